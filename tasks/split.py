"""Stage `split`: a deterministic holdout split by conversation, with no holdout conversation
that has a near-duplicate in train (leakage).

Runs as `python -m tasks.split` (the dvc.yaml stage) and as `split_task` in Prefect flows.
Each conversation's side is a function of its id alone, so adding data never moves an
existing example between train and holdout; a holdout conversation with a near-duplicate in
train moves to train, and is reported and logged (`paths.split`/changes.jsonl).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from retune.artifacts import CLEAN_RECORDS, HOLDOUT_SPLIT, SPLIT, SPLIT_REPORT, TRAIN_SPLIT
from retune.config import NearDuplicateParams, Params
from retune.data import dedup
from retune.data.lineage import CHANGES_FILE, change, write_changes
from retune.data.records import read_records
from retune.entry import stage_main, stage_task
from retune.errors import RetuneError

_BUCKETS = 10_000
# Leaking pairs listed in reports/split.json (all of them are in paths.split/changes.jsonl).
_PAIRS_SHOWN = 100
_LOCATE = ("id", "conversation_id", "source", "line")


@dataclass(frozen=True)
class Leak:
    """A holdout record with a near-duplicate in train; it moves to train."""

    holdout: dict[str, Any]  # id, conversation_id, source, line of the holdout record
    train: dict[str, Any]  # the same of its near-duplicate in train
    similarity: float  # MinHash estimate of their Jaccard similarity


@dataclass(frozen=True)
class SplitResult:
    train_file: Path
    holdout_file: Path
    n_train: int
    n_holdout: int
    leaks: tuple[Leak, ...] = field(default=(), repr=False)
    moved: int = 0  # holdout records moved to train (a leak, or its conversation)


def is_holdout(conversation_id: str, holdout_fraction: float) -> bool:
    """True if this conversation belongs to the holdout; depends on nothing but the id."""
    digest = hashlib.sha256(b"retune-split:" + conversation_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % _BUCKETS < round(holdout_fraction * _BUCKETS)


def holdout_mask(records: pa.Table, holdout_fraction: float) -> np.ndarray:
    """Which records the id hash puts in the holdout."""
    ids = records.column("conversation_id").to_pylist()
    return np.fromiter((is_holdout(i, holdout_fraction) for i in ids), dtype=bool, count=len(ids))


def split(records: pa.Table, holdout_fraction: float) -> tuple[pa.Table, pa.Table]:
    """Partition records into (train, holdout) by `conversation_id`."""
    mask = pa.array(holdout_mask(records, holdout_fraction))
    return records.filter(pc.invert(mask)), records.filter(mask)


def find_leaks(records: pa.Table, holdout: np.ndarray, cfg: NearDuplicateParams) -> list[Leak]:
    """Holdout records (mask `holdout`) whose text has a near-duplicate in train (MinHash/LSH,
    `near_duplicates` as in hygiene), counting a holdout record found leaking as train from then
    on."""
    order = pc.sort_indices(records, [("source", "ascending"), ("line", "ascending")])
    with dedup.sketch_batches(
        dedup.iter_texts(records), cfg.threshold, cfg.num_perm, cfg.shingle_words
    ) as sk:
        matches = dedup.leaks(sk, holdout, order.to_numpy())
    if not matches:
        return []
    at = sorted({m.index for m in matches} | {m.of for m in matches})
    rows = dict(zip(at, records.select(list(_LOCATE)).take(pa.array(at)).to_pylist(), strict=True))
    return [Leak(rows[m.index], rows[m.of], round(m.similarity, 4)) for m in matches]


def split_without_leaks(
    records: pa.Table, holdout_fraction: float, cfg: NearDuplicateParams
) -> tuple[pa.Table, pa.Table, list[Leak], list[dict[str, Any]]]:
    """(train, holdout, leaks, change-log entries): the id-hash split, then every holdout
    conversation with a near-duplicate in train moved to train (all its records)."""
    holdout = holdout_mask(records, holdout_fraction)
    leaks = find_leaks(records, holdout, cfg)
    why = {leak.holdout["conversation_id"]: leak for leak in leaks}
    moved = holdout & pc.is_in(
        records.column("conversation_id"), pa.array(list(why), pa.string())
    ).to_numpy(zero_copy_only=False)
    entries = []
    for row in records.select(list(_LOCATE)).filter(pa.array(moved)).to_pylist():
        leak = why[row["conversation_id"]]
        t = leak.train
        entries.append(
            change(
                "split",
                "leakage",
                row,
                f"moved from holdout to train: near-duplicate (similarity {leak.similarity:.2f}) "
                f"of {t['id']} at {t['source']}:{t['line']} in train",
                train_id=t["id"],
                train_source=t["source"],
                train_line=t["line"],
                similarity=leak.similarity,
            )
        )
    final = pa.array(holdout & ~moved)
    return records.filter(pc.invert(final)), records.filter(final), leaks, entries


def _pair(leak: Leak) -> dict[str, Any]:
    h, t = leak.holdout, leak.train
    return {
        "holdout": f"{h['source']}:{h['line']}",
        "holdout_id": h["id"],
        "train": f"{t['source']}:{t['line']}",
        "train_id": t["id"],
        "similarity": leak.similarity,
    }


def run(params: Params) -> SplitResult:
    """Edge: read the clean records, write train/holdout Parquet, the change log of moved
    records and reports/split.json (with the leaking pairs)."""
    records = read_records(CLEAN_RECORDS.path(params), written_by=CLEAN_RECORDS.written_by)
    cfg = params.near_duplicates
    train, holdout, leaks, entries = split_without_leaks(
        records, params.split.holdout_fraction, cfg
    )
    if holdout.num_rows == 0 or train.num_rows == 0:
        raise RetuneError(
            f"split.holdout_fraction={params.split.holdout_fraction} left "
            f"{train.num_rows} train and {holdout.num_rows} holdout examples of "
            f"{records.num_rows}; both need at least one (add data or change the fraction)"
        )
    out = SPLIT.path(params)
    out.mkdir(parents=True, exist_ok=True)
    train_file, holdout_file = TRAIN_SPLIT.path(params), HOLDOUT_SPLIT.path(params)
    pq.write_table(train, train_file)
    pq.write_table(holdout, holdout_file)
    write_changes(out / CHANGES_FILE, entries)
    SPLIT_REPORT.write(
        params,
        {
            "n_train": train.num_rows,
            "n_holdout": holdout.num_rows,
            "leakage": {
                "threshold": cfg.threshold,
                "pairs": len(leaks),
                "moved_to_train": len(entries),
                "pairs_shown": [_pair(leak) for leak in leaks[:_PAIRS_SHOWN]],
                "changes": str(out / CHANGES_FILE),
            },
        },
    )
    print(
        f"split: {train.num_rows} train, {holdout.num_rows} holdout conversations; "
        f"{len(leaks)} holdout conversation(s) had a near-duplicate in train and moved there"
        + (f" (listed in {out / CHANGES_FILE})" if leaks else ""),
        flush=True,
    )
    return SplitResult(
        train_file,
        holdout_file,
        train.num_rows,
        holdout.num_rows,
        leaks=tuple(leaks),
        moved=len(entries),
    )


split_task = stage_task(run, name="split")

if __name__ == "__main__":
    stage_main(run)
