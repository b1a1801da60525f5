"""Epochs and early stopping: exactly one of max_steps and num_train_epochs decides, early
stopping ends a run whose eval loss rises and saves its best checkpoint, and an interrupted run
of either kind resumes to the same model."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from retune.config import ConfigError, Params, load_params
from retune.errors import RetuneError
from retune.model.modeling import load_pretrained
from retune.model.packing import collate, pack
from retune.model.training import TrainResult, planned_steps
from tests.bases import Interrupted, KillAfterCheckpoint, chats, train_core, write_split
from tests.helpers import ROOT

# A 32-wide model at this learning rate learns for a few steps, then its eval loss rises:
# with patience 2 it stops at step 12 of 60, its best evaluation at step 6.
RISING = {
    "max_steps": 60,
    "learning_rate": 5e-2,
    "eval_steps": 3,
    "logging_steps": 3,
    "early_stopping_patience": 2,
    "precision": "fp32",  # the saved model's loss is recomputed below: no autocast noise
}


@pytest.fixture
def corpus(tiny_params: Params) -> Params:
    write_split(tiny_params, chats(80))
    return tiny_params


def eval_loss_of(params: Params, model_dir: Path, tmp_path: Path) -> float:
    """eval_loss of the model saved in `model_dir` on the blocks train evaluates on."""
    from transformers import Trainer, TrainingArguments

    model, tokenizer = load_pretrained(model_dir)
    cfg = params.train
    blocks = pack(
        params.paths.split / "holdout.parquet",
        tokenizer,
        cfg.max_seq_len,
        tmp_path / "eval-cache",
        limit=cfg.eval_max_examples,
        loss_on=cfg.loss_on,
    )
    args = TrainingArguments(
        output_dir=str(tmp_path / "eval"),
        per_device_eval_batch_size=cfg.per_device_train_batch_size,
        use_cpu=True,
        report_to="none",
    )
    trainer = Trainer(model=model, args=args, data_collator=collate, eval_dataset=blocks)
    return float(trainer.evaluate()["eval_loss"])


def evals(result: TrainResult) -> list[tuple[int, float]]:
    return [(step, ev) for step, _, ev in result.history if ev is not None]


def test_early_stopping_stops_before_the_end_and_keeps_the_best_checkpoint(
    corpus: Params, tmp_path: Path
) -> None:
    result = train_core(corpus, **RISING)

    seen = evals(result)
    best_step, best_loss = min(seen, key=lambda row: row[1])
    assert result.ending is not None and result.ending.stopped_early
    assert result.steps < RISING["max_steps"] == result.ending.planned_steps
    # Stopped `patience` evaluations after the best, none of them better.
    assert [step for step, _ in seen][-3:] == [best_step, best_step + 3, best_step + 6]
    assert result.steps == best_step + 6 and seen[-1][1] > best_loss
    assert (result.ending.best_step, result.ending.best_eval_loss) == (best_step, best_loss)
    # The saved model is the best checkpoint, not the last one.
    assert eval_loss_of(corpus, result.model_dir, tmp_path) == pytest.approx(best_loss, rel=1e-5)
    assert eval_loss_of(corpus, result.model_dir, tmp_path) != pytest.approx(seen[-1][1])
    assert (corpus.paths.checkpoints / f"checkpoint-{best_step}").is_dir()


def test_an_interrupted_early_stopping_run_resumes_to_the_same_stop_and_model(
    corpus: Params,
) -> None:
    whole = train_core(corpus, resume=False, **RISING)
    best = whole.ending.best_step if whole.ending else None
    assert best is not None
    whole_weights = load_file(whole.model_dir / "model.safetensors")

    # Killed after the first evaluation past the best: the count of evaluations without
    # improvement is restored with the checkpoint, so the resumed run stops where it would have.
    with pytest.raises(Interrupted):
        train_core(corpus, resume=False, callbacks=[KillAfterCheckpoint(best + 3)], **RISING)
    resumed = train_core(corpus, **RISING)
    assert resumed.resumed_from == corpus.paths.checkpoints / f"checkpoint-{best + 3}"
    assert (resumed.steps, resumed.ending) == (whole.steps, whole.ending)
    resumed_weights = load_file(resumed.model_dir / "model.safetensors")
    assert all(resumed_weights[k].allclose(v, atol=1e-6) for k, v in whole_weights.items())

    # Run again: the last checkpoint ends the run, and the best one is the model again.
    again = train_core(corpus, **RISING)
    assert again.tokens_per_s == 0.0 and again.ending == whole.ending
    again_weights = load_file(again.model_dir / "model.safetensors")
    assert all(again_weights[k].equal(v) for k, v in resumed_weights.items())


def test_epochs_decide_the_steps_and_an_interrupted_run_resumes(corpus: Params) -> None:
    epochs: dict[str, Any] = {"max_steps": None, "num_train_epochs": 1.5}
    whole = train_core(corpus, resume=False, **epochs)
    _, tokenizer = load_pretrained(whole.model_dir)
    n_blocks = len(
        pack(
            corpus.paths.split / "train.parquet",
            tokenizer,
            corpus.train.max_seq_len,
            corpus.paths.checkpoints / "blocks",
            loss_on=corpus.train.loss_on,
        )
    )
    # 1.5 passes over the blocks in batches of 4: the Trainer's count and retune's agree.
    assert whole.steps == math.ceil(1.5 * math.ceil(n_blocks / 4))
    assert whole.steps == planned_steps(dataclasses.replace(corpus.train, **epochs), n_blocks)
    assert whole.ending is not None and not whole.ending.stopped_early

    with pytest.raises(Interrupted):
        train_core(corpus, resume=False, callbacks=[KillAfterCheckpoint(3)], **epochs)
    resumed = train_core(corpus, **epochs)
    assert resumed.resumed_from is not None and resumed.steps == whole.steps
    got, want = (load_file(r.model_dir / "model.safetensors") for r in (resumed, whole))
    assert all(got[k].allclose(v, atol=1e-6) for k, v in want.items())


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (["train.num_train_epochs=2"], "both are set"),
        (["train.max_steps=null"], "neither is set"),
    ],
)
def test_max_steps_or_epochs_exactly_one(overrides: list[str], says: str) -> None:
    with pytest.raises(ConfigError, match=rf"train\.max_steps and train\.num_train_epochs: {says}"):
        load_params(ROOT / "params.yaml", overrides)
    assert load_params(
        ROOT / "params.yaml", ["train.max_steps=null", "train.num_train_epochs=2"]
    ).train.num_train_epochs == pytest.approx(2.0)


def test_early_stopping_without_anything_to_evaluate_is_an_error(corpus: Params) -> None:
    with pytest.raises(RetuneError, match=r"train\.early_stopping_patience=2 .*eval_max_examples"):
        train_core(corpus, eval_max_examples=1, max_seq_len=512, early_stopping_patience=2)


def test_the_train_report_and_mlflow_say_where_it_stopped_and_what_was_kept(
    corpus: Params,
) -> None:
    from mlflow import MlflowClient

    from tasks.train import run

    params = dataclasses.replace(corpus, train=dataclasses.replace(corpus.train, **RISING))
    result = run(params)

    report = json.loads((params.paths.reports / "train.json").read_text())
    assert result.ending is not None
    assert report["stopped_step"] == report["steps"] == result.steps
    assert report["planned_steps"] == 60 and report["stopped_early"] is True
    assert report["best_step"] == result.ending.best_step
    assert report["best_eval_loss"] == pytest.approx(result.ending.best_eval_loss)
    metrics = MlflowClient().get_run(report["run_id"]).data.metrics
    assert metrics["best_step"] == result.ending.best_step
    assert metrics["stopped_step"] == result.steps
