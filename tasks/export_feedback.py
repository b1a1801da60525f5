"""Stage `export_feedback`: corrected replies and well-rated exchanges into a new incoming file.

Runs as `python -m tasks.export_feedback`, as `export_feedback_task` in flows and as
`retune export-feedback`. Writes `paths.incoming`/feedback-<UTC time>.jsonl (chat JSONL, as
ingest reads it), new exchanges only, then `dvc add`s the incoming folder when DVC tracks it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retune.artifacts import EXPORT_FEEDBACK_REPORT, INCOMING, PREPARED_RECORDS
from retune.config import Params
from retune.data.records import ROLE_ORDER_REGEX, record_id
from retune.data.versioning import dvc_add
from retune.entry import stage_main, stage_task
from retune.online.feedback import clean_messages, deciding_feedback

if TYPE_CHECKING:
    import pandas as pd

EXPORT_GLOB = "feedback-*.jsonl"
# The `source` every exported line carries (ingest keeps it in the record's meta).
SOURCE = "retune-feedback"
_ROLE_ORDER = re.compile(ROLE_ORDER_REGEX)


@dataclass(frozen=True)
class Exchange:
    """One conversation to learn from: the prompt turns and the reply to imitate."""

    interaction_id: str
    feedback_id: int
    kind: str  # corrected | rated
    messages: tuple[tuple[str, str], ...]  # (role, content), cleaned and redacted

    @property
    def id(self) -> str:
        return record_id(self.messages)

    def line(self) -> dict[str, Any]:
        return {
            "messages": [{"role": r, "content": c} for r, c in self.messages],
            "source": SOURCE,
            "feedback": self.kind,
            "interaction_id": self.interaction_id,
            "feedback_id": self.feedback_id,
        }


@dataclass(frozen=True)
class ExportResult:
    file: Path | None  # None when nothing was new
    exported: int
    corrected: int  # of `exported`, with a person's corrected reply
    rated: int  # of `exported`, the model's own reply rated well
    skipped_duplicate: int  # already in the data, in an earlier export, or twice in this one
    ignored_negative: int  # rated down with no correction: nothing to imitate
    skipped_invalid: int  # not a conversation ingest accepts (roles, empty or too long text)
    interactions: int  # rated interactions considered
    dvc: str  # what happened to the DVC data version
    next_step: str | None = None

    def report(self) -> dict[str, Any]:
        return asdict(self)


def exchanges(
    feedback: pd.DataFrame, redact_kinds: tuple[str, ...], max_chars: int
) -> tuple[list[Exchange], dict[str, int]]:
    """What `feedback` (`FeedbackStore.feedback_frame`, oldest first) teaches: per interaction,
    the conversation with its corrected reply, or with the model's reply when it was rated up
    (or scored >= 0.5). Returns them, oldest first, and the counts of the rest:
    ignored_negative and skipped_invalid."""
    found: list[Exchange] = []
    counts = {"ignored_negative": 0, "skipped_invalid": 0}
    if feedback.empty:
        return found, counts
    for interaction_id, rows in feedback.groupby("interaction_id", sort=False):
        row = deciding_feedback(rows)
        correction = row["corrected_reply"]
        if isinstance(correction, str):
            kind, reply = "corrected", correction
        elif row["negative"]:
            counts["ignored_negative"] += 1
            continue
        else:
            kind, reply = "rated", row["reply"]
        messages = clean_messages(
            [*row["messages"], {"role": "assistant", "content": reply}], redact_kinds
        )
        roles = " ".join(r for r, _ in messages)
        if not _ROLE_ORDER.match(roles) or any(not c or len(c) > max_chars for _, c in messages):
            counts["skipped_invalid"] += 1
            continue
        found.append(Exchange(str(interaction_id), int(row["feedback_id"]), kind, tuple(messages)))
    found.sort(key=lambda e: e.feedback_id)
    return found, counts


def exported_before(incoming: Path) -> tuple[set[str], set[str]]:
    """(record ids, interaction ids) of every earlier export in `incoming`."""
    ids: set[str] = set()
    interactions: set[str] = set()
    for path in sorted(incoming.glob(EXPORT_GLOB)):
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                if not line.strip():
                    continue
                obj = json.loads(line)
                ids.add(record_id([(m["role"], m["content"]) for m in obj["messages"]]))
                if obj.get("interaction_id"):
                    interactions.add(str(obj["interaction_id"]))
    return ids, interactions


def prepared_ids(records_file: Path) -> set[str]:
    """Record ids of the prepared snapshot (none before the first ingest)."""
    import pyarrow.parquet as pq

    if not records_file.exists():
        return set()
    return set(pq.read_table(records_file, columns=["id"]).column("id").to_pylist())


def export(
    feedback: pd.DataFrame,
    incoming: Path,
    known_ids: set[str],
    redact_kinds: tuple[str, ...],
    max_chars: int,
    now: datetime | None = None,
) -> ExportResult:
    """Write the new exchanges of `feedback` to `incoming`/feedback-<UTC time>.jsonl; none whose
    record id is in `known_ids`, or which an earlier export in `incoming` holds (by content or
    interaction). Writes nothing when nothing is new. DVC is left to the caller."""
    found, counts = exchanges(feedback, redact_kinds, max_chars)
    seen_ids, seen_interactions = exported_before(incoming)
    seen_ids |= known_ids
    new: list[Exchange] = []
    for exchange in found:
        if exchange.id in seen_ids or exchange.interaction_id in seen_interactions:
            continue
        seen_ids.add(exchange.id)
        new.append(exchange)
    path = None
    if new:
        stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
        path = incoming / f"feedback-{stamp}.jsonl"
        n = 1
        while path.exists():
            n += 1
            path = incoming / f"feedback-{stamp}-{n}.jsonl"
        incoming.mkdir(parents=True, exist_ok=True)
        # A dotfile until complete: ingest skips dotfiles, so it never reads half an export.
        tmp = incoming / f".{path.name}.tmp"
        with tmp.open("w", encoding="utf-8") as fh:
            for exchange in new:
                fh.write(json.dumps(exchange.line(), ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    corrected = sum(e.kind == "corrected" for e in new)
    return ExportResult(
        file=path,
        exported=len(new),
        corrected=corrected,
        rated=len(new) - corrected,
        skipped_duplicate=len(found) - len(new),
        ignored_negative=counts["ignored_negative"],
        skipped_invalid=counts["skipped_invalid"],
        interactions=int(feedback["interaction_id"].nunique()) if len(feedback) else 0,
        dvc="nothing new" if path is None else "not run",
    )


def run(params: Params) -> ExportResult:
    """Edge: export the feedback store's new corrected and well-rated exchanges of
    `register.model_name` into `paths.incoming` (redacted with `ingest.redact`, deduplicated
    against the prepared records and earlier exports), `dvc add` it; write
    reports/export_feedback.json."""
    from retune.online.feedback import FeedbackStore

    store = FeedbackStore.open(params.feedback.store_url)
    try:
        feedback = store.feedback_frame(model_name=params.register.model_name)
    finally:
        store.close()
    result = export(
        feedback,
        INCOMING.path(params),
        prepared_ids(PREPARED_RECORDS.path(params)),
        tuple(dict.fromkeys(params.ingest.redact)),
        params.ingest.max_message_chars,
    )
    if result.file is not None:
        dvc, step = dvc_add(params.paths.incoming, "export_feedback")
        result = dataclasses.replace(result, dvc=dvc, next_step=step)
    EXPORT_FEEDBACK_REPORT.write(params, result.report())
    print(
        f"export_feedback: {result.exported} exchanges exported ({result.corrected} corrected, "
        f"{result.rated} rated up) -> {result.file or 'no file (nothing new)'}; "
        f"{result.skipped_duplicate} already in the data, {result.ignored_negative} rated down "
        f"without a correction, {result.skipped_invalid} not usable; DVC: {result.dvc}",
        flush=True,
    )
    if result.next_step:
        print(f"export_feedback: next: {result.next_step}", flush=True)
    return result


export_feedback_task = stage_task(run, name="export_feedback")

if __name__ == "__main__":
    stage_main(run)
