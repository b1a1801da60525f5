"""`validate` in batches: the outcome over a Parquet file read a few records at a time is the
one a single pass over the whole table gives, offending rows and percentages included."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from retune.config import ValidateParams
from retune.data.records import Record, write_records
from tasks.validate import check
from tests.helpers import make_conversations

CFG = ValidateParams(min_examples=5, failed_rows_shown=3)
REDACT = ("email",)


def records(tmp_path: Path) -> Path:
    """40 good conversations with defects spread over the file: duplicates far apart (so no
    batch holds both copies), an empty document, roles out of order, a leftover e-mail."""
    convs = [tuple(c) for c in make_conversations(40)]
    convs[7] = (("text", ""),)
    convs[18] = (("assistant", "Hi."), ("user", "Hello."))
    convs[29] = (("user", "Mail me: ann@example.com"), ("assistant", "Noted."))
    convs += [convs[2], convs[33]]
    rows = (
        Record(messages=m, source="chat.jsonl", line=i + 1, format="chat_jsonl").to_row()
        for i, m in enumerate(convs)
    )
    path = tmp_path / "records.parquet"
    write_records(rows, path)
    return path


def test_batches_give_the_outcome_of_one_pass(tmp_path: Path) -> None:
    path = records(tmp_path)
    whole = check(pq.read_table(path), CFG, REDACT, batch_rows=1_000)
    batched = check(path, CFG, REDACT, docs_dir=tmp_path / "docs", batch_rows=4)
    assert not whole.success
    assert {o.name for o in whole.failed} == {"text_length", "unique_id", "role_order", "no_email"}
    assert [dataclasses.asdict(o) for o in batched.expectations] == [
        dataclasses.asdict(o) for o in whole.expectations
    ]
    duplicates = next(o for o in batched.expectations if o.name == "unique_id")
    # Both copies of each duplicate, found across batches, with the text of each shown.
    assert duplicates.unexpected_count == 4
    assert {r.line for r in duplicates.rows} <= {3, 34, 41, 42}
    assert all(r.snippet != "(no text)" for r in duplicates.rows)
    assert (tmp_path / "docs" / "index.html").exists()


def test_an_empty_table_is_checked_too(tmp_path: Path) -> None:
    path = records(tmp_path)
    empty = pq.read_table(path).slice(0, 0)
    assert isinstance(empty, pa.Table)
    result = check(empty, CFG, REDACT, batch_rows=4)
    assert result.n_records == 0
    assert [o.name for o in result.failed] == ["min_examples"]
