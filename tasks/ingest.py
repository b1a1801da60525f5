"""Stage `ingest`: every file under `paths.incoming` into canonical records, or into quarantine.

Runs as `python -m tasks.ingest` (the dvc.yaml stage) and as `ingest_task` in Prefect flows.
Every input row ends up in a record or in quarantine.jsonl (with file, line and reason).
"""

from __future__ import annotations

import base64
import csv
import hashlib
import json
import math
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import IO, Any, NamedTuple

import orjson  # a dependency of prefect, great-expectations and dvc; ~3x faster than json here
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from retune.config import ColumnsParams, IngestParams, Params
from retune.entry import stage_main, stage_task
from retune.errors import IngestError
from retune.lineage import data_version
from retune.pii import Redactor, strings_in, with_strings
from retune.records import ROLES, Record, write_records
from retune.reports import write_json
from retune.text import normalize_text

# Why a unit went to quarantine.jsonl: a fixed vocabulary (reports and tests count by it).
REASONS: dict[str, str] = {
    "invalid_utf8": "bytes that are not UTF-8; `raw_base64` keeps them exactly",
    "malformed_json": "a JSONL line, or a `messages` cell, that is not valid JSON",
    "missing_field": "no messages / prompt+completion / role / content, a value of the wrong type, "
    "a table row whose field count differs from the header, or an unusable timestamp",
    "unknown_role": "a role that is not system, user, assistant or text after ingest.role_map",
    "empty_text": "a message empty after cleaning (the whole conversation: a turn would be lost)",
    "too_long": "a message longer than ingest.max_message_chars",
    "duplicate": "the same messages as a record already accepted (`detail` names where)",
}

# Record.format values, one per input layout.
FORMATS = (
    "chat_jsonl",
    "completion_jsonl",
    "table_chat",
    "table_wide",
    "table_long",
    "table_text",
    "text",
)

SUPPORTED = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".txt": "txt",
}

_ROLES = frozenset(ROLES)
_ROLE_LIST = ", ".join(ROLES)
_BOM = b"\xef\xbb\xbf"
_PROGRESS_EVERY = 250_000
_ARROW_CHUNK = 65_536


@dataclass(frozen=True)
class IngestResult:
    records_file: Path
    manifest_file: Path
    quarantine_file: Path
    data_version: str
    n_records: int
    input_rows: int
    accepted_rows: int
    quarantined_rows: int
    report: dict[str, Any] = field(repr=False)


class _Reject(Exception):
    """A unit that cannot become a record; `reason` is a key of REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass
class _FileStats:
    index: int
    source: str
    rows: int = 0
    accepted: int = 0
    quarantined: int = 0
    skipped_blank: int = 0
    records: int = 0
    formats: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class _Plan:
    path: Path
    source: str  # relative to incoming, posix
    kind: str  # a value of SUPPORTED
    layout: str | None = None  # table_* for tables
    columns: tuple[str, ...] = ()


class _Sink:
    """Turns candidate conversations into record rows or quarantine entries, keeping the counts."""

    def __init__(self, cfg: IngestParams, quarantine: IO[str]) -> None:
        self.role_map = {k.strip().lower(): v.strip().lower() for k, v in cfg.role_map.items()}
        self.max_chars = cfg.max_message_chars
        self.kinds = tuple(dict.fromkeys(cfg.redact))
        # Most conversations hold no personal data: its prefilters spare them the detectors.
        self.redactor = Redactor(self.kinds)
        self.quarantine = quarantine
        # id -> (file index << 40 | line) of the accepted record: names the original of a duplicate
        # without keeping records in memory.
        self.seen: dict[str, int] = {}
        self.sources: list[str] = []
        self.redactions: Counter[str] = Counter()
        self.by_reason: Counter[str] = Counter()
        self.by_format: dict[str, dict[str, int]] = {}
        self.entries = 0

    def start(self, source: str) -> _FileStats:
        self.sources.append(source)
        return _FileStats(index=len(self.sources) - 1, source=source)

    def _redact(
        self, contents: list[str], conversation_id: str | None, meta: dict[str, Any]
    ) -> tuple[list[str], str | None, dict[str, Any], Counter[str]]:
        """Redact a conversation's messages, its id and the strings in its extra fields, all in
        one call (they are stored, so personal data there would reach the records too)."""
        extra = strings_in(meta)
        ids = [] if conversation_id is None else [conversation_id]
        texts, counts = self.redactor.redact_many([*contents, *extra, *ids])
        if not counts:
            return contents, conversation_id, meta, counts
        n = len(contents)
        if extra:
            meta = with_strings(meta, iter(texts[n : n + len(extra)]))
        if ids and texts[-1] != conversation_id:
            # Still one id per conversation (split and cv group by it), pseudonymised.
            digest = hashlib.sha256(ids[0].encode("utf-8")).hexdigest()[:16]
            conversation_id = f"{texts[-1]}-{digest}"
        return texts[:n], conversation_id, meta, counts

    def offer(
        self,
        st: _FileStats,
        messages: list[tuple[str, str]],
        line: int,
        fmt: str,
        conversation_id: str | None,
        meta: dict[str, Any],
        raw: Any,
        rows: list[int] | None = None,
        message_rows: list[int] | None = None,
    ) -> dict[str, Any] | None:
        """Clean and check one conversation; return its record row, or quarantine it.

        `rows`: a long table's rows, in file order; `message_rows`: the same in message order."""

        roles: list[str] = []
        contents: list[str] = []
        for i, (role, content) in enumerate(messages, 1):
            r = role.strip().lower()
            if not r:
                self.reject(
                    st,
                    "missing_field",
                    f"{_at(i, message_rows)} has an empty role; fill in who speaks ({_ROLE_LIST})",
                    line,
                    raw,
                    rows,
                )
                return None
            r = self.role_map.get(r, r)
            if r not in _ROLES:
                self.reject(
                    st,
                    "unknown_role",
                    f"{_at(i, message_rows)} has role {role!r}, which is not one of {_ROLE_LIST}; "
                    f"map it in params.yaml, e.g. ingest.role_map: {{{r}: assistant}}",
                    line,
                    raw,
                    rows,
                )
                return None
            c = normalize_text(content)
            if not c:
                self.reject(
                    st,
                    "empty_text",
                    f"{_at(i, message_rows)} ({r}) is empty after cleaning; fill in or remove "
                    "the turn (the whole conversation is held back so no turn goes missing)",
                    line,
                    raw,
                    rows,
                )
                return None
            roles.append(r)
            contents.append(c)
        counts = None
        if self.kinds:
            contents, conversation_id, meta, counts = self._redact(contents, conversation_id, meta)
        for i, c in enumerate(contents, 1):
            if len(c) > self.max_chars:
                self.reject(
                    st,
                    "too_long",
                    f"{_at(i, message_rows)} ({roles[i - 1]}) has {len(c)} characters, over "
                    f"ingest.max_message_chars={self.max_chars}; shorten or split it, or "
                    "raise the limit",
                    line,
                    raw,
                    rows,
                )
                return None
        cleaned = tuple(zip(roles, contents, strict=True))
        record = Record(cleaned, st.source, line, fmt, conversation_id, meta)
        row = record.to_row()
        rid: str = row["id"]
        first = self.seen.get(rid)
        if first is not None:
            where = f"{self.sources[first >> 40]}:{first & ((1 << 40) - 1)}"
            self.reject(
                st,
                "duplicate",
                f"same messages as {where}, which was kept; remove one of the copies",
                line,
                raw,
                rows,
            )
            return None
        self.seen[rid] = (st.index << 40) | line
        n = len(rows) if rows else 1
        st.accepted += n
        st.records += 1
        st.formats[fmt] = st.formats.get(fmt, 0) + 1
        totals = self.by_format.get(fmt)
        if totals is None:
            totals = self.by_format[fmt] = {"records": 0, "accepted_rows": 0}
        totals["records"] += 1
        totals["accepted_rows"] += n
        if counts:
            self.redactions.update(counts)
        return row

    def reject(
        self,
        st: _FileStats,
        reason: str,
        detail: str,
        line: int,
        raw: Any,
        rows: list[int] | None = None,
        raw_base64: Any = None,
    ) -> None:
        """Write one quarantine entry covering `rows` (table rows) or one unit at `line`."""
        if callable(raw):
            raw = raw()
        if isinstance(raw, bytes):
            raw = raw.decode("utf-8", "replace").rstrip("\r\n")
        # A long-table conversation is located by its first row in the file.
        entry: dict[str, Any] = {"source": st.source, "line": rows[0] if rows else line}
        if rows:
            entry["rows"] = rows
        entry.update(reason=reason, detail=detail, raw=raw)
        if raw_base64 is not None:
            entry["raw_base64"] = raw_base64
        self.quarantine.write(json.dumps(entry, ensure_ascii=False, default=str) + "\n")
        n = len(rows) if rows else 1
        st.quarantined += n
        self.by_reason[reason] += n
        self.entries += 1


def _at(i: int, message_rows: list[int] | None) -> str:
    return f"message {i} (row {message_rows[i - 1]})" if message_rows else f"message {i}"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _type_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean"}.get(
        type(value), "null" if value is None else type(value).__name__
    )


def _messages(value: Any, where: str) -> tuple[list[tuple[str, str]], list[dict[str, Any]] | None]:
    """Validate a chat `messages` list; return (role, content) pairs and any per-message extras.

    `from`/`value` are read as `role`/`content` too (ShareGPT-style exports)."""
    if not isinstance(value, list) or not value:
        raise _Reject(
            "missing_field",
            f"{where} must be a non-empty list of {{role, content}} objects, got "
            f"{_type_name(value) if value != [] else 'an empty list'}",
        )
    out: list[tuple[str, str]] = []
    extras: list[dict[str, Any]] | None = None
    for i, m in enumerate(value, 1):
        if not isinstance(m, dict):
            raise _Reject("missing_field", f"{where}[{i}] is a {_type_name(m)}, not an object")
        role = m.get("role")
        if role is None:
            role = m.get("from")
        content = m.get("content")
        if content is None:
            content = m.get("value")
        if not isinstance(role, str):
            raise _Reject(
                "missing_field", f"message {i} has no `role` string (got {_type_name(role)})"
            )
        if not isinstance(content, str):
            raise _Reject(
                "missing_field",
                f"message {i} ({role}) has no `content` string (got {_type_name(content)})",
            )
        out.append((role, content))
        if len(m) > 2:
            if extras is None:
                extras = [{} for _ in value]
            extras[i - 1] = {
                k: v for k, v in m.items() if k not in ("role", "content", "from", "value")
            }
    return out, extras


def _from_object(
    obj: Any, cols: ColumnsParams
) -> tuple[str, list[tuple[str, str]], str | None, dict[str, Any]]:
    """One JSON object -> (kind, messages, conversation id, meta); kind is chat|completion."""
    if not isinstance(obj, dict):
        raise _Reject(
            "missing_field",
            f"a JSON {_type_name(obj)} where an object with `{cols.messages}` or "
            f"`{cols.prompt}`/`{cols.completion}` was expected",
        )
    if cols.messages in obj:
        messages, extras = _messages(obj.pop(cols.messages), f"`{cols.messages}`")
        kind = "chat"
        if extras is not None:
            obj["message_meta"] = extras
    elif cols.prompt in obj and cols.completion in obj:
        prompt, completion = obj.pop(cols.prompt), obj.pop(cols.completion)
        for key, v in ((cols.prompt, prompt), (cols.completion, completion)):
            if not isinstance(v, str):
                raise _Reject("missing_field", f"`{key}` must be a string, got {_type_name(v)}")
        messages = [("user", prompt), ("assistant", completion)]
        kind = "completion"
    else:
        raise _Reject(
            "missing_field",
            f"no `{cols.messages}` and no `{cols.prompt}`+`{cols.completion}` (keys: "
            f"{', '.join(sorted(map(str, obj))) or 'none'}); if yours are named differently set "
            "ingest.columns.messages / .prompt / .completion in params.yaml",
        )
    cid = obj.pop(cols.conversation_id, None)
    return kind, messages, None if cid is None or cid == "" else str(cid), obj


def _read_jsonl(plan: _Plan, st: _FileStats, sink: _Sink, cols: ColumnsParams) -> Iterator[dict]:
    fmt_of = {"chat": "chat_jsonl", "completion": "completion_jsonl"}
    with plan.path.open("rb") as fh:
        for lineno, data in enumerate(fh, 1):
            if lineno == 1 and data.startswith(_BOM):
                data = data[3:]
            if lineno % _PROGRESS_EVERY == 0:
                print(f"ingest:   {st.source}: {lineno} lines ...", flush=True)
            try:
                obj = orjson.loads(data)
            except orjson.JSONDecodeError as exc:
                if not data.strip():
                    st.skipped_blank += 1
                    continue
                st.rows += 1
                try:
                    data.decode("utf-8")
                except UnicodeDecodeError as uexc:
                    sink.reject(
                        st,
                        "invalid_utf8",
                        f"byte {uexc.start + 1} of the line is not UTF-8 ({uexc.reason}); save "
                        "the file as UTF-8 (the original bytes are in raw_base64)",
                        lineno,
                        data,
                        raw_base64=_b64(data.rstrip(b"\r\n")),
                    )
                else:
                    sink.reject(
                        st,
                        "malformed_json",
                        f"not valid JSON ({exc}); each line must be one complete JSON object",
                        lineno,
                        data,
                    )
                continue
            st.rows += 1
            try:
                kind, messages, cid, meta = _from_object(obj, cols)
            except _Reject as rej:
                sink.reject(st, rej.reason, rej.detail, lineno, data)
                continue
            row = sink.offer(st, messages, lineno, fmt_of[kind], cid, meta, data)
            if row is not None:
                yield row


def _read_txt(plan: _Plan, st: _FileStats, sink: _Sink) -> Iterator[dict]:
    """Blank-line separated blocks, each one document."""

    def flush(block: list[bytes], start: int) -> dict | None:
        st.rows += 1
        data = b"".join(block)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            sink.reject(
                st,
                "invalid_utf8",
                f"byte {exc.start + 1} of the block is not UTF-8 ({exc.reason}); save the file "
                "as UTF-8 (the original bytes are in raw_base64)",
                start,
                data,
                raw_base64=_b64(data),
            )
            return None
        return sink.offer(st, [("text", text)], start, "text", None, {}, text)

    block: list[bytes] = []
    start = 0
    with plan.path.open("rb") as fh:
        for lineno, data in enumerate(fh, 1):
            if lineno == 1 and data.startswith(_BOM):
                data = data[3:]
            if data.strip():
                if not block:
                    start = lineno
                block.append(data)
            elif block:
                row = flush(block, start)
                block = []
                if row is not None:
                    yield row
        if block:
            row = flush(block, start)
            if row is not None:
                yield row


class _RowIssue(NamedTuple):
    reason: str
    detail: str
    raw: Any
    raw_base64: Any


def _open_csv(path: Path, delimiter: str) -> tuple[IO[str], Any]:
    # Long messages are to be quarantined as too_long, not to crash the reader.
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    # surrogateescape: bytes that are not UTF-8 reach the row as lone surrogates, so one bad row
    # is quarantined (bytes intact) instead of failing the file.
    fh = path.open("r", encoding="utf-8-sig", errors="surrogateescape", newline="")
    return fh, csv.reader(fh, delimiter=delimiter)


def _csv_header(path: Path, delimiter: str) -> tuple[str, ...]:
    fh, reader = _open_csv(path, delimiter)
    with fh:
        try:
            header: list[str] = next(reader, [])
        except csv.Error as exc:
            raise IngestError(f"{path}: the header row cannot be parsed as CSV ({exc})") from None
    return tuple(h.strip() for h in header)


def _csv_records(plan: _Plan, st: _FileStats) -> Iterator[tuple[int, list[str]]]:
    """Yield (1-based data row, fields) for every non-blank row after the header, counted."""
    fh, reader = _open_csv(plan.path, "\t" if plan.kind == "tsv" else ",")
    with fh:
        next(reader, None)
        try:
            for row_no, fields in enumerate(reader, 1):
                if row_no % _PROGRESS_EVERY == 0:
                    print(f"ingest:   {st.source}: {row_no} rows ...", flush=True)
                if not fields:
                    st.skipped_blank += 1
                    continue
                st.rows += 1
                yield row_no, fields
        except csv.Error as exc:
            raise IngestError(
                f"{plan.path}: CSV cannot be parsed near line {reader.line_num} ({exc}); fix the "
                "quoting there"
            ) from None


def _csv_row_issue(plan: _Plan, row_no: int, fields: list[str]) -> _RowIssue | None:
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
            return _RowIssue(
                "invalid_utf8",
                f"row {row_no} has bytes that are not UTF-8; save the file as UTF-8 (the "
                "original bytes are in raw_base64)",
                {n: b.decode("utf-8", "replace") for n, b in pairs},
                {n: _b64(b) for n, b in pairs},
            )
    if len(fields) != len(header):
        separator = "tabs" if plan.kind == "tsv" else "commas"
        return _RowIssue(
            "missing_field",
            f"row {row_no} has {len(fields)} fields but the header has {len(header)}; quote "
            f"values that contain {separator}",
            fields,
            None,
        )
    return None


def _csv_rows(plan: _Plan, st: _FileStats, sink: _Sink) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (1-based data row, {column: value}) for well-formed rows; quarantine the others."""
    for row_no, fields in _csv_records(plan, st):
        issue = _csv_row_issue(plan, row_no, fields)
        if issue is not None:
            sink.reject(st, issue.reason, issue.detail, row_no, issue.raw, None, issue.raw_base64)
            continue
        yield row_no, dict(zip(plan.columns, fields, strict=True))


def _jsonable(value: Any) -> Any:
    """Parquet values as JSON: dates as ISO strings, NaN as null."""
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, bytes):
        return _b64(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return str(value)


def _parquet_rows(plan: _Plan, st: _FileStats) -> Iterator[tuple[int, dict[str, Any]]]:
    row_no = 0
    for batch in pq.ParquetFile(plan.path).iter_batches(batch_size=8_192):
        for row in batch.to_pylist():
            row_no += 1
            st.rows += 1
            yield row_no, row
        if row_no // _PROGRESS_EVERY != (row_no - batch.num_rows) // _PROGRESS_EVERY:
            print(f"ingest:   {st.source}: {row_no} rows ...", flush=True)


def _string_cell(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        raise _Reject("missing_field", f"column `{key}` must hold text, got {_type_name(value)}")
    return value


def _read_table(plan: _Plan, st: _FileStats, sink: _Sink, cols: ColumnsParams) -> Iterator[dict]:
    """Tables with one unit per row: table_chat, table_wide, table_text."""
    is_parquet = plan.kind == "parquet"
    rows = _parquet_rows(plan, st) if is_parquet else _csv_rows(plan, st, sink)
    layout = plan.layout
    used = {
        "table_chat": (cols.messages,),
        "table_wide": (cols.prompt, cols.completion),
        "table_text": (cols.text,),
    }[layout or ""] + (cols.conversation_id,)
    extra = [c for c in plan.columns if c not in used]
    for row_no, row in rows:
        raw: Any = _jsonable(row) if is_parquet else row
        try:
            if layout == "table_chat":
                value = row[cols.messages]
                if isinstance(value, str):
                    try:
                        value = orjson.loads(value)
                    except orjson.JSONDecodeError as exc:
                        raise _Reject(
                            "malformed_json",
                            f"column `{cols.messages}` is not valid JSON ({exc}); it must hold "
                            'a JSON list like [{"role": "user", "content": "..."}]',
                        ) from None
                messages, extras = _messages(value, f"column `{cols.messages}`")
            elif layout == "table_wide":
                messages = [
                    ("user", _string_cell(row, cols.prompt)),
                    ("assistant", _string_cell(row, cols.completion)),
                ]
                extras = None
            else:
                messages = [("text", _string_cell(row, cols.text))]
                extras = None
        except _Reject as rej:
            sink.reject(st, rej.reason, rej.detail, row_no, raw)
            continue
        meta = {c: _jsonable(row[c]) if is_parquet else row[c] for c in extra}
        if extras is not None:
            meta["message_meta"] = extras
        cid = row.get(cols.conversation_id)
        cid = None if cid is None or cid == "" else str(cid)
        out = sink.offer(st, messages, row_no, layout or "", cid, meta, raw)
        if out is not None:
            yield out


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
    plan: _Plan, st: _FileStats, sink: _Sink, cols: ColumnsParams
) -> tuple[pa.Table, dict[int, _RowIssue]]:
    """Pass 1 over a long CSV: all rows into Arrow columns (compact, sortable), row problems
    kept by row number so the whole conversation can be quarantined with them."""
    header = plan.columns
    cid_at = header.index(cols.conversation_id)
    ts_at = header.index(cols.timestamp) if cols.timestamp in header else None
    issues: dict[int, _RowIssue] = {}
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

    for row_no, fields in _csv_records(plan, st):
        issue = _csv_row_issue(plan, row_no, fields)
        if issue is not None:
            issues[row_no] = issue
            # Still grouped with its conversation, so the whole conversation is held back.
            fields = [
                f.encode("utf-8", "surrogateescape").decode("utf-8", "replace") for f in fields
            ]
            fields = (fields + [""] * len(header))[: len(header)]
        if not fields[cid_at].strip():
            issue = issues.pop(row_no, None) or _RowIssue(
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


def _long_table_parquet(
    plan: _Plan, st: _FileStats, sink: _Sink, cols: ColumnsParams
) -> tuple[pa.Table, dict[int, _RowIssue]]:
    table = pq.read_table(plan.path)
    n = table.num_rows
    st.rows += n
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
            raise IngestError(
                f"{plan.path}: column `{cols.conversation_id}` has type {cid.type}; "
                "conversation ids must be text or numbers"
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
                _jsonable(row),
            )
        table = table.filter(pc.invert(no_id))
    return table, {}


def _read_long(plan: _Plan, st: _FileStats, sink: _Sink, cols: ColumnsParams) -> Iterator[dict]:
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
                r: {"row": r, **{c: _jsonable(g[c][i]) for c in data_cols}}
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
                        f"row {rows[i]}: column `{key}` must hold text, got {_type_name(value)}",
                        rows[0],
                        raw,
                        ordered,
                    )
                    return None
        meta: dict[str, Any] = {}
        for c in extra:
            values = g[c]
            if all(v == values[0] for v in values):
                meta[c] = _jsonable(values[0])
            else:
                meta[c] = _jsonable(values)
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


def _layout(columns: tuple[str, ...], cols: ColumnsParams, path: Path) -> str:
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


def _check_json_lines(path: Path) -> None:
    """A pretty-printed JSON document would quarantine line by line; stop with the fix instead."""
    with path.open("rb") as fh:
        for lineno, data in enumerate(fh, 1):
            first = data.removeprefix(_BOM).strip() if lineno == 1 else data.strip()
            if not first:
                continue
            if first in (b"[", b"{"):
                raise IngestError(
                    f"{path}:{lineno}: `{first.decode()}` alone on a line: this is one JSON "
                    "document spread over many lines, but retune reads JSON Lines (one complete "
                    "object per line). Convert it, e.g. `jq -c '.[]' in.json > out.jsonl` for a "
                    "JSON array"
                )
            return


def _plan(incoming: Path, cols: ColumnsParams) -> tuple[list[_Plan], list[str]]:
    """Every file under `incoming` (sorted, dotfiles ignored), with its reader and layout.

    Table layouts are decided here, so a file retune cannot read stops the stage before any
    output is written."""
    if not incoming.is_dir():
        files: list[Path] = []
    else:
        files = sorted(
            (p for p in incoming.rglob("*") if p.is_file()),
            key=lambda p: p.relative_to(incoming).as_posix(),
        )
    plans: list[_Plan] = []
    unsupported: list[str] = []
    for path in files:
        rel = path.relative_to(incoming)
        if any(part.startswith(".") for part in rel.parts):
            continue
        kind = SUPPORTED.get(path.suffix.lower())
        if kind is None:
            unsupported.append(rel.as_posix())
            continue
        plan = _Plan(path, rel.as_posix(), kind)
        if kind in ("csv", "tsv", "parquet"):
            if kind == "parquet":
                try:
                    columns = tuple(pq.read_schema(path).names)
                except (pa.ArrowInvalid, OSError) as exc:
                    raise IngestError(f"{path}: not a readable Parquet file ({exc})") from None
            else:
                columns = _csv_header(path, "\t" if kind == "tsv" else ",")
            layout = _layout(columns, cols, path) if columns else None
            plan = _Plan(path, rel.as_posix(), kind, layout, columns)
        elif kind == "jsonl":
            _check_json_lines(path)
        plans.append(plan)
    if not plans:
        found = f" It holds only: {', '.join(unsupported[:10])}." if unsupported else ""
        raise IngestError(
            f"{incoming}: no input files retune can read"
            f"{' (the folder does not exist)' if not incoming.is_dir() else ''}.{found} "
            f"Supported extensions: {', '.join(sorted(SUPPORTED))}. Put your data there, or run "
            "`make data` (or `retune sample`) to write the sample corpus."
        )
    return plans, unsupported


def _rows(
    plans: list[_Plan], sink: _Sink, cols: ColumnsParams, stats: list[_FileStats]
) -> Iterator[dict]:
    for plan in plans:
        st = sink.start(plan.source)
        stats.append(st)
        if plan.kind == "jsonl":
            yield from _read_jsonl(plan, st, sink, cols)
        elif plan.kind == "txt":
            yield from _read_txt(plan, st, sink)
        elif plan.layout is None:
            print(f"ingest: warning: {plan.source} has no header row; skipped", flush=True)
        elif plan.layout == "table_long":
            yield from _read_long(plan, st, sink, cols)
        else:
            yield from _read_table(plan, st, sink, cols)
        formats = ", ".join(sorted(st.formats)) or plan.layout or plan.kind
        print(
            f"ingest: {plan.source} ({formats}): {st.rows} rows, {st.accepted} accepted, "
            f"{st.quarantined} quarantined"
            + (f", {st.skipped_blank} blank skipped" if st.skipped_blank else ""),
            flush=True,
        )
        if st.rows != st.accepted + st.quarantined:
            raise RuntimeError(
                f"ingest lost rows in {plan.source}: {st.rows} read, {st.accepted} accepted, "
                f"{st.quarantined} quarantined (a bug in retune: please report it)"
            )


def ingest(
    incoming: Path, cfg: IngestParams, prepared_dir: Path, quarantine_dir: Path
) -> IngestResult:
    """Read every file under `incoming`; write `prepared_dir`/records.parquet + manifest.json and
    `quarantine_dir`/quarantine.jsonl. Outputs are replaced only when the whole run succeeds."""
    started = time.perf_counter()
    plans, unsupported = _plan(incoming, cfg.columns)
    if "secret" not in cfg.redact:
        print(
            "ingest: WARNING: ingest.redact does not list `secret`: API keys, tokens, passwords "
            "and private keys in your data will be stored for training, and a model can repeat "
            "them. Add `secret` back to ingest.redact unless you are sure the data holds none.",
            flush=True,
        )
    for name in unsupported:
        print(
            f"ingest: warning: skipping {name} (unsupported; retune reads "
            f"{', '.join(sorted(SUPPORTED))})",
            flush=True,
        )
    prepared_dir.mkdir(parents=True, exist_ok=True)
    quarantine_dir.mkdir(parents=True, exist_ok=True)
    records_file = prepared_dir / "records.parquet"
    quarantine_file = quarantine_dir / "quarantine.jsonl"
    manifest_file = prepared_dir / "manifest.json"
    records_tmp = prepared_dir / "records.parquet.tmp"
    quarantine_tmp = quarantine_dir / "quarantine.jsonl.tmp"
    stats: list[_FileStats] = []
    try:
        with quarantine_tmp.open("w", encoding="utf-8") as qfh:
            sink = _Sink(cfg, qfh)
            n_records = write_records(_rows(plans, sink, cfg.columns, stats), records_tmp)
    except BaseException:
        records_tmp.unlink(missing_ok=True)
        quarantine_tmp.unlink(missing_ok=True)
        raise
    input_rows = sum(s.rows for s in stats)
    accepted = sum(s.accepted for s in stats)
    quarantined = sum(s.quarantined for s in stats)
    accounted = input_rows == accepted + quarantined and n_records == len(sink.seen)
    if not accounted:
        raise RuntimeError(
            f"ingest lost rows: {input_rows} read, {accepted} accepted, {quarantined} quarantined, "
            f"{n_records} records written for {len(sink.seen)} ids (a bug in retune: please "
            "report it)"
        )
    version = data_version(sink.seen)
    os.replace(records_tmp, records_file)
    os.replace(quarantine_tmp, quarantine_file)
    sources = {
        s.source: {"rows": s.rows, "accepted": s.accepted, "quarantined": s.quarantined}
        for s in stats
    }
    write_json(manifest_file, {"data_version": version, "n_records": n_records, "sources": sources})
    report: dict[str, Any] = {
        "data_version": version,
        "input_rows": input_rows,
        "accepted_rows": accepted,
        "quarantined_rows": quarantined,
        "accounted": accounted,
        "records": n_records,
        "skipped_blank": sum(s.skipped_blank for s in stats),
        "quarantine_entries": sink.entries,
        "by_reason": {r: sink.by_reason.get(r, 0) for r in REASONS},
        "by_file": {
            s.source: {
                "rows": s.rows,
                "accepted": s.accepted,
                "quarantined": s.quarantined,
                "skipped_blank": s.skipped_blank,
                "records": s.records,
                "formats": dict(sorted(s.formats.items())),
            }
            for s in stats
        },
        "by_format": dict(sorted(sink.by_format.items())),
        "redact": list(sink.kinds),
        "redactions": {k: sink.redactions.get(k, 0) for k in sink.kinds},
        "unsupported_files": unsupported,
    }
    elapsed = time.perf_counter() - started
    reasons = ", ".join(f"{r} {n}" for r, n in sink.by_reason.most_common()) or "none"
    print(
        f"ingest: {input_rows} rows from {len(stats)} files -> {n_records} records; "
        f"{accepted} rows accepted, {quarantined} quarantined ({reasons}) -> {quarantine_file}; "
        f"redacted {sum(sink.redactions.values())}; {elapsed:.1f}s "
        f"({input_rows / max(elapsed, 1e-9):,.0f} rows/s); data_version {version[:12]}",
        flush=True,
    )
    if n_records == 0:
        print("ingest: warning: no records were accepted; see the quarantine file", flush=True)
    return IngestResult(
        records_file=records_file,
        manifest_file=manifest_file,
        quarantine_file=quarantine_file,
        data_version=version,
        n_records=n_records,
        input_rows=input_rows,
        accepted_rows=accepted,
        quarantined_rows=quarantined,
        report=report,
    )


def run(params: Params) -> IngestResult:
    """Edge: ingest `paths.incoming` into `paths.prepared`/`paths.quarantine`; write
    reports/ingest.json."""
    result = ingest(
        params.paths.incoming, params.ingest, params.paths.prepared, params.paths.quarantine
    )
    write_json(params.paths.reports / "ingest.json", result.report)
    return result


ingest_task = stage_task(run, name="ingest")

if __name__ == "__main__":
    stage_main(run)
