"""Stage `validate`: the data contract (a Great Expectations suite) over the prepared records.

Runs as `python -m tasks.validate` (the dvc.yaml stage) and as `validate_task` in Prefect flows.
A broken contract raises `DataValidationError` naming each failed expectation and the offending
rows as `source:line`, so nothing downstream trains on bad data.
"""

from __future__ import annotations

import logging
import re
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retune.config import Params, ValidateParams
from retune.entry import stage_main, stage_task
from retune.env import configure_environment
from retune.errors import DataValidationError
from retune.pii import PATTERNS
from retune.pii import redact as redact_pii
from retune.records import ROLE_ORDER_REGEX, SCHEMA, read_records
from retune.reports import read_json, write_json

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa
    from great_expectations.core import ExpectationSuiteValidationResult
    from great_expectations.expectations import Expectation

SUITE_NAME = "retune_records"
# Columns the suite reads, plus those that locate an offending row for the user.
REQUIRED_COLUMNS = ("id", "roles", "text", "source", "line")
# GX lists offending rows by these columns; their values never include the text itself, so
# residual personal data does not end up in the Data Docs or in MLflow.
_ROW_KEYS = ["source", "line", "id"]
_SNIPPET_CHARS = 60
_PII_WORDS = {"email": "an e-mail address", "phone": "a phone number"}


@dataclass(frozen=True)
class OffendingRow:
    source: str
    line: int
    id: str
    snippet: str  # start of the text, personal data masked

    def where(self) -> str:
        return f"{self.source}:{self.line}"


@dataclass(frozen=True)
class ExpectationOutcome:
    name: str  # retune's short name, e.g. "unique_id"
    type: str  # the GX expectation type
    column: str | None
    success: bool
    problem: str  # plain words: what is wrong when it fails, with counts and the setting
    unexpected_count: int | None
    unexpected_percent: float | None
    observed_value: Any
    rows: tuple[OffendingRow, ...]


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


def build_suite(cfg: ValidateParams, redact: tuple[str, ...]) -> list[Expectation]:
    """The data contract as GX expectations; `meta["name"]` is retune's name for each."""
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
    for kind in redact:
        suite.append(
            ge.ExpectColumnValuesToNotMatchRegex(
                column="text",
                regex=PATTERNS[kind],
                meta={"name": f"no_{kind}"},
                description=(
                    f"No text still contains {_PII_WORDS.get(kind, kind)} after redaction "
                    "(ingest.redact)."
                ),
            )
        )
    return suite


def check(
    records: pa.Table | pd.DataFrame,
    cfg: ValidateParams,
    redact: tuple[str, ...],
    docs_dir: Path | None = None,
    run_name: str = "validate",
) -> CheckResult:
    """Run the suite over `records` in an ephemeral GX context; if `docs_dir` is given, replace
    it with the Data Docs HTML of this run (titled `run_name`). Writes nothing else."""
    df = _to_frame(records)
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise DataValidationError(
            f"records lack the column(s) {', '.join(missing)}; they are not the prepared "
            "records that ingest writes (run ingest again)"
        )
    expectations = build_suite(cfg, redact)
    context = _context(docs_dir)
    suite_result = _validate(context, df, expectations, cfg.failed_rows_shown, run_name)
    order = [(e.meta or {}).get("name") for e in expectations]  # GX returns its own order
    outcomes = tuple(
        sorted(
            (_outcome(r.expectation_config, r, df, cfg) for r in suite_result.results),
            key=lambda o: order.index(o.name) if o.name in order else len(order),
        )
    )
    docs_index = None
    if docs_dir is not None:
        shutil.rmtree(docs_dir, ignore_errors=True)  # an index of this run only, not stale ones
        context.build_data_docs(site_names=["retune"])
        docs_index = docs_dir / "index.html"
    return CheckResult(
        success=all(o.success for o in outcomes),
        n_records=len(df),
        expectations=outcomes,
        docs_index=docs_index,
    )


def _to_frame(records: pa.Table | pd.DataFrame) -> pd.DataFrame:
    import pandas as pd

    if not isinstance(records, pd.DataFrame):
        # The nested messages are not checked here and are the costly part to convert.
        if "messages" in records.column_names:
            records = records.drop_columns(["messages"])
        records = records.to_pandas()
    df = records.drop(columns=["messages"], errors="ignore")
    return df.reset_index(drop=True)


def _context(docs_dir: Path | None) -> Any:
    """An in-memory GX context: no progress bars, no analytics, only our docs site."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    # GX logs store and docs-site housekeeping at INFO; a stage's log is for retune's lines.
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    sites = {}
    if docs_dir is not None:
        sites["retune"] = {
            "class_name": "SiteBuilder",
            "show_how_to_buttons": False,
            "store_backend": {
                "class_name": "TupleFilesystemStoreBackend",
                "base_directory": str(Path(docs_dir).resolve()),
            },
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        }
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        data_docs_sites=sites,
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
    )
    return gx.get_context(mode="ephemeral", project_config=config)


def _validate(
    context: Any,
    df: pd.DataFrame,
    expectations: list[Expectation],
    rows_shown: int,
    run_name: str,
) -> ExpectationSuiteValidationResult:
    import great_expectations as gx
    from great_expectations.core.run_identifier import RunIdentifier

    batch_definition = (
        context.data_sources.add_pandas("records")
        .add_dataframe_asset("prepared")
        .add_batch_definition_whole_dataframe("all records")
    )
    suite = context.suites.add(gx.ExpectationSuite(name=SUITE_NAME, expectations=expectations))
    validation = context.validation_definitions.add(
        gx.ValidationDefinition(name="prepared records", data=batch_definition, suite=suite)
    )
    with warnings.catch_warnings():
        # pandas warns that the role-order regex has groups it will not extract; it need not.
        warnings.filterwarnings("ignore", "This pattern is interpreted", UserWarning)
        return validation.run(
            batch_parameters={"dataframe": df},
            result_format={
                "result_format": "SUMMARY",
                "partial_unexpected_count": max(rows_shown, 1),
                "unexpected_index_column_names": _ROW_KEYS,
                "exclude_unexpected_values": True,
            },
            run_id=RunIdentifier(run_name=run_name),
        )


def _outcome(config: Any, result: Any, df: pd.DataFrame, cfg: ValidateParams) -> ExpectationOutcome:
    name = (config.meta or {}).get("name", config.type)
    column = config.kwargs.get("column")
    info = result.result or {}
    count = info.get("unexpected_count")
    percent = info.get("unexpected_percent")
    observed = info.get("observed_value")
    error = _exception_message(result.exception_info)
    rows = _offending_rows(info.get("partial_unexpected_index_list"), df, cfg.failed_rows_shown)
    return ExpectationOutcome(
        name=name,
        type=config.type,
        column=column,
        success=bool(result.success),
        problem=_problem(name, count, observed, cfg, error),
        unexpected_count=None if count is None else int(count),
        unexpected_percent=None if percent is None else float(percent),
        observed_value=observed,
        rows=rows,
    )


def _exception_message(info: Any) -> str | None:
    """GX reports an error that stopped an expectation either flat or keyed by metric."""
    if not isinstance(info, dict):
        return None
    if info.get("raised_exception"):
        return str(info.get("exception_message"))
    for nested in info.values():
        if isinstance(nested, dict) and nested.get("raised_exception"):
            return str(nested.get("exception_message"))
    return None


def _offending_rows(index_list: Any, df: pd.DataFrame, limit: int) -> tuple[OffendingRow, ...]:
    """Join GX's offending-row keys back to the frame for a masked text snippet."""
    if not index_list or limit == 0:
        return ()
    # With exclude_unexpected_values GX returns one dict of key lists, else a dict per row.
    if (
        isinstance(index_list, list)
        and len(index_list) == 1
        and isinstance(index_list[0].get("id"), list)
    ):
        keys = index_list[0]
        triples = list(zip(keys["source"], keys["line"], keys["id"], strict=True))
    else:
        triples = [(k["source"], k["line"], k["id"]) for k in index_list]
    rows = []
    for source, line, rid in triples[:limit]:
        match = df[(df["source"] == source) & (df["line"] == line) & (df["id"] == rid)]
        text = match["text"].iloc[0] if len(match) else None
        rows.append(OffendingRow(str(source), int(line), str(rid), _snippet(text)))
    return tuple(rows)


def _snippet(text: Any) -> str:
    if not isinstance(text, str):
        return "(no text)"
    if not text:
        return "(empty text)"
    masked, _ = redact_pii(text, PATTERNS)
    flat = re.sub(r"\s+", " ", masked).strip()
    return flat if len(flat) <= _SNIPPET_CHARS else flat[: _SNIPPET_CHARS - 3] + "..."


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
    if name.startswith("no_"):
        kind = name[3:]
        what = _PII_WORDS.get(kind, kind)
        return f"{n} still contain {what} after redaction (ingest.redact lists {kind})"
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


def _data_version(prepared: Path) -> str | None:
    manifest = prepared / "manifest.json"
    if not manifest.exists():
        return None
    version = read_json(manifest).get("data_version")
    return None if version is None else str(version)


def run(params: Params) -> ValidateResult:
    """Edge: check the prepared records, write reports/validate.json and reports/validate_docs/,
    log both to an MLflow run named "validate"; raise DataValidationError if the contract broke.
    """
    configure_environment()  # before GX and MLflow load: analytics off
    import mlflow

    from retune.tracking import setup_tracking

    prepared = params.paths.prepared
    columns = [name for name in SCHEMA.names if name != "messages"]
    records = read_records(prepared / "records.parquet", columns=columns)
    print(f"validate: checking {records.num_rows} records", flush=True)
    docs_dir = params.paths.reports / "validate_docs"
    data_version = _data_version(prepared)
    result = check(
        records,
        params.validate,
        tuple(params.ingest.redact),
        docs_dir=docs_dir,
        run_name=f"data {data_version[:12]}" if data_version else "validate",
    )
    report = write_json(params.paths.reports / "validate.json", report_dict(result, data_version))
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
