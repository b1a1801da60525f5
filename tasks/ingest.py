"""Stage `ingest`: every file under `paths.incoming` into canonical records, or into quarantine.

Runs as `python -m tasks.ingest` (the dvc.yaml stage) and as `ingest_task` in Prefect flows.
Every input row ends up in a record or in quarantine.jsonl (with file, line and reason); bad
input never stops the stage (too little left is for `validate` to say). The format readers are
in retune.readers, retune.tables and retune.long_tables.
"""

from __future__ import annotations

import base64
import json
import os
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from retune.config import ColumnsParams, IngestParams, Params
from retune.entry import stage_main, stage_task
from retune.errors import IngestError
from retune.lineage import data_version, pseudonym, stored_name
from retune.long_tables import read_long
from retune.pii import Redactor, strings_in, with_strings
from retune.readers import (
    FileStats,
    Plan,
    ReadFailure,
    Reject,
    line_limit,
    read_jsonl,
    read_txt,
)
from retune.records import ROLE_ORDER_REGEX, ROLES, Record, write_records
from retune.reports import write_json
from retune.tables import csv_header, layout, parquet_columns, read_table
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

# Records `validate`'s data contract would refuse: held back here, so the run goes on.
CONTRACT_REASONS: dict[str, str] = {
    "role_order": "roles out of order: an optional system turn, then user and assistant taking "
    "turns from the user (or one text document); see retune.records.ROLE_ORDER_REGEX",
    "text_length": "a record's text shorter than validate.min_chars or longer than "
    "validate.max_chars",
}
# Input that could not be read as units: a line, a row, a Parquet row group, the rest of a
# file from a line on, or a whole file (line 0). What cannot be counted counts as one row.
READ_REASONS: dict[str, str] = {
    "too_large": "a line, CSV record, text block, JSON document or Parquet row group over the "
    "limit derived from ingest.max_message_chars (reports/ingest.json: line_limit_bytes)",
    "too_deep": "JSON nested deeper than retune.readers.MAX_DEPTH levels",
    "malformed_csv": "a CSV/TSV header or row that cannot be parsed (a quote left open)",
    "encoding": "text that is neither UTF-8 nor UTF-16/32 with a byte-order mark",
    "corrupt_file": "a Parquet file, or a row group of one, that is empty, truncated or corrupt",
    "unreadable": "a file that cannot be opened or read (permissions, I/O error)",
    "read_error": "a file retune failed on unexpectedly (a bug: please report it)",
}
ALL_REASONS = {**REASONS, **CONTRACT_REASONS, **READ_REASONS}

# Why an entry under `paths.incoming` was not read at all (reports/ingest.json: skipped_files).
SKIPPED: dict[str, str] = {
    "hidden": "its name (or a folder's) starts with `.`; rename it to ingest it",
    "symlink": "a symbolic link: retune reads only files inside paths.incoming and follows no "
    "link; copy the file in instead",
    "special": "not a regular file (a FIFO, socket or device); it is never opened",
    "unlisted": "a folder that cannot be listed (permissions); make it readable",
    "unsupported": "an extension retune does not read",
    "empty": "a table without a header row (an empty file?)",
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
_ROLE_ORDER = re.compile(ROLE_ORDER_REGEX)


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


def _keys_in(value: Any) -> list[str]:
    """Every object key inside a JSON-like value, in a fixed order (`strings_in` skips keys)."""
    if isinstance(value, dict):
        return [k for key, v in value.items() for k in (str(key), *_keys_in(v))]
    if isinstance(value, list):
        return [k for v in value for k in _keys_in(v)]
    return []


def _with_keys(value: Any, keys: Iterator[str]) -> Any:
    """`value` with its keys replaced, in `_keys_in` order, by the next of `keys`."""
    if isinstance(value, dict):
        # A dict display evaluates each key before its value: the order `_keys_in` lists them.
        return {next(keys): _with_keys(v, keys) for v in value.values()}
    if isinstance(value, list):
        return [_with_keys(v, keys) for v in value]
    return value


class _Sink:
    """Turns candidate conversations into record rows or quarantine entries, keeping the counts."""

    def __init__(
        self,
        cfg: IngestParams,
        quarantine: IO[str],
        redactor: Redactor,
        text_chars: tuple[int, int] | None = None,
    ) -> None:
        self.role_map = {k.strip().lower(): v.strip().lower() for k, v in cfg.role_map.items()}
        self.max_chars = cfg.max_message_chars
        self.line_limit = line_limit(cfg.max_message_chars)
        self.text_chars = text_chars
        self.kinds = redactor.kinds
        # Most conversations hold no personal data: its prefilters spare them the detectors.
        self.redactor = redactor
        self.quarantine = quarantine
        # id -> (file index << 40 | line) of the accepted record: names the original of a duplicate
        # without keeping records in memory.
        self.seen: dict[str, int] = {}
        self.sources: list[str] = []
        self.redactions: Counter[str] = Counter()
        self.quarantine_redactions: Counter[str] = Counter()
        self.by_reason: Counter[str] = Counter()
        self.by_format: dict[str, dict[str, int]] = {}
        self.entries = 0

    def start(self, source: str) -> FileStats:
        self.sources.append(source)
        return FileStats(index=len(self.sources) - 1, source=source)

    def _redact_values(self, value: Any, more: list[str]) -> tuple[Any, list[str], Counter[str]]:
        """Redact the strings and keys of `value` and the texts `more`, in one call; a key that
        changes becomes a pseudonym (two redacted keys stay two)."""
        values, keys = strings_in(value), _keys_in(value)
        texts, counts = self.redactor.redact_many([*more, *values, *keys])
        if not counts:
            return value, more, counts
        n, m = len(more), len(more) + len(values)
        if values:
            value = with_strings(value, iter(texts[n:m]))
        if texts[m:] != keys:
            renamed = [
                k if r == k else pseudonym(k, r) for k, r in zip(keys, texts[m:], strict=True)
            ]
            value = _with_keys(value, iter(renamed))
        return value, texts[:n], counts

    def _redact(
        self, contents: list[str], conversation_id: str | None, meta: dict[str, Any]
    ) -> tuple[list[str], str | None, dict[str, Any], Counter[str]]:
        """Redact a conversation's messages, its id and the keys and strings of its extra fields,
        all in one call (they are stored, so personal data there would reach the records too)."""
        ids = [] if conversation_id is None else [conversation_id]
        meta, texts, counts = self._redact_values(meta, [*contents, *ids])
        if not counts:
            return contents, conversation_id, meta, counts
        n = len(contents)
        if ids and texts[-1] != conversation_id:
            # Still one id per conversation (split and cv group by it), pseudonymised.
            conversation_id = pseudonym(ids[0], texts[-1])
        return texts[:n], conversation_id, meta, counts

    def _check(
        self, messages: list[tuple[str, str]], message_rows: list[int] | None
    ) -> tuple[list[str], list[str]]:
        """(roles, contents) cleaned and mapped; Reject for messages that cannot be used."""
        roles: list[str] = []
        contents: list[str] = []
        for i, (role, content) in enumerate(messages, 1):
            at = _at(i, message_rows)
            r = role.strip().lower()
            if not r:
                raise Reject(
                    "missing_field", f"{at} has an empty role; fill in who speaks ({_ROLE_LIST})"
                )
            r = self.role_map.get(r, r)
            if r not in _ROLES:
                raise Reject(
                    "unknown_role",
                    f"{at} has role {role!r}, which is not one of {_ROLE_LIST}; "
                    f"map it in params.yaml, e.g. ingest.role_map: {{{r}: assistant}}",
                )
            c = normalize_text(content)
            if not c:
                raise Reject(
                    "empty_text",
                    f"{at} ({r}) is empty after cleaning; fill in or remove the turn (the "
                    "whole conversation is held back so no turn goes missing)",
                )
            roles.append(r)
            contents.append(c)
        order = " ".join(roles)
        if not _ROLE_ORDER.match(order):
            shown = order if len(order) <= 120 else order[:117] + "..."
            raise Reject(
                "role_order",
                f"the roles are `{shown}` (after ingest.role_map); a conversation is an optional "
                "system turn, then user and assistant taking turns from the user, or one text "
                "document; fix the order, or the roles, or ingest.role_map",
            )
        return roles, contents

    def offer(
        self,
        st: FileStats,
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
        try:
            roles, contents = self._check(messages, message_rows)
        except Reject as rej:
            self.reject(st, rej.reason, rej.detail, line, raw, rows)
            return None
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
        if self.text_chars is not None:
            low, high = self.text_chars
            if not low <= row["n_chars"] <= high:
                self.reject(
                    st,
                    "text_length",
                    f"the text has {row['n_chars']:,} characters (messages joined), outside "
                    f"validate.min_chars={low} to validate.max_chars={high}; shorten or split "
                    "the conversation, or change those limits",
                    line,
                    raw,
                    rows,
                )
                return None
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

    def _scrub(self, detail: str, raw: Any, raw_base64: Any) -> tuple[str, Any, Any]:
        """A quarantine entry's text redacted like a record's: its detail, the strings and keys
        of `raw`, and the bytes behind `raw_base64` (bytes that are not UTF-8 kept as they are)."""
        blobs = strings_in(raw_base64)
        decoded = [base64.b64decode(b).decode("utf-8", "surrogateescape") for b in blobs]
        raw, texts, counts = self._redact_values(raw, [detail, *decoded])
        if not counts:
            return detail, raw, raw_base64
        self.quarantine_redactions.update(counts)
        if blobs:
            encoded = [
                base64.b64encode(t.encode("utf-8", "surrogateescape")).decode() for t in texts[1:]
            ]
            raw_base64 = with_strings(raw_base64, iter(encoded))
        return texts[0], raw, raw_base64

    def reject(
        self,
        st: FileStats,
        reason: str,
        detail: str,
        line: int,
        raw: Any,
        rows: list[int] | None = None,
        raw_base64: Any = None,
        count: int | None = None,
    ) -> None:
        """Write one quarantine entry covering `rows` (table rows), `count` units from `line` on
        (a row group, the rest of a file) or one unit at `line`."""
        if reason not in ALL_REASONS:
            raise ValueError(f"unknown quarantine reason {reason!r}")
        if callable(raw):
            raw = raw()
        if isinstance(raw, bytes):
            raw = raw.decode("utf-8", "replace").rstrip("\r\n")
        if self.kinds:
            detail, raw, raw_base64 = self._scrub(detail, raw, raw_base64)
        # A long-table conversation is located by its first row in the file.
        entry: dict[str, Any] = {"source": st.source, "line": rows[0] if rows else line}
        if rows:
            entry["rows"] = rows
        n = count if count is not None else len(rows) if rows else 1
        if count is not None:
            entry["n_rows"] = count
        entry.update(reason=reason, detail=detail, raw=raw)
        if raw_base64 is not None:
            entry["raw_base64"] = raw_base64
        self.quarantine.write(json.dumps(entry, ensure_ascii=False, default=str) + "\n")
        st.quarantined += n
        self.by_reason[reason] += n
        self.entries += 1


def _at(i: int, message_rows: list[int] | None) -> str:
    return f"message {i} (row {message_rows[i - 1]})" if message_rows else f"message {i}"


def _walk(incoming: Path) -> tuple[list[tuple[Path, str]], list[tuple[str, str]]]:
    """Regular files under `incoming` as (path, name relative to it), and the entries not read
    as (name, a key of SKIPPED): no link is followed, no hidden folder entered."""
    files: list[tuple[Path, str]] = []
    skipped: list[tuple[str, str]] = []
    folders = [incoming]
    while folders:
        folder = folders.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError:
            skipped.append((folder.relative_to(incoming).as_posix(), "unlisted"))
            continue
        for entry in entries:
            path = Path(entry.path)
            rel = path.relative_to(incoming).as_posix()
            try:
                if entry.name.startswith("."):
                    skipped.append((rel, "hidden"))
                elif entry.is_symlink():
                    skipped.append((rel, "symlink"))
                elif entry.is_dir(follow_symlinks=False):
                    folders.append(path)
                elif entry.is_file(follow_symlinks=False):
                    files.append((path, rel))
                else:
                    skipped.append((rel, "special"))
            except OSError:
                skipped.append((rel, "unlisted"))
    return sorted(files, key=lambda f: f[1]), sorted(skipped)


def _plan(
    incoming: Path, cols: ColumnsParams, redactor: Redactor, limit: int
) -> tuple[list[Plan], list[dict[str, str]]]:
    """Every file under `incoming` (sorted) with its reader and layout, and the files skipped
    ({file, reason, detail}). Names are stored redacted (retune.lineage.stored_name).

    Table layouts are decided here, so a table whose columns retune cannot map stops the stage
    before any output is written; a file that cannot be read is planned to be quarantined."""
    files, skipped = _walk(incoming) if incoming.is_dir() else ([], [])
    root = Path(os.path.realpath(incoming))
    plans: list[Plan] = []
    for path, rel in files:
        source = stored_name(rel, redactor)
        kind = SUPPORTED.get(path.suffix.lower())
        if kind is None:
            skipped.append((rel, "unsupported"))
            continue
        plan = Plan(path, source, kind, root)
        if kind in ("csv", "tsv", "parquet"):
            try:
                columns = parquet_columns(plan) if kind == "parquet" else csv_header(plan, limit)
            except ReadFailure as exc:
                plans.append(Plan(path, source, kind, root, failure=exc))
                continue
            if not columns:
                skipped.append((rel, "empty"))
                continue
            plan = Plan(path, source, kind, root, layout(columns, cols, path), columns)
        plans.append(plan)
    out = [
        {"file": stored_name(rel, redactor), "reason": reason, "detail": SKIPPED[reason]}
        for rel, reason in sorted(skipped)
    ]
    if not plans:
        found = f" It holds only: {', '.join(s['file'] for s in out[:10])}." if out else ""
        raise IngestError(
            f"{incoming}: no input files retune can read"
            f"{' (the folder does not exist)' if not incoming.is_dir() else ''}.{found} "
            f"Supported extensions: {', '.join(sorted(SUPPORTED))}. Put your data there, or run "
            "`make data` (or `retune sample`) to write the sample corpus."
        )
    return plans, out


def _quarantine_rest(sink: _Sink, st: FileStats, exc: ReadFailure) -> None:
    """Quarantine what a reader could not read: the rows it counted but did not settle, and the
    rest of the file (one unit) when there were none."""
    if st.rows == st.accepted + st.quarantined:
        st.rows += 1
    where = f"from line {exc.line} on: " if exc.line > 1 else ""
    count = st.rows - st.accepted - st.quarantined
    sink.reject(st, exc.reason, where + exc.detail, exc.line, None, count=count)


def _rows(
    plans: list[Plan], sink: _Sink, cols: ColumnsParams, stats: list[FileStats]
) -> Iterator[dict]:
    for plan in plans:
        st = sink.start(plan.source)
        stats.append(st)
        try:
            if plan.failure is not None:
                raise plan.failure
            if plan.kind == "jsonl":
                yield from read_jsonl(plan, st, sink, cols)
            elif plan.kind == "txt":
                yield from read_txt(plan, st, sink)
            elif plan.layout == "table_long":
                yield from read_long(plan, st, sink, cols)
            else:
                yield from read_table(plan, st, sink, cols)
        except ReadFailure as exc:
            _quarantine_rest(sink, st, exc)
        except Exception as exc:  # one file retune fails on must not stop the others
            detail = (
                f"retune failed reading it ({type(exc).__name__}: {exc}); please report this "
                "bug (the rest of the data was ingested)"
            )
            _quarantine_rest(sink, st, ReadFailure(0, "read_error", detail))
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
    incoming: Path,
    cfg: IngestParams,
    prepared_dir: Path,
    quarantine_dir: Path,
    text_chars: tuple[int, int] | None = None,
) -> IngestResult:
    """Read every file under `incoming`; write `prepared_dir`/records.parquet + manifest.json and
    `quarantine_dir`/quarantine.jsonl. Outputs are replaced only when the whole run succeeds.

    `text_chars`: (validate.min_chars, validate.max_chars); a record outside them is quarantined
    here rather than failing validation."""
    started = time.perf_counter()
    redactor = Redactor(tuple(dict.fromkeys(cfg.redact)))
    plans, skipped = _plan(incoming, cfg.columns, redactor, line_limit(cfg.max_message_chars))
    if "secret" not in cfg.redact:
        print(
            "ingest: WARNING: ingest.redact does not list `secret`: API keys, tokens, passwords "
            "and private keys in your data will be stored for training, and a model can repeat "
            "them. Add `secret` back to ingest.redact unless you are sure the data holds none.",
            flush=True,
        )
    for s in skipped:
        why = s["detail"]
        if s["reason"] == "unsupported":
            why = f"unsupported; retune reads {', '.join(sorted(SUPPORTED))}"
        print(f"ingest: warning: skipping {s['file']} ({why})", flush=True)
    prepared_dir.mkdir(parents=True, exist_ok=True)
    quarantine_dir.mkdir(parents=True, exist_ok=True)
    records_file = prepared_dir / "records.parquet"
    quarantine_file = quarantine_dir / "quarantine.jsonl"
    manifest_file = prepared_dir / "manifest.json"
    records_tmp = prepared_dir / "records.parquet.tmp"
    quarantine_tmp = quarantine_dir / "quarantine.jsonl.tmp"
    stats: list[FileStats] = []
    try:
        with quarantine_tmp.open("w", encoding="utf-8") as qfh:
            sink = _Sink(cfg, qfh, redactor, text_chars)
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
        "by_reason": {r: sink.by_reason.get(r, 0) for r in ALL_REASONS},
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
        "quarantine_redactions": {k: sink.quarantine_redactions.get(k, 0) for k in sink.kinds},
        "line_limit_bytes": sink.line_limit,
        "skipped_files": skipped,
        "unsupported_files": [s["file"] for s in skipped if s["reason"] == "unsupported"],
    }
    elapsed = time.perf_counter() - started
    reasons = ", ".join(f"{r} {n}" for r, n in sink.by_reason.most_common()) or "none"
    skips = Counter(s["reason"] for s in skipped)
    not_read = ", ".join(f"{r} {n}" for r, n in skips.most_common())
    print(
        f"ingest: {input_rows} rows from {len(stats)} files -> {n_records} records; "
        f"{accepted} rows accepted, {quarantined} quarantined ({reasons}) -> {quarantine_file}; "
        f"{len(skipped)} files skipped{f' ({not_read})' if skipped else ''}; "
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
    contract = (params.validate.min_chars, params.validate.max_chars)
    paths = params.paths
    result = ingest(paths.incoming, params.ingest, paths.prepared, paths.quarantine, contract)
    write_json(params.paths.reports / "ingest.json", result.report)
    return result


ingest_task = stage_task(run, name="ingest")

if __name__ == "__main__":
    stage_main(run)
