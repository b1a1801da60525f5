"""ingest's long tables (CSV/TSV/Parquet): one row per message, grouped into conversations by
id wherever the rows are in the file, each ordered by timestamp.

Used by `tasks.ingest`. A row that cannot be read holds back its whole conversation, so no
conversation is trained on with a turn missing.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import date, datetime
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from retune.config import ColumnsParams
from retune.data.readers import FileStats, Plan, ReadFailure, b64, open_input, type_name
from retune.data.tables import (
    PARQUET_ERRORS,
    RowIssue,
    csv_records,
    csv_row_issue,
    group_too_large,
    jsonable,
    parquet_problem,
)

if TYPE_CHECKING:
    from retune.data.sink import Sink

_ARROW_CHUNK = 65_536


_EPOCH = datetime(1970, 1, 1)


def _timestamp_key(value: Any) -> float | None:
    """Sort key for a timestamp cell: seconds (naive times read as UTC); None if empty.

    Raises ValueError for a value that is neither a number nor an ISO 8601 date-time."""
    if isinstance(value, str):
        s = value.strip()
        if not s:
            return None
        if "-" in s or ":" in s:
            try:
                value = datetime.fromisoformat(s)
            except ValueError:
                value = float(s)  # "-5", "1e-3"; anything else raises ValueError
        else:
            value = float(s)
    if value is None:
        return None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            return (value - _EPOCH).total_seconds()
        return value.timestamp()
    if isinstance(value, date):
        return float((value - _EPOCH.date()).days * 86_400)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return None if math.isnan(value) else float(value)
    raise ValueError(value)


_TS_OK, _TS_MISSING, _TS_BAD = 0, 1, 2


def _ts_columns(values: list[Any]) -> tuple[list[float | None], list[int]]:
    keys: list[float | None] = []
    states: list[int] = []
    for v in values:
        try:
            k = _timestamp_key(v)
        except ValueError:
            keys.append(None)
            states.append(_TS_BAD)
            continue
        keys.append(k)
        states.append(_TS_MISSING if k is None else _TS_OK)
    return keys, states


def _long_table_csv(
    plan: Plan, st: FileStats, sink: Sink, cols: ColumnsParams
) -> tuple[pa.Table, dict[int, RowIssue]]:
    """Pass 1 over a long CSV: all rows into Arrow columns (compact, sortable), row problems
    kept by row number so the whole conversation can be quarantined with them."""
    header = plan.columns
    cid_at = header.index(cols.conversation_id)
    ts_at = header.index(cols.timestamp) if cols.timestamp in header else None
    issues: dict[int, RowIssue] = {}
    buffers: list[list[str]] = [[] for _ in header]
    row_numbers: list[int] = []
    batches: list[pa.RecordBatch] = []
    names = [*header, "__row", "__ts", "__ts_state"]

    def flush() -> None:
        arrays = [pa.array(b, type=pa.string()) for b in buffers]
        keys, states = _ts_columns(buffers[ts_at]) if ts_at is not None else ([], [])
        arrays += [
            pa.array(row_numbers, type=pa.int64()),
            pa.array(keys or [None] * len(row_numbers), type=pa.float64()),
            pa.array(states or [_TS_MISSING] * len(row_numbers), type=pa.int8()),
        ]
        batches.append(pa.RecordBatch.from_arrays(arrays, names=names))
        for b in buffers:
            b.clear()
        row_numbers.clear()

    for row_no, fields, unread in csv_records(plan, st, sink):
        issue = unread or csv_row_issue(plan, row_no, fields)
        if issue is not None:
            issues[row_no] = issue
            # Still grouped with its conversation, so the whole conversation is held back.
            fields = [
                f.encode("utf-8", "surrogateescape").decode("utf-8", "replace") for f in fields
            ]
            fields = (fields + [""] * len(header))[: len(header)]
        if not fields[cid_at].strip():
            issue = issues.pop(row_no, None) or RowIssue(
                "missing_field",
                f"no `{cols.conversation_id}`: the row cannot be placed in a conversation; "
                "fill it in",
                dict(zip(header, fields, strict=True)),
                None,
            )
            sink.reject(st, issue.reason, issue.detail, row_no, issue.raw, None, issue.raw_base64)
            continue
        for b, f in zip(buffers, fields, strict=True):
            b.append(f)
        row_numbers.append(row_no)
        if len(row_numbers) >= _ARROW_CHUNK:
            flush()
    flush()
    return pa.Table.from_batches(batches), issues


def _numeric_timestamps(ts: pa.ChunkedArray) -> pa.ChunkedArray | None:
    """A typed Parquet timestamp/date/number column as float64 sort keys (vectorised), or None
    for text columns. Only the order within one column matters, so units are ignored."""
    t = ts.type
    if pa.types.is_timestamp(t) or pa.types.is_date64(t):
        return pc.cast(pc.cast(ts, pa.int64()), pa.float64())
    if pa.types.is_date32(t):
        return pc.cast(pc.cast(ts, pa.int32()), pa.float64())
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        return pc.cast(ts, pa.float64())
    return None


def _utf8_issues(table: pa.Table) -> tuple[pa.Table, dict[int, RowIssue]]:
    """Text columns that are not valid UTF-8, decoded with replacement characters, and the rows
    that held such bytes (by row number) with their original bytes."""
    issues: dict[int, RowIssue] = {}
    for i, name in enumerate(table.column_names):
        column = table.column(i)
        try:
            column.validate(full=True)
            continue
        except pa.ArrowInvalid:
            pass
        t = column.type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
            raise ReadFailure(
                0,
                "invalid_utf8",
                f"column `{name}` holds text that is not UTF-8; write it as UTF-8",
            )
        binary = pa.binary() if pa.types.is_string(t) else pa.large_binary()
        values = pa.chunked_array([c.view(binary) for c in column.chunks], type=binary)
        decoded: list[str | None] = []
        for row_no, value in enumerate(values.to_pylist(), 1):
            if value is None:
                decoded.append(None)
                continue
            try:
                decoded.append(value.decode("utf-8"))
                continue
            except UnicodeDecodeError:
                decoded.append(value.decode("utf-8", "replace"))
            issues.setdefault(
                row_no,
                RowIssue(
                    "invalid_utf8",
                    f"row {row_no}: column `{name}` has bytes that are not UTF-8; write the "
                    "text as UTF-8 (the original bytes are in raw_base64)",
                    {name: decoded[-1]},
                    {name: b64(value)},
                ),
            )
        table = table.set_column(i, name, pa.array(decoded, type=t))
    return table, issues


def _read_parquet(plan: Plan, st: FileStats, limit: int) -> pa.Table:
    """A long Parquet table whole (its conversations may span row groups): a file with a row
    group that cannot be read is held back whole."""
    with open_input(plan) as fh:
        try:
            pf = pq.ParquetFile(fh)
            n = pf.metadata.num_rows
        except PARQUET_ERRORS as exc:
            raise ReadFailure(0, "corrupt_file", parquet_problem(exc)) from None
        st.rows += n
        held = "; the whole table is held back, as its conversations may continue there"
        for g in range(pf.num_row_groups):
            if (problem := group_too_large(pf, g, limit)) is not None:
                raise ReadFailure(0, "too_large", problem + held)
        try:
            table: pa.Table = pf.read()
        except PARQUET_ERRORS as exc:
            raise ReadFailure(0, "corrupt_file", parquet_problem(exc) + held) from None
    return table


def _long_table_parquet(
    plan: Plan, st: FileStats, sink: Sink, cols: ColumnsParams
) -> tuple[pa.Table, dict[int, RowIssue]]:
    table, issues = _utf8_issues(_read_parquet(plan, st, sink.line_limit))
    n = table.num_rows
    table = table.append_column("__row", pa.array(range(1, n + 1), type=pa.int64()))
    ts = table.column(cols.timestamp) if cols.timestamp in table.column_names else None
    if ts is None:
        keys: Any = pa.nulls(n, type=pa.float64())
        states: Any = pa.array([_TS_MISSING] * n, type=pa.int8())
    else:
        numeric = _numeric_timestamps(ts)
        if numeric is not None:
            keys = numeric
            states = pc.if_else(pc.is_null(keys), _TS_MISSING, _TS_OK).cast(pa.int8())
        else:
            k, s = _ts_columns(ts.to_pylist())
            keys, states = pa.array(k, type=pa.float64()), pa.array(s, type=pa.int8())
    table = table.append_column("__ts", keys).append_column("__ts_state", states)
    cid = table.column(cols.conversation_id)
    if not pa.types.is_string(cid.type):
        try:
            cid = pc.cast(cid, pa.string())
        except pa.ArrowNotImplementedError:
            raise ReadFailure(
                0,
                "missing_field",
                f"column `{cols.conversation_id}` has type {cid.type}; conversation ids must be "
                "text or numbers",
            ) from None
        table = table.set_column(
            table.column_names.index(cols.conversation_id), cols.conversation_id, cid
        )
    no_id = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(cid), ""), True)
    if pc.any(no_id).as_py():
        for row in table.filter(no_id).drop_columns(["__ts", "__ts_state"]).to_pylist():
            row_no = row.pop("__row")
            sink.reject(
                st,
                "missing_field",
                f"no `{cols.conversation_id}`: the row cannot be placed in a conversation; "
                "fill it in",
                row_no,
                jsonable(row),
            )
        table = table.filter(pc.invert(no_id))
    return table, issues


def read_long(plan: Plan, st: FileStats, sink: Sink, cols: ColumnsParams) -> Iterator[dict]:
    """One row per message, grouped by conversation id wherever the rows are in the file, each
    conversation ordered by timestamp (stable: ties and missing timestamps keep row order)."""
    is_parquet = plan.kind == "parquet"
    if is_parquet:
        table, issues = _long_table_parquet(plan, st, sink, cols)
    else:
        table, issues = _long_table_csv(plan, st, sink, cols)
    cid_col = table.column(cols.conversation_id)
    group = pc.index_in(cid_col, value_set=pc.unique(cid_col))
    table = table.append_column("__group", group)
    order = pc.sort_indices(
        table,
        sort_keys=[("__group", "ascending"), ("__ts", "ascending"), ("__row", "ascending")],
    )
    table = table.take(order)
    has_ts = cols.timestamp in plan.columns
    data_cols = [c for c in table.column_names if not c.startswith("__")]
    extra = [c for c in data_cols if c not in (cols.conversation_id, cols.role, cols.text)]

    def emit(g: dict[str, list[Any]]) -> dict | None:
        rows: list[int] = g["__row"]
        cid = str(g[cols.conversation_id][0])
        ordered = sorted(rows)

        def raw() -> list[dict[str, Any]]:
            by_row = {
                r: {"row": r, **{c: jsonable(g[c][i]) for c in data_cols}}
                for i, r in enumerate(rows)
            }
            return [by_row[r] for r in ordered]

        if issues:
            bad = [r for r in ordered if r in issues]
            if bad:
                first = issues[bad[0]]
                entries = raw()
                b64 = {}
                for e in entries:
                    issue = issues.get(e["row"])
                    if issue is None:
                        continue
                    # The row as read: undecodable bytes shown replaced, ragged fields in full.
                    e.update(issue.raw if isinstance(issue.raw, dict) else {"fields": issue.raw})
                    if issue.raw_base64 is not None:
                        b64[str(e["row"])] = issue.raw_base64
                more = f" (and {len(bad) - 1} more bad rows)" if len(bad) > 1 else ""
                sink.reject(
                    st,
                    first.reason,
                    f"{first.detail}{more}; the whole conversation {cid!r} is held back",
                    rows[0],
                    entries,
                    ordered,
                    raw_base64=b64 or None,
                )
                return None
        if has_ts:
            states = g["__ts_state"]
            if _TS_BAD in states or (_TS_MISSING in states and _TS_OK in states):
                ts_values = g[cols.timestamp]
                where = [
                    f"row {r}: {ts_values[i]!r}" for i, r in enumerate(rows) if states[i] != _TS_OK
                ]
                sink.reject(
                    st,
                    "missing_field",
                    f"conversation {cid!r} cannot be ordered: `{cols.timestamp}` is missing or "
                    f"not a number / ISO 8601 date-time in {', '.join(where[:5])}; give every "
                    "row of a conversation a timestamp, or none",
                    rows[0],
                    raw,
                    ordered,
                )
                return None
        messages = list(zip(g[cols.role], g[cols.text], strict=True))
        for i, (role, text) in enumerate(messages):
            for key, value in ((cols.role, role), (cols.text, text)):
                if not isinstance(value, str):
                    sink.reject(
                        st,
                        "missing_field",
                        f"row {rows[i]}: column `{key}` must hold text, got {type_name(value)}",
                        rows[0],
                        raw,
                        ordered,
                    )
                    return None
        meta: dict[str, Any] = {}
        for c in extra:
            values = g[c]
            if all(v == values[0] for v in values):
                meta[c] = jsonable(values[0])
            else:
                meta[c] = jsonable(values)
        return sink.offer(st, messages, rows[0], "table_long", cid, meta, raw, ordered, rows)

    pending: dict[str, list[Any]] | None = None
    for batch in table.to_batches(max_chunksize=_ARROW_CHUNK):
        columns = {name: batch.column(name).to_pylist() for name in batch.schema.names}
        groups = columns["__group"]
        start, n = 0, len(groups)
        while start < n:
            end = start + 1
            while end < n and groups[end] == groups[start]:
                end += 1
            piece = {name: values[start:end] for name, values in columns.items()}
            # A conversation may run on from the previous batch.
            if pending is not None and pending["__group"][0] == groups[start]:
                for name, values in piece.items():
                    pending[name].extend(values)
            else:
                if pending is not None and (out := emit(pending)) is not None:
                    yield out
                pending = piece
            start = end
    if pending is not None and (out := emit(pending)) is not None:
        yield out
