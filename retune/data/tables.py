"""ingest's table formats, CSV/TSV and Parquet: the header or schema a file is planned by, and
the rows of the tables with one unit per row (table_chat, table_wide, table_text).

Used by `tasks.ingest` and `retune.data.long_tables`; the shared reader pieces are in
`retune.data.readers`. What cannot be read is quarantined: a row, a Parquet row group, or the file.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator
from datetime import date, datetime
from typing import TYPE_CHECKING, Any, BinaryIO, NamedTuple

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from retune.config import ColumnsParams
from retune.data.readers import (
    MAX_DEPTH,
    PROGRESS_EVERY,
    FileStats,
    LineSource,
    Overlong,
    Plan,
    ReadFailure,
    Reject,
    b64,
    check_depth,
    messages_of,
    open_input,
    too_large,
    type_name,
)
from retune.errors import IngestError

if TYPE_CHECKING:
    from retune.data.sink import Sink


class RowIssue(NamedTuple):
    reason: str
    detail: str
    raw: Any
    raw_base64: Any


class _Records:
    """A CSV file's lines as text for csv.reader, at most the line limit per record (a quote
    left open would otherwise make the rest of the file one field)."""

    def __init__(self, fh: BinaryIO, limit: int) -> None:
        self.lines = LineSource(fh, limit, csv_text=True)
        self.used = 0
        self.start = 0

    def __iter__(self) -> _Records:
        return self

    def __next__(self) -> str:
        try:
            text = self.lines.next_text()
        except Overlong as exc:
            # The head is the record's only when the record began on that line.
            head, self.used = (exc.head if not self.used else b""), 0
            raise Overlong(exc.line, exc.size, head, exc.unit) from None
        if not self.used:
            self.start = self.lines.lineno
        self.used += len(text)
        if self.used > self.lines.limit:
            size, self.used = self.used, 0
            raise Overlong(self.start, size, b"", self.lines.unit)
        return text

    def done(self) -> None:
        """A record was read whole: the next one starts a new count."""
        self.used = 0


def _reader(fh: BinaryIO, plan: Plan, limit: int) -> tuple[_Records, Any]:
    # Long messages are to be quarantined as too_long, not to crash the reader; _Records
    # bounds a record instead.
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    records = _Records(fh, limit)
    return records, csv.reader(records, delimiter="\t" if plan.kind == "tsv" else ",")


def csv_header(plan: Plan, limit: int) -> tuple[str, ...]:
    """The header row of a CSV/TSV file; ReadFailure for one that cannot name columns."""
    with open_input(plan) as fh:
        records, reader = _reader(fh, plan, limit)
        try:
            header: list[str] = next(reader, [])
        except Overlong as exc:
            if exc.line != records.lines.lineno:  # a record over many lines
                detail = 'the header row has a quote (") that is never closed; fix the quoting'
                raise ReadFailure(1, "malformed_csv", detail) from None
            detail = too_large("the header row", exc.size, limit, exc.unit)
            raise ReadFailure(1, "too_large", detail) from None
        except csv.Error as exc:
            raise ReadFailure(
                1, "malformed_csv", f"the header row cannot be parsed ({exc})"
            ) from None
    if header and reader.line_num > 1:
        raise ReadFailure(
            1,
            "malformed_csv",
            f'the header row runs over {reader.line_num} lines: a quote (") in it is not closed '
            "where it should be; fix the quoting of line 1",
        )
    joined = "".join(header)
    if "\x00" in joined:
        raise ReadFailure(
            1,
            "encoding",
            "the header holds NUL bytes: the file looks like UTF-16 without a byte-order mark; "
            "save it as UTF-8 (e.g. `iconv -f UTF-16LE -t UTF-8 in.csv > out.csv`)",
        )
    try:
        joined.encode("utf-8")
    except UnicodeEncodeError:
        raise ReadFailure(
            1,
            "encoding",
            "the header holds bytes that are not UTF-8; save the file as UTF-8 (e.g. `iconv -f "
            "WINDOWS-1252 -t UTF-8 in.csv > out.csv` for a Windows export)",
        ) from None
    return tuple(h.strip() for h in header)


def _leading_fields(head: bytes, plan: Plan) -> list[str]:
    """The fields that lie whole in the first bytes of an overlong record."""
    text = head.decode("utf-8", "surrogateescape")
    try:
        fields = next(csv.reader([text], delimiter="\t" if plan.kind == "tsv" else ","), [])
    except csv.Error:
        return []
    return fields[:-1]  # the last one is cut off


def csv_records(
    plan: Plan, st: FileStats, sink: Sink
) -> Iterator[tuple[int, list[str], RowIssue | None]]:
    """Yield (1-based data row, fields, issue) for every non-blank row after the header,
    counted. A row that cannot be parsed has an issue and only the fields that could be read."""
    with open_input(plan) as fh:
        records, reader = _reader(fh, plan, sink.line_limit)
        next(reader, None)
        records.done()
        row_no = 0
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return
            except Overlong as exc:
                row_no += 1
                st.rows += 1
                what = f"row {row_no} (from line {exc.line})"
                detail = too_large(what, exc.size, sink.line_limit, exc.unit)
                yield (
                    row_no,
                    _leading_fields(exc.head, plan),
                    RowIssue("too_large", detail, None, None),
                )
                continue
            except csv.Error as exc:
                row_no += 1
                st.rows += 1
                where = f"row {row_no} (line {reader.line_num})"
                detail = f"{where} cannot be parsed ({exc}); fix its quoting"
                yield row_no, [], RowIssue("malformed_csv", detail, None, None)
                continue
            records.done()
            row_no += 1
            if row_no % PROGRESS_EVERY == 0:
                print(f"ingest:   {st.source}: {row_no} rows ...", flush=True)
            if not fields:
                st.skipped_blank += 1
                continue
            st.rows += 1
            yield row_no, fields, None


def csv_row_issue(plan: Plan, row_no: int, fields: list[str]) -> RowIssue | None:
    """Why a CSV row cannot be read as it is: bytes that are not UTF-8, or a wrong field count."""
    header = plan.columns
    joined = "".join(fields)
    if not joined.isascii():
        try:
            joined.encode("utf-8")
        except UnicodeEncodeError:
            names = [*header] + [f"field_{i + 1}" for i in range(len(header), len(fields))]
            pairs = [
                (n, f.encode("utf-8", "surrogateescape"))
                for n, f in zip(names, fields, strict=False)
            ]
            return RowIssue(
                "invalid_utf8",
                f"row {row_no} has bytes that are not UTF-8; save the file as UTF-8 (the "
                "original bytes are in raw_base64)",
                {n: b.decode("utf-8", "replace") for n, b in pairs},
                {n: b64(b) for n, b in pairs},
            )
    if len(fields) != len(header):
        separator = "tabs" if plan.kind == "tsv" else "commas"
        return RowIssue(
            "missing_field",
            f"row {row_no} has {len(fields)} fields but the header has {len(header)}; quote "
            f"values that contain {separator}",
            fields,
            None,
        )
    return None


def _csv_rows(plan: Plan, st: FileStats, sink: Sink) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (1-based data row, {column: value}) for well-formed rows; quarantine the others."""
    for row_no, fields, issue in csv_records(plan, st, sink):
        issue = issue or csv_row_issue(plan, row_no, fields)
        if issue is not None:
            sink.reject(st, issue.reason, issue.detail, row_no, issue.raw, None, issue.raw_base64)
            continue
        yield row_no, dict(zip(plan.columns, fields, strict=True))


def jsonable(value: Any) -> Any:
    """Parquet values as JSON: dates as ISO strings, NaN as null."""
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, bytes):
        return b64(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return str(value)


# What pyarrow raises for a file it cannot read: its own errors (ArrowInvalid is a
# ValueError), I/O errors, and UnicodeDecodeError (a ValueError) for names that are not UTF-8.
PARQUET_ERRORS = (pa.ArrowException, OSError, ValueError)


def parquet_problem(exc: Exception) -> str:
    return (
        f"not a readable Parquet file ({exc}); write it again (pandas `to_parquet`, pyarrow "
        "`write_table`) or remove it"
    )


def _type_depth(t: pa.DataType) -> int:
    depth, stack = 0, [(t, 1)]
    while stack:
        t, d = stack.pop()
        depth = max(depth, d)
        stack.extend((t.field(i).type, d + 1) for i in range(t.num_fields))
    return depth


def parquet_columns(plan: Plan) -> tuple[str, ...]:
    """The column names of a Parquet file; ReadFailure for one that cannot be read."""
    with open_input(plan) as fh:
        try:
            schema = pq.read_schema(fh)
        except PARQUET_ERRORS as exc:
            raise ReadFailure(0, "corrupt_file", parquet_problem(exc)) from None
    deepest = max((_type_depth(f.type) for f in schema), default=0)
    if deepest > MAX_DEPTH:
        raise ReadFailure(
            0, "too_deep", f"its columns nest {deepest} levels deep, over {MAX_DEPTH}; flatten them"
        )
    return tuple(schema.names)


def group_too_large(pf: pq.ParquetFile, g: int, limit: int) -> str | None:
    """Why row group `g` is not to be read (its rows hold more than `limit` bytes on average
    uncompressed: a giant cell, or a compression bomb), or None."""
    group = pf.metadata.row_group(g)
    allowed = max(group.num_rows, 1) * limit
    if group.total_byte_size <= allowed:
        return None
    return too_large(f"row group {g + 1} uncompressed", group.total_byte_size, allowed)


def _cell_bytes(cell: pa.Array) -> bytes | None:
    if pa.types.is_string(cell.type):
        value: bytes | None = cell.view(pa.binary())[0].as_py()
        return value
    if pa.types.is_large_string(cell.type):
        value = cell.view(pa.large_binary())[0].as_py()
        return value
    return None  # text nested in a list or struct: nothing to show


def _row_or_issue(batch: pa.RecordBatch, i: int) -> dict[str, Any] | RowIssue:
    row = batch.slice(i, 1)
    try:
        value: dict[str, Any] = row.to_pylist()[0]
        return value
    except UnicodeDecodeError:
        pass
    raw: dict[str, Any] = {}
    raw_b64: dict[str, str] = {}
    bad: list[str] = []
    for name, cell in zip(row.schema.names, row.columns, strict=True):
        try:
            raw[name] = jsonable(cell.to_pylist()[0])
            continue
        except UnicodeDecodeError:
            bad.append(f"`{name}`")
        data = _cell_bytes(cell)
        raw[name] = None if data is None else data.decode("utf-8", "replace")
        if data is not None:
            raw_b64[name] = b64(data)
    return RowIssue(
        "invalid_utf8",
        f"column {', '.join(bad)} holds bytes that are not UTF-8; write the text as UTF-8 (the "
        "original bytes are in raw_base64)",
        raw,
        raw_b64 or None,
    )


def _parquet_rows(plan: Plan, st: FileStats, sink: Sink) -> Iterator[tuple[int, dict[str, Any]]]:
    """Rows of a Parquet file, row group by row group: a group that cannot be read is
    quarantined (as one entry) and the next one read."""
    with open_input(plan) as fh:
        try:
            pf = pq.ParquetFile(fh)
        except PARQUET_ERRORS as exc:
            raise ReadFailure(0, "corrupt_file", parquet_problem(exc)) from None
        row_no = 0
        for g in range(pf.num_row_groups):
            n, first = pf.metadata.row_group(g).num_rows, row_no + 1
            last = first + n - 1
            if (problem := group_too_large(pf, g, sink.line_limit)) is not None:
                st.rows += max(n, 1)
                sink.reject(
                    st, "too_large", f"rows {first}-{last}: {problem}", first, None, count=max(n, 1)
                )
                row_no = last
                continue
            done = 0
            try:
                for batch in pf.iter_batches(batch_size=8_192, row_groups=[g]):
                    try:
                        rows: list[Any] = batch.to_pylist()
                    except UnicodeDecodeError:
                        rows = [_row_or_issue(batch, i) for i in range(batch.num_rows)]
                    for row in rows:
                        row_no += 1
                        done += 1
                        st.rows += 1
                        if isinstance(row, RowIssue):
                            detail = f"row {row_no}: {row.detail}"
                            sink.reject(
                                st, row.reason, detail, row_no, row.raw, None, row.raw_base64
                            )
                        else:
                            yield row_no, row
                    if row_no // PROGRESS_EVERY != (row_no - batch.num_rows) // PROGRESS_EVERY:
                        print(f"ingest:   {st.source}: {row_no} rows ...", flush=True)
            except PARQUET_ERRORS as exc:
                if done < n:
                    st.rows += n - done
                    detail = (
                        f"row group {g + 1}, rows {first + done}-{last}, cannot be read ({exc}); "
                        "write the file again"
                    )
                    sink.reject(st, "corrupt_file", detail, first + done, None, count=n - done)
            row_no = last


def _string_cell(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        raise Reject("missing_field", f"column `{key}` must hold text, got {type_name(value)}")
    return value


def _chat_cell(row: dict[str, Any], cols: ColumnsParams) -> tuple[list[tuple[str, str]], Any]:
    value = row[cols.messages]
    if isinstance(value, str):
        try:
            parsed = orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            raise Reject(
                "malformed_json",
                f"column `{cols.messages}` is not valid JSON ({exc}); it must hold "
                'a JSON list like [{"role": "user", "content": "..."}]',
            ) from None
        check_depth(value, parsed)
        value = parsed
    return messages_of(value, f"column `{cols.messages}`")


def read_table(plan: Plan, st: FileStats, sink: Sink, cols: ColumnsParams) -> Iterator[dict]:
    """Tables with one unit per row: table_chat, table_wide, table_text."""
    is_parquet = plan.kind == "parquet"
    rows = _parquet_rows(plan, st, sink) if is_parquet else _csv_rows(plan, st, sink)
    layout = plan.layout
    used = {
        "table_chat": (cols.messages,),
        "table_wide": (cols.prompt, cols.completion),
        "table_text": (cols.text,),
    }[layout or ""] + (cols.conversation_id,)
    extra = [c for c in plan.columns if c not in used]
    for row_no, row in rows:
        raw: Any = jsonable(row) if is_parquet else row
        extras = None
        try:
            if layout == "table_chat":
                messages, extras = _chat_cell(row, cols)
            elif layout == "table_wide":
                messages = [
                    ("user", _string_cell(row, cols.prompt)),
                    ("assistant", _string_cell(row, cols.completion)),
                ]
            else:
                messages = [("text", _string_cell(row, cols.text))]
        except Reject as rej:
            sink.reject(st, rej.reason, rej.detail, row_no, raw)
            continue
        meta = {c: jsonable(row[c]) if is_parquet else row[c] for c in extra}
        if extras is not None:
            meta["message_meta"] = extras
        cid = row.get(cols.conversation_id)
        cid = None if cid is None or cid == "" else str(cid)
        out = sink.offer(st, messages, row_no, layout or "", cid, meta, raw)
        if out is not None:
            yield out


def layout(columns: tuple[str, ...], cols: ColumnsParams, path: Any) -> str:
    """Which table layout the mapped columns present in the file describe."""
    have = set(columns)
    if cols.messages in have:
        return "table_chat"
    if cols.prompt in have and cols.completion in have:
        return "table_wide"
    if cols.text in have and cols.role in have and cols.conversation_id in have:
        return "table_long"
    if cols.text in have and cols.role not in have:
        return "table_text"
    hint = (
        f" It has `{cols.role}` and `{cols.text}` but no `{cols.conversation_id}`: one row per "
        "message needs a conversation id column."
        if cols.text in have
        else ""
    )
    raise IngestError(
        f"{path}: cannot tell the table layout from its columns "
        f"[{', '.join(columns) or 'none'}].{hint} retune reads a `{cols.messages}` column (JSON "
        f"chat messages); `{cols.prompt}` + `{cols.completion}`; `{cols.conversation_id}` + "
        f"`{cols.role}` + `{cols.text}` (+ optional `{cols.timestamp}`), one row per message; or "
        f"`{cols.text}` alone (documents). Map your column names in params.yaml with "
        "ingest.columns.messages, ingest.columns.prompt, ingest.columns.completion, "
        "ingest.columns.conversation_id, ingest.columns.role, ingest.columns.text, "
        "ingest.columns.timestamp (e.g. `retune run ingest.columns.text=body`)."
    )
