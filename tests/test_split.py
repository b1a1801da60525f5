"""The holdout split: deterministic, grouped by conversation, stable as data grows."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq

from retune.config import NearDuplicateParams, Params
from retune.data.records import SCHEMA, Record, write_records
from tasks.split import is_holdout, run, split, split_without_leaks
from tests.helpers import make_conversations


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


def _doc(rng: random.Random, n: int = 60) -> list[str]:
    return [f"w{rng.randrange(5_000)}" for _ in range(n)]


def _records(texts: list[str], cids: list[str]) -> pa.Table:
    rows = [
        Record(
            messages=(("user", t), ("assistant", "Noted.")),
            source="chats.jsonl",
            line=i + 1,
            format="chat_jsonl",
            conversation_id=cid,
        ).to_row()
        for i, (t, cid) in enumerate(zip(texts, cids, strict=True))
    ]
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def _ids(n: int, holdout: bool) -> list[str]:
    return [c for c in (f"conv-{i}" for i in range(10_000)) if is_holdout(c, 0.2) == holdout][:n]


def test_a_holdout_near_duplicate_of_train_moves_to_train_and_is_reported() -> None:
    rng = random.Random(0)
    train_ids, hold_ids = _ids(20, False), _ids(6, True)
    bodies = [" ".join(_doc(rng)) for _ in range(26)]
    texts = (
        bodies[:20]
        + bodies[20:24]
        + [
            "Hello! " + bodies[3] + " thanks",  # near-duplicate of train record 4
            bodies[7].replace(bodies[7].split()[30], "changed", 1),  # near-duplicate of record 8
        ]
    )
    records = _records(texts, train_ids + hold_ids)
    train, holdout, leaks, changes = split_without_leaks(records, 0.2, NearDuplicateParams())
    assert {leak.holdout["conversation_id"] for leak in leaks} == set(hold_ids[4:])
    assert {(leak.holdout["line"], leak.train["line"]) for leak in leaks} == {(25, 4), (26, 8)}
    assert all(leak.similarity >= 0.8 for leak in leaks)
    assert set(holdout.column("conversation_id").to_pylist()) == set(hold_ids[:4])
    assert train.num_rows == 22 and train.num_rows + holdout.num_rows == records.num_rows
    assert [(c["stage"], c["reason"], c["line"], c["train_line"]) for c in changes] == [
        ("split", "leakage", 25, 4),
        ("split", "leakage", 26, 8),
    ]


def test_run_reports_leaks_and_logs_every_moved_record(tiny_params: Params) -> None:
    rng = random.Random(1)
    train_ids, hold_ids = _ids(30, False), _ids(5, True)
    bodies = [" ".join(_doc(rng)) for _ in range(35)]
    bodies[-1] = bodies[0] + " again"  # the last holdout record copies the first train record
    write_records(
        _records(bodies, train_ids + hold_ids).to_pylist(),
        tiny_params.paths.clean / "records.parquet",
    )
    result = run(tiny_params)
    assert (result.n_train, result.n_holdout, result.moved) == (31, 4, 1)
    report = json.loads((tiny_params.paths.reports / "split.json").read_text())
    assert report["leakage"]["pairs"] == 1 and report["leakage"]["moved_to_train"] == 1
    (pair,) = report["leakage"]["pairs_shown"]
    assert (pair["holdout"], pair["train"]) == ("chats.jsonl:35", "chats.jsonl:1")
    (logged,) = [
        json.loads(line)
        for line in (tiny_params.paths.split / "changes.jsonl").read_text().splitlines()
    ]
    assert logged["reason"] == "leakage" and logged["conversation_id"] == hold_ids[-1]
    assert "chats.jsonl:1 in train" in logged["detail"]
    assert hold_ids[-1] in pq.read_table(result.train_file).column("conversation_id").to_pylist()
