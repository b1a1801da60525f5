"""Great Expectations over retune's records in batches: the records as GX reads them (whole
columns, batches of rows, the rows of some ids), an in-memory context, a suite validated a batch
at a time with the row-by-row results merged into one, the result stored for the Data Docs, and
the offending rows it names (as `source:line`, personal data masked).

Memory follows the batch, not the corpus, and the outcome is the one a single pass gives.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Callable, Iterator
from copy import copy
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retune.data.pii import KINDS
from retune.data.pii import redact as redact_pii

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa
    from great_expectations.core import ExpectationSuiteValidationResult
    from great_expectations.expectations import Expectation

# GX lists offending rows by these columns; their values never include the text itself, so
# residual personal data does not end up in the Data Docs or in MLflow.
ROW_KEYS = ["source", "line", "id"]
_SNIPPET_CHARS = 60
# Records per pass of the row-by-row expectations: a pandas frame of them costs ~3 KB each in
# GX, so 1M records at once took 3.2 GB; 50k keep a stage near its import footprint.
BATCH_ROWS = 50_000
_BATCH_ID = "records-prepared"  # how the Data Docs name the checked data


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


class Records:
    """The records a suite reads: whole columns, batches of rows, or the rows of some ids.

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

    def column(self, name: str) -> pa.Array:
        """One whole column of the records as Arrow."""
        import pandas as pd
        import pyarrow as pa
        import pyarrow.parquet as pq

        if isinstance(self.records, Path):
            return pq.read_table(self.records, columns=[name]).column(name).combine_chunks()
        if isinstance(self.records, pd.DataFrame):
            return pa.Array.from_pandas(self.records[name])
        return self.records.column(name).combine_chunks()

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


def gx_context(docs_dir: Path | None) -> Any:
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
    cols = list(ROW_KEYS)
    for e in expectations:
        kwargs = e.configuration.kwargs
        named = [kwargs.get(k) for k in ("column", "column_A", "column_B")]
        for c in [*named, *(kwargs.get("column_list") or ())]:
            if isinstance(c, str) and c not in cols:
                cols.append(c)
    return cols


def validate_in_batches(
    context: Any,
    source: Records,
    suite_name: str,
    expectations: list[Expectation],
    rows_shown: int,
    run_name: str,
    batch_rows: int,
    after_batch: Callable[[], object] = lambda: None,
) -> tuple[ExpectationSuiteValidationResult, list[tuple[OffendingRow, ...]]]:
    """Validate `source` as the suite `suite_name`, in passes: expectations that compare rows
    with each other (row count, uniqueness) see the columns they read of every record at once;
    row-by-row ones see `batch_rows` records at a time, their counts summed into one result.
    `after_batch` runs after each such pass (to drop what it cached). Return one suite result,
    stored in the context for the Data Docs, and each result's offending rows (same order)."""
    import great_expectations as gx

    batch_definition = (
        context.data_sources.add_pandas("records")
        .add_dataframe_asset("prepared")
        .add_batch_definition_whole_dataframe("all records")
    )
    suite = context.suites.add(gx.ExpectationSuite(name=suite_name, expectations=expectations))
    result_format = {
        "result_format": "SUMMARY",
        "partial_unexpected_count": max(rows_shown, 1),
        "unexpected_index_column_names": ROW_KEYS,
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
                gx.ExpectationSuite(name=suite_name, expectations=[copy(e) for e in subset]),
                result_format=result_format,
            )
        return list(piece.results)

    whole = [e for e in suite.expectations if not _row_local(e)]
    local = [e for e in suite.expectations if _row_local(e)]
    results: list[Any] = validate(source.frame(_columns(whole)), whole)
    # Rows found in the key columns alone are looked up again for their text.
    keys = [index_triples((r.result or {}).get("partial_unexpected_index_list")) for r in results]
    shown = {str(t[2]) for k in keys for t in k[:rows_shown]}
    lookup = source.with_ids(shown) if shown else None
    rows = [offending_rows(k, lookup, rows_shown) if lookup is not None else () for k in keys]

    parts: list[list[Any]] = [[] for _ in local]
    local_rows: list[list[OffendingRow]] = [[] for _ in local]
    for df in source.batches([*_columns(local), "text"], batch_rows):
        try:
            batch_results = validate(df, local)
        finally:
            after_batch()  # memory follows the batch
        for i, r in enumerate(batch_results):
            parts[i].append(r)
            if len(local_rows[i]) < rows_shown:
                found = index_triples((r.result or {}).get("partial_unexpected_index_list"))
                local_rows[i].extend(offending_rows(found, df, rows_shown - len(local_rows[i])))
    results += [_merge(p, rows_shown) for p in parts]
    rows += [tuple(r) for r in local_rows]
    return store_result(context, suite, results, run_name), rows


# (retune's name, offending count, observed value, error or None) -> the problem in plain words.
Problem = Callable[[str, "int | None", Any, "str | None"], str]


def suite_outcomes(
    expectations: list[Expectation],
    suite_result: ExpectationSuiteValidationResult,
    rows: list[tuple[OffendingRow, ...]],
    problem: Problem,
) -> tuple[ExpectationOutcome, ...]:
    """`validate_in_batches`' result as one outcome per expectation, in the suite's order
    (GX returns its own), each named by its `meta["name"]` and worded by `problem`."""
    order = [(e.meta or {}).get("name") for e in expectations]
    found = []
    for i, result in enumerate(suite_result.results):
        config = result.expectation_config
        assert config is not None
        name = (config.meta or {}).get("name", config.type)
        info = result.result or {}
        count = info.get("unexpected_count")
        percent = info.get("unexpected_percent")
        observed = info.get("observed_value")
        found.append(
            ExpectationOutcome(
                name=name,
                type=config.type,
                column=config.kwargs.get("column"),
                success=bool(result.success),
                problem=problem(name, count, observed, exception_message(result.exception_info)),
                unexpected_count=None if count is None else int(count),
                unexpected_percent=None if percent is None else float(percent),
                observed_value=observed,
                rows=rows[i],
            )
        )
    return tuple(
        sorted(found, key=lambda o: order.index(o.name) if o.name in order else len(order))
    )


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
            for t in index_triples((p.result or {}).get("partial_unexpected_index_list"))
        ][:rows_shown]
        info["partial_unexpected_index_list"] = (
            [{k: [t[j] for t in kept] for j, k in enumerate(ROW_KEYS)}] if kept else []
        )
    raised = [p for p in parts if exception_message(p.exception_info)]
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


def store_result(
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


def exception_message(info: Any) -> str | None:
    """GX reports an error that stopped an expectation either flat or keyed by metric."""
    if not isinstance(info, dict):
        return None
    if info.get("raised_exception"):
        return str(info.get("exception_message"))
    for nested in info.values():
        if isinstance(nested, dict) and nested.get("raised_exception"):
            return str(nested.get("exception_message"))
    return None


def index_triples(index_list: Any) -> list[tuple[Any, Any, Any]]:
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


def offending_rows(
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
