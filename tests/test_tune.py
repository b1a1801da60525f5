"""`retune tune`: an Optuna search whose trials are MLflow child runs, whose pruner stops a bad
trial, whose best settings are overrides `retune run` takes, and whose study resumes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from retune.config import Params, SearchRange, TuneParams, load_params, to_plain
from retune.errors import RetuneError
from retune.model.tuning import distributions, override_line
from tasks import split
from tasks import tune as tune_stage


def tuned(prepared: Params, **tune: object) -> Params:
    cfg = TuneParams(
        trials=3,
        folds=3,
        startup_trials=2,
        # Short trials that evaluate every 2 steps: something to prune on.
        overrides={"train.max_steps": 8, "train.eval_steps": 2, "train.warmup_steps": 0},
        space={"train.learning_rate": SearchRange(low=1e-9, high=2e-2, log=True)},
        # After the current settings: a good learning rate, then one that learns nothing.
        enqueue=[{"train.learning_rate": 1e-2}, {"train.learning_rate": 1e-9}],
    )
    return dataclasses.replace(prepared, tune=dataclasses.replace(cfg, **tune))


def test_the_space_keeps_ints_whole_and_names_a_setting_that_does_not_exist(
    tiny_params: Params,
) -> None:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    cfg = TuneParams(
        space={
            "train.learning_rate": SearchRange(low=1e-4, high=1e-2, log=True),
            "train.warmup_steps": SearchRange(low=0, high=40),
            "train.per_device_train_batch_size": SearchRange(choices=[4, 8]),
        }
    )
    found = distributions(cfg, tiny_params)
    assert isinstance(found["train.learning_rate"], FloatDistribution)
    assert isinstance(found["train.warmup_steps"], IntDistribution)
    assert isinstance(found["train.per_device_train_batch_size"], CategoricalDistribution)
    bad = TuneParams(space={"train.learnin_rate": SearchRange(low=1e-4, high=1e-2)})
    with pytest.raises(RetuneError, match=r"'train\.learnin_rate' is not a setting"):
        distributions(bad, tiny_params)
    with pytest.raises(ValueError, match=r"low .* must be below high"):
        SearchRange(low=1.0, high=0.5)
    assert override_line({"train.learning_rate": 0.001, "train.warmup_steps": 8}) == (
        "train.learning_rate=0.001 train.warmup_steps=8"
    )


@pytest.mark.slow
def test_a_search_prunes_the_bad_trial_logs_each_as_a_child_run_and_resumes_on_a_pool(
    prepared: Params, tmp_path: Path
) -> None:
    from mlflow import MlflowClient
    from prefect.testing.utilities import prefect_test_harness

    from flows.tune import tune as tune_flow
    from retune.release.registry import Registry

    split.run(prepared)
    params = tuned(prepared)
    result = tune_stage.run(params)

    assert [(t.number, t.state) for t in result.trials] == [
        (0, "complete"),
        (1, "complete"),
        (2, "pruned"),
    ]
    bad = result.trials[2]
    assert bad.values == {"train.learning_rate": 1e-9}
    assert bad.pruned_at == 2 and bad.steps == 2  # stopped at its first evaluation, not at 8
    best = result.best
    assert best is not None and best.number in (0, 1)
    assert best.eval_loss == min(t.eval_loss for t in result.trials[:2])  # type: ignore[type-var]
    # The best settings are overrides `retune run` (and load_params) take.
    line = (params.paths.reports / "tune_best.txt").read_text().strip()
    assert line == override_line(best.values)
    assert (
        load_params(overrides=line.split()).train.learning_rate
        == best.values["train.learning_rate"]
    )
    report = yaml.safe_load((params.paths.reports / "tune.json").read_text())
    assert report["n_pruned"] == 1 and report["best"]["number"] == best.number
    assert report["baseline_eval_loss"] == result.trials[0].eval_loss

    client = MlflowClient()
    children = client.search_runs(
        [client.get_run(result.parent_run_id).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{result.parent_run_id}'",
    )
    runs = {r.info.run_name: r for r in children}
    assert sorted(runs) == ["trial-0", "trial-1", "trial-2"]
    assert runs["trial-2"].data.tags["retune.trial_state"] == "pruned"
    assert runs["trial-2"].data.params["train.learning_rate"] == "1e-09"
    curve = client.get_metric_history(runs["trial-1"].info.run_id, "eval_loss")
    assert [m.step for m in sorted(curve, key=lambda m: m.step)] == [2, 4, 6, 8]
    parent = client.get_run(result.parent_run_id).data
    assert parent.metrics["best_eval_loss"] == pytest.approx(best.eval_loss)
    assert parent.metrics["n_pruned"] == 1
    # Nothing was registered, and no trial left a model behind.
    assert not Registry.open(params.tracking, params.register.model_name).exists()
    assert not list((params.paths.checkpoints / "tune").glob("trial-*"))

    # The same study, two more trials, side by side on the process runner, through the flow
    # (a Prefect task per trial): the three ended ones count, and only two new ones train.
    more = dataclasses.replace(
        tuned(prepared, trials=5, enqueue=[]),
        runner=dataclasses.replace(params.runner, kind="process", workers=2),
    )
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(to_plain(more)))
    with prefect_test_harness(server_startup_timeout=120):
        resumed = tune_flow(str(params_file))
    assert [t["number"] for t in resumed["trials"]] == [0, 1, 2, 3, 4]
    assert resumed["parent_run_id"] == result.parent_run_id
    children = client.search_runs(
        [client.get_run(result.parent_run_id).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{result.parent_run_id}'",
    )
    assert len(children) == 5
