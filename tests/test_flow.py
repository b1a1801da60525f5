"""The `retrain` flow end to end under Prefect's test harness, on tiny data and a tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from retune.config import Params, load_params, to_plain
from tests.helpers import make_conversations, tiny_params_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def harness() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def write_incoming(params: Params, extra_lines: list[bytes]) -> Path:
    """80 good conversations as chat JSONL, then `extra_lines` appended (1-based line numbers
    of the extras start at 81)."""
    params.paths.incoming.mkdir(parents=True, exist_ok=True)
    path = params.paths.incoming / "chats.jsonl"
    lines = [
        json.dumps({"messages": [{"role": r, "content": c} for r, c in conv]}).encode()
        for conv in make_conversations(80)
    ]
    path.write_bytes(b"\n".join(lines + extra_lines) + b"\n")
    return path


def params_file(params: Params, tmp_path: Path) -> str:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(to_plain(params)))
    return str(path)


def test_flow_quarantines_bad_lines_trains_on_the_rest_and_registers(
    harness: None, tmp_path: Path
) -> None:
    from flows.retrain import retrain

    # Two CV folds as well: the flow submits them as separate tasks.
    params = tiny_params_for(tmp_path, cv={"folds": 2})
    good = json.dumps(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    ).encode()
    write_incoming(
        params,
        [
            b'{"messages": [{"role": "user", "content": "truncated',  # line 81
            b'{"messages": [{"role": "user", "content": "caf\xe9 bad bytes"}]}',  # line 82
            json.dumps({"messages": [{"role": "moderator", "content": "x"}]}).encode(),  # 83
            good,  # line 84, accepted
            good,  # line 85, exact duplicate of 84
        ],
    )
    summary = retrain(params_file(params, tmp_path))

    quarantined = [
        json.loads(line)
        for line in (params.paths.quarantine / "quarantine.jsonl").read_text().splitlines()
    ]
    by_line = {q["line"]: q["reason"] for q in quarantined}
    assert by_line == {
        81: "malformed_json",
        82: "invalid_utf8",
        83: "unknown_role",
        85: "duplicate",
    }
    assert all(q["source"] == "chats.jsonl" for q in quarantined)
    ingest = json.loads((params.paths.reports / "ingest.json").read_text())
    assert ingest["input_rows"] == 85
    assert ingest["accepted_rows"] == 81 and ingest["quarantined_rows"] == 4

    cv = json.loads((params.paths.reports / "cv.json").read_text())
    assert len(cv["folds"]) == 2
    assert summary["version"] == 1
    assert summary["promotion"] == "promote"  # the first model passes the absolute gates
    assert list(summary["stages_s"]) == [
        "ingest",
        "hygiene",
        "validate",
        "split",
        "train",
        "preference",
        "cv",
        "evaluate",
        "register",
        "promote",
    ]
    # Production loads through MLflow in a fresh process, as a client would, and generates text.
    code = (
        "import mlflow, sys\n"
        "m = mlflow.pyfunc.load_model('models:/retune-test@production')\n"
        "out = m.predict(['Hi, my router'])\n"
        "text = out[0] if isinstance(out, list) else out.iloc[0, 0]\n"
        # A 6-step tiny model may well stop at once: loading and answering is the point here.
        "assert isinstance(text, str) and len(out) == 1, out\n"
        "print('GENERATED', repr(text))\n"
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": params.tracking.uri, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "GENERATED" in proc.stdout

    # Same data, settings and code: the flow notices and trains nothing; a new file retrains.
    from mlflow import MlflowClient

    again = retrain(params_file(params, tmp_path))
    assert again["skipped"] is True and again["stages_s"] == {}
    client = MlflowClient(tracking_uri=params.tracking.uri, registry_uri=params.tracking.uri)
    assert [int(v.version) for v in client.search_model_versions("name='retune-test'")] == [1]
    (params.paths.incoming / "more.jsonl").write_bytes(good + b"\n")
    changed = retrain(params_file(params, tmp_path))
    assert "skipped" not in changed and changed["version"] == 2


def test_failed_expectation_stops_before_train_and_registers_nothing(
    harness: None, tmp_path: Path
) -> None:
    import mlflow
    from mlflow import MlflowClient

    from flows.retrain import retrain
    from retune.errors import DataValidationError
    from retune.release.tracking import resolved_uri

    params = tiny_params_for(tmp_path, validate={"min_examples": 10_000})
    write_incoming(params, [])
    with pytest.raises(DataValidationError, match=r"10000|10,000"):
        retrain(params_file(params, tmp_path))

    assert (params.paths.prepared / "records.parquet").exists()  # ingest ran
    assert not params.paths.split.exists()  # split, train and everything after did not
    assert not params.paths.model.exists()
    assert not (params.paths.reports / "train.json").exists()
    mlflow.set_tracking_uri(resolved_uri(params.tracking.uri))
    assert MlflowClient().search_registered_models() == []


def test_a_worse_retrain_is_registered_but_production_does_not_move(
    harness: None, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    from flows.retrain import retrain
    from retune.release.tracking import resolved_uri

    params = tiny_params_for(tmp_path, train={"max_steps": 30, "save_steps": 30})
    write_incoming(params, [])
    path = params_file(params, tmp_path)
    first = retrain(path)
    # Same data, same holdout; one training step instead of thirty: clearly worse.
    second = retrain(path, ["train.max_steps=1", "train.save_steps=1"])

    assert (first["version"], first["promotion"]) == (1, "promote")
    assert (second["version"], second["promotion"]) == (2, "reject")
    client = MlflowClient(resolved_uri(params.tracking.uri))
    assert str(client.get_model_version_by_alias("retune-test", "production").version) == "1"
    rejected = client.get_model_version("retune-test", "2").tags
    assert rejected["gate.decision"] == "reject"
    assert rejected["gate.compared_version"] == "1"
    assert "worse" in rejected["gate.reason"]

    # A run stopped between register and promote leaves a version nobody judged; the next
    # run, though it has nothing new to train, finishes that work before saying so.
    from tasks.register import run as register

    assert register(load_params(Path(path), ["train.max_steps=1"])).version == 3
    assert "gate.decision" not in client.get_model_version("retune-test", "3").tags
    again = retrain(path, ["train.max_steps=1", "train.save_steps=1"])
    assert again["skipped"] is True
    assert again["finished_interrupted"] == "gated v3: reject"
    assert client.get_model_version("retune-test", "3").tags["gate.decision"] == "reject"
    assert str(client.get_model_version_by_alias("retune-test", "production").version) == "1"


def test_a_retrain_with_enough_ratings_tunes_on_them_and_says_so(
    harness: None, tmp_path: Path
) -> None:
    """Ratings in the store: the flow's first step makes them the preference set, the
    preference stage tunes on them (KTO), and a rerun with no new rating is up to date."""
    from mlflow import MlflowClient

    from flows.retrain import retrain
    from retune.online.feedback import FeedbackStore

    params = tiny_params_for(tmp_path)
    write_incoming(params, [])
    store = FeedbackStore.open(params.feedback.store_url)
    try:
        for i, conv in enumerate(make_conversations(30, seed=3)):
            rid = store.log_interaction(
                model_name="retune-test",
                model_version="1",
                kind="chat",
                messages=[{"role": "user", "content": conv[0][1]}],
                reply=conv[1][1],
                latency_ms=5.0,
                prompt_tokens=4,
                completion_tokens=4,
            )
            store.add_feedback(interaction_id=rid, rating="down" if i % 3 == 0 else "up")
    finally:
        store.close()
    file = params_file(params, tmp_path)
    # A DVC project: the run keeps its inputs and its tuning set as data versions.
    subprocess.run(
        [sys.executable, "-m", "dvc", "init", "-q", "--no-scm"], cwd=tmp_path, check=True
    )

    summary = retrain(params_file=file)

    assert "preference" in summary["stages_s"]
    report = json.loads((params.paths.reports / "preference.json").read_text())
    assert report["tuned"] is True and report["method"] == "kto" and report["steps"] == 3
    kept = report["preference_dvc"]
    assert kept["md5"].endswith(".dir") and kept["nfiles"] >= 1
    train_run = json.loads((params.paths.reports / "train.json").read_text())["run_id"]
    tags = MlflowClient().get_run(train_run).data.tags
    assert tags["preference_dvc"] == kept["md5"] and tags["incoming_dvc"].endswith(".dir")
    sets = json.loads((params.paths.reports / "preference_data.json").read_text())
    assert sets["exchanges"] == 30 and sum(sets["outcomes"].values()) == 30
    assert retrain(params_file=file)["skipped"] is True  # the same data, no new rating
