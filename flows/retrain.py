"""Flow `retrain`: ingest -> hygiene -> validate -> split -> train -> preference -> cv ->
evaluate -> register -> promote, with the feedback store's ratings first turned into the
preference set (`preference_data`).

Entered by `retune run` / `make run` (and later by deployments). Each step is the stage's own
`run(params)` wrapped as a Prefect task, so this flow and `dvc repro` execute the same code.
A failed data contract raises in `validate`, and nothing after it runs; a candidate the gate
rejects stays registered (tagged with the reason) and production does not move.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow

from flows.runners import results, running, workers_for
from retune.artifacts import FLOW_REPORT, REGISTER_REPORT
from retune.config import DEFAULT_PARAMS, Params, load_params
from retune.data.datastate import (
    RUN_FINGERPRINT_TAG,
    incoming_fingerprint,
    last_fingerprint,
    record_fingerprint,
    run_fingerprint,
)
from retune.env import configure_environment
from retune.runlock import project_folder, run_lock
from tasks.cv import CvResult, cv_task, fold_task, parent_run, summarize_task
from tasks.evaluate import evaluate_task
from tasks.export_feedback import export_feedback_task
from tasks.hygiene import hygiene_task
from tasks.ingest import ingest_task
from tasks.preference import preference_task, why_not
from tasks.preference_data import preference_data_task
from tasks.promote import promote_task
from tasks.register import register_task
from tasks.split import split_task
from tasks.train import train_task
from tasks.validate import validate_task

STAGES = (
    ("ingest", ingest_task),
    ("hygiene", hygiene_task),
    ("validate", validate_task),
    ("split", split_task),
    ("train", train_task),
    ("preference", preference_task),
    ("cv", cv_task),
    ("evaluate", evaluate_task),
    ("register", register_task),
    ("promote", promote_task),
)


def cross_validate(params: Params) -> CvResult:
    """The `cv` stage with its folds as independent tasks on `params.runner`: one after
    another (`sequential`), side by side in a process pool, or on Ray, each fold training with
    its share of the cores. `tasks.cv.run` (DVC) runs the same `fold` and `summarize` one
    after another."""
    k = params.cv.folds
    if k < 2:
        return cv_task(params)
    parent = parent_run(params)
    workers = workers_for(params.runner, k)
    if workers > 1:
        print(f"cv: {k} folds on the {params.runner.kind} runner, {workers} at a time")
    with running(params.runner, k) as submit:
        futures = [
            submit(fold_task, params=params, k_index=i, parent_run_id=parent, concurrent=workers)
            for i in range(k)
        ]
        folds = results(futures)
    return summarize_task(params, folds, parent_run_id=parent)


def _up_to_date(params: Params, fingerprint: str, finished: str | None) -> dict[str, Any]:
    """The summary of a retrain skipped because the last one saw the same data, settings
    and code: it would rebuild the model it already has."""
    summary = {
        "skipped": True,
        "run_fingerprint": fingerprint,
        "stages_s": {},
        "total_s": 0.0,
        "finished_interrupted": finished,
    }
    FLOW_REPORT.write(params, summary)
    print(
        f"up to date: the last retrain used the same data in {params.paths.incoming}, the same "
        "model settings and the same code; nothing to retrain (`retune run --force` retrains "
        "anyway)"
    )
    return summary


def finish_interrupted(params: Params) -> str | None:
    """Gate the version an interrupted run registered but never judged (it crashed or was
    stopped between `register` and `promote`): the version `reports/register.json` names,
    if it is the newest one and has no gate decision. Returns what was done, or None."""
    registered = REGISTER_REPORT.read_if_present(params)
    if registered is None:
        return None
    from retune.release.registry import Registry

    report = REGISTER_REPORT.path(params)
    registry = Registry.open(params.tracking, str(registered.get("model_name")))
    if not registry.exists():
        return None
    versions = registry.versions()
    if not versions or versions[0].decision is not None:
        return None
    if str(versions[0].version) != str(registered.get("version")):
        print(
            f"{registry.model_name} v{versions[0].version} was registered but never gated, "
            f"and {report} is of another version: judge it with `retune promote "
            f"{versions[0].version}`"
        )
        return None
    print(
        f"{registry.model_name} v{versions[0].version} was registered by an interrupted run "
        "but never gated: gating it now"
    )
    result = promote_task(params)
    return f"gated v{result.version}: {result.outcome}"


@flow(name="retrain", log_prints=True)
def retrain(
    params_file: str = str(DEFAULT_PARAMS),
    overrides: list[str] | None = None,
    force: bool = False,
    export_feedback: bool = False,
) -> dict[str, Any]:
    """Run every stage in order on `params_file` (+ dotted `overrides`); return stage timings
    and the registered model, also written to `reports/flow.json`. Skips the work when the
    last completed retrain had the same data, model settings and code, unless `force`.
    With `export_feedback` (the deployments), users' corrected and well-rated exchanges are
    first exported into `paths.incoming`, so the retrain learns from them."""
    configure_environment()
    params = load_params(Path(params_file), overrides or [])
    with run_lock(project_folder(params_file), check_dvc=True):
        summary = _retrain(params, force, export_feedback)
        if not summary.get("skipped"):
            record_in_dvc_lock(Path(params_file), overrides or [])
        return summary


def record_in_dvc_lock(params_file: Path, overrides: list[str]) -> None:
    """Record the run's inputs and outputs in dvc.lock as `dvc repro` would (`dvc commit`), so
    `dvc repro` after a run has nothing to do and `dvc metrics diff` compares it. Only where
    the run is what dvc.yaml describes: the project's params.yaml, no overrides."""
    folder = project_folder(params_file)
    if not (folder / "dvc.yaml").is_file() or not (folder / ".dvc").is_dir():
        return
    if params_file.resolve() != (folder / DEFAULT_PARAMS).resolve() or overrides:
        print(
            "dvc.lock not updated: this run used "
            + (f"overrides {' '.join(overrides)}" if overrides else f"{params_file}")
            + ", not what dvc.yaml describes (params.yaml as it is)"
        )
        return
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "dvc", "commit", "--force"],
        cwd=folder,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        print(f"dvc.lock not updated: `dvc commit` failed ({detail[-1] if detail else '?'})")
        return
    print(
        f"dvc.lock records this run ({time.perf_counter() - started:.1f}s): `dvc repro` has "
        "nothing to do until an input, a setting or the code changes"
    )


def _retrain(params: Params, force: bool, export_feedback: bool) -> dict[str, Any]:
    finished = finish_interrupted(params)
    if export_feedback:
        export_feedback_task(params)
    # Before the fingerprint: new ratings make a retrain when preference tuning is on.
    preference = preference_data_task(params)
    # Taken before ingest reads the folder: data landing mid-run is seen by the next check.
    incoming = incoming_fingerprint(params.paths.incoming)
    # Only ratings that will be tuned on make a retrain (too few change nothing).
    tuned_on = preference.data_version if why_not(params, preference.folder) is None else None
    fingerprint = run_fingerprint(params, incoming, tuned_on)
    if not force and last_fingerprint(params, RUN_FINGERPRINT_TAG) == fingerprint:
        return _up_to_date(params, fingerprint, finished)
    timings: dict[str, float] = {}
    results: dict[str, Any] = {}
    start = time.perf_counter()
    for name, stage in STAGES:
        t0 = time.perf_counter()
        results[name] = cross_validate(params) if name == "cv" else stage(params)
        timings[name] = round(time.perf_counter() - t0, 2)
        print(f"stage {name} done in {timings[name]:.1f}s")
    total = round(time.perf_counter() - start, 2)
    # Whatever the gate decided: a rejected model was still trained on this data.
    record_fingerprint(params, incoming, fingerprint)
    registered, promoted = results["register"], results["promote"]
    summary = {
        "stages_s": timings,
        "total_s": total,
        "model_uri": registered.model_uri,
        "version": registered.version,
        "promotion": promoted.outcome,
    }
    FLOW_REPORT.write(params, summary)
    breakdown = ", ".join(f"{k} {v:.1f}s" for k, v in timings.items())
    print(
        f"retrain finished in {total:.1f}s ({breakdown}); registered {summary['model_uri']}, "
        f"gate: {promoted.outcome}"
    )
    return summary
