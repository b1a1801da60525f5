"""ingest on bad input: every file and row it cannot read is quarantined (file, line, reason and
a fix) or skipped with a reason, the rest is read, nothing outside the incoming folder is read,
no secret reaches quarantine, and every input row is accounted for."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from benchmarks.malformed import (
    EMAIL,
    SECRET,
    TEXT_CHARS,
    chat,
    leaks,
    mismatches,
    write_corpus,
)
from retune.config import IngestParams, Params
from retune.data.lineage import trace
from retune.data.readers import LineSource, Overlong, line_limit
from tasks import ingest as ingest_module
from tasks.ingest import ALL_REASONS, SKIPPED, IngestResult, ingest, run


def _ingest(root: Path, **cfg: Any) -> IngestResult:
    return ingest(root / "in", IngestParams(**cfg), root / "prep", root / "q", TEXT_CHARS)


def _quarantine(result: IngestResult) -> list[dict[str, Any]]:
    return [json.loads(x) for x in result.quarantine_file.read_text("utf-8").splitlines()]


def _texts(result: IngestResult) -> list[str]:
    return pq.read_table(result.records_file, columns=["text"]).column(0).to_pylist()


def _write(path: Path, lines: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_malformed_corpus_every_file_accounted_and_every_good_row_kept(tmp_path: Path) -> None:
    kinds = write_corpus(tmp_path / "in", tmp_path / "outside")
    assert len(kinds) >= 25
    result = _ingest(tmp_path)
    rep = result.report
    assert mismatches(kinds, rep, _quarantine(result), _texts(result)) == []
    assert rep["accounted"] is True
    assert rep["input_rows"] == rep["accepted_rows"] + rep["quarantined_rows"]
    assert sum(rep["by_reason"].values()) == rep["quarantined_rows"]
    assert (
        sum(e.get("n_rows", len(e.get("rows", [0]))) for e in _quarantine(result))
        == (rep["quarantined_rows"])
    )
    assert leaks([tmp_path / "prep", tmp_path / "q"]) == []
    reasons = {e["reason"] for e in _quarantine(result)}
    assert reasons <= set(ALL_REASONS)
    for e in _quarantine(result):
        assert {"source", "line", "reason", "detail"} <= set(e), e
        assert e["detail"].strip(), e


def test_a_deep_json_line_is_quarantined_as_too_deep(tmp_path: Path) -> None:
    deep = "[" * 5_000 + "]" * 5_000
    medium = json.dumps(chat("medium"))[:-1] + ', "x": ' + "[" * 900 + "]" * 900 + "}"
    _write(tmp_path / "in" / "a.jsonl", [chat("ok"), deep, medium, chat("ok2")])
    result = _ingest(tmp_path)
    assert [(e["line"], e["reason"]) for e in _quarantine(result)] == [
        (2, "too_deep"),
        (3, "too_deep"),
    ]
    assert result.n_records == 2


def test_parquet_invalid_utf8_quarantines_the_row_and_keeps_the_bytes(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    texts = pa.array([b"good one", b"caf\xe9 bad", b"good two"], pa.binary()).view(pa.string())
    pq.write_table(pa.table({"text": texts}), tmp_path / "in" / "t.parquet")
    result = _ingest(tmp_path)
    [entry] = _quarantine(result)
    assert (entry["line"], entry["reason"]) == (2, "invalid_utf8")
    assert base64.b64decode(entry["raw_base64"]["text"]) == b"caf\xe9 bad"
    assert sorted(_texts(result)) == ["good one", "good two"]


@pytest.mark.parametrize("content", [b"", b"PAR1 not really", b"{}"])
def test_an_unreadable_parquet_is_one_quarantine_line_and_the_rest_is_read(
    tmp_path: Path, content: bytes
) -> None:
    _write(tmp_path / "in" / "a.jsonl", [chat("kept")])
    (tmp_path / "in" / "b.parquet").write_bytes(content)
    result = _ingest(tmp_path)
    [entry] = _quarantine(result)
    assert (entry["source"], entry["line"], entry["reason"]) == ("b.parquet", 0, "corrupt_file")
    assert "write it again" in entry["detail"]
    assert result.n_records == 1
    assert result.report["by_file"]["b.parquet"]["quarantined"] == 1


def test_utf16_csv_with_a_bom_is_decoded(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    text = "prompt,completion\r\nIs it on?,Yes.\r\nCaf\u00e9?,Oui.\r\n"
    (tmp_path / "in" / "x.csv").write_bytes(text.encode("utf-16"))
    result = _ingest(tmp_path)
    assert sorted(_texts(result)) == ["Caf\u00e9?\nOui.", "Is it on?\nYes."]


def test_utf16_without_a_bom_names_the_encoding_and_the_fix(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.csv").write_bytes("prompt,completion\nq,a\n".encode("utf-16-le"))
    [entry] = _quarantine(_ingest(tmp_path))
    assert entry["reason"] == "encoding"
    assert "UTF-16" in entry["detail"] and "iconv" in entry["detail"]


def test_a_bad_quote_in_the_header_quarantines_the_file_with_the_fix(tmp_path: Path) -> None:
    _write(tmp_path / "in" / "a.jsonl", [chat("kept")])
    (tmp_path / "in" / "b.csv").write_text('"prompt,completion\nq,a\nq2,a2\n')
    result = _ingest(tmp_path)
    [entry] = _quarantine(result)
    assert (entry["source"], entry["line"], entry["reason"]) == ("b.csv", 1, "malformed_csv")
    assert "quote" in entry["detail"]
    assert result.n_records == 1


def test_a_quote_left_open_in_a_row_costs_one_record_limit(tmp_path: Path) -> None:
    """The open quote makes the rest of the file one field: read up to the record limit
    (1 MiB), quarantined, and reading goes on after it."""
    more = ["more text " * 100] * 2_000  # 2 MB
    rows = ["prompt,completion", "q1,a1", 'q2,"never closed', *more, "q3,a3"]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.csv").write_text("\n".join(rows) + "\n")
    result = _ingest(tmp_path)
    assert _texts(result)[0] == "q1\na1"
    assert "q3\na3" in _texts(result)
    entries = _quarantine(result)
    assert (entries[0]["line"], entries[0]["reason"]) == (2, "too_large")
    assert {e["reason"] for e in entries[1:]} == {"missing_field"}  # the field's own lines
    assert result.report["accounted"] is True


def test_pretty_printed_json_is_read_or_quarantined_with_the_json_lines_fix(
    tmp_path: Path,
) -> None:
    inc = tmp_path / "in"
    inc.mkdir()
    array = json.dumps([chat("a1"), chat("a2")], indent=2)
    (inc / "array.json").write_text(array)
    starts = [i for i, line in enumerate(array.splitlines(), 1) if line == "  {"]
    (inc / "object.json").write_text(json.dumps(chat("o1"), indent=4))
    (inc / "open.jsonl").write_text("[\n")  # a document that never closes
    result = _ingest(tmp_path)
    by_file = result.report["by_file"]
    assert by_file["array.json"] == {**by_file["array.json"], "rows": 2, "accepted": 2}
    assert by_file["object.json"]["accepted"] == 1
    [entry] = _quarantine(result)
    assert (entry["source"], entry["reason"]) == ("open.jsonl", "malformed_json")
    assert "one JSON object per line" in entry["detail"]
    lines = pq.read_table(result.records_file, columns=["source", "line"]).to_pylist()
    # A record's line is where its element starts.
    assert sorted((r["source"], r["line"]) for r in lines) == [
        *(("array.json", n) for n in starts),
        ("object.json", 1),
    ]


def test_a_giant_line_is_rejected_before_it_is_parsed(tmp_path: Path) -> None:
    limit = line_limit(IngestParams().max_message_chars)
    _write(tmp_path / "in" / "a.jsonl", [chat("before"), chat("x" * (2 * limit)), chat("after")])
    result = _ingest(tmp_path)
    [entry] = _quarantine(result)
    assert (entry["line"], entry["reason"], entry["raw"]) == (2, "too_large", None)
    assert f"{limit:,}" in entry["detail"] and "ingest.max_message_chars" in entry["detail"]
    assert result.report["line_limit_bytes"] == limit
    assert result.n_records == 2


def test_line_source_never_holds_more_than_the_limit() -> None:
    reads: list[int] = []

    class Recording(io.BytesIO):
        def readline(self, size: int | None = -1) -> bytes:
            reads.append(size if size is not None else -1)
            return super().readline(size)

    data = b"short\n" + b"x" * 5_000_000 + b"\nlast\n"
    lines = LineSource(Recording(data), limit=1_000)  # type: ignore[arg-type]
    assert next(lines) == b"short\n"
    with pytest.raises(Overlong) as exc:
        next(lines)
    assert (exc.value.line, exc.value.size) == (2, 5_000_001)
    assert next(lines) == b"last\n"
    assert 0 < max(reads) <= 2**20  # every read bounded, none of the whole line


def test_symlinks_are_never_followed_and_every_skipped_file_is_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inc = tmp_path / "in"
    outside = tmp_path / "outside"
    _write(outside / "private.jsonl", [chat("outside-secret")])
    _write(inc / "kept.jsonl", [chat("kept")])
    (inc / "out.jsonl").symlink_to(outside / "private.jsonl")
    (inc / "inside.jsonl").symlink_to(inc / "kept.jsonl")  # inside, still not followed
    (inc / "dangling.jsonl").symlink_to(outside / "gone.jsonl")
    (inc / "folder").symlink_to(outside, target_is_directory=True)
    for name in ("passwd", "hostname"):
        if Path("/etc", name).exists():
            (inc / f"{name}.txt").symlink_to(Path("/etc", name))
    _write(inc / ".hidden" / "h.jsonl", [chat("hidden")])
    _write(inc / ".dot.jsonl", [chat("dot")])
    (inc / "notes.md").write_text("notes")
    (inc / "empty.csv").write_text("")
    os.mkfifo(inc / "pipe.jsonl")
    result = _ingest(tmp_path)
    skipped = {s["file"]: s["reason"] for s in result.report["skipped_files"]}
    links = ["out.jsonl", "inside.jsonl", "dangling.jsonl", "folder"]
    links += [f"{n}.txt" for n in ("passwd", "hostname") if Path("/etc", n).exists()]
    assert skipped == {
        **dict.fromkeys(links, "symlink"),
        ".hidden": "hidden",
        ".dot.jsonl": "hidden",
        "notes.md": "unsupported",
        "empty.csv": "empty",
        "pipe.jsonl": "special",
    }
    assert all(s["detail"] == SKIPPED[s["reason"]] for s in result.report["skipped_files"])
    assert list(result.report["by_file"]) == ["kept.jsonl"]
    assert _texts(result) == [
        chat("kept")["messages"][0]["content"] + "\n" + chat("kept")["messages"][1]["content"]
    ]
    assert result.quarantine_file.read_text() == ""
    out = capsys.readouterr().out
    for name in skipped:
        assert f"skipping {name} (" in out
    assert f"{len(skipped)} files skipped" in out


@contextlib.contextmanager
def _swapped_after_planning(path: Path, swap: Callable[[Path], None]) -> Iterator[None]:
    """Run ingest with `path` replaced by `swap` between planning and reading (a race)."""
    plan = ingest_module._plan

    def plan_then_swap(*args: Any) -> Any:
        out = plan(*args)
        path.unlink()
        swap(path)
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ingest_module, "_plan", plan_then_swap)
        yield


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    """Planned as a regular file, a FIFO when read: opened non-blocking, found not to be a
    regular file, quarantined. (A FIFO found when planning is skipped.)"""
    _write(tmp_path / "in" / "a.jsonl", [chat("kept")])
    swapped = _write(tmp_path / "in" / "b.jsonl", [chat("swapped")])
    results: list[IngestResult] = []
    with _swapped_after_planning(swapped, os.mkfifo):
        worker = threading.Thread(target=lambda: results.append(_ingest(tmp_path)), daemon=True)
        worker.start()
        worker.join(timeout=60)
    assert not worker.is_alive(), "ingest blocked on a FIFO"
    [entry] = _quarantine(results[0])
    assert (entry["source"], entry["reason"]) == ("b.jsonl", "unreadable")
    assert "not a regular file" in entry["detail"]
    assert results[0].n_records == 1


def test_a_file_swapped_for_a_link_after_planning_is_not_followed(tmp_path: Path) -> None:
    secret = _write(tmp_path / "outside" / "s.jsonl", [chat("outside-secret")])
    swapped = _write(tmp_path / "in" / "b.jsonl", [chat("swapped")])
    with _swapped_after_planning(swapped, lambda p: p.symlink_to(secret)):
        result = _ingest(tmp_path)
    [entry] = _quarantine(result)
    assert entry["reason"] == "unreadable"
    assert "outside-secret" not in result.quarantine_file.read_text()
    assert result.n_records == 0


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its permissions")
def test_a_file_without_read_permission_is_quarantined(tmp_path: Path) -> None:
    _write(tmp_path / "in" / "a.jsonl", [chat("kept")])
    _write(tmp_path / "in" / "b.jsonl", [chat("locked")]).chmod(0)
    result = _ingest(tmp_path)
    [entry] = _quarantine(result)
    assert (entry["source"], entry["line"], entry["reason"]) == ("b.jsonl", 0, "unreadable")
    assert "permission denied" in entry["detail"] and "chmod" in entry["detail"]
    assert result.n_records == 1


def test_secrets_and_addresses_in_rejected_rows_never_reach_quarantine(tmp_path: Path) -> None:
    inc = tmp_path / "in"
    leak = f"mail {EMAIL} key {SECRET}"
    _write(
        inc / "a.jsonl",
        [
            chat("kept"),
            '{"messages": [{"role": "user", "content": "' + leak + '"',  # malformed
            {"messages": [{"role": "wizard", "content": leak}]},  # unknown role
            {"messages": [{"role": "user", "content": leak}] * 2, leak: 1},  # role order
        ],
    )
    with (inc / "a.jsonl").open("ab") as fh:
        fh.write(f'{{"prompt": "caf\xe9 {leak}", "completion": "x"}}\n'.encode("latin-1"))
    (inc / "long.csv").write_bytes(
        f"conversation_id,role,text\nc,user,caf\xe9 {leak}\nc,assistant,ok\n".encode("latin-1")
    )
    texts = pa.array([f"bad \xff {leak}".encode("latin-1")], pa.binary()).view(pa.string())
    pq.write_table(pa.table({"text": texts}), inc / "t.parquet")
    result = _ingest(tmp_path)
    entries = _quarantine(result)
    assert {e["reason"] for e in entries} == {
        "malformed_json",
        "unknown_role",
        "role_order",
        "invalid_utf8",
    }
    stored = result.quarantine_file.read_text("utf-8")
    blobs = [base64.b64decode(b) for e in entries for b in _strings(e.get("raw_base64"))]
    for text in [stored, *(b.decode("latin-1") for b in blobs)]:
        assert SECRET not in text and EMAIL not in text
    # The bytes that are not UTF-8 are kept exactly; only the secrets around them are replaced.
    assert sum(b"\xe9" in b or b"\xff" in b for b in blobs) == 3
    assert sum(result.report["quarantine_redactions"].values()) >= 10


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    return []


def test_personal_data_in_file_names_and_keys_is_redacted_and_trace_finds_the_real_name(
    tiny_params: Params,
) -> None:
    paths = tiny_params.paths
    name = f"{EMAIL}.jsonl"
    good = chat("named")
    good[f"owner {EMAIL}"] = "vip"
    _write(paths.incoming / "exports" / name, [good, "{broken"])
    run(tiny_params)
    written = [
        *paths.prepared.rglob("*"),
        *paths.quarantine.rglob("*"),
        paths.reports / "ingest.json",
    ]
    for path in written:
        if path.is_file():
            assert EMAIL.encode() not in path.read_bytes(), path
    [record] = pq.read_table(paths.prepared / "records.parquet").to_pylist()
    assert record["source"].startswith("exports/[EMAIL]-") and record["source"].endswith(".jsonl")
    [key] = json.loads(record["meta"])
    assert key.startswith("owner [EMAIL]-")
    steps = trace(paths, f"exports/{name}")
    assert [(s.line, s.outcome) for s in steps] == [(1, "prepared"), (2, "quarantined")]


def test_run_quarantines_what_the_contract_would_refuse(tiny_params: Params) -> None:
    long_turns = [
        {"role": r, "content": f"turn {i} " + "word " * 700}
        for i, r in enumerate(["user", "assistant"] * 3)
    ]
    _write(
        tiny_params.paths.incoming / "a.jsonl",
        [
            chat("fine"),
            chat("reversed", first="assistant"),
            {"messages": [{"role": "system", "content": "Be brief."}, *chat("sys")["messages"]]},
            {"messages": long_turns},  # each turn fits, the whole is over validate.max_chars
        ],
    )
    result = run(tiny_params)
    assert [(e["line"], e["reason"]) for e in _quarantine(result)] == [
        (2, "role_order"),
        (4, "text_length"),
    ]
    assert (
        f"validate.max_chars={tiny_params.validate.max_chars}" in _quarantine(result)[1]["detail"]
    )
    assert result.n_records == 2


def test_a_reader_failing_on_one_file_does_not_stop_the_others(tmp_path: Path) -> None:
    _write(tmp_path / "in" / "a.jsonl", [chat("kept")])
    (tmp_path / "in" / "b.txt").write_text("a document\n")

    def broken(*args: Any) -> Any:
        raise ZeroDivisionError("simulated bug")
        yield  # a generator, as the real reader is

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ingest_module, "read_txt", broken)
        result = _ingest(tmp_path)
    [entry] = _quarantine(result)
    assert (entry["source"], entry["reason"]) == ("b.txt", "read_error")
    assert "ZeroDivisionError" in entry["detail"] and "report" in entry["detail"]
    assert result.n_records == 1 and result.report["accounted"] is True


def test_a_file_name_that_is_not_utf8_is_stored_escaped_and_traced(tiny_params: Params) -> None:
    paths = tiny_params.paths
    name = os.fsdecode(b"caf\xe9.jsonl")  # Latin-1 on disk: the OS gives a lone surrogate
    _write(paths.incoming / name, [chat("named"), "{broken"])
    result = run(tiny_params)
    assert list(result.report["by_file"]) == ["caf\\xe9.jsonl"]
    assert [(s.line, s.outcome) for s in trace(paths, name)] == [
        (1, "prepared"),
        (2, "quarantined"),
    ]
