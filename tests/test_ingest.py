"""ingest: every format into canonical records, every bad row quarantined with file, line and
reason, every input row accounted for."""

from __future__ import annotations

import base64
import json
import random
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from retune.config import ColumnsParams, IngestParams, Params
from retune.data.pii import PATTERNS, PREFILTERS
from retune.data.records import SCHEMA, record_id
from retune.errors import IngestError
from tasks.ingest import REASONS, IngestResult, ingest, normalize_text, run


def _jsonl(path: Path, lines: list[Any]) -> Path:
    """Objects are dumped; str lines are written as they are (blank or broken lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines)
    path.write_text(text, encoding="utf-8")
    return path


def _text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _ingest(root: Path, **cfg: Any) -> IngestResult:
    return ingest(root / "in", IngestParams(**cfg), root / "prep", root / "q")


def _records(result: IngestResult) -> list[dict[str, Any]]:
    table = pq.read_table(result.records_file)
    assert table.schema.equals(SCHEMA)
    return table.to_pylist()


def _messages(record: dict[str, Any]) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in record["messages"]]


def _quarantine(result: IngestResult) -> list[dict[str, Any]]:
    return [json.loads(x) for x in result.quarantine_file.read_text("utf-8").splitlines()]


def _chat(*turns: str) -> dict[str, Any]:
    roles = ["user", "assistant"]
    return {"messages": [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]}


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("  Hello   world \t ", "Hello world"),
        ("a\r\nb\rc\u2028d", "a\nb\nc\nd"),
        ("line one   \nline two\t\n", "line one\nline two"),
        ("zero\u200bwidth\ufeff and\x00 bell\x07", "zerowidth and bell"),
        ("cafe\u0301", "caf\u00e9"),  # NFD -> NFC
        ("tab\tkept", "tab\tkept"),
        ("\u200b \n ", ""),
    ],
)
def test_normalize_text(raw: str, clean: str) -> None:
    assert normalize_text(raw) == clean


def test_chat_jsonl_is_cleaned_and_role_mapped(tmp_path: Path) -> None:
    line = {
        "messages": [
            {"role": "Human", "content": "  My cafe\u0301 router\r\nis   off\u200b  "},
            {"role": "GPT", "content": "Unplug it.\t\tThen wait. "},
        ],
        "category": "power",
        "conversation_id": 77,
    }
    _jsonl(tmp_path / "in" / "chats.jsonl", [line])
    result = _ingest(tmp_path)
    [rec] = _records(result)
    assert _messages(rec) == [
        ("user", "My caf\u00e9 router\nis off"),
        ("assistant", "Unplug it. Then wait."),
    ]
    assert rec["format"] == "chat_jsonl"
    assert (rec["source"], rec["line"]) == ("chats.jsonl", 1)
    assert rec["conversation_id"] == "77"
    assert json.loads(rec["meta"]) == {"category": "power"}
    assert rec["id"] == record_id(_messages(rec))
    assert rec["roles"] == "user assistant"


def test_prompt_completion_jsonl(tmp_path: Path) -> None:
    _jsonl(
        tmp_path / "in" / "pc.jsonl",
        ["", {"prompt": "Reset?", "completion": " Hold the button. ", "product": "cam"}],
    )
    result = _ingest(tmp_path)
    [rec] = _records(result)
    assert _messages(rec) == [("user", "Reset?"), ("assistant", "Hold the button.")]
    assert (rec["format"], rec["line"]) == ("completion_jsonl", 2)
    assert json.loads(rec["meta"]) == {"product": "cam"}
    assert rec["conversation_id"] == rec["id"]
    assert result.report["skipped_blank"] == 1


def test_csv_long_groups_scattered_rows_and_orders_by_timestamp(tmp_path: Path) -> None:
    _text(
        tmp_path / "in" / "support" / "long.csv",
        "conversation_id,role,text,timestamp,channel\n"
        "a,Customer,second question,2024-05-01T10:02:00,web\n"  # row 1
        "b,client,no times here,,mail\n"  # row 2
        "a,Agent,first answer,2024-05-01T10:01:00Z,web\n"  # row 3
        "b,support,still none,,mail\n"  # row 4
        'a,customer,"first, with a comma",2024-05-01T10:00:00,web\n'  # row 5
        "a,bot,last answer,2024-05-01T10:03:00,web\n",  # row 6
    )
    result = _ingest(tmp_path)
    recs = {r["conversation_id"]: r for r in _records(result)}
    assert _messages(recs["a"]) == [
        ("user", "first, with a comma"),
        ("assistant", "first answer"),
        ("user", "second question"),
        ("assistant", "last answer"),
    ]
    assert recs["a"]["line"] == 5  # the row of the first message
    assert recs["a"]["format"] == "table_long"
    assert recs["a"]["source"] == "support/long.csv"
    assert json.loads(recs["a"]["meta"])["channel"] == "web"
    # No timestamps at all: row order.
    assert _messages(recs["b"]) == [("user", "no times here"), ("assistant", "still none")]
    assert result.report["by_file"]["support/long.csv"] == {
        "rows": 6, "accepted": 6, "quarantined": 0, "skipped_blank": 0, "records": 2,
        "formats": {"table_long": 2},
    }  # fmt: skip


def test_tsv_wide_and_csv_chat_and_text_tables(tmp_path: Path) -> None:
    _text(
        tmp_path / "in" / "wide.tsv",
        "prompt\tcompletion\tcategory\nWhere is my order, please?\tIt ships today.\tshipping\n",
    )
    chat = json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    _text(
        tmp_path / "in" / "chat.csv",
        'conversation_id,messages\nz9,"' + chat.replace('"', '""') + '"\n',
    )
    _text(tmp_path / "in" / "docs.csv", "text,lang\nA manual page.,en\n")
    recs = {r["source"]: r for r in _records(_ingest(tmp_path))}
    wide = recs["wide.tsv"]
    assert _messages(wide) == [
        ("user", "Where is my order, please?"),
        ("assistant", "It ships today."),
    ]
    assert (wide["format"], wide["line"]) == ("table_wide", 1)
    assert json.loads(wide["meta"]) == {"category": "shipping"}
    assert _messages(recs["chat.csv"]) == [("user", "hi"), ("assistant", "yo")]
    assert (recs["chat.csv"]["format"], recs["chat.csv"]["conversation_id"]) == ("table_chat", "z9")
    assert _messages(recs["docs.csv"]) == [("text", "A manual page.")]
    assert recs["docs.csv"]["format"] == "table_text"


def test_parquet_wide_long_and_nested_chat(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    pq.write_table(
        pa.table({"prompt": ["Is it on?"], "completion": ["Yes."], "score": [0.5]}),
        tmp_path / "in" / "wide.parquet",
    )
    t = [datetime(2024, 5, 1, 9, m) for m in (2, 0, 1)]
    long_table = {
        "conversation_id": pa.array([7, 7, 7], pa.int64()),
        "role": ["user", "human", "model"],
        "text": ["again?", "hello", "hi there"],
        "timestamp": pa.array(t, pa.timestamp("us")),
    }
    pq.write_table(pa.table(long_table), tmp_path / "in" / "long.parquet")
    nested = [[{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}]]
    pq.write_table(pa.table({"messages": nested}), tmp_path / "in" / "chat.parquet")
    recs = {r["source"]: r for r in _records(_ingest(tmp_path))}
    assert _messages(recs["chat.parquet"]) == [("user", "ping"), ("assistant", "pong")]
    assert _messages(recs["wide.parquet"]) == [("user", "Is it on?"), ("assistant", "Yes.")]
    assert json.loads(recs["wide.parquet"]["meta"]) == {"score": 0.5}
    long = recs["long.parquet"]
    assert _messages(long) == [("user", "hello"), ("assistant", "hi there"), ("user", "again?")]
    assert (long["conversation_id"], long["line"], long["format"]) == ("7", 2, "table_long")
    assert json.loads(long["meta"])["timestamp"][0] == "2024-05-01T09:00:00"


def test_txt_blocks_are_documents(tmp_path: Path) -> None:
    _text(tmp_path / "in" / "manual.txt", "Title\nfirst para  \n\n\n  \nSecond one.\r\n\nThird\n")
    recs = _records(_ingest(tmp_path))
    assert [(_messages(r), r["line"], r["format"]) for r in recs] == [
        ([("text", "Title\nfirst para")], 1, "text"),
        ([("text", "Second one.")], 6, "text"),
        ([("text", "Third")], 8, "text"),
    ]


def test_every_quarantine_reason_with_source_and_line(tmp_path: Path) -> None:
    ok = _chat("How do I reset it?", "Hold the button.")
    lines = [
        ok,  # 1 accepted
        "{not json",  # 2
        {"messages": [{"role": "user"}]},  # 3
        {"messages": [{"role": "wizard", "content": "x"}]},  # 4
        _chat("Hi", " \u200b "),  # 5
        _chat("Hi", "y" * 60),  # 6
        "",  # 7 blank: skipped, not quarantined
        ok,  # 8 duplicate of line 1
        {"text": "no usable keys"},  # 9
    ]
    path = _jsonl(tmp_path / "in" / "mixed.jsonl", lines)
    with path.open("ab") as fh:
        fh.write(b'{"prompt": "caf\xe9", "completion": "latin-1"}\n')  # 10
    result = _ingest(tmp_path, max_message_chars=50)
    entries = _quarantine(result)
    assert [(e["source"], e["line"], e["reason"]) for e in entries] == [
        ("mixed.jsonl", 2, "malformed_json"),
        ("mixed.jsonl", 3, "missing_field"),
        ("mixed.jsonl", 4, "unknown_role"),
        ("mixed.jsonl", 5, "empty_text"),
        ("mixed.jsonl", 6, "too_long"),
        ("mixed.jsonl", 8, "duplicate"),
        ("mixed.jsonl", 9, "missing_field"),
        ("mixed.jsonl", 10, "invalid_utf8"),
    ]
    assert {e["reason"] for e in entries} == set(REASONS)
    by_line = {e["line"]: e for e in entries}
    assert "mixed.jsonl:1" in by_line[8]["detail"]
    assert "ingest.role_map" in by_line[4]["detail"]
    assert "ingest.max_message_chars=50" in by_line[6]["detail"]
    assert by_line[2]["raw"] == "{not json"
    assert json.loads(by_line[3]["raw"]) == lines[2]
    assert base64.b64decode(by_line[10]["raw_base64"]) == (
        b'{"prompt": "caf\xe9", "completion": "latin-1"}'
    )
    assert result.report["by_reason"]["missing_field"] == 2
    assert (result.input_rows, result.accepted_rows, result.quarantined_rows) == (9, 1, 8)


def test_long_table_quarantines_whole_conversations(tmp_path: Path) -> None:
    path = _text(
        tmp_path / "in" / "long.csv",
        "conversation_id,role,text,timestamp\n"
        "ok,user,hello,1\n"  # 1
        "r,user,hi,1\n"  # 2
        "ok,assistant,hi,2\n"  # 3
        "r,moderator,removed,2\n"  # 4
        ",user,orphan,3\n"  # 5
        "t,user,when?,yesterday\n"  # 6
        "t,assistant,now,5\n"  # 7
        "e,user,,1\n"  # 8
        "e,assistant,answer,2\n",  # 9
    )
    with path.open("ab") as fh:
        fh.write(b"u,user,bad \xff byte,1\n")  # 10
        fh.write(b"u,assistant,fine,2\n")  # 11
    result = _ingest(tmp_path)
    entries = {e["reason"]: e for e in _quarantine(result)}
    assert set(entries) == {"unknown_role", "missing_field", "empty_text", "invalid_utf8"}
    assert entries["unknown_role"]["rows"] == [2, 4]
    assert [r["text"] for r in entries["unknown_role"]["raw"]] == ["hi", "removed"]
    assert entries["empty_text"]["rows"] == [8, 9]
    assert entries["invalid_utf8"]["rows"] == [10, 11]
    assert base64.b64decode(entries["invalid_utf8"]["raw_base64"]["10"]["text"]) == b"bad \xff byte"
    missing = [e for e in _quarantine(result) if e["reason"] == "missing_field"]
    assert sorted(e["line"] for e in missing) == [5, 6]
    assert [_messages(r) for r in _records(result)] == [[("user", "hello"), ("assistant", "hi")]]
    assert (result.input_rows, result.accepted_rows, result.quarantined_rows) == (11, 2, 9)


def test_mixed_folder_accounts_for_every_row(tmp_path: Path) -> None:
    inc = tmp_path / "in"
    _jsonl(inc / "a.jsonl", [_chat("a", "b"), "", "oops", _chat("a", "b"), {"prompt": "p"}])
    _jsonl(inc / "deep" / "b.json", [{"prompt": "p", "completion": "c"}, "[1, 2]"])
    _text(inc / "c.csv", "prompt,completion\nx,y\nx,y\n,empty prompt\n1,2,3\n")
    _text(inc / "d.txt", "doc\n\ndoc\n\nother doc\n")
    pq.write_table(pa.table({"text": ["t1", None, "t1"]}), inc / "e.parquet")
    _text(inc / "notes.md", "# not data")
    _text(inc / ".hidden" / "skip.jsonl", "{}\n")
    _text(inc / ".DS_Store.jsonl", "{}\n")
    result = _ingest(tmp_path)
    rep = result.report
    assert rep["accounted"] is True
    assert rep["input_rows"] == rep["accepted_rows"] + rep["quarantined_rows"] == 16
    for name, counts in rep["by_file"].items():
        assert counts["rows"] == counts["accepted"] + counts["quarantined"], name
    assert sorted(rep["by_file"]) == ["a.jsonl", "c.csv", "d.txt", "deep/b.json", "e.parquet"]
    assert rep["unsupported_files"] == ["notes.md"]
    assert sum(rep["by_reason"].values()) == rep["quarantined_rows"]
    assert len(_quarantine(result)) == rep["quarantine_entries"] == rep["quarantined_rows"]
    assert len(_records(result)) == rep["records"] == result.n_records == 6
    assert rep["by_reason"]["duplicate"] == 4  # across files and formats too
    manifest = json.loads(result.manifest_file.read_text())
    assert manifest["n_records"] == 6
    assert manifest["sources"]["c.csv"] == {"rows": 4, "accepted": 1, "quarantined": 3}
    assert manifest["data_version"] == result.data_version


def test_personal_data_is_redacted_and_look_alikes_kept(tmp_path: Path) -> None:
    _jsonl(
        tmp_path / "in" / "pii.jsonl",
        [
            _chat(
                "I'm jane.doe+shop@mail.example.co.uk, call +1 415-555-0132 or 020 7946 0958.",
                "Order NW-483920 from 2024-05-01 ships 2024-05-03; ticket 58213.",
            )
        ],
    )
    result = _ingest(tmp_path)
    [rec] = _records(result)
    assert _messages(rec) == [
        ("user", "I'm [EMAIL], call [PHONE] or [PHONE]."),
        ("assistant", "Order NW-483920 from 2024-05-01 ships 2024-05-03; ticket 58213."),
    ]
    assert {k: v for k, v in result.report["redactions"].items() if v} == {"email": 1, "phone": 2}


def test_pii_prefilters_never_hide_a_match() -> None:
    """ingest skips the full patterns when the prefilter finds nothing: that must never skip a
    match (a changed pattern needs its prefilter changed too)."""
    rng = random.Random(0)
    tokens = ["1", "23", "456", "7890", " ", "-", ".", "(", ")", "+", "@", "ab", "x.co", "\n"]
    samples = ["+1 (415) 555-0132", "(020) 7946 0958", "a@b.co", "415.555.0100"]
    samples += ["".join(rng.choices(tokens, k=rng.randint(3, 12))) for _ in range(20_000)]
    for kind, pattern in PATTERNS.items():
        full, hint = re.compile(pattern), re.compile(PREFILTERS[kind])
        missed = [s for s in samples if full.search(s) and not hint.search(s)]
        assert not missed, (kind, missed[:3])


def test_data_version_ignores_file_names_and_order_but_not_content(tmp_path: Path) -> None:
    convs = [_chat(f"question {i}", f"answer {i}") for i in range(6)]
    _jsonl(tmp_path / "v1" / "in" / "one.jsonl", convs[:3])
    _jsonl(tmp_path / "v1" / "in" / "two.jsonl", convs[3:])
    _jsonl(tmp_path / "v2" / "in" / "z" / "all.jsonl", list(reversed(convs)))
    changed = [*convs[:5], _chat("question 5", "answer 5!")]
    _jsonl(tmp_path / "v3" / "in" / "all.jsonl", changed)
    v1, v2, v3 = (_ingest(tmp_path / v).data_version for v in ("v1", "v2", "v3"))
    assert v1 == v2
    assert v3 != v1
    assert len(v1) == 64


def test_unknown_table_layout_names_file_columns_and_settings(tmp_path: Path) -> None:
    _jsonl(tmp_path / "in" / "a.jsonl", [_chat("q", "a")])
    _text(tmp_path / "in" / "export.csv", "question,answer\nq,a\n")
    with pytest.raises(IngestError) as exc:
        _ingest(tmp_path)
    message = str(exc.value)
    assert "export.csv" in message
    assert "question, answer" in message
    assert "ingest.columns.prompt" in message and "ingest.columns.completion" in message
    assert not (tmp_path / "prep" / "records.parquet").exists()


def test_column_mapping_reads_a_renamed_layout(tmp_path: Path) -> None:
    _text(tmp_path / "in" / "export.csv", "question,answer\nWhy?,Because.\n")
    result = _ingest(tmp_path, columns=ColumnsParams(prompt="question", completion="answer"))
    assert [_messages(r) for r in _records(result)] == [
        [("user", "Why?"), ("assistant", "Because.")]
    ]


def test_empty_folder_says_how_to_get_data(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    _text(tmp_path / "in" / "readme.pdf", "x")
    with pytest.raises(IngestError) as exc:
        _ingest(tmp_path)
    message = str(exc.value)
    assert str(tmp_path / "in") in message
    assert ".jsonl" in message and ".parquet" in message
    assert "make data" in message and "retune sample" in message


def test_failed_run_keeps_previous_outputs(tmp_path: Path) -> None:
    _jsonl(tmp_path / "in" / "a.jsonl", [_chat("q", "a")])
    first = _ingest(tmp_path)
    # Bad input is quarantined; what still stops the stage is a table it cannot map.
    _text(tmp_path / "in" / "b.csv", "question,answer\nq,a\n")
    with pytest.raises(IngestError, match="cannot tell the table layout"):
        _ingest(tmp_path)
    assert len(_records(first)) == 1
    assert json.loads(first.manifest_file.read_text())["data_version"] == first.data_version


def test_run_writes_report_and_manifest(tiny_params: Params) -> None:
    _jsonl(tiny_params.paths.incoming / "a.jsonl", [_chat("q", "a"), "broken"])
    result = run(tiny_params)
    report = json.loads((tiny_params.paths.reports / "ingest.json").read_text())
    assert report["accounted"] is True
    assert (report["accepted_rows"], report["quarantined_rows"]) == (1, 1)
    assert result.records_file == tiny_params.paths.prepared / "records.parquet"
    assert (tiny_params.paths.quarantine / "quarantine.jsonl").exists()
    assert (tiny_params.paths.prepared / "manifest.json").exists()
