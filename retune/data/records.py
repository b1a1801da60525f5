"""The canonical record: one training example (a conversation or a document) and its files.

`ingest` writes records, `validate` and `split` read them, `train`/`evaluate` read the split.
Every reader and writer of those Parquet files goes through this module.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from retune.errors import MissingInputError

# "text" marks a plain document (from .txt or a text-only table): no speakers, no template.
ROLES = ("system", "user", "assistant", "text")

# A conversation: optional system turn, then user/assistant alternating, starting with the user.
# A document: exactly one "text" message. Checked against the space-joined `roles` column.
ROLE_ORDER_REGEX = r"^(text|(system )?user( assistant user)*( assistant)?)$"

# `weight` is OpenAI's per-message fine-tuning weight: 0 leaves an assistant reply out of the
# loss, 1 or null (the default) trains on it. Records written before the field read without it.
MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string()), ("weight", pa.int8())])

SCHEMA = pa.schema(
    [
        ("id", pa.string()),  # content hash of the messages: stable across files and runs
        ("conversation_id", pa.string()),  # the source's own id where it has one, else `id`
        ("messages", pa.list_(MESSAGE_TYPE)),
        ("roles", pa.string()),  # space-joined roles, for the role-order expectation
        ("text", pa.string()),  # contents joined by newlines, for text expectations
        ("n_messages", pa.int32()),
        ("n_chars", pa.int32()),
        # Messages the loss trains on under train.loss_on: replies (see `n_trained`), for the
        # contract's expectation that every record trains on something.
        ("n_trained", pa.int32()),
        ("source", pa.string()),  # input file, relative to the incoming folder
        ("line", pa.int64()),  # 1-based line (JSONL/TXT) or data row (tables) of the first message
        ("format", pa.string()),  # see tasks.ingest.FORMATS
        ("meta", pa.string()),  # JSON object of extra fields (category, timestamps, ...)
    ]
)


@dataclass(frozen=True)
class Record:
    messages: tuple[tuple[str, str], ...]  # (role, content)
    source: str
    line: int
    format: str
    conversation_id: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    # Per message, in order: 0 or 1 where the input gave a `weight`, else None; () for none at
    # all. Not part of the id: the same turns are the same conversation whatever is trained.
    weights: tuple[int | None, ...] = ()

    @property
    def id(self) -> str:
        return record_id(self.messages)

    def to_row(self) -> dict[str, Any]:
        rid = self.id
        text = "\n".join(c for _, c in self.messages)
        return {
            "id": rid,
            "conversation_id": self.conversation_id or rid,
            "messages": [
                {"role": r, "content": c, "weight": w}
                for (r, c), w in zip(
                    self.messages, self.weights or (None,) * len(self.messages), strict=True
                )
            ],
            "roles": " ".join(r for r, _ in self.messages),
            "text": text,
            "n_messages": len(self.messages),
            "n_chars": len(text),
            "n_trained": n_trained(self.messages, self.weights),
            "source": self.source,
            "line": self.line,
            "format": self.format,
            "meta": json.dumps(self.meta, sort_keys=True, ensure_ascii=False),
        }


def n_trained(messages: Sequence[tuple[str, str]], weights: Sequence[int | None] = ()) -> int:
    """Messages of a record the loss trains on under `train.loss_on: replies`: a document's text
    (a document always trains on all of it), or each assistant reply whose weight is not 0.
    Packing never cuts a record short, so this is zero exactly when the record would give the
    loss no token to train on."""
    weights = tuple(weights) or (None,) * len(messages)
    return sum(
        role == "text" or (role == "assistant" and weight != 0)
        for (role, _), weight in zip(messages, weights, strict=True)
    )


def record_id(messages: Sequence[tuple[str, str]]) -> str:
    """Content hash of a conversation: the same conversation has one id wherever it is."""
    payload = json.dumps([list(m) for m in messages], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:20]


def write_records(rows: Iterable[dict[str, Any]], path: Path, batch_size: int = 5_000) -> int:
    """Stream row dicts (see `Record.to_row`) into a Parquet file in batches; return the count."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with pq.ParquetWriter(path, SCHEMA) as writer:
        batch: list[dict[str, Any]] = []
        for row in rows:
            batch.append(row)
            if len(batch) >= batch_size:
                writer.write_table(pa.Table.from_pylist(batch, schema=SCHEMA))
                n += len(batch)
                batch = []
        if batch or n == 0:
            writer.write_table(pa.Table.from_pylist(batch, schema=SCHEMA))
            n += len(batch)
    return n


def read_records(
    path: Path, columns: list[str] | None = None, written_by: str | None = None
) -> pa.Table:
    """Read a records Parquet file written by `write_records`; a missing one is a
    MissingInputError naming `written_by`, the stage to run first."""
    if not path.is_file():
        raise MissingInputError(path, written_by)
    return pq.read_table(path, columns=columns)


def iter_messages(table: pa.Table) -> Iterable[list[dict[str, str]]]:
    """Yield each record's messages as chat-template dicts, batch by batch."""
    for batch in table.select(["messages"]).to_batches(max_chunksize=2_048):
        yield from batch.column(0).to_pylist()
