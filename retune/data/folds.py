"""Folds by conversation: which of k groups a conversation belongs to, and a table cut by them.

CV trains on all folds but one; tuning trials validate on one fold of the train split, so
hyperparameters are never chosen on the holdout that evaluate and the gate judge.
"""

from __future__ import annotations

import hashlib

import pyarrow as pa
import pyarrow.compute as pc


def fold_of(conversation_id: str, k: int) -> int:
    """The fold (0..k-1) this conversation belongs to; depends on nothing but the id and k, so
    adding data never moves a conversation to another fold."""
    digest = hashlib.sha256(b"retune-cv:" + conversation_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % k


def fold_split(records: pa.Table, k: int, index: int) -> tuple[pa.Table, pa.Table]:
    """Partition `records` into (train, validation) for fold `index` of `k`, by conversation."""
    folds = pa.array(
        [fold_of(c, k) for c in records.column("conversation_id").to_pylist()], type=pa.int64()
    )
    held_out = pc.equal(folds, index)
    return records.filter(pc.invert(held_out)), records.filter(held_out)
