"""Stage `train`: fine-tune a causal LM (the scratch GPT-2 or a user's base) on the train split.

Runs as `python -m tasks.train` (the dvc.yaml stage) and as `train_task` in Prefect flows. It
starts the pipeline's MLflow run, which `evaluate` and `register` re-open by its id.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from retune import artifacts
from retune.artifacts import (
    CLEAN_MANIFEST,
    HOLDOUT_SPLIT,
    INGEST_REPORT,
    SFT_MODEL,
    TRAIN_LOSS,
    TRAIN_REPORT,
    TRAIN_SPLIT,
    VALIDATE_REPORT,
)
from retune.config import Params
from retune.data.snapshot import INCOMING_DVC_TAG, recorded
from retune.entry import stage_main, stage_task
from retune.errors import RetuneError
from retune.masking import safe_params
from retune.model import distributed
from retune.model.adapters import ADAPTER_DIR
from retune.model.base import PROVENANCE
from retune.model.checkpoints import checkpoint_step, file_sha256
from retune.model.training import History, TrainResult, train
from retune.release.gitinfo import git_state
from retune.release.tracking import STEP_METRICS, setup_tracking, step_metrics_callback


def _log_history(history: History, up_to: int) -> None:
    import mlflow

    for step, loss, ev in history:
        if step <= up_to:
            values = {"train_loss": loss, "eval_loss": ev}
            mlflow.log_metrics({k: v for k, v in values.items() if v is not None}, step=step)


def _mlflow_params(params: Params) -> dict[str, str]:
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    return {k: v[:MAX_PARAM_VAL_LENGTH] for k, v in safe_params(params).items()}


def write_loss_csv(path: Path, history: History) -> Path:
    """The loss curve as `step,loss,eval_loss` rows (blank where not measured): a DVC plot."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["step", "loss", "eval_loss"])
        for step, loss, ev in history:
            writer.writerow([step, "" if loss is None else loss, "" if ev is None else ev])
    return path


def base_provenance(base_model: str) -> dict[str, Any] | None:
    """The origin `retune base` recorded in a base's folder (`retune_base.json`), if any."""
    path = Path(base_model).expanduser() / PROVENANCE
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # no such file: a folder of the user's own, or a hub id
        return None
    return recorded if isinstance(recorded, dict) else None


def trained_facts(params: Params, result: TrainResult) -> dict[str, Any]:
    """What was trained, for reports/train.json and the model card: which tokens, which
    weights (all, or a LoRA adapter and its settings), from which base and its origin."""
    cfg, trainable = params.train, result.trainable
    facts: dict[str, Any] = {
        "loss_on": cfg.loss_on,
        "adapter": trainable.adapter if trainable else cfg.adapter,
        "lora": trainable.lora if trainable else None,
        "trainable_params": trainable.trainable_params if trainable else None,
        "trainable_share": round(trainable.share, 6) if trainable else None,
    }
    if trainable is not None and trainable.lora is not None:
        facts["adapter_dir"] = str(result.model_dir / ADAPTER_DIR)
    return facts | {
        "base_model": {"name": cfg.base_model, "provenance": base_provenance(cfg.base_model)}
    }


def ending_facts(result: TrainResult) -> dict[str, Any]:
    """How the schedule ended: planned steps, the step it stopped at, whether early stopping
    stopped it, and (with early stopping) the best evaluation, which is the saved model."""
    ending = result.ending
    if ending is None:
        return {}
    return {
        "planned_steps": ending.planned_steps,
        "stopped_step": result.steps,
        "stopped_early": ending.stopped_early,
        "best_step": ending.best_step,
        "best_eval_loss": ending.best_eval_loss,
    }


def provenance_tags(params: Params) -> dict[str, str]:
    """What `retune reproduce` rebuilds the run from: the code's commit (and whether the tree
    had changes) and the inputs' DVC data version that ingest kept."""
    git = git_state()
    tags = {"git_commit": git.commit_tag, "git_dirty": git.dirty_tag}
    incoming = recorded(INGEST_REPORT.read_if_present(params) or {})
    return tags | ({INCOMING_DVC_TAG: incoming} if incoming else {})


def run(params: Params) -> TrainResult:
    """Edge: start the pipeline's MLflow run, train on the split, save to `paths.sft`, and
    write reports/train.json (with the run id) and reports/train_loss.csv."""
    import mlflow

    # Both files now, before any process starts: a rank would fail on either one.
    train_file = TRAIN_SPLIT.require(params)
    HOLDOUT_SPLIT.require(params)
    data_version = artifacts.data_version(CLEAN_MANIFEST, params)
    train_sha = file_sha256(train_file)

    setup_tracking(params.tracking)
    with mlflow.start_run(run_name=f"train-{(data_version or train_sha)[:8]}") as active:
        mlflow.log_params(_mlflow_params(params))
        mlflow.set_tags(
            {"retune.stage": "train", "train_file_sha256": train_sha}
            | ({"data_version": data_version} if data_version else {})
            | provenance_tags(params)
        )
        for facts in (INGEST_REPORT, VALIDATE_REPORT):
            if facts.path(params).is_file():
                mlflow.log_artifact(str(facts.path(params)), artifact_path="reports")
        processes = distributed.resolve_processes(params.train.processes)
        if processes == 1:
            result = _train_rank(params, active.info.run_id)
        else:
            run_id = active.info.run_id
            result = _agreed(distributed.launch(_train_rank, (params, run_id), processes, "train"))
        final = {
            "train_runtime_s": result.runtime_s,
            "tokens_per_s": result.tokens_per_s,
            "tokens_seen": float(result.tokens_seen),
            "n_params": float(result.n_params),
            "processes": float(result.processes),
        }
        trained, ending = trained_facts(params, result), ending_facts(result)
        final.update(
            {
                k: float(v)
                for k, v in ending.items()
                if isinstance(v, int | float) and not isinstance(v, bool)
            }
        )
        if result.trainable is not None:
            final["trainable_params"] = float(result.trainable.trainable_params)
            final["trainable_share"] = result.trainable.share
            mlflow.log_param("trained", result.trainable.describe())
        adapter = SFT_MODEL.path(params) / ADAPTER_DIR
        if adapter.is_dir():
            mlflow.log_artifacts(str(adapter), artifact_path="adapter")
        if result.resumed_from is not None:
            # Steps before the resume were trained by an earlier call: give this run their curve.
            _log_history(result.history, up_to=checkpoint_step(result.resumed_from))
        if not any(loss is not None for _, loss, _ in result.history):
            final["train_loss"] = result.train_loss
        mlflow.log_metrics(final, step=result.steps)
        report = TRAIN_REPORT.write(
            params,
            {
                "run_id": active.info.run_id,
                "train_loss": result.train_loss,
                "eval_loss": result.eval_loss,
                "steps": result.steps,
                "tokens_seen": result.tokens_seen,
                "tokens_per_s": result.tokens_per_s,
                "n_params": result.n_params,
                "runtime_s": result.runtime_s,
                "resumed_from": str(result.resumed_from) if result.resumed_from else None,
                "processes": result.processes,
                "weights_sha256": result.weights_sha256,  # with processes > 1: every rank's
                **ending,
                **trained,
            },
        )
        curve = write_loss_csv(TRAIN_LOSS.path(params), result.history)
        for path in (report, curve):
            mlflow.log_artifact(str(path), artifact_path="reports")
    return result


def _train_rank(params: Params, run_id: str) -> TrainResult:
    """Train on the split: the whole stage's training in one process, or one rank's part of a
    data-parallel run (`distributed.launch`), where rank 0 logs the step metrics into the
    pipeline's run `run_id`, opened by the launching process."""
    callbacks = []
    if distributed.is_main():
        if distributed.world_size() > 1:  # a spawned rank: MLflow is not set up here yet
            setup_tracking(params.tracking)
        callbacks.append(step_metrics_callback(STEP_METRICS, run_id=run_id))
    return train(
        params.train,
        params.seed,
        TRAIN_SPLIT.path(params),
        HOLDOUT_SPLIT.path(params),
        SFT_MODEL.path(params),
        params.paths.checkpoints,
        callbacks=callbacks,
    )


def _agreed(ranks: list[TrainResult]) -> TrainResult:
    """Rank 0's result, once every rank is found to hold the same weights as rank 0 saved."""
    digests = [r.weights_sha256 for r in ranks]
    if len(set(digests)) > 1:
        raise RetuneError(
            f"train: the {len(ranks)} ranks ended with different weights ({digests}); the "
            "model was saved from rank 0 but is not what the others trained. Rerun with "
            "train.processes=1 and report this"
        )
    return ranks[0]


train_task = stage_task(run, name="train")

if __name__ == "__main__":
    stage_main(run)
