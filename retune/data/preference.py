"""Preference data from rated exchanges: unpaired (prompt, reply, desirable) examples for KTO and
(prompt, chosen, rejected) pairs for DPO, each rated exchange used or skipped with a reason.

Pure functions over `FeedbackStore.feedback_frame`; the `preference_data` stage writes what
they return (`PREFERENCE_FILES`) and checks it against its contract.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retune.artifacts import DPO_FILE, EXCHANGES_FILE, KTO_FILE, MANIFEST_FILE
from retune.data.records import ROLE_ORDER_REGEX, record_id
from retune.online.feedback import clean_messages, deciding_feedback

if TYPE_CHECKING:
    import pandas as pd

    from retune.config import PreferenceDataParams

PREFERENCE_FILES = (KTO_FILE, DPO_FILE, EXCHANGES_FILE, MANIFEST_FILE)

# Why a rated exchange was left out (the `outcome` of an exchange not used).
SKIP_REASONS = {
    "other_version": "rated on a version preference_data.versions leaves out",
    "invalid": "not a conversation ingest accepts (role order, empty or over-long message)",
    "too_long": "prompt and reply over preference_data.max_chars",
    "duplicate": "the same prompt and reply(s) rated again later: the latest rating counts",
}
SPLITS = ("train", "holdout")
_ROLE_ORDER = re.compile(ROLE_ORDER_REGEX)


@dataclass
class PreferenceSet:
    """What the feedback teaches, and what happened to every rated exchange."""

    kto: list[dict[str, Any]] = field(default_factory=list)
    dpo: list[dict[str, Any]] = field(default_factory=list)
    # One per rated interaction: its deciding feedback and outcome (a split, or a skip reason).
    exchanges: list[dict[str, Any]] = field(default_factory=list)

    def counts(self) -> dict[str, Any]:
        """Examples per split and label, pairs per split, exchanges per outcome."""
        outcomes: dict[str, int] = {}
        for e in self.exchanges:
            outcomes[e["outcome"]] = outcomes.get(e["outcome"], 0) + 1
        return {
            "exchanges": len(self.exchanges),
            "outcomes": dict(sorted(outcomes.items())),
            "kto": {
                s: {
                    "desirable": sum(r["split"] == s and r["label"] for r in self.kto),
                    "undesirable": sum(r["split"] == s and not r["label"] for r in self.kto),
                }
                for s in SPLITS
            },
            "dpo": {s: sum(r["split"] == s for r in self.dpo) for s in SPLITS},
        }


def is_holdout(prompt_id: str, holdout_fraction: float) -> bool:
    """Whether the hash of a prompt's record id puts its exchanges in the holdout: the same
    prompt is never in both, and adding ratings never moves one across."""
    digest = hashlib.sha256(b"retune-preference:" + prompt_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < holdout_fraction


def _desirable(row: dict[str, Any], threshold: float) -> bool:
    if row["rating"] in ("up", "down"):
        return bool(row["rating"] == "up")
    return float(row["score"]) >= threshold


def _newest_version(versions: Iterable[str]) -> str | None:
    found = [str(v) for v in versions]
    if not found:
        return None
    return max(found, key=lambda v: (int(v), v) if v.isdigit() else (-1, v))


def _messages(pairs: Iterable[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"role": r, "content": c} for r, c in pairs]


def build(
    feedback: pd.DataFrame,
    cfg: PreferenceDataParams,
    redact_kinds: tuple[str, ...],
    max_message_chars: int,
) -> PreferenceSet:
    """The preference set `feedback` (oldest first) gives. Per rated interaction, its deciding
    feedback (`deciding_feedback`): a correction makes the corrected reply desirable, the
    served one undesirable and the two a DPO pair; a rating or score labels the served reply.
    Text is cleaned and redacted as ingest does. The newest rating of a prompt and reply
    counts; older ones are duplicates. Each exchange is used (`train` or `holdout`, by a hash
    of the prompt) or skipped with a reason in `SKIP_REASONS`."""
    out = PreferenceSet()
    if feedback.empty:
        return out
    newest = _newest_version(feedback["model_version"].unique())
    by_interaction = feedback.groupby("interaction_id", sort=False)
    decided = [deciding_feedback(rows) for _, rows in by_interaction]
    seen: set[str] = set()
    # Newest first, so the latest rating of a repeated exchange is the one kept.
    for row in sorted(decided, key=lambda r: int(r["feedback_id"]), reverse=True):
        exchange = {
            "interaction_id": str(row["interaction_id"]),
            "feedback_id": int(row["feedback_id"]),
            "model_version": str(row["model_version"]),
        }
        out.exchanges.append(exchange)
        correction = row["corrected_reply"] if isinstance(row["corrected_reply"], str) else None
        prompt = clean_messages(row["messages"], redact_kinds)
        served_and_corrected = [row["reply"], *([correction] if correction else [])]
        replies = clean_messages(
            [{"role": "assistant", "content": str(r)} for r in served_and_corrected],
            redact_kinds,
        )
        longest = max((len(c) for _, c in replies), default=0)
        prompt_chars = sum(len(c) for _, c in prompt)
        if cfg.versions == "newest" and exchange["model_version"] != newest:
            exchange["outcome"] = "other_version"
        elif not _ROLE_ORDER.match(" ".join([*(r for r, _ in prompt), "assistant"])) or any(
            not c or len(c) > max_message_chars for _, c in [*prompt, *replies]
        ):
            exchange["outcome"] = "invalid"
        elif prompt_chars + longest > cfg.max_chars:
            exchange["outcome"] = "too_long"
        else:
            key = record_id([*prompt, *replies])
            if key in seen:
                exchange["outcome"] = "duplicate"
                continue
            seen.add(key)
            split = "holdout" if is_holdout(record_id(prompt), cfg.holdout_fraction) else "train"
            exchange["outcome"] = split
            base = {**exchange, "prompt": _messages(prompt), "split": split}
            served = replies[0][1]
            if correction is None:
                out.kto.append(
                    base
                    | {
                        "id": record_id([*prompt, ("assistant", served)]),
                        "completion": served,
                        "label": _desirable(row, cfg.score_threshold),
                        "origin": "served",
                    }
                )
                continue
            corrected = replies[1][1]
            for reply, label, origin in ((corrected, True, "corrected"), (served, False, "served")):
                out.kto.append(
                    base
                    | {
                        "id": record_id([*prompt, ("assistant", reply)]),
                        "completion": reply,
                        "label": label,
                        "origin": origin,
                    }
                )
            out.dpo.append(base | {"id": key, "chosen": corrected, "rejected": served})
    for rows in (out.kto, out.dpo, out.exchanges):
        rows.sort(key=lambda r: (int(r["feedback_id"]), str(r.get("id", ""))))
    return out


def set_rows(folder: Path, kind: str, split: str) -> list[dict[str, Any]]:
    """The KTO examples (`kind` "kto") or DPO pairs ("dpo") of one split of the preference set
    in `folder`; none when it has no such file (no set written yet)."""
    import pyarrow.parquet as pq

    file = folder / (KTO_FILE if kind == "kto" else DPO_FILE)
    if not file.is_file():
        return []
    return [r for r in pq.read_table(file).to_pylist() if r["split"] == split]


def text_of(row: dict[str, Any]) -> str:
    """Every text of an example or pair, joined: what its contract checks for personal data."""
    replies = [row[k] for k in ("completion", "chosen", "rejected") if k in row]
    return "\n".join([*(m["content"] for m in row["prompt"]), *replies])
