"""Stage `promote` against a real MLflow store: production moves only for a better model, every
decision is tagged on its version, and promote / force / rollback keep a history that survives."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from retune.config import Params
from retune.data.records import Record, write_records
from retune.release.registry import Registry, RegistryError
from retune.release.tracking import setup_tracking
from retune.reports import read_json, write_json
from tests.helpers import make_conversations, tiny_params_for

ACTOR = "cli:tester"


def gate_params(tmp_path: Path) -> Params:
    """Tiny params whose absolute gates a minutes-trained tiny model can pass, and today's
    holdout (40 conversations) written where the split stage puts it."""
    params = tiny_params_for(
        tmp_path,
        scoring={"max_examples": 40},
        promote={
            "max_perplexity": 1000.0,
            "max_perplexity_vs_baseline": None,
            "bootstrap_samples": 500,
        },
    )
    rows = (
        Record(messages=tuple(c), source="holdout.jsonl", line=i + 1, format="chat_jsonl").to_row()
        for i, c in enumerate(make_conversations(40, seed=7))
    )
    write_records(rows, params.paths.split / "holdout.parquet")
    return params


@pytest.fixture
def params(tmp_path: Path) -> Params:
    return gate_params(tmp_path)


def trained_copy(src: Path, out: Path, steps: int, noise: float = 0.0) -> Path:
    """`src` trained `steps` steps on the test corpus, then `noise` (std) added to every
    weight, saved to `out`: cheap candidates of known quality."""
    import torch

    from retune.model.modeling import load_pretrained
    from retune.model.scoring import encode

    torch.manual_seed(0)
    model, tokenizer = load_pretrained(src)
    conversations = [
        [{"role": r, "content": c} for r, c in conv] for conv in make_conversations(80)
    ]
    seqs = encode(tokenizer, conversations, 64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for step in range(steps):
        batch = [seqs[(step * 8 + i) % len(seqs)] for i in range(8)]
        width = max(len(s) for s in batch)
        ids = torch.full((8, width), tokenizer.pad_token_id)
        labels = torch.full((8, width), -100)
        for row, seq in enumerate(batch):
            ids[row, : len(seq)] = labels[row, : len(seq)] = torch.tensor(seq)
        loss = model(input_ids=ids, attention_mask=(labels != -100).long(), labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * noise)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def register_candidate(params: Params, model_dir: Path, **metrics: float) -> int:
    """What train -> evaluate -> register leave for the gate: a pipeline run, the candidate's
    per-example holdout scores (through retune.model.scoring, as `evaluate` writes them), its
    metrics, and a registered version (the real register stage). Returns the version."""
    import mlflow
    import pyarrow.parquet as pq

    from retune.model.modeling import load_pretrained
    from retune.model.scoring import aggregate, score_examples
    from tasks.register import run as register

    reports = params.paths.reports
    shutil.rmtree(params.paths.model, ignore_errors=True)
    shutil.copytree(model_dir, params.paths.model)
    setup_tracking(params.tracking)
    with mlflow.start_run() as active:
        pass
    write_json(reports / "train.json", {"run_id": active.info.run_id})
    model, tokenizer = load_pretrained(params.paths.model)
    scores = score_examples(
        model,
        tokenizer,
        params.paths.split / "holdout.parquet",
        params.scoring.max_examples,
        params.scoring.batch_size,
        params.scoring.max_seq_len,
        loss_on=params.train.loss_on,  # as evaluate scores: the tokens the loss trains on
    )
    reports.mkdir(parents=True, exist_ok=True)
    pq.write_table(scores, reports / "holdout_scores.parquet")
    write_json(reports / "evaluate.json", {**aggregate(scores), "unsafe_share": 0.0, **metrics})
    write_json(params.paths.clean / "manifest.json", {"data_version": "d" * 64})
    return register(params).version


@pytest.fixture(scope="module")
def candidates(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    """Models of known order on the holdout (perplexity about 2.6, 58 and 240): `good` (30
    steps) beats `fair` (8 steps), which beats `bad` (`fair` with noise on its weights)."""
    out = tmp_path_factory.mktemp("candidates")
    fair = trained_copy(tiny_model_dir, out / "fair", steps=8)
    return {
        "fair": fair,
        "good": trained_copy(tiny_model_dir, out / "good", steps=30),
        "bad": trained_copy(fair, out / "bad", steps=0, noise=0.1),
    }


@pytest.mark.slow
def test_the_gate_promotes_only_a_better_model_and_records_every_decision(
    params: Params, candidates: dict[str, Path]
) -> None:
    from mlflow import MlflowClient

    from tasks.promote import run as promote

    registry = Registry.open(params.tracking, "retune-test")
    report = params.paths.reports / "promote.json"

    v1 = register_candidate(params, candidates["fair"])
    first = promote(params)
    assert (first.outcome, first.production, first.compared_version) == ("promote", v1, None)
    assert first.reason.startswith("first model: no production version yet")
    assert read_json(report)["outcome"] == "promote"

    v2 = register_candidate(params, candidates["bad"])
    worse = promote(params)
    assert worse.outcome == "reject" and worse.alias is None
    assert registry.production() == v1  # production did not move
    assert worse.reason.startswith(f"worse than production v{v1}: holdout bits per byte ")
    # The default gate compares bits per byte, and its report says so.
    assert "bits/byte (95% CI" in worse.reason
    assert (read_json(report)["metric"], read_json(report)["unit"]) == (
        "bits_per_byte",
        "bits/byte",
    )
    assert worse.comparison is not None and worse.comparison["unit"] == "bits/byte"
    tags = MlflowClient().get_model_version("retune-test", str(v2)).tags
    assert tags["gate.decision"] == "reject"
    assert tags["gate.reason"] == worse.reason
    assert tags["gate.compared_version"] == str(v1)
    assert tags["gate.decided_by"] == "gate" and tags["gate.forced"] == "false"
    assert float(tags["gate.ci_high"]) < 0
    # Production was scored afresh on today's holdout, from the registry, not taken from the
    # numbers it was registered with: the same weights give the same figures.
    champion = json.loads(tags["gate.champion_metrics"])
    assert champion["perplexity"] == pytest.approx(first.candidate_metrics["perplexity"])
    assert champion["n_examples"] == 40
    assert json.loads(tags["gate.candidate_metrics"])["perplexity"] > champion["perplexity"]
    pipeline_run = MlflowClient().get_run(read_json(params.paths.reports / "train.json")["run_id"])
    assert pipeline_run.data.tags["gate.decision"] == "reject"
    assert pipeline_run.data.metrics["gate.ci_high"] < 0

    v3 = register_candidate(params, candidates["good"])
    better = promote(params)
    assert (better.outcome, better.production) == ("promote", v3)
    assert better.comparison is not None and better.comparison["ci_low"] > 0
    assert better.reason.startswith(f"better than production v{v1} beyond the noise")

    v4 = register_candidate(params, candidates["good"])  # the same weights again
    same = promote(params)
    assert same.outcome == "reject" and registry.production() == v3
    assert same.reason.startswith(f"not better than production v{v3} beyond the noise")
    assert read_json(report)["reason"] == same.reason

    history = registry.history()
    assert [(e.from_version, e.to_version, e.kind) for e in history] == [
        (v1, v3, "promote"),
        (None, v1, "promote"),
    ]
    assert history[0].actor == "gate" and history[0].why == better.reason
    assert {v.version: v.decision for v in registry.versions()} == {
        v4: "reject",
        v3: "promote",
        v2: "reject",
        v1: "promote",
    }


@pytest.mark.slow
def test_propose_mode_sets_challenger_and_a_person_promotes_it(
    params: Params, candidates: dict[str, Path]
) -> None:
    import dataclasses

    from tasks.promote import promote_version
    from tasks.promote import run as promote

    proposing = dataclasses.replace(
        params, promote=dataclasses.replace(params.promote, mode="propose")
    )
    registry = Registry.open(params.tracking, "retune-test")
    v1 = register_candidate(params, candidates["good"])
    proposed = promote(proposing)
    assert (proposed.outcome, proposed.alias, proposed.production) == (
        "propose",
        "challenger",
        None,
    )
    assert registry.aliases() == {"challenger": v1}

    taken = promote_version(params, v1, ACTOR)
    assert taken.outcome == "promote" and taken.decided_by == ACTOR
    assert registry.aliases() == {"production": v1}  # the challenger alias went with it
    assert [(e.alias, e.kind) for e in registry.history()] == [
        ("production", "promote"),
        ("challenger", "propose"),
    ]


@pytest.mark.slow
def test_manual_promote_refuses_worse_force_overrides_and_rollback_walks_back(
    params: Params, candidates: dict[str, Path]
) -> None:
    from mlflow import MlflowClient

    from retune.release.gate import GateError
    from tasks.promote import promote_version
    from tasks.promote import run as promote

    registry = Registry.open(params.tracking, "retune-test")
    with pytest.raises(RegistryError, match="no production version to roll back"):
        registry.rollback(ACTOR)
    v1 = register_candidate(params, candidates["bad"], perplexity=10.0)  # passes as the first
    promote(params)
    v2 = register_candidate(params, candidates["good"])
    promote(params)
    assert registry.production() == v2

    refused = promote_version(params, v1, ACTOR)
    assert refused.outcome == "reject" and registry.production() == v2
    assert refused.reason.startswith(f"worse than production v{v2}")
    # Scored afresh on today's holdout, not the perplexity it was registered with.
    assert refused.candidate_metrics["perplexity"] > 10.0
    with pytest.raises(GateError, match="--reason"):
        promote_version(params, v1, ACTOR, force=True)
    with pytest.raises(RegistryError, match="already production"):
        promote_version(params, v2, ACTOR)

    forced = promote_version(params, v1, ACTOR, force=True, reason="legal asked for v1 back")
    assert forced.outcome == "promote" and forced.forced and registry.production() == v1
    tags = MlflowClient().get_model_version("retune-test", str(v1)).tags
    assert tags["gate.forced"] == "true" and tags["gate.decided_by"] == ACTOR
    assert tags["gate.reason"].startswith("forced: legal asked for v1 back (the gate alone")
    assert float(tags["gate.ci_high"]) < 0  # the record keeps the evidence against it

    back = registry.rollback(ACTOR)
    assert (back.from_version, back.to_version, back.kind) == (v1, v2, "rollback")
    assert registry.production() == v2
    again = registry.rollback(ACTOR, "v2 misbehaves too")
    assert (again.from_version, again.to_version) == (v2, v1)
    with pytest.raises(RegistryError, match="no earlier production version"):
        registry.rollback(ACTOR)

    # The history survives the process: a fresh client on the same store reads it back.
    history = Registry.open(params.tracking, "retune-test").history()
    assert [(e.kind, e.from_version, e.to_version, e.forced) for e in history] == [
        ("rollback", v2, v1, False),
        ("rollback", v1, v2, False),
        ("promote", v2, v1, True),
        ("promote", v1, v2, False),
        ("promote", None, v1, False),
    ]
    assert history[0].why == "v2 misbehaves too" and history[0].actor == ACTOR


def test_without_a_registered_candidate_the_stage_says_what_to_run(params: Params) -> None:
    from retune.errors import RetuneError
    from tasks.promote import run as promote

    with pytest.raises(RetuneError, match=r"register\.json is missing: run the `register` stage"):
        promote(params)


@pytest.mark.slow
def test_a_failed_gate_never_serves_and_production_is_served_by_its_alias(
    params: Params, candidates: dict[str, Path]
) -> None:
    """A first candidate that misses an absolute gate stays out of production; the next one
    passes, and `mlflow models serve -m models:/<name>@production --env-manager local` (a
    fresh process loading the alias through pyfunc) answers a generation request with it."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    from retune.release.tracking import resolved_uri
    from tasks.promote import run as promote

    unsafe = register_candidate(params, candidates["good"], unsafe_share=0.3)
    rejected = promote(params)
    assert (rejected.outcome, rejected.production) == ("reject", None)
    assert rejected.reason == (
        "failed the absolute gates: unsafe_share 0.3 > promote.max_unsafe_share=0.05"
    )
    served = register_candidate(params, candidates["good"])
    assert promote(params).production == served != unsafe

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    venv_bin = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
        "MLFLOW_TRACKING_URI": resolved_uri(params.tracking.uri),
        "HF_HUB_OFFLINE": "1",
    }
    command = [f"{venv_bin}/mlflow", "models", "serve", "-m", "models:/retune-test@production"]
    command += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    server = subprocess.Popen(
        command,
        env=env,
        cwd=params.paths.reports.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: uvicorn's worker is stopped with it
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, server.stderr.read().decode()[-3000:]  # type: ignore[union-attr]
            try:
                urllib.request.urlopen(f"{base}/ping", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "mlflow models serve did not come up"
                time.sleep(0.5)
        body = {"inputs": ["Hi, my camera arrived damaged."], "params": {"max_new_tokens": 12}}
        request = urllib.request.Request(
            f"{base}/invocations",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            predictions = json.loads(response.read())["predictions"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    assert len(predictions) == 1 and predictions[0].strip()


def diverged_copy(params: Params, base: Path, out: Path) -> Path:
    """`base` trained by the real train core at train.learning_rate=50: the weights blow up
    and the holdout perplexity overflows to inf (mean NLL in the tens of thousands)."""
    import dataclasses

    from retune.model.training import train

    train_file = params.paths.split / "train.parquet"
    rows = (
        Record(messages=tuple(c), source="train.jsonl", line=i + 1, format="chat_jsonl").to_row()
        for i, c in enumerate(make_conversations(80))
    )
    write_records(rows, train_file)
    cfg = dataclasses.replace(params.train, base_model=str(base), learning_rate=50.0)
    holdout = params.paths.split / "holdout.parquet"
    train(cfg, params.seed, train_file, holdout, out, params.paths.checkpoints)
    return out


@pytest.mark.slow
def test_a_diverged_retrain_is_rejected_with_the_reason_and_the_gate_reruns(
    params: Params, candidates: dict[str, Path], tmp_path: Path
) -> None:
    import yaml
    from mlflow import MlflowClient
    from typer.testing import CliRunner

    from flows.cli import app
    from retune.config import to_plain
    from tasks.promote import promote_version
    from tasks.promote import run as promote

    registry = Registry.open(params.tracking, "retune-test")
    v1 = register_candidate(params, candidates["fair"])
    promote(params)
    v2 = register_candidate(params, diverged_copy(params, candidates["fair"], tmp_path / "lr50"))
    assert read_json(params.paths.reports / "evaluate.json")["perplexity"] == float("inf")

    reason = "the model diverged: perplexity is inf; lower train.learning_rate"
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(to_plain(params)))
    for _ in range(2):  # `retune gate` again on the same version decides the same
        gated = CliRunner().invoke(app, ["gate", "--params", str(params_file)])
        assert gated.exit_code == 0, gated.output
        assert f"retune-test v{v2} REJECTED (stays registered, not production): {reason}" in (
            gated.output
        )
        assert registry.production() == v1
        assert read_json(params.paths.reports / "promote.json")["reason"] == reason
        tags = MlflowClient().get_model_version("retune-test", str(v2)).tags
        assert (tags["gate.decision"], tags["gate.reason"]) == ("reject", reason)
    # A person's promotion scores it afresh, and is refused for the same reason.
    refused = promote_version(params, v2, ACTOR)
    assert (refused.outcome, refused.reason, refused.production) == ("reject", reason, v1)


@pytest.mark.slow
def test_a_candidate_better_on_the_holdout_but_worse_on_held_out_ratings_is_not_promoted(
    params: Params, candidates: dict[str, Path]
) -> None:
    """Users' held-out ratings judge the candidate too: the ratings are made so the better
    model moved away from what users liked (the liked replies are those it made least likely
    relative to production), and the gate rejects it though its holdout bits are better."""
    import numpy as np
    import pyarrow.parquet as pq

    from retune.data.preference import PreferenceSet
    from retune.model.modeling import load_pretrained
    from retune.model.scoring import score_rated
    from tasks.preference_data import write
    from tasks.promote import run as promote

    v1 = register_candidate(params, candidates["fair"])
    assert promote(params).production == v1
    rows = [
        {
            "id": f"r{i}",
            "interaction_id": f"i{i}",
            "feedback_id": i,
            "model_version": str(v1),
            "prompt": [{"role": "user", "content": conv[0][1]}],
            "completion": conv[1][1],
            "label": True,
            "origin": "served",
            "split": "holdout",
        }
        for i, conv in enumerate(make_conversations(40, seed=11))
    ]

    def nll(model_dir: Path) -> np.ndarray:
        model, tokenizer = load_pretrained(model_dir)
        table = score_rated(model, tokenizer, rows, 8, params.scoring.max_seq_len)
        return np.asarray(table.column("nll_sum").to_pylist())

    gain = nll(candidates["fair"]) - nll(candidates["good"])
    liked = gain < np.median(gain)  # users liked what the better model moved away from
    for row, label in zip(rows, liked, strict=True):
        row["label"] = bool(label)
    write(PreferenceSet(kto=rows), params.paths.preference, {"ready": {"kto": True}})

    v2 = register_candidate(params, candidates["good"])
    model, tokenizer = load_pretrained(params.paths.model)
    pq.write_table(
        score_rated(model, tokenizer, rows, 8, params.scoring.max_seq_len),
        params.paths.reports / "rated_scores.parquet",
    )
    result = promote(params)

    assert result.outcome == "reject" and result.production == v1
    assert result.comparison is not None and result.comparison["ci_low"] > 0  # better holdout
    assert result.ratings is not None
    assert (result.ratings["n_desirable"], result.ratings["n_undesirable"]) == (20, 20)
    assert result.ratings["auc"] == 0.0 and result.ratings["ci_high"] < 0.5
    assert result.reason.startswith(f"worse than production v{v1} on users' ratings")
    assert read_json(params.paths.reports / "promote.json")["ratings"]["auc"] == 0.0
    from mlflow import MlflowClient

    tags = MlflowClient().get_model_version("retune-test", str(v2)).tags
    assert json.loads(tags["gate.ratings"])["n_undesirable"] == 20  # recorded on the version
    run = MlflowClient().get_run(read_json(params.paths.reports / "train.json")["run_id"])
    assert run.data.metrics["gate.ratings_auc"] == 0.0
    assert Registry.open(params.tracking, "retune-test").production() == v1
    assert v2 == v1 + 1
