"""The line-based formats of ingest: JSON Lines, JSON documents (one array or object spread over
lines) and plain text, and the checks of a JSON value that every format holding JSON shares
(depth, chat messages).

Used by `tasks.ingest` and `retune.data.tables` (CSV/TSV/Parquet). A reader never stops the stage:
what it cannot read goes to the sink's quarantine with file, line and reason, and every cost
is bounded by the input limit (`line_limit`), so one giant or deeply nested line costs little.
How an input is opened and read line by line is retune.data.inputs; its names are offered here
too.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, BinaryIO

import orjson  # a dependency of prefect, great-expectations and dvc; ~3x faster than json here

from retune.config import ColumnsParams
from retune.data.inputs import (
    LINE_BYTES_PER_CHAR,
    PROGRESS_EVERY,
    FileStats,
    LineSource,
    Overlong,
    Plan,
    ReadFailure,
    Reject,
    b64,
    encoding_of,
    line_limit,
    open_input,
    too_large,
    type_name,
)

if TYPE_CHECKING:
    from retune.data.sink import Sink

__all__ = [
    "LINE_BYTES_PER_CHAR",
    "MAX_DEPTH",
    "PROGRESS_EVERY",
    "FileStats",
    "LineSource",
    "Overlong",
    "Plan",
    "ReadFailure",
    "Reject",
    "b64",
    "check_depth",
    "depth_over",
    "encoding_of",
    "from_object",
    "line_limit",
    "messages_of",
    "open_input",
    "read_document",
    "read_jsonl",
    "read_txt",
    "too_large",
    "type_name",
]

# Deeper JSON than this is quarantined (`too_deep`): Python recursion would fail on it.
MAX_DEPTH = 64
# A JSON document (not JSON Lines) is parsed whole, so it may be at most this many line limits.
_DOCUMENT_LINES = 64


def depth_over(value: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether arrays and objects nest deeper than `limit` in `value` (without recursion)."""
    stack = [(value, 1)]
    while stack:
        v, d = stack.pop()
        children = v.values() if isinstance(v, dict) else v
        if d > limit:
            return True
        stack.extend((c, d + 1) for c in children if isinstance(c, dict | list))
    return False


def check_depth(text: str | bytes, value: Any) -> None:
    """Reject `value`, parsed from `text`, if it nests deeper than MAX_DEPTH (brackets counted
    first: text with fewer cannot)."""
    if isinstance(text, str):
        opened = text.count("[") + text.count("{")
    else:
        opened = text.count(b"[") + text.count(b"{")
    if opened > MAX_DEPTH and isinstance(value, dict | list) and depth_over(value):
        raise Reject("too_deep", _TOO_DEEP)


_TOO_DEEP = (
    f"JSON nested more than {MAX_DEPTH} levels deep; flatten it (retune reads messages and "
    "flat extra fields)"
)


def messages_of(
    value: Any, where: str
) -> tuple[list[tuple[str, str]], list[dict[str, Any]] | None]:
    """Validate a chat `messages` list; return (role, content) pairs and any per-message extras.

    `from`/`value` are read as `role`/`content` too (ShareGPT-style exports)."""
    if not isinstance(value, list) or not value:
        raise Reject(
            "missing_field",
            f"{where} must be a non-empty list of {{role, content}} objects, got "
            f"{type_name(value) if value != [] else 'an empty list'}",
        )
    out: list[tuple[str, str]] = []
    extras: list[dict[str, Any]] | None = None
    for i, m in enumerate(value, 1):
        if not isinstance(m, dict):
            raise Reject("missing_field", f"{where}[{i}] is a {type_name(m)}, not an object")
        role = m.get("role")
        if role is None:
            role = m.get("from")
        content = m.get("content")
        if content is None:
            content = m.get("value")
        if not isinstance(role, str):
            raise Reject(
                "missing_field", f"message {i} has no `role` string (got {type_name(role)})"
            )
        if not isinstance(content, str):
            raise Reject(
                "missing_field",
                f"message {i} ({role}) has no `content` string (got {type_name(content)})",
            )
        out.append((role, content))
        if len(m) > 2:
            if extras is None:
                extras = [{} for _ in value]
            extras[i - 1] = {
                k: v for k, v in m.items() if k not in ("role", "content", "from", "value")
            }
    return out, extras


def from_object(
    obj: Any, cols: ColumnsParams
) -> tuple[str, list[tuple[str, str]], str | None, dict[str, Any]]:
    """One JSON object -> (kind, messages, conversation id, meta); kind is chat|completion."""
    if not isinstance(obj, dict):
        raise Reject(
            "missing_field",
            f"a JSON {type_name(obj)} where an object with `{cols.messages}` or "
            f"`{cols.prompt}`/`{cols.completion}` was expected",
        )
    if cols.messages in obj:
        messages, extras = messages_of(obj.pop(cols.messages), f"`{cols.messages}`")
        kind = "chat"
        if extras is not None:
            obj["message_meta"] = extras
    elif cols.prompt in obj and cols.completion in obj:
        prompt, completion = obj.pop(cols.prompt), obj.pop(cols.completion)
        for key, v in ((cols.prompt, prompt), (cols.completion, completion)):
            if not isinstance(v, str):
                raise Reject("missing_field", f"`{key}` must be a string, got {type_name(v)}")
        messages = [("user", prompt), ("assistant", completion)]
        kind = "completion"
    else:
        raise Reject(
            "missing_field",
            f"no `{cols.messages}` and no `{cols.prompt}`+`{cols.completion}` (keys: "
            f"{', '.join(sorted(map(str, obj))) or 'none'}); if yours are named differently set "
            "ingest.columns.messages / .prompt / .completion in params.yaml",
        )
    cid = obj.pop(cols.conversation_id, None)
    return kind, messages, None if cid is None or cid == "" else str(cid), obj


_FMT_OF = {"chat": "chat_jsonl", "completion": "completion_jsonl"}


def _offer_object(
    st: FileStats, sink: Sink, cols: ColumnsParams, obj: Any, data: str | bytes, line: int, raw: Any
) -> dict | None:
    """Check the depth of `obj` (parsed from `data`) and offer it; quarantine what fails."""
    try:
        check_depth(data, obj)
        kind, messages, cid, meta = from_object(obj, cols)
    except Reject as rej:
        sink.reject(st, rej.reason, rej.detail, line, None if rej.reason == "too_deep" else raw)
        return None
    return sink.offer(st, messages, line, _FMT_OF[kind], cid, meta, raw)


def _is_document(first: bytes, plan: Plan) -> bool:
    """A JSON document spread over lines rather than JSON Lines: its first line opens an array
    or object and holds nothing else (any .json file whose first line opens an array)."""
    s = first.strip()
    return s in (b"[", b"{") or (plan.path.suffix.lower() == ".json" and s.startswith(b"["))


def read_jsonl(plan: Plan, st: FileStats, sink: Sink, cols: ColumnsParams) -> Iterator[dict]:
    """One JSON object per line; a file that is one JSON document goes to `read_document`."""
    with open_input(plan) as fh:
        lines = LineSource(fh, sink.line_limit)
        started = False
        for lineno, data, size in lines.items():
            if lineno % PROGRESS_EVERY == 0:
                print(f"ingest:   {st.source}: {lineno} lines ...", flush=True)
            if data is None:
                st.rows += 1
                what = f"line {lineno}"
                detail = too_large(what, size, lines.limit, lines.unit)
                sink.reject(st, "too_large", detail, lineno, None)
                continue
            if not started and data.strip():
                started = True
                if _is_document(data, plan):
                    st.skipped_blank = 0
                    yield from read_document(plan, st, sink, cols, fh, lines.encoding)
                    return
            try:
                obj = orjson.loads(data)
            except orjson.JSONDecodeError as exc:
                if not data.strip():
                    st.skipped_blank += 1
                    continue
                st.rows += 1
                _reject_unparsed(st, sink, lineno, data, str(exc))
                continue
            st.rows += 1
            row = _offer_object(st, sink, cols, obj, data, lineno, data)
            if row is not None:
                yield row


def _reject_unparsed(st: FileStats, sink: Sink, lineno: int, data: bytes, error: str) -> None:
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
            raw_base64=b64(data.rstrip(b"\r\n")),
        )
        return
    if "depth" in error or "recursion" in error:
        sink.reject(st, "too_deep", _TOO_DEEP, lineno, None)
        return
    sink.reject(
        st,
        "malformed_json",
        f"not valid JSON ({error}); each line must be one complete JSON object",
        lineno,
        data,
    )


_SPACE = re.compile(r"[ \t\n\r]*")
_NOT_JSON_LINES = (
    "; write one JSON object per line (JSON Lines), e.g. `jq -c '.[]' in.json > out.jsonl` "
    "for an array"
)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _document_units(text: str) -> Iterator[tuple[Any, int, int, int]]:
    """(value, start, end, line) of each unit of a JSON document: the elements of an array (at the
    top), then every other top-level value. Raises ReadFailure where parsing cannot go on."""
    decoder = json.JSONDecoder(parse_constant=_no_constant)
    pos, line, counted = _SPACE.match(text, 0).end(), 1, 0  # type: ignore[union-attr]
    in_array = text.startswith("[", pos)
    if in_array:
        pos = _SPACE.match(text, pos + 1).end()  # type: ignore[union-attr]
        if text.startswith("]", pos):
            in_array, pos = False, _SPACE.match(text, pos + 1).end()  # type: ignore[union-attr]
    while pos < len(text):
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            value, end = decoder.raw_decode(text, pos)
        except RecursionError:
            raise ReadFailure(line, "too_deep", _TOO_DEEP + _NOT_JSON_LINES) from None
        except ValueError as exc:  # JSONDecodeError, and integers of over 4,300 digits
            where = f" at line {exc.lineno}" if isinstance(exc, json.JSONDecodeError) else ""
            raise ReadFailure(
                line, "malformed_json", f"not valid JSON{where} ({exc}){_NOT_JSON_LINES}"
            ) from None
        yield value, pos, end, line
        pos = _SPACE.match(text, end).end()  # type: ignore[union-attr]
        if in_array:
            if text.startswith(",", pos):
                pos = _SPACE.match(text, pos + 1).end()  # type: ignore[union-attr]
            elif text.startswith("]", pos):
                in_array, pos = False, _SPACE.match(text, pos + 1).end()  # type: ignore[union-attr]
            else:
                line += text.count("\n", counted, pos)
                ended = "ends" if pos >= len(text) else "goes on"
                raise ReadFailure(
                    line,
                    "malformed_json",
                    f"the JSON array {ended} without `,` or `]` after an element{_NOT_JSON_LINES}",
                )
    if in_array:
        raise ReadFailure(
            line, "malformed_json", f"the JSON array is never closed{_NOT_JSON_LINES}"
        )


def _lone_surrogate(value: Any) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def read_document(
    plan: Plan, st: FileStats, sink: Sink, cols: ColumnsParams, fh: BinaryIO, encoding: str
) -> Iterator[dict]:
    """A JSON file that is one document: an array of records, one object, or objects one after
    another; `line` is where each record starts. What cannot be parsed is quarantined from there
    on (one unit: a broken document cannot be split reliably)."""
    limit = sink.line_limit * _DOCUMENT_LINES
    size = os.fstat(fh.fileno()).st_size
    if size > limit:
        raise ReadFailure(
            1, "too_large", too_large("this JSON document", size, limit) + _NOT_JSON_LINES
        )
    fh.seek(0)
    data = fh.read(limit + 1)
    if len(data) > limit:  # it grew since
        raise ReadFailure(
            1, "too_large", too_large("this JSON document", len(data), limit) + _NOT_JSON_LINES
        )
    try:
        text = data.decode(encoding + "-sig" if encoding == "utf-8" else encoding)
    except UnicodeDecodeError as exc:
        raise ReadFailure(
            1,
            "invalid_utf8" if encoding == "utf-8" else "encoding",
            f"byte {exc.start + 1} is not {encoding.upper()} ({exc.reason}); save the file as "
            "UTF-8",
        ) from None
    for obj, start, end, line in _document_units(text):
        st.rows += 1
        unit = text[start:end]
        if len(unit) > sink.line_limit:
            detail = too_large(f"the value at line {line}", len(unit), sink.line_limit)
            sink.reject(st, "too_large", detail + _NOT_JSON_LINES, line, None)
            continue
        if "\\u" in unit and _lone_surrogate(obj):
            detail = (
                "a \\u escape in it is half a surrogate pair, not a character (as JSON Lines "
                "readers refuse it too); write the character itself, or the whole pair"
            )
            sink.reject(st, "malformed_json", detail, line, unit)
            continue
        row = _offer_object(st, sink, cols, obj, unit, line, unit)
        if row is not None:
            yield row


def read_txt(plan: Plan, st: FileStats, sink: Sink) -> Iterator[dict]:
    """Blank-line separated blocks, each one document; a block over the limit is quarantined."""
    limit = sink.line_limit

    def flush(block: list[bytes], start: int, size: int) -> dict | None:
        st.rows += 1
        if size > limit:
            detail = too_large(f"the block from line {start}", size, limit)
            sink.reject(st, "too_large", detail, start, None)
            return None
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
                raw_base64=b64(data),
            )
            return None
        return sink.offer(st, [("text", text)], start, "text", None, {}, text)

    block: list[bytes] = []
    start = size = 0
    with open_input(plan) as fh:
        try:
            for lineno, data, n in LineSource(fh, limit).items():
                if data is None or data.strip():
                    if not size:
                        start = lineno
                    size += n
                    if data is not None and size <= limit:
                        block.append(data)
                elif size:
                    row = flush(block, start, size)
                    block, size = [], 0
                    if row is not None:
                        yield row
        except ReadFailure as exc:
            if size:  # the block read so far is part of what cannot be read
                raise ReadFailure(start, exc.reason, exc.detail) from None
            raise
    if size:
        row = flush(block, start, size)
        if row is not None:
            yield row
