"""The train stage on a tiny corpus: weights move, loss falls, runs resume, MLflow records it."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from retune.config import Params
from retune.data.records import iter_messages, read_records
from retune.errors import BaseModelError
from retune.model.chat import CHAT_TEMPLATE, render
from retune.model.checkpoints import FINGERPRINT_FILE
from retune.model.modeling import load_pretrained
from retune.model.packing import pack
from tasks import split
from tasks.train import run
from tests.bases import Interrupted, KillAfterCheckpoint, train_core


@pytest.fixture
def split_params(prepared: Params) -> Params:
    split.run(prepared)
    return prepared


def weights(model_dir: Path) -> dict[str, Any]:
    model, _ = load_pretrained(model_dir)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_records_are_packed_into_full_blocks_split_by_eos(
    split_params: Params, tiny_model_dir: Path, tmp_path: Path
) -> None:
    _, tokenizer = load_pretrained(tiny_model_dir)
    train_file = split_params.paths.split / "train.parquet"
    packed_all = pack(train_file, tokenizer, 64, tmp_path / "cache", loss_on="all")
    blocks = packed_all["input_ids"]
    # Under loss_on all every token is a target (tests/test_masks.py has the replies).
    assert packed_all["labels"] == blocks

    stream: list[int] = []
    for messages in iter_messages(read_records(train_file)):
        ids = tokenizer(render(tokenizer, messages), add_special_tokens=False)["input_ids"]
        stream += [*ids, tokenizer.eos_token_id]
    packed = [token for block in blocks for token in block]
    # Every block is full (no padding), in order, and only the tail of one block is dropped.
    assert all(len(block) == 64 for block in blocks)
    assert packed == stream[: len(packed)] and len(stream) - len(packed) < 64


def test_scratch_model_learns_the_corpus(split_params: Params) -> None:
    # A 32-wide model takes a high learning rate; 30 steps then show it clearly learning.
    result = train_core(
        split_params, max_steps=30, learning_rate=5e-3, logging_steps=5, eval_steps=10
    )

    losses = [loss for _, loss, _ in result.history if loss is not None]
    evals = [ev for _, _, ev in result.history if ev is not None]
    assert result.steps == 30 and len(losses) == 6 and len(evals) == 3
    assert losses[-1] < losses[0] - 1.0, losses
    assert evals[-1] < evals[0], evals
    assert result.train_loss == losses[-1] and result.eval_loss == evals[-1]
    assert result.tokens_seen == 30 * 4 * 64
    # The saved model is whole: it loads through the users' path with its chat template.
    model, tokenizer = load_pretrained(result.model_dir)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert model.config.vocab_size == len(tokenizer)
    assert sum(p.numel() for p in model.parameters()) == result.n_params


def test_local_base_model_is_fine_tuned(split_params: Params, tiny_model_dir: Path) -> None:
    result = train_core(split_params, base_model=str(tiny_model_dir))

    before, after = weights(tiny_model_dir), weights(result.model_dir)
    assert before.keys() == after.keys()
    changed = [k for k in before if not before[k].equal(after[k])]
    assert "transformer.h.0.attn.c_attn.weight" in changed
    assert len(changed) > len(before) // 2
    # The base's own tokenizer is kept, not replaced by a newly trained one.
    _, base_tok = load_pretrained(tiny_model_dir)
    _, tuned_tok = load_pretrained(result.model_dir)
    assert base_tok.get_vocab() == tuned_tok.get_vocab()


def test_bad_base_model_names_the_setting(split_params: Params, tmp_path: Path) -> None:
    with pytest.raises(BaseModelError, match=r"train\.base_model=.*no such directory"):
        train_core(split_params, base_model=str(tmp_path / "no-such-model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BaseModelError, match=r"(?s)train\.base_model=.*save_pretrained"):
        train_core(split_params, base_model=str(tmp_path / "empty"))
    assert not split_params.paths.model.exists()


def test_interrupted_run_resumes_from_its_last_checkpoint(split_params: Params) -> None:
    checkpoints = split_params.paths.checkpoints
    with pytest.raises(Interrupted):
        train_core(split_params, callbacks=[KillAfterCheckpoint(step=3)])
    assert (checkpoints / "checkpoint-3").is_dir()
    assert not split_params.paths.model.exists()  # no half-trained model handed on

    resumed = train_core(split_params)
    assert resumed.resumed_from == checkpoints / "checkpoint-3"
    assert resumed.steps == 6
    # The curve spans both calls: steps logged before the interruption are kept.
    assert [step for step, loss, _ in resumed.history if loss is not None] == [2, 4, 6]

    # The same inputs again: the final checkpoint is the model; nothing is retrained.
    again = train_core(split_params)
    assert again.resumed_from == checkpoints / "checkpoint-6"
    assert again.steps == 6 and again.tokens_per_s == 0.0
    assert again.history == resumed.history
    saved = weights(split_params.paths.model)
    assert all(saved[k].equal(v) for k, v in weights(resumed.model_dir).items())

    # Resuming loses nothing: training afresh in one go gives the same weights.
    uninterrupted = train_core(split_params, resume=False)
    assert uninterrupted.resumed_from is None
    fresh_weights = weights(uninterrupted.model_dir)
    assert all(torch.allclose(saved[k], v, atol=1e-6) for k, v in fresh_weights.items())

    # Changed settings are other training inputs: start afresh rather than resume.
    fingerprint = (checkpoints / FINGERPRINT_FILE).read_text()
    fresh = train_core(split_params, learning_rate=5e-4)
    assert fresh.resumed_from is None and fresh.steps == 6
    assert (checkpoints / FINGERPRINT_FILE).read_text() != fingerprint


def test_run_starts_the_mlflow_run_and_writes_reports(split_params: Params) -> None:
    import mlflow
    from mlflow import MlflowClient

    from retune.release.tracking import resolved_uri

    paths = split_params.paths
    paths.clean.mkdir(parents=True, exist_ok=True)  # train reads the hygiene stage's manifest
    (paths.clean / "manifest.json").write_text(json.dumps({"data_version": "ab12cd34" * 8}))
    result = run(split_params)

    report = json.loads((paths.reports / "train.json").read_text())
    assert report["steps"] == 6 and report["resumed_from"] is None
    assert report["train_loss"] == pytest.approx(result.train_loss)
    with (paths.reports / "train_loss.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == [step for step, _, _ in result.history]
    assert rows[-1]["eval_loss"] != ""

    mlflow.set_tracking_uri(resolved_uri(split_params.tracking.uri))
    client = MlflowClient()
    mlrun = client.get_run(report["run_id"])
    assert mlrun.info.run_name == "train-ab12cd34"
    assert mlrun.data.tags["data_version"] == "ab12cd34" * 8
    assert mlrun.data.params["train.learning_rate"] == str(split_params.train.learning_rate)
    assert mlrun.data.params["train.scratch.n_layer"] == "2"
    curve = client.get_metric_history(report["run_id"], "train_loss")
    assert [m.step for m in curve] == [2, 4, 6]
    assert {m.step for m in client.get_metric_history(report["run_id"], "eval_loss")} == {3, 6}
    assert mlrun.data.metrics["n_params"] == result.n_params
    artifacts = {a.path for a in client.list_artifacts(report["run_id"], "reports")}
    assert {"reports/train.json", "reports/train_loss.csv"} <= artifacts
