"""An input file as ingest's readers see it: its plan and counts, the errors a reader raises,
opening it safely (a regular file inside the incoming folder), its encoding, and its lines, each
within the line limit (`line_limit`), so one giant line costs little.

Used by the format readers (retune.data.readers, retune.data.tables, retune.data.long_tables).
"""

from __future__ import annotations

import base64
import codecs
import errno
import io
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

# A line may hold this many bytes per character of ingest.max_message_chars (several long
# messages, escapes, extra fields), and never less than _MIN_LINE_BYTES.
LINE_BYTES_PER_CHAR = 64
_MIN_LINE_BYTES = 2**20
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
