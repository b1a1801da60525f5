"""What ingest's format readers share, and the line-based formats: JSON Lines, JSON documents
(one array or object spread over lines) and plain text.

Used by `tasks.ingest` and `retune.data.tables` (CSV/TSV/Parquet). A reader never stops the stage:
what it cannot read goes to the sink's quarantine with file, line and reason, and every cost
is bounded by the input limit (`line_limit`), so one giant or deeply nested line costs little.
"""

from __future__ import annotations

import base64
import codecs
import errno
import io
import json
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import orjson  # a dependency of prefect, great-expectations and dvc; ~3x faster than json here

from retune.config import ColumnsParams

if TYPE_CHECKING:
    from retune.data.sink import Sink

# Deeper JSON than this is quarantined (`too_deep`): Python recursion would fail on it.
MAX_DEPTH = 64
# A line may hold this many bytes per character of ingest.max_message_chars (several long
# messages, escapes, extra fields), and never less than _MIN_LINE_BYTES.
LINE_BYTES_PER_CHAR = 64
_MIN_LINE_BYTES = 2**20
# A JSON document (not JSON Lines) is parsed whole, so it may be at most this many line limits.
_DOCUMENT_LINES = 64
PROGRESS_EVERY = 250_000

_BOMS = (  # longest first: the UTF-32 LE mark begins with the UTF-16 LE one
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
_OPEN_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_NOFOLLOW", 0)  # a link swapped in after the folder was listed
    | getattr(os, "O_NONBLOCK", 0)  # opening a FIFO must not wait for a writer
    | getattr(os, "O_CLOEXEC", 0)
)


def line_limit(max_message_chars: int) -> int:
    """The most bytes one line (CSV record, text block, JSON element, Parquet row) may hold."""
    return max(_MIN_LINE_BYTES, LINE_BYTES_PER_CHAR * max_message_chars)


def too_large(what: str, size: int, limit: int, unit: str = "bytes") -> str:
    return (
        f"{what} is {size:,} {unit}, over the limit of {limit:,} ({LINE_BYTES_PER_CHAR} x "
        "ingest.max_message_chars, at least 1 MiB); split it, or raise ingest.max_message_chars"
    )


class Reject(Exception):
    """A unit that cannot become a record; `reason` is one of ingest's reasons."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class ReadFailure(Exception):
    """The rest of a file from `line` on (line 0: the whole file) cannot be read."""

    def __init__(self, line: int, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.line = line
        self.reason = reason
        self.detail = detail


class Overlong(Exception):
    """Line `line` held `size` bytes (characters for UTF-16/32), more than the limit; it was
    skipped to its end. `head`: its first bytes, as far as the limit."""

    def __init__(self, line: int, size: int, head: bytes, unit: str) -> None:
        super().__init__(f"line {line}: {size} {unit}")
        self.line, self.size, self.head, self.unit = line, size, head, unit


@dataclass
class FileStats:
    index: int
    source: str
    rows: int = 0
    accepted: int = 0
    quarantined: int = 0
    skipped_blank: int = 0
    records: int = 0
    formats: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Plan:
    path: Path
    source: str  # as stored: relative to incoming, posix, personal data redacted
    kind: str  # a value of tasks.ingest.SUPPORTED
    root: Path  # the incoming folder, resolved: nothing outside it is opened
    layout: str | None = None  # table_* for tables
    columns: tuple[str, ...] = ()
    failure: ReadFailure | None = None  # found when planning: the file is quarantined whole


def _open_problem(exc: OSError) -> str:
    if exc.errno in (errno.EACCES, errno.EPERM):
        return (
            "cannot be opened: permission denied; make it readable by the user running retune "
            "(e.g. `chmod a+r` it)"
        )
    if exc.errno == errno.ELOOP:
        return "became a symbolic link while ingest ran; retune does not follow links"
    if exc.errno == errno.ENOENT:
        return "disappeared while ingest ran; run ingest again"
    return f"cannot be opened ({exc.strerror}); check the file and run ingest again"


def open_input(plan: Plan) -> BinaryIO:
    """Open an input file for reading: only a regular file inside `plan.root`, never through a
    symbolic link, never waiting on a FIFO or device. Raises ReadFailure (line 0)."""
    if not Path(os.path.realpath(plan.path)).is_relative_to(plan.root):
        raise ReadFailure(0, "unreadable", "lies outside the incoming folder; it is not read")
    try:
        fd = os.open(plan.path, _OPEN_FLAGS)
    except OSError as exc:
        raise ReadFailure(0, "unreadable", _open_problem(exc)) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ReadFailure(0, "unreadable", "is not a regular file (a FIFO or device?)")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def encoding_of(head: bytes) -> tuple[str, int]:
    """(codec, length of the byte-order mark) from a file's first bytes; UTF-8 without one."""
    for bom, name in _BOMS:
        if head.startswith(bom):
            return name, len(bom)
    return "utf-8", 0


def _ended(line: bytes | str) -> bool:
    """Whether a line read with a size limit is whole (ends where lines end)."""
    return line.endswith(b"\n") if isinstance(line, bytes) else line.endswith(("\n", "\r"))


class LineSource:
    """A file's lines, numbered from 1, each at most `limit` long: a longer one is skipped to
    its end without being held and raises Overlong (the next call goes on). UTF-16/32 with a
    byte-order mark is decoded; text that does not decode raises ReadFailure.

    `next()` gives UTF-8 bytes split at LF; `next_text()` text split as csv expects (at LF,
    CRLF or a lone CR; bytes that are not UTF-8 as lone surrogates)."""

    def __init__(self, fh: BinaryIO, limit: int, csv_text: bool = False) -> None:
        self.fh, self.limit, self.lineno = fh, limit, 0
        self.encoding, skip = encoding_of(fh.read(4))
        fh.seek(skip if self.encoding == "utf-8" else 0)  # the wrapper reads a UTF-16/32 mark
        self.text: io.TextIOWrapper | None = None
        self.unit = "bytes"
        if csv_text or self.encoding != "utf-8":
            self.text = io.TextIOWrapper(
                fh,
                encoding=self.encoding,
                errors="surrogateescape" if self.encoding == "utf-8" else "strict",
                newline="" if csv_text else "\n",
            )
            self.unit = "characters"

    def _read(self, n: int) -> bytes | str:
        if self.text is None:
            return self.fh.readline(n)
        try:
            return self.text.readline(n)
        except UnicodeDecodeError as exc:
            name = self.encoding.upper()
            raise ReadFailure(
                self.lineno + 1,
                "encoding",
                f"not valid {name} ({exc.reason}); convert the file to UTF-8, e.g. "
                f"`iconv -f {name} -t UTF-8 in > out`",
            ) from None

    def _line(self) -> bytes | str:
        try:
            line = self._read(self.limit + 1)
            if not line:
                raise StopIteration
            self.lineno += 1
            if len(line) <= self.limit or _ended(line):
                return line
            size = len(line) + self._skip()
        except OSError as exc:
            raise ReadFailure(self.lineno + 1, "unreadable", f"cannot be read ({exc})") from None
        head = line if isinstance(line, bytes) else line.encode("utf-8", "surrogateescape")
        raise Overlong(self.lineno, size, head[: self.limit], self.unit)

    def _skip(self) -> int:
        """Read the rest of an overlong line, a MiB at a time, holding none of it; its size."""
        size = 0
        while rest := self._read(2**20):
            size += len(rest)
            if _ended(rest):
                break
        return size

    def __iter__(self) -> LineSource:
        return self

    def __next__(self) -> bytes:
        line = self._line()
        return line if isinstance(line, bytes) else line.encode("utf-8", "surrogateescape")

    def next_text(self) -> str:
        line = self._line()
        return line if isinstance(line, str) else line.decode("utf-8", "surrogateescape")

    def items(self) -> Iterator[tuple[int, bytes | None, int]]:
        """(line number, line, size); the line is None when it was too long."""
        if self.text is not None:
            yield from self._decoded_items()
            return
        # The common case, UTF-8 bytes, without a call per line through `_line`.
        readline, limit = self.fh.readline, self.limit
        try:
            while line := readline(limit + 1):
                self.lineno += 1
                if len(line) <= limit or line.endswith(b"\n"):
                    yield self.lineno, line, len(line)
                else:
                    yield self.lineno, None, len(line) + self._skip()
        except OSError as exc:
            raise ReadFailure(self.lineno + 1, "unreadable", f"cannot be read ({exc})") from None

    def _decoded_items(self) -> Iterator[tuple[int, bytes | None, int]]:
        while True:
            try:
                data = next(self)
            except StopIteration:
                return
            except Overlong as exc:
                yield exc.line, None, exc.size
                continue
            yield self.lineno, data, len(data)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def type_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean"}.get(
        type(value), "null" if value is None else type(value).__name__
    )


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
