"""`retune tune`: an Optuna search of the train settings in `tune.space`.

Runs as `python -m tasks.tune` (trials one after another) and as the `tune` flow
(flows/tune.py: a Prefect task per trial, on `params.runner`). Each trial trains on the train
split less one validation fold (by conversation; the holdout is never looked at) with the
trial's settings, reports every evaluation's loss to the study, and stops when the pruner
gives up on it. Trial 0 is the current settings, so the best is measured against them. Every
trial is an MLflow child run (its settings, its curve) of the study's run. The study lives in
`tune.storage` (SQLite beside the tracking store by default) and a rerun resumes it. Writes
reports/tune.json and reports/tune_best.txt: the best settings as `retune run` overrides. The
best trial registers nothing: `retune run $(cat reports/tune_best.txt)` trains it through the
pipeline and the gate.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from retune.artifacts import TRAIN_FILE, TRAIN_SPLIT, TUNE_BEST, TUNE_REPORT
from retune.config import Params
from retune.data.folds import fold_split
from retune.data.records import read_records
from retune.entry import stage_main, stage_task
from retune.errors import RetuneError
from retune.masking import mask_value
from retune.model.training import available_cores, train
from retune.model.tuning import (
    baseline,
    distributions,
    make_pruner,
    override_line,
    pruning_callback,
    storage_url,
    trial_params,
)
from retune.release.tracking import (
    STEP_METRICS,
    child_run,
    resolved_uri,
    setup_tracking,
    step_metrics_callback,
)

TUNE_DIR = "tune"  # under paths.checkpoints: the validation split and the running trials
STUDY_TAG = "retune.study"
COMPLETE, PRUNED, FAILED = "complete", "pruned", "failed"


@dataclass(frozen=True)
class TrialResult:
    number: int
    values: dict[str, Any]
    state: str  # complete | pruned | failed
    eval_loss: float | None  # the last evaluation's loss on the validation fold
    steps: int
    pruned_at: int | None
    wall_s: float
    run_id: str
    error: str | None = None


@dataclass(frozen=True)
class TuneResult:
    study: str
    storage: str  # with any password masked
    trials: list[TrialResult]  # every ended trial of the study (complete, pruned, failed)
    parent_run_id: str
    wall_s: float
    report_file: Path
    best_file: Path | None
    space: dict[str, Any] = field(default_factory=dict)

    @property
    def best(self) -> TrialResult | None:
        done = [t for t in self.trials if t.state == COMPLETE and t.eval_loss is not None]
        return min(done, key=lambda t: t.eval_loss or 0.0) if done else None

    @property
    def baseline(self) -> TrialResult | None:
        return next((t for t in self.trials if t.number == 0), None)

    def report(self) -> dict[str, Any]:
        best, base = self.best, self.baseline
        return {
            "study": self.study,
            "storage": self.storage,
            "parent_run_id": self.parent_run_id,
            "space": self.space,
            "trials": [dataclasses.asdict(t) for t in self.trials],
            "n_complete": sum(t.state == COMPLETE for t in self.trials),
            "n_pruned": sum(t.state == PRUNED for t in self.trials),
            "n_failed": sum(t.state == FAILED for t in self.trials),
            "best": dataclasses.asdict(best) if best else None,
            "baseline_eval_loss": base.eval_loss if base else None,
            "best_overrides": override_line(best.values) if best else None,
            "wall_s": self.wall_s,
        }


def split_files(params: Params) -> tuple[Path, Path]:
    """Where the trials' train and validation records are (`validation_split` writes them)."""
    folder = params.paths.checkpoints / TUNE_DIR
    return folder / TRAIN_FILE, folder / "validation.parquet"


def validation_split(params: Params) -> tuple[Path, Path]:
    """The train split less fold 0 of `tune.folds` (by conversation), and that fold: what every
    trial trains and validates on, under paths.checkpoints/tune."""
    records = read_records(TRAIN_SPLIT.require(params))
    fit, held = fold_split(records, params.tune.folds, 0)
    if fit.num_rows == 0 or held.num_rows == 0:
        raise RetuneError(
            f"tune.folds={params.tune.folds} leaves {fit.num_rows} train and {held.num_rows} "
            f"validation records of {TRAIN_SPLIT.path(params)}; lower tune.folds or add data"
        )
    train_file, validation_file = split_files(params)
    train_file.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(fit, train_file)
    pq.write_table(held, validation_file)
    return train_file, validation_file


def trial(
    params: Params,
    number: int,
    trial_id: int,
    values: dict[str, Any],
    study: str,
    storage: str,
    parent_run_id: str,
    concurrent: int = 1,
) -> TrialResult:
    """Edge for one trial (a Prefect task, on any runner): train with `values`, report each
    evaluation to the study, stop when pruned; an MLflow child run of `parent_run_id`. A
    trial whose settings fail (a bad combination, out of memory) is a failed trial, not a
    failed search."""
    import mlflow
    import optuna

    started = time.perf_counter()
    client = mlflow.MlflowClient(tracking_uri=resolved_uri(params.tracking.uri))
    run_id = child_run(
        client,
        parent_run_id,
        f"trial-{number}",
        {"retune.stage": "tune", "retune.trial": str(number)},
    )
    loaded = optuna.load_study(study_name=study, storage=storage, pruner=make_pruner(params.tune))
    live = optuna.trial.Trial(loaded, trial_id)

    def report(loss: float, step: int) -> bool:
        live.report(loss, step)
        return bool(live.should_prune())

    prune = pruning_callback(report)
    work = params.paths.checkpoints / TUNE_DIR / f"trial-{number}"
    train_file, validation_file = split_files(params)
    print(f"tune: trial {number}: {override_line(values)}", flush=True)
    try:
        tuned = trial_params(params, values)
        setup_tracking(params.tracking)
        with mlflow.start_run(run_id=run_id):
            mlflow.log_params({**{k: str(v) for k, v in values.items()}, "tune.trial": str(number)})
            result = train(
                tuned.train,
                params.seed,
                train_file,
                validation_file,
                work / "model",
                work / "checkpoints",
                callbacks=[step_metrics_callback(STEP_METRICS), prune],
                num_threads=max(1, available_cores() // max(1, concurrent)),
            )
            state = PRUNED if prune.pruned_at is not None else COMPLETE
            mlflow.set_tag("retune.trial_state", state)
            if result.eval_loss is not None:
                mlflow.log_metric("final_eval_loss", result.eval_loss)
    except Exception as exc:  # this trial's settings failed: the search goes on
        client.set_terminated(run_id, "FAILED")
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"tune: trial {number} failed: {message}", flush=True)
        return TrialResult(number, values, FAILED, None, 0, None, _since(started), run_id, message)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # nothing of a trial is kept but its run
    outcome = f"pruned at step {prune.pruned_at}" if state == PRUNED else "complete"
    print(f"tune: trial {number}: eval loss {result.eval_loss}, {outcome}", flush=True)
    return TrialResult(
        number,
        values,
        state,
        result.eval_loss,
        result.steps,
        prune.pruned_at,
        _since(started),
        run_id,
    )


def _since(started: float) -> float:
    return round(time.perf_counter() - started, 2)


RunBatch = Callable[[Sequence[dict[str, Any]]], list[TrialResult]]


def _parent_run(params: Params, study: str) -> str:
    """The study's MLflow run in the pipeline's experiment: the one tagged with the study's
    name (a resumed study keeps its run), or a new one."""
    from mlflow import MlflowClient

    experiment = setup_tracking(params.tracking)
    client = MlflowClient()
    found = client.search_runs(
        [experiment], filter_string=f"tags.`{STUDY_TAG}` = '{study}'", max_results=1
    )
    if found:
        return str(found[0].info.run_id)
    run = client.create_run(experiment, run_name=f"tune {study}", tags={STUDY_TAG: study})
    return str(run.info.run_id)


def search(params: Params, run_batch: RunBatch, workers: int = 1) -> TuneResult:
    """Core of the search: ask the study for up to `workers` trials at a time, run them with
    `run_batch` (one after another, or on a task runner), tell the study how each ended,
    until `tune.trials` have ended; then the report, the best settings and the study's run."""
    import optuna
    from mlflow import MlflowClient
    from optuna.trial import TrialState

    cfg = params.tune
    started = time.perf_counter()
    space = distributions(cfg, params)
    storage = storage_url(cfg, resolved_uri(params.tracking.uri))
    name = cfg.study or f"{params.tracking.experiment}-tune"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        direction="minimize",
        sampler=optuna.samplers.TPESampler(seed=params.seed),
        pruner=make_pruner(cfg),
        load_if_exists=True,
    )
    for stale in study.get_trials(states=(TrialState.RUNNING,)):  # an interrupted run's
        study.tell(stale.number, state=TrialState.FAIL)
    # A failed trial (its settings broke training) has ended too: the search is bounded.
    ended_states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    if not study.trials:
        study.enqueue_trial(baseline(params, cfg.space))
        for settings in cfg.enqueue:
            study.enqueue_trial(settings)
    shown = mask_value(storage)
    done = len(study.get_trials(states=ended_states))
    print(f"tune: study {name!r} in {shown}: {done} of {cfg.trials} trials ended", flush=True)
    parent = _parent_run(params, name)
    validation_split(params)
    while done < cfg.trials:
        asked = [study.ask(space) for _ in range(min(workers, cfg.trials - done))]
        batch = [
            {
                "params": params,
                "number": t.number,
                "trial_id": t._trial_id,  # Optuna's id of the trial, to report to it elsewhere
                "values": dict(t.params),
                "study": name,
                "storage": storage,
                "parent_run_id": parent,
                "concurrent": len(asked),
            }
            for t in asked
        ]
        for asked_trial, outcome in zip(asked, run_batch(batch), strict=True):
            if outcome.state == COMPLETE and outcome.eval_loss is not None:
                study.tell(asked_trial, outcome.eval_loss)
            elif outcome.state == PRUNED:
                study.tell(asked_trial, state=TrialState.PRUNED)
            else:
                asked_trial.set_user_attr("error", outcome.error or "failed")
                study.tell(asked_trial, state=TrialState.FAIL)
        done = len(study.get_trials(states=ended_states))
    trials = _ended(study, MlflowClient(tracking_uri=resolved_uri(params.tracking.uri)), parent)
    result = TuneResult(
        study=name,
        storage=shown,
        trials=trials,
        parent_run_id=parent,
        wall_s=_since(started),
        report_file=TUNE_REPORT.path(params),
        best_file=None,
        space={k: dataclasses.asdict(v) for k, v in cfg.space.items()},
    )
    result = _record(params, result)
    if result.best is None:
        raise RetuneError(
            f"tune: none of the {len(result.trials)} trials of study {name!r} completed; "
            f"each one's error is in {result.report_file}"
        )
    return result


def _ended(study: Any, client: Any, parent: str) -> list[TrialResult]:
    """Every ended trial of the study (this run's and earlier ones'), from the study and the
    trials' MLflow runs."""
    from optuna.trial import TrialState

    runs = {
        r.data.tags.get("retune.trial"): r
        for r in client.search_runs(
            [client.get_run(parent).info.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{parent}'",
            max_results=10_000,
        )
    }
    states = {TrialState.COMPLETE: COMPLETE, TrialState.PRUNED: PRUNED, TrialState.FAIL: FAILED}
    out = []
    for t in study.trials:
        if t.state not in states:
            continue
        run = runs.get(str(t.number))
        last = t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None
        pruned_at = max(t.intermediate_values) if t.state == TrialState.PRUNED and last else None
        out.append(
            TrialResult(
                number=t.number,
                values=dict(t.params),
                state=states[t.state],
                eval_loss=t.value if t.state == TrialState.COMPLETE else last,
                steps=max(t.intermediate_values, default=0),
                pruned_at=pruned_at,
                wall_s=t.duration.total_seconds() if t.duration else 0.0,
                run_id=run.info.run_id if run is not None else "",
                error=t.user_attrs.get("error"),
            )
        )
    return out


def _record(params: Params, result: TuneResult) -> TuneResult:
    """reports/tune.json, reports/tune_best.txt, and the study's run: the best trial's settings
    as params, its eval loss and the baseline's as metrics."""
    from mlflow import MlflowClient

    best, base = result.best, result.baseline
    best_file = None
    if best is not None:
        best_file = TUNE_BEST.path(params)
        best_file.parent.mkdir(parents=True, exist_ok=True)
        best_file.write_text(override_line(best.values) + "\n")
    result = dataclasses.replace(result, best_file=best_file)
    report = result.report()
    TUNE_REPORT.write(params, report)
    client = MlflowClient(tracking_uri=resolved_uri(params.tracking.uri))
    metrics = {
        "n_trials": float(len(result.trials)),
        "n_pruned": float(report["n_pruned"]),
        "n_failed": float(report["n_failed"]),
        "wall_s": result.wall_s,
    }
    if best is not None and best.eval_loss is not None:
        metrics["best_eval_loss"] = best.eval_loss
        for key, value in best.values.items():
            client.set_tag(result.parent_run_id, f"best.{key}", str(value))
    if base is not None and base.eval_loss is not None:
        metrics["baseline_eval_loss"] = base.eval_loss
    for key, value in metrics.items():
        client.log_metric(result.parent_run_id, key, value)
    client.log_artifact(result.parent_run_id, str(result.report_file))
    client.set_terminated(result.parent_run_id)
    if best is not None:
        print(
            f"tune: best trial {best.number} of {len(result.trials)} ({report['n_pruned']} "
            f"pruned): eval loss {best.eval_loss:.4f} (current settings: "
            f"{report['baseline_eval_loss']}); `retune run $(cat {best_file})` trains it "
            "through the pipeline and the gate",
            flush=True,
        )
    return result


def run(params: Params) -> TuneResult:
    """Edge: the search with its trials one after another (the flow runs them on the runner)."""
    return search(params, lambda batch: [trial(**kwargs) for kwargs in batch])


trial_task = stage_task(trial, name="tune-trial")

if __name__ == "__main__":
    stage_main(run)
