"""The cv stage: folds grouped by conversation, fold runs under the pipeline's MLflow run,
a summary whose mean and std are those of the folds, and nothing at all when it is off."""

from __future__ import annotations

import dataclasses
import json
import shutil
import statistics
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pytest

from retune.config import Params, RunnerKind
from retune.data.records import read_records
from retune.errors import RetuneError
from tasks import cv, preference, split, train


def with_folds(params: Params, k: int) -> Params:
    return dataclasses.replace(params, cv=dataclasses.replace(params.cv, folds=k))


@pytest.fixture
def trained(prepared: Params) -> Params:
    """The split and the pipeline's train run done, as the flow has them before cv."""
    split.run(prepared)
    train.run(prepared)
    preference.run(prepared)  # preference.method none: the candidate is the sft model
    return prepared


def conversations(n: int, start: int = 0) -> pa.Table:
    # Several records per conversation: the grouping must keep them together.
    ids = [f"conv-{i}" for i in range(start, start + n) for _ in range(i % 3 + 1)]
    return pa.table({"id": [f"r{j}" for j in range(len(ids))], "conversation_id": ids})


def test_no_conversation_is_in_two_folds() -> None:
    records, k = conversations(600), 3
    held_out: list[set[str]] = []
    for i in range(k):
        fold_train, fold_val = cv.fold_split(records, k, i)
        train_ids = set(fold_train.column("conversation_id").to_pylist())
        val_ids = set(fold_val.column("conversation_id").to_pylist())
        assert not train_ids & val_ids
        assert fold_train.num_rows + fold_val.num_rows == records.num_rows
        held_out.append(val_ids)
    # Every conversation is validated in exactly one fold, and the folds are of similar size.
    everyone = set(records.column("conversation_id").to_pylist())
    assert sorted(c for ids in held_out for c in ids) == sorted(everyone)
    assert all(150 < len(ids) < 250 for ids in held_out), [len(ids) for ids in held_out]

    # Adding data never moves a conversation that was already there to another fold.
    grown = pa.concat_tables([records, conversations(300, start=600)])
    for i in range(k):
        grown_ids = set(cv.fold_split(grown, k, i)[1].column("conversation_id").to_pylist())
        assert held_out[i] <= grown_ids


@pytest.mark.parametrize("k", [0, 1])
def test_folds_below_two_turn_cv_off(prepared: Params, k: int) -> None:
    result = cv.run(with_folds(prepared, k))

    assert result.k == 0 and result.folds == () and result.perplexity_mean is None
    report = json.loads((prepared.paths.reports / "cv.json").read_text())
    assert report["enabled"] is False and f"cv.folds={k}" in report["reason"]
    # Nothing trained, nothing tracked.
    assert not (prepared.paths.checkpoints / cv.CV_DIR).exists()
    assert not Path(prepared.tracking.uri.removeprefix("sqlite:///")).exists()


@pytest.mark.slow
def test_folds_are_child_runs_and_the_summary_matches_them(
    trained: Params, capsys: pytest.CaptureFixture[str]
) -> None:
    from mlflow import MlflowClient

    from retune.release.tracking import setup_tracking

    params = with_folds(trained, 2)
    paths = params.paths
    main_model = (paths.model / "model.safetensors").read_bytes()
    main_checkpoints = sorted(p.name for p in paths.checkpoints.iterdir())

    result = cv.run(params)

    n_train = read_records(paths.split / "train.parquet").num_rows
    assert [f.fold for f in result.folds] == [0, 1]
    assert sum(f.n_validation for f in result.folds) == n_train
    assert all(f.n_train + f.n_validation == n_train for f in result.folds)
    assert all(f.steps == params.train.max_steps for f in result.folds)
    # The summary is that of the folds, in the report as in the result.
    report = json.loads(result.report_file.read_text())
    perplexities = [f["perplexity"] for f in report["folds"]]
    accuracies = [f["next_token_accuracy"] for f in report["folds"]]
    assert report["enabled"] is True and report["k"] == 2
    assert report["perplexity_mean"] == pytest.approx(statistics.fmean(perplexities))
    assert report["perplexity_std"] == pytest.approx(statistics.stdev(perplexities))
    assert report["next_token_accuracy_std"] == pytest.approx(statistics.stdev(accuracies))
    assert report["fold_s_total"] == pytest.approx(sum(f["wall_s"] for f in report["folds"]))
    assert result.chart_file is not None and result.chart_file.read_bytes()[:4] == b"\x89PNG"
    # The main model and its checkpoints are untouched; fold models live apart.
    assert (paths.model / "model.safetensors").read_bytes() == main_model
    assert sorted(p.name for p in paths.checkpoints.iterdir()) == sorted([*main_checkpoints, "cv"])
    assert all(f.model_dir == cv.fold_dir(params, f.fold) / "model" for f in result.folds)

    setup_tracking(params.tracking)
    client = MlflowClient()
    parent = json.loads((paths.reports / "train.json").read_text())["run_id"]
    assert result.parent_run_id == parent
    children = client.search_runs(
        [client.get_run(parent).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent}'",
    )
    by_name = {run.info.run_name: run for run in children}
    assert sorted(by_name) == ["fold-0", "fold-1"]
    for f in result.folds:
        child = by_name[f"fold-{f.fold}"]
        assert child.info.status == "FINISHED" and child.info.run_id == f.run_id
        assert child.data.metrics["perplexity"] == pytest.approx(f.perplexity)
        assert child.data.params["cv.fold"] == str(f.fold)
        assert child.data.params["train.max_steps"] == str(params.train.max_steps)
    summary = client.get_run(parent).data.metrics
    assert summary["cv_perplexity_mean"] == pytest.approx(result.perplexity_mean)
    assert summary["cv_perplexity_std"] == pytest.approx(result.perplexity_std)
    per_fold = client.get_metric_history(parent, "cv_fold_perplexity")
    assert [(m.step, m.value) for m in sorted(per_fold, key=lambda m: m.step)] == [
        pytest.approx((f.fold, f.perplexity)) for f in result.folds
    ]
    artifacts = {a.path for a in client.list_artifacts(parent, "cv")}
    assert artifacts == {"cv/cv.json", "cv/cv_folds.png"}

    # Both folds again, submitted at once as a flow's thread-pool task runner does. transformers
    # patches process-wide state while it builds or loads a model, so folds in one process
    # must take turns (else their models come out broken: infinite perplexity). The finished
    # fold checkpoints of the same inputs are reused: the same models, nothing retrained.
    capsys.readouterr()
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(cv.fold, params, i) for i in range(2)]
        again = sorted((f.result() for f in futures), key=lambda f: f.fold)
    first, second = sorted(again, key=lambda f: f.started_at)
    assert first.finished_at <= second.started_at
    assert [f.perplexity for f in again] == pytest.approx([f.perplexity for f in result.folds])
    assert {f.run_id for f in again}.isdisjoint({f.run_id for f in result.folds})
    assert capsys.readouterr().out.count("nothing left to train") == 2


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["process", "ray"])
def test_folds_on_a_runner_run_side_by_side_and_match_the_sequential_ones(
    trained: Params, kind: RunnerKind
) -> None:
    """`runner.kind: process` (spawned processes) or `ray` (a local Ray cluster on 127.0.0.1):
    the flow's folds train at the same time, each with its share of the cores, and score as
    the folds run one after another do; a fold that fails fails the step with its message."""
    import importlib.util
    import os

    if kind == "ray" and importlib.util.find_spec("prefect_ray") is None:
        if os.environ.get("RETUNE_REQUIRE_RAY"):
            pytest.fail("RETUNE_REQUIRE_RAY is set but the ray extra is not installed")
        pytest.skip("the ray extra is not installed (pip install -e '.[ray]')")
    from prefect import flow
    from prefect.testing.utilities import prefect_test_harness

    from flows.retrain import cross_validate

    params = with_folds(trained, 2)
    sequential = cv.run(params)
    shutil.rmtree(params.paths.checkpoints / cv.CV_DIR)  # no fold checkpoint to resume from
    on_runner = dataclasses.replace(
        params, runner=dataclasses.replace(params.runner, kind=kind, workers=2)
    )

    @flow
    def folds() -> cv.CvResult:
        return cross_validate(on_runner)

    with prefect_test_harness(server_startup_timeout=120):
        pooled = folds()

    assert [f.fold for f in pooled.folds] == [0, 1]
    # Side by side: each started before the other finished.
    assert max(f.started_at for f in pooled.folds) < min(f.finished_at for f in pooled.folds)
    for alone, pool in zip(sequential.folds, pooled.folds, strict=True):
        assert (pool.n_train, pool.n_validation, pool.steps) == (
            alone.n_train,
            alone.n_validation,
            alone.steps,
        )
        # One thread each instead of all the cores: the same model up to float rounding.
        assert pool.perplexity == pytest.approx(alone.perplexity, rel=1e-3)
        assert pool.next_token_accuracy == pytest.approx(alone.next_token_accuracy, abs=1e-3)
        assert pool.run_id != alone.run_id  # each its own MLflow child run
    assert pooled.parent_run_id == sequential.parent_run_id
    assert pooled.perplexity_mean == pytest.approx(sequential.perplexity_mean, rel=1e-3)

    # A fold that fails where it runs fails the step with its own message; nothing hangs.
    train_file = params.paths.split / "train.parquet"
    train_file.rename(train_file.with_suffix(".moved"))
    with prefect_test_harness(server_startup_timeout=120), pytest.raises(RetuneError) as failed:
        folds()
    assert str(train_file) in str(failed.value) and "`retune split`" in str(failed.value)
