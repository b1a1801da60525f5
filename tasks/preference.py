"""Stage `preference`: tune the supervised model on users' ratings (KTO) or corrections (DPO),
or hand it on unchanged; either way `paths.model` is the candidate every later stage reads.

Runs as `python -m tasks.preference` (the dvc.yaml stage) and as `preference_task` in Prefect
flows. Reads `paths.sft` (train's model) and `paths.preference` (`preference_data`'s set),
logs into the pipeline's MLflow run (train's), writes reports/preference.json.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retune.artifacts import (
    MODEL,
    PREFERENCE_REPORT,
    PREFERENCE_SET,
    SFT_MODEL,
    require_pipeline_run_id,
)
from retune.config import Params
from retune.data.preference import MANIFEST_FILE
from retune.data.snapshot import PREFERENCE_DVC_TAG, keep
from retune.entry import stage_main, stage_task
from retune.model.preference import LOGGED, PreferenceResult, training_rows, tune
from retune.reports import read_json


@dataclass(frozen=True)
class PreferenceStageResult:
    model_dir: Path
    tuned: bool
    reason: str  # what was done, in words
    tuning: PreferenceResult | None = None


def hand_on(sft_dir: Path, model_dir: Path) -> None:
    """Make `model_dir` the supervised model as it is: its files hard-linked (copied where the
    file system cannot link), swapped in whole."""
    tmp = model_dir.with_name(model_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(sft_dir, tmp, copy_function=link)
    old = model_dir.with_name(model_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if model_dir.exists():
        model_dir.rename(old)
    tmp.rename(model_dir)
    shutil.rmtree(old, ignore_errors=True)


def why_not(params: Params, data_dir: Path) -> str | None:
    """Why the supervised model goes on untuned (None: tune it)."""
    cfg = params.preference
    if cfg.method == "none":
        return "preference.method is none"
    manifest = data_dir / MANIFEST_FILE
    if not manifest.is_file():
        return f"no preference set in {data_dir}: `retune preference-data` writes it"
    ready = read_json(manifest).get("ready", {}).get(cfg.method)
    n = len(training_rows(data_dir, cfg.method))
    what = "examples" if cfg.method == "kto" else "pairs (corrected replies)"
    if n < cfg.min_examples:
        return (
            f"{n} {cfg.method} {what} to tune on, preference.min_examples is {cfg.min_examples}: "
            "collect more ratings, or lower it"
        )
    if not ready:
        return (
            f"the preference set's contract for {cfg.method} is not met (too few of a label): "
            f"see {PREFERENCE_SET.path(params)}/{MANIFEST_FILE}"
        )
    return None


def run(params: Params) -> PreferenceStageResult:
    """Edge: tune `paths.sft` into `paths.model` when `preference.method` and the set allow,
    else hand it on; log to the pipeline's MLflow run; write reports/preference.json."""
    import mlflow

    from retune.release.tracking import resume_run, step_metrics_callback

    sft_dir, model_dir = SFT_MODEL.require(params), MODEL.path(params)
    data_dir = PREFERENCE_SET.path(params)
    reason = why_not(params, data_dir)
    run_id = require_pipeline_run_id(params, "preference")
    if reason is not None:
        hand_on(sft_dir, model_dir)
        print(f"preference: not tuned ({reason}); the candidate is the sft model", flush=True)
        PREFERENCE_REPORT.write(
            params, {"tuned": False, "method": params.preference.method, "reason": reason}
        )
        with resume_run(params.tracking, run_id):
            mlflow.set_tag("preference", f"not tuned: {reason}")
        return PreferenceStageResult(model_dir, False, reason)

    with resume_run(params.tracking, run_id):
        result = tune(
            params.preference,
            params.train,
            params.seed,
            sft_dir,
            data_dir,
            model_dir,
            params.paths.checkpoints / "preference",
            callbacks=[
                step_metrics_callback({k: f"preference_{k.replace('/', '_')}" for k in LOGGED})
            ],
        )
        data_version = read_json(data_dir / MANIFEST_FILE).get("data_version")
        # The tuning set as a DVC data version, so `retune reproduce` can tune on it again.
        kept = keep(data_dir, "preference", "the preference data")
        figures = {f"preference_{k.replace('/', '_')}": v for k, v in result.final.items()}
        mlflow.log_metrics(
            figures
            | {
                "preference_runtime_s": result.runtime_s,
                "preference_examples": float(result.examples),
            }
        )
        mlflow.set_tags(
            {"preference": f"tuned: {result.method}", "preference_data_version": data_version}
            | ({PREFERENCE_DVC_TAG: kept["md5"]} if "md5" in kept else {})
        )
        reason = f"{result.method}, {result.steps} steps on {result.examples} " + (
            "examples" if result.method == "kto" else "pairs"
        )
        report = PREFERENCE_REPORT.write(
            params, _report(result, data_version, reason) | {PREFERENCE_DVC_TAG: kept}
        )
        mlflow.log_artifact(str(report), artifact_path="reports")
    print(f"preference: tuned ({reason}) in {result.runtime_s:.1f}s -> {model_dir}", flush=True)
    return PreferenceStageResult(model_dir, True, reason, result)


def _report(result: PreferenceResult, data_version: Any, reason: str) -> dict[str, Any]:
    final = result.final
    return {
        "tuned": True,
        "method": result.method,
        "reason": reason,
        "steps": result.steps,
        "examples": result.examples,
        "too_long": result.too_long,
        "weights": list(result.weights) if result.weights else None,
        "trained": result.trainable.describe(),
        "train_loss": final.get("loss"),
        "kl": final.get("kl"),
        "rewards_margin": final.get("rewards/margins"),
        "runtime_s": round(result.runtime_s, 2),
        "data_version": data_version,
    }


preference_task = stage_task(run, name="preference")

if __name__ == "__main__":
    stage_main(run)
