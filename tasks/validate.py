"""Stage `validate`: the data contract (a Great Expectations suite) over the clean records
(what `hygiene` kept), with expectations on what they represent (categories, languages).

Runs as `python -m tasks.validate` (the dvc.yaml stage) and as `validate_task` in Prefect flows.
A broken contract raises `DataValidationError` naming each failed expectation and the offending
rows as `source:line`, so nothing downstream trains on bad data.
"""

from __future__ import annotations

import logging
import re
import shutil
import warnings
from collections.abc import Iterator
from copy import copy
from dataclasses import asdict, dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retune.config import HygieneParams, Params, ValidateParams
from retune.data.pii import KINDS, PLACEHOLDERS, WORDS
from retune.data.pii import kinds_in as pii_kinds_in
from retune.data.pii import redact as redact_pii
from retune.data.records import ROLE_ORDER_REGEX
from retune.entry import stage_main, stage_task
from retune.env import configure_environment
from retune.errors import DataValidationError, MissingInputError
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
# Records per pass of the row-by-row expectations: a pandas frame of them costs ~3 KB each in
# GX, so 1M records at once took 3.2 GB; 50k keep the stage near its import footprint.
BATCH_ROWS = 50_000
_BATCH_ID = "records-prepared"  # how the Data Docs name the checked data
_PII_WORDS = WORDS


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


@cache  # cleared after each batch (`_validate`)
def _pii_in(text: str) -> frozenset[str]:
    """Every kind's detector, run once per text: the suite's seven per-kind expectations all
    ask this (one pass instead of seven took validate of 1M records from 50.7 s to 45.1 s)."""
    return pii_kinds_in(text)


@lru_cache(maxsize=1)
def pii_expectation() -> type[Expectation]:
    """`ExpectColumnValuesToHoldNoPii(column=, kind=)`: a GX expectation that runs ingest's own
    detector (retune.data.pii.find) on every value. A regular expression cannot check a Luhn digit,
    an IBAN checksum or a phone number's validity, so `validate` would disagree with `ingest`.
    Defined on first use (GX registers it then), so importing this module stays light."""
    from typing import ClassVar

    from great_expectations.execution_engine import PandasExecutionEngine
    from great_expectations.expectations.expectation import ColumnMapExpectation
    from great_expectations.expectations.metrics.map_metric_provider import (
        ColumnMapMetricProvider,
        column_condition_partial,
    )

    class ColumnValuesHoldNoPii(ColumnMapMetricProvider):  # registered by GX on creation
        condition_metric_name = "column_values.retune_hold_no_pii"
        condition_value_keys = ("kind",)

        @column_condition_partial(engine=PandasExecutionEngine)  # type: ignore[misc]
        def _pandas(cls, column: pd.Series, kind: str, **kwargs: Any) -> pd.Series:
            return column.map(lambda text: not isinstance(text, str) or kind not in _pii_in(text))

    class ExpectColumnValuesToHoldNoPii(ColumnMapExpectation):
        """Expect no value to hold personal data or a secret of `kind` (see retune.data.pii)."""

        kind: str
        map_metric = "column_values.retune_hold_no_pii"
        success_keys = ("kind", "mostly")
        args_keys = ("column", "kind")
        library_metadata: ClassVar[dict[str, Any]] = {
            "maturity": "production",
            "tags": ["retune", "pii"],
            "contributors": ["retune"],
        }

    return ExpectColumnValuesToHoldNoPii


def check(
    records: pa.Table | pd.DataFrame | Path,
    cfg: ValidateParams,
    redact: tuple[str, ...],
    docs_dir: Path | None = None,
    run_name: str = "validate",
    batch_rows: int = BATCH_ROWS,
    representation: HygieneParams | None = None,
) -> CheckResult:
    """Run the suite over `records` (a table, a frame, or a records Parquet file) in an
    ephemeral GX context; if `docs_dir` is given, replace it with the Data Docs HTML of this run
    (titled `run_name`). Writes nothing else.

    Row-by-row expectations see `batch_rows` records at a time, their counts summed into one
    result; the others (row count, uniqueness) see the key columns of every record at once. So
    memory follows the batch, not the corpus, and the outcome is the same as in one pass.

    With `representation` (the hygiene settings), the categories and languages the records
    represent are checked too (see `representation_outcomes`)."""
    source = _Records(records)
    missing = [c for c in REQUIRED_COLUMNS if c not in source.columns]
    if missing:
        raise DataValidationError(
            f"records lack the column(s) {', '.join(missing)}; they are not the prepared "
            "records that ingest writes (run ingest again)"
        )
    expectations = build_suite(cfg, redact)
    context = _context(docs_dir)
    suite_result, rows = _validate(
        context, source, expectations, cfg.failed_rows_shown, run_name, batch_rows
    )
    order = [(e.meta or {}).get("name") for e in expectations]  # GX returns its own order
    outcomes = tuple(
        sorted(
            (
                _outcome(r.expectation_config, r, rows[i], cfg)
                for i, r in enumerate(suite_result.results)
            ),
            key=lambda o: order.index(o.name) if o.name in order else len(order),
        )
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


class _Records:
    """The records `check` reads: whole columns, batches of rows, or the rows of some ids.

    A Parquet file is read a batch at a time; the nested messages are never read (not checked
    here, and the costly part to convert)."""

    def __init__(self, records: pa.Table | pd.DataFrame | Path) -> None:
        import pandas as pd
        import pyarrow.parquet as pq

        self.records = records
        if isinstance(records, Path):
            self.file = pq.ParquetFile(records)
            self.columns = [c for c in self.file.schema_arrow.names if c != "messages"]
            self.num_rows = self.file.metadata.num_rows
        elif isinstance(records, pd.DataFrame):
            self.columns = [c for c in records.columns if c != "messages"]
            self.num_rows = len(records)
        else:
            self.columns = [c for c in records.column_names if c != "messages"]
            self.num_rows = records.num_rows

    def frame(self, columns: list[str]) -> pd.DataFrame:
        """Every record, these columns only."""
        import pandas as pd
        import pyarrow.parquet as pq

        cols = [c for c in self.columns if c in columns]
        if isinstance(self.records, Path):
            return pq.read_table(self.records, columns=cols).to_pandas()
        if isinstance(self.records, pd.DataFrame):
            return self.records[cols].reset_index(drop=True)
        return self.records.select(cols).to_pandas()

    def batches(self, columns: list[str], size: int) -> Iterator[pd.DataFrame]:
        """Consecutive frames of at most `size` records; at least one, even when empty."""
        import pandas as pd
        import pyarrow as pa

        cols = [c for c in self.columns if c in columns]
        if self.num_rows == 0:
            yield self.frame(cols)
        elif isinstance(self.records, Path):
            for batch in self.file.iter_batches(batch_size=size, columns=cols):
                yield pa.Table.from_batches([batch]).to_pandas()
        elif isinstance(self.records, pd.DataFrame):
            for start in range(0, self.num_rows, size):
                yield self.records[cols].iloc[start : start + size].reset_index(drop=True)
        else:
            for start in range(0, self.num_rows, size):
                yield self.records.select(cols).slice(start, size).to_pandas()

    def with_ids(self, ids: set[str]) -> pd.DataFrame:
        """The records with these ids (to show offending rows found in the key columns)."""
        import pandas as pd
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        cols = [c for c in ("source", "line", "id", "text") if c in self.columns]
        wanted = sorted(ids)
        if isinstance(self.records, Path):
            found = pq.read_table(self.records, columns=cols, filters=[("id", "in", wanted)])
            return found.to_pandas()
        if isinstance(self.records, pd.DataFrame):
            df = self.records[cols]
            return df[df["id"].isin(wanted)].reset_index(drop=True)
        table = self.records.select(cols)
        id_type = table.schema.field("id").type
        return table.filter(pc.is_in(table["id"], pa.array(wanted, type=id_type))).to_pandas()


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


# Map expectations that compare rows with each other: they need the whole column at once.
_CROSS_ROW = frozenset(
    {
        "expect_column_values_to_be_unique",
        "expect_compound_columns_to_be_unique",
        "expect_column_values_to_be_increasing",
        "expect_column_values_to_be_decreasing",
    }
)


def _row_local(expectation: Expectation) -> bool:
    """Whether each record passes or fails on its own (so batches can be checked apart)."""
    from great_expectations.expectations.expectation import (
        ColumnMapExpectation,
        ColumnPairMapExpectation,
        MulticolumnMapExpectation,
    )

    map_types = (ColumnMapExpectation, ColumnPairMapExpectation, MulticolumnMapExpectation)
    return isinstance(expectation, map_types) and expectation.expectation_type not in _CROSS_ROW


def _columns(expectations: list[Expectation]) -> list[str]:
    """The columns these expectations read, plus those that locate a row."""
    cols = list(_ROW_KEYS)
    for e in expectations:
        kwargs = e.configuration.kwargs
        named = [kwargs.get(k) for k in ("column", "column_A", "column_B")]
        for c in [*named, *(kwargs.get("column_list") or ())]:
            if isinstance(c, str) and c not in cols:
                cols.append(c)
    return cols


def _validate(
    context: Any,
    source: _Records,
    expectations: list[Expectation],
    rows_shown: int,
    run_name: str,
    batch_rows: int,
) -> tuple[ExpectationSuiteValidationResult, list[tuple[OffendingRow, ...]]]:
    """Validate `source` in passes (see `check`); return one suite result, stored in the
    context for the Data Docs, and each result's offending rows (same order)."""
    import great_expectations as gx

    batch_definition = (
        context.data_sources.add_pandas("records")
        .add_dataframe_asset("prepared")
        .add_batch_definition_whole_dataframe("all records")
    )
    suite = context.suites.add(gx.ExpectationSuite(name=SUITE_NAME, expectations=expectations))
    result_format = {
        "result_format": "SUMMARY",
        "partial_unexpected_count": max(rows_shown, 1),
        "unexpected_index_column_names": _ROW_KEYS,
        "exclude_unexpected_values": True,
    }

    def validate(df: pd.DataFrame, subset: list[Expectation]) -> list[Any]:
        if not subset:
            return []
        batch = batch_definition.get_batch(batch_parameters={"dataframe": df})
        with warnings.catch_warnings():
            # pandas warns that the role-order regex has groups it will not extract; it need not.
            warnings.filterwarnings("ignore", "This pattern is interpreted", UserWarning)
            piece = batch.validate(
                # Copies: an expectation belongs to one suite, the full one the docs show.
                gx.ExpectationSuite(name=SUITE_NAME, expectations=[copy(e) for e in subset]),
                result_format=result_format,
            )
        return list(piece.results)

    whole = [e for e in suite.expectations if not _row_local(e)]
    local = [e for e in suite.expectations if _row_local(e)]
    results: list[Any] = validate(source.frame(_columns(whole)), whole)
    # Rows found in the key columns alone are looked up again for their text.
    keys = [_index_triples((r.result or {}).get("partial_unexpected_index_list")) for r in results]
    shown = {str(t[2]) for k in keys for t in k[:rows_shown]}
    lookup = source.with_ids(shown) if shown else None
    rows = [_offending_rows(k, lookup, rows_shown) if lookup is not None else () for k in keys]

    parts: list[list[Any]] = [[] for _ in local]
    local_rows: list[list[OffendingRow]] = [[] for _ in local]
    for df in source.batches([*_columns(local), "text"], batch_rows):
        try:
            batch_results = validate(df, local)
        finally:
            _pii_in.cache_clear()  # memory follows the batch
        for i, r in enumerate(batch_results):
            parts[i].append(r)
            if len(local_rows[i]) < rows_shown:
                found = _index_triples((r.result or {}).get("partial_unexpected_index_list"))
                local_rows[i].extend(_offending_rows(found, df, rows_shown - len(local_rows[i])))
    results += [_merge(p, rows_shown) for p in parts]
    rows += [tuple(r) for r in local_rows]
    return _store(context, suite, results, run_name), rows


def _merge(parts: list[Any], rows_shown: int) -> Any:
    """One map expectation's results over consecutive batches as one result: counts summed,
    percentages recomputed, the first offending rows kept, `mostly` applied to the whole."""
    from great_expectations.core import ExpectationValidationResult

    first = parts[0]
    if len(parts) == 1:
        return first
    info = dict(first.result or {})
    for key in ("element_count", "unexpected_count", "missing_count"):
        if key in info:
            info[key] = sum(int((p.result or {}).get(key) or 0) for p in parts)
    elements, unexpected = info.get("element_count", 0), info.get("unexpected_count", 0)
    present = elements - info.get("missing_count", 0)
    if "unexpected_percent" in info:
        info["unexpected_percent"] = 100.0 * unexpected / present if present else None
    if "unexpected_percent_nonmissing" in info:
        info["unexpected_percent_nonmissing"] = info["unexpected_percent"]
    if "unexpected_percent_total" in info:
        info["unexpected_percent_total"] = 100.0 * unexpected / elements if elements else None
    if "missing_percent" in info:
        info["missing_percent"] = 100.0 * info["missing_count"] / elements if elements else None
    if "partial_unexpected_index_list" in info:
        kept = [
            t
            for p in parts
            for t in _index_triples((p.result or {}).get("partial_unexpected_index_list"))
        ][:rows_shown]
        info["partial_unexpected_index_list"] = (
            [{k: [t[j] for t in kept] for j, k in enumerate(_ROW_KEYS)}] if kept else []
        )
    raised = [p for p in parts if _exception_message(p.exception_info)]
    mostly = first.expectation_config.kwargs.get("mostly")
    if raised:
        success = False
    elif mostly is None:
        success = all(p.success for p in parts)
    else:
        success = present == 0 or (present - unexpected) / present >= float(mostly)
    return ExpectationValidationResult(
        success=success,
        expectation_config=first.expectation_config,
        result=info,
        exception_info=(raised[0] if raised else first).exception_info,
        meta=first.meta,
    )


def _store(
    context: Any, suite: Any, results: list[Any], run_name: str
) -> ExpectationSuiteValidationResult:
    """The suite's result from its passes, kept in the context's store (what Data Docs show)."""
    import datetime

    from great_expectations import __version__
    from great_expectations.core import ExpectationSuiteValidationResult
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.resource_identifiers import (
        ExpectationSuiteIdentifier,
        ValidationResultIdentifier,
    )
    from great_expectations.validator.validation_statistics import calc_validation_statistics

    run_id = RunIdentifier(run_name=run_name, run_time=datetime.datetime.now(datetime.UTC))
    stats = calc_validation_statistics(results)
    suite_result = ExpectationSuiteValidationResult(
        results=results,
        success=stats.success,
        suite_name=suite.name,
        statistics={
            "evaluated_expectations": stats.evaluated_expectations,
            "successful_expectations": stats.successful_expectations,
            "unsuccessful_expectations": stats.unsuccessful_expectations,
            "success_percent": stats.success_percent,
        },
        meta={
            "great_expectations_version": __version__,
            "run_id": run_id,
            "validation_time": run_id.run_time,
            "batch_parameters": {"dataframe": "prepared records"},
        },
        batch_id=_BATCH_ID,
    )
    suite_id = ExpectationSuiteIdentifier(name=suite.name)
    context.validation_results_store.store_validation_results(
        suite_validation_result=suite_result,
        suite_validation_result_identifier=ValidationResultIdentifier(
            batch_identifier=_BATCH_ID, expectation_suite_identifier=suite_id, run_id=run_id
        ),
        expectation_suite_identifier=suite_id,
    )
    return suite_result


def _outcome(
    config: Any, result: Any, rows: tuple[OffendingRow, ...], cfg: ValidateParams
) -> ExpectationOutcome:
    name = (config.meta or {}).get("name", config.type)
    column = config.kwargs.get("column")
    info = result.result or {}
    count = info.get("unexpected_count")
    percent = info.get("unexpected_percent")
    observed = info.get("observed_value")
    error = _exception_message(result.exception_info)
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


def _index_triples(index_list: Any) -> list[tuple[Any, Any, Any]]:
    """GX's offending-row keys as (source, line, id); with exclude_unexpected_values GX returns
    one dict of key lists, else a dict per row."""
    if not index_list:
        return []
    if (
        isinstance(index_list, list)
        and len(index_list) == 1
        and isinstance(index_list[0].get("id"), list)
    ):
        keys = index_list[0]
        return list(zip(keys["source"], keys["line"], keys["id"], strict=True))
    return [(k["source"], k["line"], k["id"]) for k in index_list]


def _offending_rows(
    triples: list[tuple[Any, Any, Any]], df: pd.DataFrame, limit: int
) -> tuple[OffendingRow, ...]:
    """Join offending-row keys back to the frame for a masked text snippet."""
    if not triples or limit <= 0:
        return ()
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
    masked, _ = redact_pii(text, KINDS)
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


# What the records represent is checked on two small derived frames (one row per category;
# one per sampled record with its detected language), as a second suite of the same context,
# so the Data Docs show it next to the contract.
REPRESENTATION_SUITE = "retune_representation"


def _column(source: _Records, name: str) -> pa.Array:
    """One whole column of the records as Arrow."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    if isinstance(source.records, Path):
        return pq.read_table(source.records, columns=[name]).column(name).combine_chunks()
    if isinstance(source.records, pd.DataFrame):
        return pa.Array.from_pandas(source.records[name])
    return source.records.column(name).combine_chunks()


def representation_frames(
    source: _Records, hyg: HygieneParams
) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """(categories, languages): each category of meta[hygiene.category_field] with its count
    and share of the records that have one (None when none has one, or the check is off); and
    the language sample (hygiene.language_sample records, fixed by id) with each record's
    detected language (None when no language is expected)."""
    import pandas as pd
    import pyarrow.compute as pc

    from retune.data import representation as rep

    categories = None
    if hyg.min_category_share > 0 and "meta" in source.columns and source.num_rows:
        values = rep.category_values(_column(source, "meta"), hyg.category_field)
        counts = pc.value_counts(values.drop_null())
        if len(counts):
            n = pc.sum(counts.field("counts")).as_py()
            categories = pd.DataFrame(
                {
                    "category": counts.field("values").to_pylist(),
                    "records": counts.field("counts").to_pylist(),
                }
            )
            categories["share"] = categories["records"] / n
            categories = categories.sort_values(["share", "category"]).reset_index(drop=True)
    languages = None
    if hyg.languages and source.num_rows:
        ids = _column(source, "id")
        sampled = ids.take(rep.sample_indices(ids, hyg.language_sample)).to_pylist()
        languages = source.with_ids(set(sampled)).sort_values(["source", "line"])
        languages = languages.reset_index(drop=True)
        languages["language"] = rep.detect_languages([t or "" for t in languages["text"]])
    return categories, languages


def representation_suite(
    hyg: HygieneParams, categories: pd.DataFrame | None, languages: pd.DataFrame | None
) -> list[tuple[Expectation, str]]:
    """The representation expectations, each with the frame it reads ("categories" or
    "languages"); `meta["name"]` is retune's name for each."""
    import great_expectations as gx

    ge = gx.expectations
    out: list[tuple[Expectation, str]] = []
    if categories is not None:
        field = hyg.category_field
        out.append(
            (
                ge.ExpectColumnValuesToBeBetween(
                    column="share",
                    min_value=hyg.min_category_share,
                    meta={"name": "category_share"},
                    description=(
                        f"Every category (meta.{field}) holds at least "
                        f"{hyg.min_category_share:.1%} of the records that have one "
                        "(hygiene.min_category_share)."
                    ),
                ),
                "categories",
            )
        )
    if languages is not None:
        out.append(
            (
                ge.ExpectColumnValuesToBeInSet(
                    column="language",
                    value_set=list(hyg.languages),
                    mostly=hyg.min_language_share,
                    meta={"name": "language_share"},
                    description=(
                        f"At least {hyg.min_language_share:.0%} of {len(languages)} sampled "
                        f"records are in {', '.join(hyg.languages)} (hygiene.languages, "
                        "hygiene.min_language_share, hygiene.language_sample)."
                    ),
                ),
                "languages",
            )
        )
    return out


def representation_outcomes(
    context: Any, source: _Records, hyg: HygieneParams, rows_shown: int, run_name: str
) -> tuple[ExpectationOutcome, ...]:
    """Check what the records represent; the results are stored for the Data Docs as the
    suite REPRESENTATION_SUITE."""
    import great_expectations as gx

    categories, languages = representation_frames(source, hyg)
    expectations = representation_suite(hyg, categories, languages)
    if not expectations:
        return ()
    frames = {"categories": categories, "languages": languages}
    keys = {"categories": ["category"], "languages": _ROW_KEYS}
    data = context.data_sources.add_pandas("representation")
    suite = context.suites.add(
        gx.ExpectationSuite(name=REPRESENTATION_SUITE, expectations=[e for e, _ in expectations])
    )
    results, outcomes = [], []
    for expectation, frame in zip(suite.expectations, (f for _, f in expectations), strict=True):
        df = frames[frame]
        batch = (
            data.add_dataframe_asset(frame)
            .add_batch_definition_whole_dataframe(frame)
            .get_batch(batch_parameters={"dataframe": df})
        )
        result = batch.validate(
            gx.ExpectationSuite(name=REPRESENTATION_SUITE, expectations=[copy(expectation)]),
            result_format={
                "result_format": "SUMMARY",
                "partial_unexpected_count": max(rows_shown, 1),
                "unexpected_index_column_names": keys[frame],
                "exclude_unexpected_values": True,
            },
        ).results[0]
        results.append(result)
        outcomes.append(_representation_outcome(result, df, hyg, rows_shown))
    _store(context, suite, results, run_name)
    return tuple(outcomes)


def _representation_outcome(
    result: Any, df: pd.DataFrame, hyg: HygieneParams, rows_shown: int
) -> ExpectationOutcome:
    config = result.expectation_config
    name = config.meta["name"]
    info = result.result or {}
    error = _exception_message(result.exception_info)
    rows: tuple[OffendingRow, ...] = ()
    if name == "category_share":
        shares = dict(zip(df["category"], df["share"], strict=True))
        observed: Any = {str(k): round(float(v), 6) for k, v in shares.items()}
        total = int(df["records"].sum())
        rare = df[df["share"] < hyg.min_category_share]
        problem = "; ".join(
            f"category {r.category!r} holds {r.share:.2%} ({r.records} of the {total} records "
            f"with a meta.{hyg.category_field})"
            for r in rare.itertuples()
        )
        problem += (
            f", under hygiene.min_category_share={hyg.min_category_share:.1%}: add examples of "
            "it, merge it into a related category, or lower hygiene.min_category_share in "
            "params.yaml"
        )
    else:
        counts = df["language"].value_counts()
        observed = {str(k): int(v) for k, v in counts.items()}
        inside = int(df["language"].isin(list(hyg.languages)).sum())
        share = inside / len(df) if len(df) else 1.0
        others = ", ".join(f"{k} {v}" for k, v in counts.items() if k not in set(hyg.languages))
        problem = (
            f"only {share:.1%} of {len(df)} sampled records are in "
            f"{', '.join(hyg.languages)} (hygiene.min_language_share="
            f"{hyg.min_language_share:.0%}); others: {others or 'none'}. Add the language to "
            "hygiene.languages if it belongs, or remove those records"
        )
        found = _index_triples(info.get("partial_unexpected_index_list"))
        rows = _offending_rows(found, df, rows_shown)
    count = info.get("unexpected_count")
    percent = info.get("unexpected_percent")
    return ExpectationOutcome(
        name=name,
        type=config.type,
        column=config.kwargs.get("column"),
        success=bool(result.success),
        problem=f"could not be checked: {error}" if error else problem,
        unexpected_count=None if count is None else int(count),
        unexpected_percent=None if percent is None else float(percent),
        observed_value=observed,
        rows=rows,
    )


def _data_version(prepared: Path) -> str | None:
    manifest = prepared / "manifest.json"
    if not manifest.exists():
        return None
    version = read_json(manifest).get("data_version")
    return None if version is None else str(version)


def run(params: Params) -> ValidateResult:
    """Edge: check the clean records, write reports/validate.json and reports/validate_docs/,
    log both (and hygiene's representation report and chart) to an MLflow run named
    "validate"; raise DataValidationError if the contract broke.
    """
    configure_environment()  # before GX and MLflow load: analytics off
    import mlflow
    import pyarrow.parquet as pq

    from retune.release.tracking import setup_tracking

    clean = params.paths.clean
    records = clean / "records.parquet"
    if not records.exists():
        raise MissingInputError(records, "hygiene")
    print(f"validate: checking {pq.ParquetFile(records).metadata.num_rows} records", flush=True)
    docs_dir = params.paths.reports / "validate_docs"
    data_version = _data_version(clean)
    result = check(
        records,
        params.validate,
        tuple(params.ingest.redact),
        docs_dir=docs_dir,
        run_name=f"data {data_version[:12]}" if data_version else "validate",
        representation=params.hygiene,
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
        # The hygiene stage's representation report and chart, next to the contract's.
        for name in ("hygiene.json", "hygiene.png"):
            if (params.paths.reports / name).exists():
                mlflow.log_artifact(str(params.paths.reports / name), artifact_path="validation")
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
