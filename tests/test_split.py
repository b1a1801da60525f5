"""The holdout split: deterministic, grouped by conversation, stable as data grows."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from retune.config import Params
from retune.records import Record, write_records
from tasks.split import is_holdout, run, split
from tests.conftest import make_conversations


def _table(n: int, start: int = 0) -> pa.Table:
    rows = [
        Record(
            messages=tuple(c),
            source="f.jsonl",
            line=i,
            format="chat_jsonl",
            conversation_id=f"conv-{start + i}",
        ).to_row()
        for i, c in enumerate(make_conversations(n, seed=start), start=0)
    ]
    from retune.records import SCHEMA

    return pa.Table.from_pylist(rows, schema=SCHEMA)


def test_adding_data_never_moves_an_existing_example() -> None:
    before = _table(300)
    after = pa.concat_tables([before, _table(300, start=300)])
    _, hold_before = split(before, 0.2)
    train_after, hold_after = split(after, 0.2)
    kept = set(hold_before.column("conversation_id").to_pylist())
    assert kept <= set(hold_after.column("conversation_id").to_pylist())
    assert not kept & set(train_after.column("conversation_id").to_pylist())


def test_fraction_is_roughly_respected_and_groups_stay_together() -> None:
    ids = [f"c{i}" for i in range(10_000)]
    share = sum(is_holdout(i, 0.1) for i in ids) / len(ids)
    assert 0.09 < share < 0.11
    # Rows of one conversation (same conversation_id) always land on the same side.
    table = _table(50)
    doubled = pa.concat_tables([table, table])
    train, hold = split(doubled, 0.5)
    assert not set(train.column("conversation_id").to_pylist()) & set(
        hold.column("conversation_id").to_pylist()
    )
    assert train.num_rows + hold.num_rows == 100


def test_run_writes_both_sides_and_report(prepared: Params) -> None:
    result = run(prepared)
    assert result.n_train + result.n_holdout == 80
    assert pq.read_table(result.train_file).num_rows == result.n_train
    assert (prepared.paths.reports / "split.json").exists()


def test_records_round_trip(tmp_path) -> None:
    path = tmp_path / "r.parquet"
    rows = [
        Record(
            messages=(("user", "a"), ("assistant", "b")), source="x", line=1, format="chat_jsonl"
        ).to_row()
    ]
    assert write_records(iter(rows), path) == 1
    back = pq.read_table(path).to_pylist()[0]
    assert back["roles"] == "user assistant" and back["text"] == "a\nb"
    assert back["id"] == rows[0]["id"] and back["conversation_id"] == rows[0]["id"]
