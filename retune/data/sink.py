"""Where ingest's readers send what they read: each conversation cleaned, checked and
redacted into a record row, or a quarantine entry (redacted too), every row counted.

Used by `tasks.ingest` (which makes one per run) and, through it, by the readers in
retune.data.readers, retune.data.tables and retune.data.long_tables. Nothing runs here.
"""

from __future__ import annotations

import base64
import json
import re
from collections import Counter
from collections.abc import Iterator
from typing import IO, Any

from retune.config import IngestParams
from retune.data.lineage import pseudonym
from retune.data.pii import Redactor, strings_in, with_strings
from retune.data.readers import FileStats, Reject, line_limit
from retune.data.records import ROLE_ORDER_REGEX, ROLES, Record
from retune.data.text import normalize_text

# Why a unit went to quarantine.jsonl: a fixed vocabulary (reports and tests count by it).
REASONS: dict[str, str] = {
    "invalid_utf8": "bytes that are not UTF-8; `raw_base64` keeps them exactly",
    "malformed_json": "a JSONL line, or a `messages` cell, that is not valid JSON",
    "missing_field": "no messages / prompt+completion / role / content, a value of the wrong type, "
    "a table row whose field count differs from the header, an unusable timestamp, or a message "
    "`weight` that is not 0 or 1 or is on a message other than the assistant's",
    "unknown_role": "a role that is not system, user, assistant or text after ingest.role_map",
    "empty_text": "a message empty after cleaning (the whole conversation: a turn would be lost)",
    "too_long": "a message longer than ingest.max_message_chars",
    "duplicate": "the same messages as a record already accepted (`detail` names where)",
}

# Records `validate`'s data contract would refuse: held back here, so the run goes on.
CONTRACT_REASONS: dict[str, str] = {
    "role_order": "roles out of order: an optional system turn, then user and assistant taking "
    "turns from the user (or one text document); see retune.data.records.ROLE_ORDER_REGEX",
    "text_length": "a record's text shorter than validate.min_chars or longer than "
    "validate.max_chars",
}
# Input that could not be read as units: a line, a row, a Parquet row group, the rest of a
# file from a line on, or a whole file (line 0). What cannot be counted counts as one row.
READ_REASONS: dict[str, str] = {
    "too_large": "a line, CSV record, text block, JSON document or Parquet row group over the "
    "limit derived from ingest.max_message_chars (reports/ingest.json: line_limit_bytes)",
    "too_deep": "JSON nested deeper than retune.data.readers.MAX_DEPTH levels",
    "malformed_csv": "a CSV/TSV header or row that cannot be parsed (a quote left open)",
    "encoding": "text that is neither UTF-8 nor UTF-16/32 with a byte-order mark",
    "corrupt_file": "a Parquet file, or a row group of one, that is empty, truncated or corrupt",
    "unreadable": "a file that cannot be opened or read (permissions, I/O error)",
    "read_error": "a file retune failed on unexpectedly (a bug: please report it)",
}
ALL_REASONS = {**REASONS, **CONTRACT_REASONS, **READ_REASONS}

_ROLES = frozenset(ROLES)
_ROLE_LIST = ", ".join(ROLES)
_ROLE_ORDER = re.compile(ROLE_ORDER_REGEX)


def _keys_in(value: Any) -> list[str]:
    """Every object key inside a JSON-like value, in a fixed order (`strings_in` skips keys)."""
    keys: list[str] = []
    if isinstance(value, dict):
        for key, v in value.items():
            keys.append(str(key))
            if isinstance(v, dict | list):
                keys += _keys_in(v)
    elif isinstance(value, list):
        for v in value:
            if isinstance(v, dict | list):
                keys += _keys_in(v)
    return keys


def _with_keys(value: Any, keys: Iterator[str]) -> Any:
    """`value` with its keys replaced, in `_keys_in` order, by the next of `keys`."""
    if isinstance(value, dict):
        # A comprehension evaluates each key before its value: the order `_keys_in` lists them.
        return {next(keys): _with_keys(v, keys) for v in value.values()}
    if isinstance(value, list):
        return [_with_keys(v, keys) for v in value]
    return value


class Sink:
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
            r = role.strip().lower()
            if not r:
                raise Reject(
                    "missing_field",
                    f"{_at(i, message_rows)} has an empty role; fill in who speaks ({_ROLE_LIST})",
                )
            r = self.role_map.get(r, r)
            if r not in _ROLES:
                raise Reject(
                    "unknown_role",
                    f"{_at(i, message_rows)} has role {role!r}, which is not one of {_ROLE_LIST}; "
                    f"map it in params.yaml, e.g. ingest.role_map: {{{r}: assistant}}",
                )
            c = normalize_text(content)
            if not c:
                raise Reject(
                    "empty_text",
                    f"{_at(i, message_rows)} ({r}) is empty after cleaning; fill in or remove "
                    "the turn (the whole conversation is held back so no turn goes missing)",
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
            weights, meta = _weights(meta, roles, message_rows)
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
        record = Record(cleaned, st.source, line, fmt, conversation_id, meta, weights)
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


def _weights(
    meta: dict[str, Any], roles: list[str], message_rows: list[int] | None
) -> tuple[tuple[int | None, ...], dict[str, Any]]:
    """The messages' `weight`s (OpenAI's fine-tuning format: 0 or 1, on assistant messages),
    taken out of the per-message extras the readers keep in `meta["message_meta"]`; returns
    them and `meta` without them. Reject for a weight train could not honour."""
    extras = meta.get("message_meta")
    if not isinstance(extras, list) or not any(
        isinstance(e, dict) and "weight" in e for e in extras
    ):
        return (), meta
    weights: list[int | None] = []
    rest: list[Any] = []
    for i, (extra, role) in enumerate(zip(extras, roles, strict=True), 1):
        if not isinstance(extra, dict) or "weight" not in extra:
            weights.append(None)
            rest.append(extra)
            continue
        weight = extra["weight"]
        if isinstance(weight, bool) or weight not in (0, 1):
            raise Reject(
                "missing_field",
                f"{_at(i, message_rows)} ({role}) has weight {weight!r}; a weight is 0 (leave the "
                "reply out of training) or 1 (train on it)",
            )
        if role != "assistant":
            raise Reject(
                "missing_field",
                f"{_at(i, message_rows)} ({role}) has a weight; only assistant messages take one "
                "(the replies are what is trained on): remove it",
            )
        weights.append(int(weight))
        rest.append({k: v for k, v in extra.items() if k != "weight"})
    kept = {k: v for k, v in meta.items() if k != "message_meta"}
    if any(rest):
        kept["message_meta"] = rest
    return tuple(weights), kept


def _at(i: int, message_rows: list[int] | None) -> str:
    return f"message {i} (row {message_rows[i - 1]})" if message_rows else f"message {i}"
