"""Stage `validate`: the data contract (a Great Expectations suite) over the clean records
(what `hygiene` kept), with expectations on what they represent (categories, languages).

Runs as `python -m tasks.validate` (the dvc.yaml stage) and as `validate_task` in Prefect flows.
A broken contract raises `DataValidationError` naming each failed expectation and the offending
rows as `source:line`, so nothing downstream trains on bad data.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retune import artifacts
from retune.artifacts import (
    CLEAN_MANIFEST,
    CLEAN_RECORDS,
    HYGIENE_CHART,
    HYGIENE_REPORT,
    VALIDATE_DOCS,
    VALIDATE_REPORT,
)
from retune.config import Params, RepresentationParams, ValidateParams
from retune.data.gx_batches import (
    BATCH_ROWS,
    ExpectationOutcome,
    Records,
    gx_context,
    suite_outcomes,
    validate_in_batches,
)
from retune.data.pii import PLACEHOLDERS, WORDS
from retune.data.pii_expectation import pii_expectation, pii_in
from retune.data.records import ROLE_ORDER_REGEX
from retune.data.representation_suite import representation_outcomes
from retune.entry import stage_main, stage_task
from retune.env import configure_environment
from retune.errors import DataValidationError

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa
    from great_expectations.expectations import Expectation

SUITE_NAME = "retune_records"
# Columns the suite reads, plus those that locate an offending row for the user.
REQUIRED_COLUMNS = ("id", "roles", "text", "source", "line")
_PII_WORDS = WORDS


@dataclass(frozen=True)
class CheckResult:
    success: bool
    n_records: int
    expectations: tuple[ExpectationOutcome, ...]
    docs_index: Path | None  # Data Docs index.html, when a docs folder was given

    @property
    def failed(self) -> tuple[ExpectationOutcome, ...]:
        return tuple(e for e in self.expectations if not e.success)


@dataclass(frozen=True)
class ValidateResult:
    success: bool
    report: Path
    docs: Path
    failed: tuple[str, ...]
    run_id: str | None


def build_suite(
    cfg: ValidateParams, redact: tuple[str, ...], loss_on: str | None = None
) -> list[Expectation]:
    """The data contract as GX expectations; `meta["name"]` is retune's name for each. With
    `loss_on="replies"` (train.loss_on) every record must give the loss something to train on."""
    import great_expectations as gx

    ge = gx.expectations
    suite: list[Expectation] = [
        ge.ExpectTableRowCountToBeBetween(
            min_value=cfg.min_examples,
            meta={"name": "min_examples"},
            description=(
                f"At least {cfg.min_examples} examples. For a small corpus of your own, lower "
                "validate.min_examples in params.yaml."
            ),
        ),
        ge.ExpectColumnValuesToNotBeNull(
            column="text",
            meta={"name": "text_not_null"},
            description="Every record has text.",
        ),
        ge.ExpectColumnValueLengthsToBeBetween(
            column="text",
            min_value=cfg.min_chars,
            max_value=cfg.max_chars,
            meta={"name": "text_length"},
            description=(
                f"Every text is {cfg.min_chars} to {cfg.max_chars} characters long "
                "(validate.min_chars, validate.max_chars)."
            ),
        ),
        ge.ExpectColumnValuesToBeUnique(
            column="id",
            meta={"name": "unique_id"},
            description="Every record is unique (no conversation appears twice).",
        ),
        ge.ExpectColumnValuesToMatchRegex(
            column="roles",
            regex=ROLE_ORDER_REGEX,
            meta={"name": "role_order"},
            description=(
                "Roles are in a sane order: an optional system turn, then user and assistant "
                "alternating from the user; or one plain text document."
            ),
        ),
    ]
    if loss_on == "replies":
        suite.append(
            ge.ExpectColumnValuesToBeBetween(
                column="n_trained",
                min_value=1,
                meta={"name": "trains_on_a_reply"},
                description=(
                    "Every conversation has an assistant reply to train on (one of weight 1 or "
                    "none), as train.loss_on: replies trains only on replies."
                ),
            )
        )
    no_pii: Any = pii_expectation()  # a class GX creates on first use: fields unknown to mypy
    for kind in redact:
        suite.append(
            no_pii(
                column="text",
                kind=kind,
                meta={"name": f"no_{kind}"},
                description=(
                    f"No text still contains {_PII_WORDS.get(kind, kind)} after redaction "
                    f"(ingest.redact lists {kind}; the same detector as ingest's, "
                    "retune.data.pii)."
                ),
            )
        )
    return suite


def check(
    records: pa.Table | pd.DataFrame | Path,
    cfg: ValidateParams,
    redact: tuple[str, ...],
    docs_dir: Path | None = None,
    run_name: str = "validate",
    batch_rows: int = BATCH_ROWS,
    representation: RepresentationParams | None = None,
    loss_on: str | None = None,
) -> CheckResult:
    """Run the suite over `records` (a table, a frame, or a records Parquet file) in an
    ephemeral GX context; if `docs_dir` is given, replace it with the Data Docs HTML of this run
    (titled `run_name`). Writes nothing else.

    Row-by-row expectations see `batch_rows` records at a time, their counts summed into one
    result; the others (row count, uniqueness) see the key columns of every record at once. So
    memory follows the batch, not the corpus, and the outcome is the same as in one pass.

    With `representation` (the `representation` section), the categories and languages the records
    represent are checked too (see `representation_outcomes`). With `loss_on` (train.loss_on),
    "replies" checks every record has a reply to train on."""
    source = Records(records)
    required = [*REQUIRED_COLUMNS, *(["n_trained"] if loss_on == "replies" else [])]
    missing = [c for c in required if c not in source.columns]
    if missing:
        raise DataValidationError(
            f"records lack the column(s) {', '.join(missing)}; they are not the prepared "
            "records that ingest writes (run ingest again)"
        )
    expectations = build_suite(cfg, redact, loss_on)
    context = gx_context(docs_dir)
    suite_result, rows = validate_in_batches(
        context,
        source,
        SUITE_NAME,
        expectations,
        cfg.failed_rows_shown,
        run_name,
        batch_rows,
        after_batch=pii_in.cache_clear,
    )
    outcomes = suite_outcomes(
        expectations,
        suite_result,
        rows,
        lambda name, count, observed, error: _problem(name, count, observed, cfg, error),
    )
    if representation is not None:
        outcomes += representation_outcomes(
            context, source, representation, cfg.failed_rows_shown, run_name
        )
    docs_index = None
    if docs_dir is not None:
        shutil.rmtree(docs_dir, ignore_errors=True)  # an index of this run only, not stale ones
        context.build_data_docs(site_names=["retune"])
        docs_index = docs_dir / "index.html"
    return CheckResult(
        success=all(o.success for o in outcomes),
        n_records=source.num_rows,
        expectations=outcomes,
        docs_index=docs_index,
    )


def _problem(
    name: str, count: int | None, observed: Any, cfg: ValidateParams, error: str | None
) -> str:
    if error:
        return f"could not be checked: {error}"
    n = f"{count} record(s)"
    if name == "min_examples":
        return (
            f"too few examples: {observed} record(s), validate.min_examples is "
            f"{cfg.min_examples}; add data, or for a small corpus lower validate.min_examples "
            "in params.yaml"
        )
    if name == "text_not_null":
        return f"{n} have no text"
    if name == "text_length":
        return (
            f"{n} have text outside {cfg.min_chars}..{cfg.max_chars} characters "
            "(validate.min_chars, validate.max_chars)"
        )
    if name == "unique_id":
        return f"{n} are duplicates: the same conversation appears more than once"
    if name == "role_order":
        return (
            f"{n} have roles out of order (expected an optional system turn, then user and "
            "assistant alternating from the user, or one text document)"
        )
    if name == "trains_on_a_reply":
        return (
            f"{n} give train nothing to train on under train.loss_on: replies (no assistant "
            "reply, or every reply has weight 0): add a reply or a weight 1, remove them from "
            "the input, or set train.loss_on: all"
        )
    if name.startswith("no_"):
        kind = name[3:]
        what = _PII_WORDS.get(kind, kind)
        return (
            f"{n} still contain {what} after redaction (ingest.redact lists {kind}): run ingest "
            f"again, which replaces it with {PLACEHOLDERS.get(kind, kind)}, or remove it from the "
            "input"
        )
    return f"{n} failed"


def error_message(result: CheckResult, report: Path | None = None) -> str:
    """Plain words for a failed check: each failed expectation and a few offending rows."""
    failed = result.failed
    lines = [
        f"the prepared data broke the data contract: {len(failed)} of "
        f"{len(result.expectations)} expectations failed on {result.n_records} records"
    ]
    for outcome in failed:
        lines.append(f"  {outcome.name}: {outcome.problem}")
        lines.extend(f"    {row.where()}: {row.snippet}" for row in outcome.rows)
    if report is not None:
        where = f"details in {report}"
        if result.docs_index is not None:
            where += f" and {result.docs_index}"
        lines.append(where)
    return "\n".join(lines)


def report_dict(result: CheckResult, data_version: str | None) -> dict[str, Any]:
    return {
        "success": result.success,
        "data_version": data_version,
        "n_records": result.n_records,
        "failed": [o.name for o in result.failed],
        "expectations": [
            {
                "name": o.name,
                "type": o.type,
                "column": o.column,
                "success": o.success,
                "problem": None if o.success else o.problem,
                "unexpected_count": o.unexpected_count,
                "unexpected_percent": o.unexpected_percent,
                "observed_value": o.observed_value,
                "failed_rows": [
                    {"source": r.source, "line": r.line, "id": r.id, "snippet": r.snippet}
                    for r in o.rows
                ],
            }
            for o in result.expectations
        ],
    }


def run(params: Params) -> ValidateResult:
    """Edge: check the clean records, write reports/validate.json and reports/validate_docs/,
    log both (and hygiene's representation report and chart) to an MLflow run named
    "validate"; raise DataValidationError if the contract broke.
    """
    configure_environment()  # before GX and MLflow load: analytics off
    import mlflow
    import pyarrow.parquet as pq

    from retune.release.tracking import setup_tracking

    records = CLEAN_RECORDS.require(params)
    print(f"validate: checking {pq.ParquetFile(records).metadata.num_rows} records", flush=True)
    docs_dir = VALIDATE_DOCS.path(params)
    data_version = artifacts.data_version(CLEAN_MANIFEST, params)
    result = check(
        records,
        params.validate,
        tuple(params.ingest.redact),
        docs_dir=docs_dir,
        run_name=f"data {data_version[:12]}" if data_version else "validate",
        representation=params.representation,
        loss_on=params.train.loss_on,
    )
    report = VALIDATE_REPORT.write(params, report_dict(result, data_version))
    failed = tuple(o.name for o in result.failed)
    print(
        f"validate: {len(result.expectations) - len(failed)}/{len(result.expectations)} "
        f"expectations passed" + (f"; failed: {', '.join(failed)}" if failed else ""),
        flush=True,
    )

    setup_tracking(params.tracking)
    with mlflow.start_run(run_name="validate") as active:
        if data_version is not None:
            mlflow.set_tag("data_version", data_version)
        mlflow.log_params({f"validate.{k}": v for k, v in asdict(params.validate).items()})
        mlflow.log_metrics(
            {
                "validation_success": float(result.success),
                "n_records": float(result.n_records),
                "failed_expectations": float(len(failed)),
            }
        )
        mlflow.log_artifact(str(report), artifact_path="validation")
        mlflow.log_artifacts(str(docs_dir), artifact_path="validation/validate_docs")
        # The hygiene stage's representation report and chart, next to the contract's.
        for facts in (HYGIENE_REPORT, HYGIENE_CHART):
            if facts.path(params).is_file():
                mlflow.log_artifact(str(facts.path(params)), artifact_path="validation")
        if not result.success:
            # Raised inside the run, so MLflow records the run as FAILED.
            raise DataValidationError(error_message(result, report))
    return ValidateResult(
        success=True,
        report=report,
        docs=docs_dir,
        failed=failed,
        run_id=active.info.run_id,
    )


validate_task = stage_task(run, name="validate")

if __name__ == "__main__":
    stage_main(run)
