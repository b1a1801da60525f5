"""Feedback into data: corrected and well-rated exchanges become an incoming chat-JSONL file,
redacted and new only, that ingest takes without quarantining a line; and a DVC data version."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from retune.config import Params
from retune.data.records import Record, write_records
from tests.helpers import tiny_params_for

DVC = str(Path(sys.executable).parent / "dvc")


def chat(*turns: str) -> list[dict[str, str]]:
    roles = ["user", "assistant"]
    return [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]


def log(store: Any, messages: list[dict[str, str]], reply: str, **feedback: Any) -> str:
    rid: str = store.log_interaction(
        model_name="retune-test",
        model_version="1",
        kind="chat",
        messages=messages,
        reply=reply,
        latency_ms=10.0,
        prompt_tokens=8,
        completion_tokens=6,
    )
    if feedback:
        store.add_feedback(interaction_id=rid, **feedback)
    return rid


@pytest.fixture
def params(tmp_path: Path) -> Params:
    return tiny_params_for(tmp_path, feedback={"store_url": f"sqlite:///{tmp_path}/fb.db"})


@pytest.fixture
def store(params: Params) -> Any:
    from retune.online.feedback import FeedbackStore

    store = FeedbackStore.open(params.feedback.store_url)
    yield store
    store.close()


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_export_writes_what_to_learn_redacted_and_new_only_and_ingest_takes_it(
    params: Params, store: Any
) -> None:
    from tasks.export_feedback import run as export
    from tasks.ingest import run as ingest

    # Already in the data: an incoming file and its ingested record (ingest stored the text
    # cleaned, which the export must match: one space, no trailing blank).
    known = (("user", "Hi, my router won't turn on."), ("assistant", "Hold the power button."))
    params.paths.incoming.mkdir(parents=True)
    (params.paths.incoming / "chats.jsonl").write_text(
        json.dumps({"messages": [{"role": r, "content": c} for r, c in known]}) + "\n"
    )
    write_records(
        [Record(messages=known, source="chats.jsonl", line=1, format="chat_jsonl").to_row()],
        params.paths.prepared / "records.parquet",
    )
    corrected = log(
        store,
        chat("My doorbell is offline, mail me at jane.doe@example.com"),
        "Buy a new one.",
        rating="down",
        corrected_reply="Restart it from the app; we will write to jane.doe@example.com.",
    )
    log(store, chat("Hi, my camera arrived damaged."), "A replacement ships today.", rating="up")
    log(store, chat("Was I charged twice?"), "I refunded the duplicate charge.", score=0.9)
    log(store, chat("Hi,  my router won't turn on.  "), "Hold the power button.", rating="up")
    log(store, chat("Where is my order?"), "No idea.", rating="down")  # nothing to imitate
    log(store, chat("Where is my order?"), "Ask someone else.", score=0.2)
    # The same exchange twice (a greedy model answers a repeated question the same way).
    log(store, chat("Thanks!"), "Glad to help!", rating="up")
    log(store, chat("Thanks!"), "Glad to help!", rating="up")
    system = [{"role": "system", "content": "Be brief."}]
    multi = log(
        store,
        system + chat("My speaker hums.", "Is it near the router?", "Yes, call me on 555-123-4567"),
        "Move it a metre away.",
        rating="up",
    )
    store.add_feedback(interaction_id=multi, rating="down")
    store.add_feedback(interaction_id=multi, rating="up")  # the latest opinion counts
    log(store, chat("Hello", "Hi! How can I"), "help?", rating="up")  # a continuation: no turn

    first = export(params)
    assert first.file is not None and first.file.parent == params.paths.incoming
    assert first.file.name.startswith("feedback-") and first.file.suffix == ".jsonl"
    assert (first.exported, first.corrected, first.rated) == (5, 1, 4)
    assert (first.skipped_duplicate, first.ignored_negative, first.skipped_invalid) == (2, 2, 1)
    assert first.interactions == 10
    assert first.dvc.startswith("skipped: ") and "not in a DVC repository" in first.dvc
    lines = read_lines(first.file)
    assert [line["feedback"] for line in lines] == ["corrected", "rated", "rated", "rated", "rated"]
    fixed = lines[0]
    assert fixed["interaction_id"] == corrected and fixed["source"] == "retune-feedback"
    assert fixed["messages"] == [
        {"role": "user", "content": "My doorbell is offline, mail me at [EMAIL]"},
        {"role": "assistant", "content": "Restart it from the app; we will write to [EMAIL]."},
    ]
    text = first.file.read_text(encoding="utf-8")
    assert "example.com" not in text and "555-123-4567" not in text and "[PHONE]" in text
    assert "Buy a new one." not in text and "No idea." not in text
    assert text.count("Glad to help!") == 1
    assert [m["role"] for m in lines[-1]["messages"]] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
    ]
    report = json.loads((params.paths.reports / "export_feedback.json").read_text())
    assert report["exported"] == 5 and report["file"] == str(first.file)

    again = export(params)
    assert again.file is None and again.exported == 0 and again.dvc == "nothing new"
    assert again.skipped_duplicate == 7
    assert sorted(p.name for p in params.paths.incoming.iterdir()) == [
        "chats.jsonl",
        first.file.name,
    ]

    ingested = ingest(params)
    assert (ingested.input_rows, ingested.n_records, ingested.quarantined_rows) == (6, 6, 0)
    # Once ingested, the records alone keep it out of later exports, whatever the files.
    first.file.rename(first.file.with_name("renamed.jsonl"))
    assert export(params).exported == 0


@pytest.mark.slow
def test_export_into_a_dvc_tracked_folder_makes_a_new_data_version(
    tmp_path: Path, store: Any
) -> None:
    from tasks.export_feedback import run as export

    repo = tmp_path / "repo"
    incoming = repo / "data" / "incoming"
    incoming.mkdir(parents=True)
    (incoming / "chats.jsonl").write_text(json.dumps({"messages": chat("a", "b")}) + "\n")
    subprocess.run([DVC, "init", "--no-scm", "-q"], cwd=repo, check=True)
    subprocess.run([DVC, "add", "-q", "data/incoming"], cwd=repo, check=True)
    pointer = repo / "data" / "incoming.dvc"
    before = yaml.safe_load(pointer.read_text())["outs"][0]
    params = tiny_params_for(
        tmp_path,
        paths={"incoming": str(incoming)},
        feedback={"store_url": f"sqlite:///{tmp_path}/fb.db"},
    )
    log(store, chat("My thermostat is stuck."), "Reset it from the app.", rating="up")

    result = export(params)
    assert result.exported == 1 and result.dvc == "added"
    assert result.next_step == "git add data/incoming.dvc"
    after = yaml.safe_load(pointer.read_text())["outs"][0]
    assert after["md5"] != before["md5"] and after["nfiles"] == before["nfiles"] + 1
