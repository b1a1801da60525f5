"""MLflow set-up at the edge: the SQLite store and artifact root from `params.tracking`.

Stages call `setup_tracking` in `run(params)`; nothing here runs at import time.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retune.config import TrackingParams

if TYPE_CHECKING:
    import mlflow


def resolved_uri(uri: str) -> str:
    """Make a relative `sqlite:///path` absolute, creating its folder, so any cwd agrees."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        db = Path(uri[len(prefix) :]).resolve()
        db.parent.mkdir(parents=True, exist_ok=True)
        return prefix + str(db)
    return uri


def setup_tracking(cfg: TrackingParams) -> str:
    """Point MLflow (tracking and registry) at `cfg.uri`; ensure the experiment; return its id.

    The experiment gets an explicit artifact location under `cfg.artifacts`: without one MLflow
    writes artifacts into `./mlruns` of whatever directory the process happens to run in.
    """
    import mlflow

    uri = resolved_uri(cfg.uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    exp = mlflow.get_experiment_by_name(cfg.experiment)
    if exp is None:
        artifacts = Path(cfg.artifacts).resolve()
        artifacts.mkdir(parents=True, exist_ok=True)
        exp_id = mlflow.create_experiment(cfg.experiment, artifact_location=artifacts.as_uri())
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return str(exp_id)


@contextmanager
def resume_run(cfg: TrackingParams, run_id: str) -> Iterator[mlflow.ActiveRun]:
    """Re-open the pipeline's MLflow run (started by `train`) to add to it."""
    import mlflow

    setup_tracking(cfg)
    with mlflow.start_run(run_id=run_id) as run:
        yield run


def side_experiment(cfg: TrackingParams, suffix: str) -> str:
    """Id of the experiment `<cfg.experiment>-<suffix>` (created if missing), for records that
    are not pipeline runs, such as drift checks. Its artifacts go under `cfg.artifacts/<suffix>`
    for the same reason as `setup_tracking`'s. MLflow must already point at the store."""
    from mlflow import MlflowClient

    client = MlflowClient()
    name = f"{cfg.experiment}-{suffix}"
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return str(exp.experiment_id)
    artifacts = (Path(cfg.artifacts) / suffix).resolve()
    artifacts.mkdir(parents=True, exist_ok=True)
    return str(client.create_experiment(name, artifact_location=artifacts.as_uri()))


def child_run(client: Any, parent_run_id: str, name: str, tags: Mapping[str, str]) -> str:
    """A new MLflow run nested under `parent_run_id` (same experiment), named `name`, with
    `tags`: a CV fold's or a tuning trial's. Returns its id."""
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

    experiment_id = client.get_run(parent_run_id).info.experiment_id
    run = client.create_run(
        experiment_id,
        run_name=name,
        tags={MLFLOW_PARENT_RUN_ID: parent_run_id, MLFLOW_RUN_NAME: name, **tags},
    )
    return str(run.info.run_id)


# Trainer log keys -> the MLflow metric names a training's curve is logged under.
STEP_METRICS = {
    "loss": "train_loss",
    "eval_loss": "eval_loss",
    "learning_rate": "learning_rate",
    "grad_norm": "grad_norm",
}


def step_metrics_callback(names: Mapping[str, str], run_id: str | None = None) -> Any:
    """A Trainer callback that logs each `names` key of the Trainer's logs into the active
    MLflow run (or the run `run_id`, from another process), as its mapped name, by step."""
    import mlflow
    from transformers import TrainerCallback

    class MlflowMetrics(TrainerCallback):
        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any
        ) -> None:
            logs = logs or {}
            metrics = {name: float(logs[key]) for key, name in names.items() if key in logs}
            if metrics:
                mlflow.log_metrics(metrics, step=state.global_step, run_id=run_id)

    return MlflowMetrics()
