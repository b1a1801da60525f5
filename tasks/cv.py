"""Stage `cv`: k-fold cross-validation of the train settings, folds grouped by conversation.

Runs as `python -m tasks.cv` (the dvc.yaml stage: folds one after another) and as `cv_task` in
Prefect flows; a flow can instead map `fold_task` over the folds and finish with `summarize_task`.
"""

from __future__ import annotations

import dataclasses
import shutil
import statistics
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pyarrow.parquet as pq

from retune.artifacts import (
    CV_CHART,
    CV_REPORT,
    TRAIN_FILE,
    TRAIN_REPORT,
    TRAIN_SPLIT,
    pipeline_run_id,
)
from retune.config import Params, ScoringParams, TrainParams
from retune.data.folds import fold_split
from retune.data.records import read_records
from retune.entry import stage_main, stage_task
from retune.errors import RetuneError
from retune.masking import safe_params
from retune.model.training import available_cores, train
from retune.release.tracking import child_run

if TYPE_CHECKING:
    from mlflow import MlflowClient

R = TypeVar("R")

# Fold models, checkpoints and data live here under paths.checkpoints: apart from the main
# model and its checkpoints, and kept so an interrupted or repeated CV resumes (train.resume).
CV_DIR = "cv"
# transformers 5 builds and loads models by patching torch's init functions and its own
# `tie_weights` process-wide for the duration (transformers.initialization), and seeds are
# process-wide too: two folds training in one process (threads) corrupt each other's models.
# In one process they take turns; side by side they need processes (a process pool).
_FOLD_LOCK = threading.Lock()


@dataclass(frozen=True)
class FoldResult:
    fold: int  # 0-based index
    k: int
    n_train: int  # records the fold model trained on
    n_validation: int  # records held out in this fold
    perplexity: float  # on up to scoring.max_examples validation records
    next_token_accuracy: float
    mean_nll: float
    n_examples: int
    n_tokens: int
    train_loss: float
    steps: int
    started_at: float  # epoch seconds: with `finished_at`, the wall span of concurrent folds
    finished_at: float
    wall_s: float  # data, training and scoring of this fold
    model_dir: Path
    run_id: str | None = None  # the fold's MLflow child run


@dataclass(frozen=True)
class CvResult:
    k: int  # 0 when cross-validation is off (cv.folds < 2)
    folds: tuple[FoldResult, ...]
    perplexity_mean: float | None
    perplexity_std: float | None  # sample standard deviation over folds (ddof=1)
    next_token_accuracy_mean: float | None
    next_token_accuracy_std: float | None
    fold_s_total: float  # the folds' wall times added up: their cost when run one by one
    wall_s: float  # first fold's start to last fold's end: less than the total if concurrent
    parent_run_id: str | None
    report_file: Path
    chart_file: Path | None


def train_fold(
    train_cfg: TrainParams,
    scoring: ScoringParams,
    seed: int,
    train_file: Path,
    k: int,
    index: int,
    work_dir: Path,
    num_threads: int | None = None,
) -> FoldResult:
    """Train a model on the records of `train_file` outside fold `index` of `k`; score it on
    up to `scoring.max_examples` records of that fold.

    Writes the fold's train/validation Parquet, checkpoints and model under `work_dir` only.
    Folds in one process run one at a time (see `_FOLD_LOCK`).
    """
    if not 0 <= index < k:
        raise RetuneError(f"fold {index} does not exist with cv.folds={k}")
    if not train_file.exists():
        raise TRAIN_SPLIT.missing(train_file)
    name = f"cv fold {index + 1}/{k}"
    with _one_fold_at_a_time(name):
        return _train_fold(train_cfg, scoring, seed, train_file, k, index, work_dir, num_threads)


@contextmanager
def _one_fold_at_a_time(name: str) -> Iterator[None]:
    if not _FOLD_LOCK.acquire(blocking=False):
        print(
            f"{name}: waiting for the fold running in this process (folds share one process "
            "only one at a time; run them side by side with a process pool)",
            flush=True,
        )
        _FOLD_LOCK.acquire()
    try:
        yield
    finally:
        _FOLD_LOCK.release()


def _train_fold(
    train_cfg: TrainParams,
    scoring: ScoringParams,
    seed: int,
    train_file: Path,
    k: int,
    index: int,
    work_dir: Path,
    num_threads: int | None,
) -> FoldResult:
    from retune.model.modeling import load_pretrained
    from retune.model.scoring import aggregate, score_examples

    started_at, t0 = time.time(), time.perf_counter()
    name = f"cv fold {index + 1}/{k}"
    fold_train, fold_val = fold_split(read_records(train_file), k, index)
    if fold_train.num_rows == 0 or fold_val.num_rows == 0:
        raise RetuneError(
            f"cv.folds={k}: fold {index} leaves {fold_train.num_rows} train and "
            f"{fold_val.num_rows} validation records of {train_file}; lower cv.folds "
            "or add data"
        )
    work_dir.mkdir(parents=True, exist_ok=True)
    fold_train_file, fold_val_file = work_dir / TRAIN_FILE, work_dir / "validation.parquet"
    pq.write_table(fold_train, fold_train_file)
    pq.write_table(fold_val, fold_val_file)
    print(
        f"{name}: training on {fold_train.num_rows} records, validating on {fold_val.num_rows}",
        flush=True,
    )
    trained = train(
        train_cfg,
        seed,
        fold_train_file,
        fold_val_file,
        work_dir / "model",
        work_dir / "checkpoints",
        num_threads=num_threads,
    )
    model, tokenizer = load_pretrained(trained.model_dir)
    scores = score_examples(
        model,
        tokenizer,
        fold_val_file,
        scoring.max_examples,
        scoring.batch_size,
        scoring.max_seq_len,
        loss_on=train_cfg.loss_on,
        log_prefix=name,
    )
    metrics = aggregate(scores)
    wall = round(time.perf_counter() - t0, 2)
    print(
        f"{name}: perplexity {metrics['perplexity']:.3f}, next-token accuracy "
        f"{metrics['next_token_accuracy']:.4f} on {metrics['n_examples']} records, {wall:.1f}s",
        flush=True,
    )
    return FoldResult(
        fold=index,
        k=k,
        n_train=fold_train.num_rows,
        n_validation=fold_val.num_rows,
        perplexity=float(metrics["perplexity"]),
        next_token_accuracy=float(metrics["next_token_accuracy"]),
        mean_nll=float(metrics["mean_nll"]),
        n_examples=int(metrics["n_examples"]),
        n_tokens=int(metrics["n_tokens"]),
        train_loss=trained.train_loss,
        steps=trained.steps,
        started_at=started_at,
        finished_at=time.time(),
        wall_s=wall,
        model_dir=trained.model_dir,
    )


def _mlflow_client(params: Params) -> MlflowClient:
    """A client on params.tracking: folds log through it rather than the fluent API's active
    run, so folds running side by side (threads or processes) never share state."""
    from mlflow import MlflowClient

    from retune.release.tracking import setup_tracking

    setup_tracking(params.tracking)
    return MlflowClient()


def _parent(params: Params, parent_run_id: str | None) -> str:
    parent = parent_run_id or pipeline_run_id(params)
    if parent is None:
        raise RetuneError(
            f"{TRAIN_REPORT.path(params)} names no MLflow run to hang the folds on; "
            "run the train stage first (or `python -m tasks.cv`, which starts its own run)"
        )
    return parent


def fold(
    params: Params, k_index: int, parent_run_id: str | None = None, concurrent: int = 1
) -> FoldResult:
    """Edge for one fold: train and score fold `k_index` of `cv.folds`, recorded as an
    MLflow child run of `parent_run_id` (default: the run in reports/train.json).

    `concurrent` is how many folds run at the same time on this machine (in separate
    processes, e.g. Prefect's ProcessPoolTaskRunner): each trains with its share of the cores,
    so side-by-side folds do not fight over them. Folds in threads of one process take turns.
    """
    from mlflow.entities import Metric, Param, RunStatus
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    k = params.cv.folds
    if k < 2:
        raise RetuneError(f"cv.folds={k}: cross-validation is off (set it to 2 or more)")
    parent = _parent(params, parent_run_id)
    client = _mlflow_client(params)
    run_id = child_run(
        client, parent, f"fold-{k_index}", {"retune.stage": "cv", "retune.fold": str(k_index)}
    )
    try:
        settings = {
            key: value[:MAX_PARAM_VAL_LENGTH]
            for key, value in safe_params(params).items()
            if key == "seed" or key.startswith("train.")
        }
        result = train_fold(
            params.train,
            params.scoring,
            params.seed,
            TRAIN_SPLIT.path(params),
            k,
            k_index,
            fold_dir(params, k_index),
            num_threads=max(1, available_cores() // max(1, concurrent)),
        )
        settings |= {
            "cv.fold": str(k_index),
            "cv.k": str(k),
            "cv.n_train": str(result.n_train),
            "cv.n_validation": str(result.n_validation),
        }
        now = int(time.time() * 1000)
        values = {
            "perplexity": result.perplexity,
            "next_token_accuracy": result.next_token_accuracy,
            "mean_nll": result.mean_nll,
            "n_tokens": float(result.n_tokens),
            "train_loss": result.train_loss,
            "wall_s": result.wall_s,
        }
        client.log_batch(
            run_id,
            metrics=[Metric(key, value, now, result.steps) for key, value in values.items()],
            params=[Param(key, value) for key, value in settings.items()],
        )
    except BaseException:
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
        raise
    client.set_terminated(run_id)
    return dataclasses.replace(result, run_id=run_id)


def fold_dir(params: Params, index: int) -> Path:
    return params.paths.checkpoints / CV_DIR / f"fold-{index}"


def summarize(
    params: Params, results: Sequence[FoldResult], parent_run_id: str | None = None
) -> CvResult:
    """Edge for the summary: mean and std over `results` into reports/cv.json (and
    reports/cv_folds.png); on the parent run (default: reports/train.json's), the summary
    metrics, `cv_fold_*` metrics by fold (step = fold) and the chart. With no results
    (cv.folds < 2) it writes a report saying cross-validation is off, and logs nothing.
    """
    report_file = CV_REPORT.path(params)
    k = params.cv.folds
    if k < 2:
        CV_REPORT.write(
            params,
            {
                "enabled": False,
                "k": 0,
                "folds": [],
                "reason": f"cv.folds={k}: cross-validation is off (2 or more turns it on)",
            },
        )
        print(f"cv: off (cv.folds={k})", flush=True)
        return CvResult(0, (), None, None, None, None, 0.0, 0.0, None, report_file, None)
    ordered = tuple(sorted(results, key=lambda r: r.fold))
    if [r.fold for r in ordered] != list(range(k)):
        raise RetuneError(
            f"cv: got folds {[r.fold for r in ordered]}, expected 0..{k - 1} "
            f"(cv.folds={k}); re-run the cv stage"
        )
    perplexities = [r.perplexity for r in ordered]
    accuracies = [r.next_token_accuracy for r in ordered]
    result = CvResult(
        k=k,
        folds=ordered,
        perplexity_mean=statistics.fmean(perplexities),
        perplexity_std=statistics.stdev(perplexities),
        next_token_accuracy_mean=statistics.fmean(accuracies),
        next_token_accuracy_std=statistics.stdev(accuracies),
        fold_s_total=round(sum(r.wall_s for r in ordered), 2),
        wall_s=round(max(r.finished_at for r in ordered) - min(r.started_at for r in ordered), 2),
        parent_run_id=_parent(params, parent_run_id),
        report_file=report_file,
        chart_file=CV_CHART.path(params),
    )
    CV_REPORT.write(params, _report(result))
    assert result.chart_file is not None
    _chart(result, result.chart_file)
    _log_summary(params, result)
    _remove_stale_folds(params, k)
    print(
        f"cv: perplexity {result.perplexity_mean:.3f} ± {result.perplexity_std:.3f}, "
        f"next-token accuracy {result.next_token_accuracy_mean:.4f} ± "
        f"{result.next_token_accuracy_std:.4f} over {k} folds; folds took "
        f"{result.fold_s_total:.1f}s ({result.wall_s:.1f}s wall)",
        flush=True,
    )
    return result


def _report(result: CvResult) -> dict[str, Any]:
    folds = [
        {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(f).items()}
        for f in result.folds
    ]
    return {
        "enabled": True,
        "k": result.k,
        "perplexity_mean": result.perplexity_mean,
        "perplexity_std": result.perplexity_std,
        "next_token_accuracy_mean": result.next_token_accuracy_mean,
        "next_token_accuracy_std": result.next_token_accuracy_std,
        "std": "sample standard deviation over folds (ddof=1)",
        "fold_s_total": result.fold_s_total,
        "wall_s": result.wall_s,
        "parent_run_id": result.parent_run_id,
        "folds": folds,
    }


def _chart(result: CvResult, path: Path) -> Path:
    """Per-fold bars for perplexity and next-token accuracy, with the mean ± std band."""
    from matplotlib.figure import Figure  # no pyplot: no global state, safe off the main thread

    fig = Figure(figsize=(8, 3.2), layout="constrained")
    labels = [str(f.fold) for f in result.folds]
    panels = (
        ("validation perplexity", [f.perplexity for f in result.folds], result.perplexity_mean,
         result.perplexity_std),
        ("validation next-token accuracy", [f.next_token_accuracy for f in result.folds],
         result.next_token_accuracy_mean, result.next_token_accuracy_std),
    )  # fmt: skip
    for ax, (title, values, mean, std) in zip(fig.subplots(1, 2), panels, strict=True):
        assert mean is not None and std is not None
        bars = ax.bar(labels, values, color="#4c72b0")
        # The axis is zoomed onto the spread (fold differences are small next to the values);
        # the labels keep the bars' heights honest.
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
        ax.axhline(mean, color="#c44e52", label=f"mean {mean:.3f}")
        ax.axhspan(mean - std, mean + std, color="#c44e52", alpha=0.15, label=f"± std {std:.3f}")
        low, high = min([*values, mean - std]), max([*values, mean + std])
        pad = (high - low) * 0.5 or abs(high) * 0.05 or 1.0
        ax.set_ylim(low - pad, high + pad)
        ax.set(title=title, xlabel="fold")
        ax.legend(fontsize=8)
    fig.suptitle(f"{result.k}-fold cross-validation")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def _log_summary(params: Params, result: CvResult) -> None:
    """Only the summary writes to the parent run; each fold wrote its own child run."""
    from mlflow.entities import Metric

    assert result.parent_run_id is not None
    client = _mlflow_client(params)
    now = int(time.time() * 1000)
    summary = {
        "cv_perplexity_mean": result.perplexity_mean,
        "cv_perplexity_std": result.perplexity_std,
        "cv_next_token_accuracy_mean": result.next_token_accuracy_mean,
        "cv_next_token_accuracy_std": result.next_token_accuracy_std,
        "cv_fold_s_total": result.fold_s_total,
        "cv_wall_s": result.wall_s,
    }
    metrics = [Metric(key, float(v), now, 0) for key, v in summary.items() if v is not None]
    for f in result.folds:
        metrics += [
            Metric("cv_fold_perplexity", f.perplexity, now, f.fold),
            Metric("cv_fold_next_token_accuracy", f.next_token_accuracy, now, f.fold),
        ]
    client.log_batch(result.parent_run_id, metrics=metrics)
    client.set_tag(result.parent_run_id, "retune.cv_folds", str(result.k))
    for path in (result.report_file, result.chart_file):
        if path is not None:
            client.log_artifact(result.parent_run_id, str(path), artifact_path="cv")


def _remove_stale_folds(params: Params, k: int) -> None:
    """Drop fold folders left by an earlier run with more folds than `k`."""
    root = params.paths.checkpoints / CV_DIR
    for folder in root.glob("fold-*") if root.is_dir() else ():
        index = folder.name.removeprefix("fold-")
        if index.isdigit() and int(index) >= k:
            shutil.rmtree(folder, ignore_errors=True)


def parent_run(params: Params) -> str:
    """The MLflow run the folds hang under: the pipeline's run (reports/train.json), or a new
    run `cv` when there is none (cv run on its own)."""
    parent = pipeline_run_id(params)
    if parent is not None:
        return parent
    from mlflow import get_experiment_by_name

    client = _mlflow_client(params)
    experiment = get_experiment_by_name(params.tracking.experiment)
    assert experiment is not None  # setup_tracking created it
    created = client.create_run(experiment.experiment_id, run_name="cv")
    client.set_terminated(created.info.run_id)
    return str(created.info.run_id)


def run(params: Params) -> CvResult:
    """Edge: the k folds one after another (for DVC), then `summarize`, under `parent_run`."""
    k = params.cv.folds
    if k < 2:
        return summarize(params, [])
    parent = parent_run(params)
    results = [fold(params, i, parent_run_id=parent) for i in range(k)]
    return summarize(params, results, parent_run_id=parent)


cv_task = stage_task(run, name="cv")
fold_task = stage_task(fold, name="cv-fold")
summarize_task = stage_task(summarize, name="cv-summarize")

if __name__ == "__main__":
    stage_main(run)
