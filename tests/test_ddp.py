"""`train.processes: 2`: the train stage runs data-parallel on two gloo processes (torch's
elastic launcher, DDP through the Trainer). The ranks end with the same weights, rank 0 saves
them and the result registers and loads like a one-process model; a failing rank fails the
stage with its own message, and no rank is left running."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import psutil
import pytest

from retune.config import Params
from retune.errors import RetuneError
from retune.model import distributed
from retune.model.modeling import load_pretrained
from retune.release.tracking import resolved_uri
from retune.reports import read_json
from tasks import evaluate, preference, register, split
from tasks import train as train_stage
from tests.helpers import run_in_fresh_process

pytestmark = pytest.mark.slow


def _with_train(params: Params, **changes: object) -> Params:
    return dataclasses.replace(params, train=dataclasses.replace(params.train, **changes))


@pytest.fixture
def split_params(prepared: Params) -> Params:
    split.run(prepared)
    return prepared


def _children() -> set[int]:
    """Processes under this one, but multiprocessing's resource tracker (started with the first
    spawned process, it lives as long as its parent)."""
    return {
        p.pid
        for p in psutil.Process().children(recursive=True)
        if "resource_tracker" not in " ".join(p.cmdline())
    }


def test_two_gloo_processes_train_one_model_that_registers_and_loads(
    split_params: Params,
) -> None:
    params = _with_train(split_params, processes=2, max_steps=6, learning_rate=5e-3)
    before = _children()
    result = train_stage.run(params)
    assert _children() <= before  # both ranks are gone

    report = read_json(params.paths.reports / "train.json")
    assert report["processes"] == result.processes == 2
    # A step is 4 blocks of 64 tokens on each of the 2 ranks.
    assert report["tokens_seen"] == 6 * 4 * 64 * 2
    # The weights rank 0 saved are the ones every rank holds (launch checked they agree).
    model, _ = load_pretrained(params.paths.sft)
    assert distributed.weights_digest(model) == report["weights_sha256"]

    run = mlflow.get_run(report["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["processes"] == 2.0
    # Rank 0 logged the curve into the launching process's run, step by step.
    history = mlflow.MlflowClient().get_metric_history(report["run_id"], "train_loss")
    assert [m.step for m in history] == [2, 4, 6]

    preference.run(params)  # no ratings: the supervised model goes on as the candidate
    evaluate.run(params)
    registered = register.run(params)
    code = f"""
import json, mlflow
model = mlflow.pyfunc.load_model({registered.model_uri!r})
print(json.dumps(model.predict(["Hi, my router won't turn on."])))
"""
    out = run_in_fresh_process(code, resolved_uri(params.tracking.uri))
    assert len(out) == 1 and isinstance(out[0], str)


def test_ranks_end_with_identical_weights_after_learning(split_params: Params) -> None:
    params = _with_train(split_params, processes=2, max_steps=8, learning_rate=5e-3)
    ranks = distributed.launch(train_stage._train_rank, (params, _open_run(params)), 2, "train")

    assert [r.processes for r in ranks] == [2, 2]
    digests = [r.weights_sha256 for r in ranks]
    assert digests[0] is not None and digests[0] == digests[1]
    # They learnt together: the loss rank 0 logged fell over the 8 steps.
    losses = [loss for _, loss, _ in ranks[0].history if loss is not None]
    assert losses[-1] < losses[0], losses


def _open_run(params: Params) -> str:
    from retune.release.tracking import setup_tracking

    setup_tracking(params.tracking)
    with mlflow.start_run() as active:
        return active.info.run_id


def test_a_failing_rank_fails_the_stage_with_its_message(split_params: Params) -> None:
    # The holdout is gone for every rank: the first to fail is reported in its own words.
    params = _with_train(split_params, processes=2)
    (params.paths.split / "holdout.parquet").unlink()
    before = _children()
    said = r"train: rank [01] of 2 failed: .*holdout.parquet: missing; run the split stage"
    with pytest.raises(RetuneError, match=said):
        distributed.launch(train_stage._train_rank, (params, _open_run(params)), 2, "train")
    assert _children() <= before


def test_a_rank_that_dies_stops_the_other_and_says_so(tmp_path: Path) -> None:
    # Rank 1 exits hard mid-run while rank 0 waits for it in a collective: the launcher must
    # stop rank 0 and report rank 1, not hang. Run as the CLI would, in its own process.
    code = """
import os, sys
from retune.model import distributed
from tests.test_ddp import _die_on_rank_1
try:
    distributed.launch(_die_on_rank_1, (), 2, "train")
except Exception as exc:
    print(exc)
    sys.exit(3)
"""
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=Path(__file__).parents[1],
        env={**os.environ, "RETUNE_DEBUG": ""},
    )
    assert done.returncode == 3, done.stderr[-2000:]
    assert "train: rank 1 of 2 failed" in done.stdout
    assert "Traceback" not in done.stderr  # one message, no launcher traceback


def _die_on_rank_1() -> None:
    import torch
    import torch.distributed as dist

    if distributed.rank() == 1:
        os._exit(7)
    dist.all_reduce(torch.ones(1))  # rank 0 waits here for a rank that is gone


def test_processes_auto_is_one_on_a_cpu() -> None:
    import torch

    expected = max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1
    assert distributed.resolve_processes("auto") == expected
    assert distributed.resolve_processes(3) == 3


def test_train_json_records_one_process_by_default(split_params: Params) -> None:
    train_stage.run(_with_train(split_params, max_steps=2))
    report = json.loads((split_params.paths.reports / "train.json").read_text())
    assert report["processes"] == 1 and report["weights_sha256"] is None


def test_a_data_parallel_run_resumes_from_its_checkpoint(split_params: Params) -> None:
    import shutil

    params = _with_train(split_params, processes=2, max_steps=4, save_steps=2, eval_steps=2)
    first = train_stage.run(params)
    checkpoints = params.paths.checkpoints
    assert first.resumed_from is None and (checkpoints / "checkpoint-2").is_dir()
    # As if the run had died after its first checkpoint: the rest is trained again, on 2 ranks.
    shutil.rmtree(checkpoints / "checkpoint-4")
    shutil.rmtree(params.paths.sft)
    again = train_stage.run(params)
    assert again.resumed_from == checkpoints / "checkpoint-2"
    assert again.steps == 4 and again.processes == 2
    report = read_json(params.paths.reports / "train.json")
    assert report["resumed_from"] == str(checkpoints / "checkpoint-2")
    model, _ = load_pretrained(params.paths.sft)
    assert distributed.weights_digest(model) == report["weights_sha256"]
