"""Stage `split`: a deterministic holdout split by conversation.

Runs as `python -m tasks.split` (the dvc.yaml stage) and as `split_task` in Prefect flows.
Each conversation's side is a function of its id alone, so adding data never moves an
existing example between train and holdout.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from retune.config import Params
from retune.entry import stage_main, stage_task
from retune.errors import RetuneError
from retune.records import read_records
from retune.reports import write_json

_BUCKETS = 10_000


@dataclass(frozen=True)
class SplitResult:
    train_file: Path
    holdout_file: Path
    n_train: int
    n_holdout: int


def is_holdout(conversation_id: str, holdout_fraction: float) -> bool:
    """True if this conversation belongs to the holdout; depends on nothing but the id."""
    digest = hashlib.sha256(b"retune-split:" + conversation_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % _BUCKETS < round(holdout_fraction * _BUCKETS)


def split(records: pa.Table, holdout_fraction: float) -> tuple[pa.Table, pa.Table]:
    """Partition records into (train, holdout) by `conversation_id`."""
    ids = records.column("conversation_id").to_pylist()
    mask = pa.array([is_holdout(i, holdout_fraction) for i in ids], type=pa.bool_())
    return records.filter(pc.invert(mask)), records.filter(mask)


def run(params: Params) -> SplitResult:
    """Edge: read the prepared records, write train/holdout Parquet and reports/split.json."""
    records = read_records(params.paths.prepared / "records.parquet")
    train, holdout = split(records, params.split.holdout_fraction)
    if holdout.num_rows == 0 or train.num_rows == 0:
        raise RetuneError(
            f"split.holdout_fraction={params.split.holdout_fraction} left "
            f"{train.num_rows} train and {holdout.num_rows} holdout examples of "
            f"{records.num_rows}; both need at least one (add data or change the fraction)"
        )
    out = params.paths.split
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(train, out / "train.parquet")
    pq.write_table(holdout, out / "holdout.parquet")
    write_json(
        params.paths.reports / "split.json",
        {"n_train": train.num_rows, "n_holdout": holdout.num_rows},
    )
    print(f"split: {train.num_rows} train, {holdout.num_rows} holdout conversations")
    return SplitResult(
        out / "train.parquet", out / "holdout.parquet", train.num_rows, holdout.num_rows
    )


split_task = stage_task(run, name="split")

if __name__ == "__main__":
    stage_main(run)
