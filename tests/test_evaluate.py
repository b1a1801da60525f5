"""The `evaluate` stage: the metric scripts, the unigram baseline, the stage on a tiny model."""

from __future__ import annotations

import csv
import dataclasses
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import tasks.split
from retune.config import Params
from retune.errors import RetuneError
from retune.model.metrics import NAMES, load_metric, metric_path
from retune.model.scoring import GENERATION_COLUMNS, SCORES_SCHEMA, bits_per_byte
from retune.reports import read_json, write_json
from tasks.evaluate import EXAMPLES_TABLE, run, unigram_counts, unigram_nll, unigram_perplexity

REPLY_KEYS = {
    "rouge_l",
    "chrf",
    "distinct_1",
    "distinct_2",
    "mean_reply_words",
    "empty_reply_share",
    "unsafe_share",
}


def test_metric_scripts_are_in_the_repo_and_load_by_path(tmp_path: Path) -> None:
    for name in NAMES:
        path = metric_path(name)
        assert path.is_file() and path.parent.name == "metrics"
        metric = load_metric(name, tmp_path)
        assert metric.info.description and metric.info.inputs_description


def test_perplexity_is_exp_of_token_weighted_mean_nll(tmp_path: Path) -> None:
    ppl = load_metric("perplexity", tmp_path)
    # Two examples: 3 nats over 1 token and 3 nats over 5 tokens -> 6 nats / 6 tokens.
    out = ppl.compute(nll_sum=[3.0, 3.0], n_tokens=[1, 5])
    assert out["mean_nll"] == pytest.approx(1.0)
    assert out["perplexity"] == pytest.approx(math.e)
    assert out["n_tokens"] == 6


def test_perplexity_streamed_in_batches_equals_one_shot(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n_tokens = rng.integers(1, 50, size=30)
    nll_sum = n_tokens * rng.uniform(0.5, 4.0, size=30)
    one_shot = load_metric("perplexity", tmp_path / "a").compute(
        nll_sum=nll_sum.tolist(), n_tokens=n_tokens.tolist()
    )
    streamed = load_metric("perplexity", tmp_path / "b")
    for lo, hi in [(0, 7), (7, 8), (8, 21), (21, 30)]:
        streamed.add_batch(nll_sum=nll_sum[lo:hi].tolist(), n_tokens=n_tokens[lo:hi].tolist())
    out = streamed.compute()
    assert out["perplexity"] == pytest.approx(one_shot["perplexity"], rel=1e-12)
    assert out["perplexity"] == pytest.approx(math.exp(nll_sum.sum() / n_tokens.sum()))


def test_next_token_accuracy_counts_tokens_not_examples(tmp_path: Path) -> None:
    acc = load_metric("next_token_accuracy", tmp_path)
    acc.add_batch(n_correct=[1, 2], n_tokens=[2, 6])
    acc.add_batch(n_correct=[0], n_tokens=[2])
    assert acc.compute()["next_token_accuracy"] == pytest.approx(3 / 10)
    with pytest.raises(ValueError, match="at least one predicted token"):
        acc.compute(n_correct=[0], n_tokens=[0])


def test_unigram_baseline_matches_hand_computation() -> None:
    # Targets are every position but the first: train targets are 1, 1, 2 (vocab of 4).
    train = unigram_counts([[3, 1, 1], [0, 2]], vocab_size=4)
    assert train.tolist() == [0, 2, 1, 0]
    # Add-one: p = (c + 1) / (N + V) = [1, 3, 2, 1] / 7. Holdout targets 1 and 3 (3 unseen).
    held = unigram_counts([[2, 1, 3]], vocab_size=4)
    expected = math.exp(-(math.log(3 / 7) + math.log(1 / 7)) / 2)  # = 7 / sqrt(3)
    assert unigram_perplexity(train, held) == pytest.approx(expected)
    assert expected == pytest.approx(7 / math.sqrt(3))
    # The same two targets as 5 bytes of text: -log2(3/7) - log2(1/7) bits over 5 bytes.
    nll = unigram_nll(train, held)
    assert nll == pytest.approx(-math.log(3 / 7) - math.log(1 / 7))
    assert bits_per_byte(nll, 5) == pytest.approx((-math.log2(3 / 7) - math.log2(1 / 7)) / 5)
    assert math.isnan(bits_per_byte(nll, 0))


def _pipeline(params: Params, tiny_model_dir: Path) -> None:
    """Split the prepared fixture and stand the tiny model in for `train`'s output."""
    tasks.split.run(params)
    shutil.copytree(tiny_model_dir, params.paths.model)


@pytest.mark.slow
def test_stage_scores_holdout_and_logs_into_the_pipeline_run(
    prepared: Params, tiny_model_dir: Path
) -> None:
    import mlflow

    from retune.release.tracking import setup_tracking

    params = prepared
    _pipeline(params, tiny_model_dir)
    setup_tracking(params.tracking)
    with mlflow.start_run(run_name="pipeline") as pipeline_run:
        pass
    run_id = pipeline_run.info.run_id
    write_json(params.paths.reports / "train.json", {"run_id": run_id, "steps": 0})

    result = run(params)

    holdout = pq.read_table(params.paths.split / "holdout.parquet")
    assert result.n_examples == min(params.scoring.max_examples, holdout.num_rows)
    assert 1.0 < result.perplexity < math.inf
    assert 0.0 <= result.next_token_accuracy <= 1.0
    assert 1.0 < result.baseline_perplexity < math.inf
    assert result.perplexity_vs_baseline == pytest.approx(
        result.perplexity / result.baseline_perplexity
    )

    # Per-example scores add up to the reported figures (a promotion gate resamples them).
    scores = pq.read_table(result.scores_file)
    assert scores.schema.equals(SCORES_SCHEMA)
    assert scores.num_rows == result.n_examples
    assert set(scores.column("id").to_pylist()) <= set(holdout.column("id").to_pylist())
    nll, tokens = scores.column("nll_sum").to_numpy(), scores.column("n_tokens").to_numpy()
    assert tokens.sum() == result.n_tokens
    assert result.perplexity == pytest.approx(math.exp(nll.sum() / tokens.sum()))
    correct = scores.column("n_correct").to_numpy()
    assert result.next_token_accuracy == pytest.approx(correct.sum() / tokens.sum())
    n_bytes = scores.column("n_bytes").to_numpy()
    assert n_bytes.sum() == result.n_bytes > tokens.sum()
    assert result.bits_per_byte == pytest.approx(nll.sum() / (math.log(2) * n_bytes.sum()))
    # The baseline is scored on the same tokens and bytes: per byte and per token its ratio
    # to the model is the ratio of the two total NLLs alike.
    assert result.baseline_bits_per_byte / result.bits_per_byte == pytest.approx(
        math.log(result.baseline_perplexity) / math.log(result.perplexity)
    )
    assert result.bits_per_byte_vs_baseline == pytest.approx(
        result.bits_per_byte / result.baseline_bits_per_byte
    )
    assert result.base_bits_per_byte is None  # a scratch model has no base to score

    # Every holdout conversation (all have a reply) up to the generation budget is replied to.
    with result.generations_file.open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert (
        len(rows)
        == result.n_generated
        == min(params.evaluate.generation_examples, holdout.num_rows)
    )
    assert tuple(rows[0]) == GENERATION_COLUMNS
    assert all(r["prompt"].startswith("Hi, my ") and r["reference"] for r in rows)
    assert result.mean_reply_words == pytest.approx(
        np.mean([len(r["generated"].split()) for r in rows])
    )
    assert result.rouge_l is not None and 0.0 <= result.rouge_l <= 1.0
    assert result.unsafe_share is not None and 0.0 <= result.unsafe_share <= 1.0

    report = read_json(params.paths.reports / "evaluate.json")
    assert report["run_id"] == run_id
    assert report["perplexity"] == pytest.approx(result.perplexity)
    assert REPLY_KEYS | {"n_generated"} <= set(report)
    assert report["n_generated"] == len(rows)
    for key in ("bits_per_byte", "baseline_bits_per_byte", "bits_per_byte_vs_baseline"):
        assert report[key] == pytest.approx(getattr(result, key))
    assert not {"base_bits_per_byte", "base_perplexity"} & set(report)
    logged = mlflow.get_run(run_id)
    assert logged.data.metrics["perplexity"] == pytest.approx(result.perplexity)
    assert logged.data.metrics["baseline_perplexity"] == pytest.approx(result.baseline_perplexity)
    assert logged.data.metrics["bits_per_byte"] == pytest.approx(result.bits_per_byte)
    assert logged.data.metrics["baseline_bits_per_byte"] == pytest.approx(
        result.baseline_bits_per_byte
    )
    for key in REPLY_KEYS:
        assert logged.data.metrics[key] == pytest.approx(report[key])
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id)}
    assert {"generations.csv", "generations.json"} <= artifacts
    # The MLflow table shows the first `evaluate.prompts` replies; the CSV artifact has all.
    table = mlflow.load_table("generations.json", run_ids=[run_id])
    assert table["id"].tolist() == [r["id"] for r in rows[: params.evaluate.prompts]]

    # Every scored example is in the UI's per-example table, worst first, named by its
    # conversation and the input file and line it came from.
    examples = mlflow.load_table(EXAMPLES_TABLE, run_ids=[run_id])
    assert len(examples) == result.n_examples
    assert examples["bits_per_byte"].is_monotonic_decreasing
    origin = {
        r["id"]: (r["conversation_id"], f"{r['source']}:{r['line']}")
        for r in holdout.select(["id", "conversation_id", "source", "line"]).to_pylist()
    }
    assert {
        rid: (cid, src)
        for rid, cid, src in zip(
            examples["record_id"], examples["conversation_id"], examples["source"], strict=True
        )
    } == {rid: origin[rid] for rid in scores.column("id").to_pylist()}
    by_id = {r["id"]: r for r in scores.to_pylist()}
    worst = by_id[examples["record_id"][0]]
    assert examples["nll"][0] == pytest.approx(worst["nll_sum"] / worst["n_tokens"])
    assert examples["bits_per_byte"][0] == pytest.approx(
        worst["nll_sum"] / (math.log(2) * worst["n_bytes"])
    )


@pytest.mark.slow
def test_model_outside_the_pipeline_gets_its_own_run(
    prepared: Params, tiny_model_dir: Path
) -> None:
    import mlflow

    # With generation off (or a corpus of documents: nothing to reply to) the reply metrics
    # are left out of the report rather than written as zeros a gate could mistake for real.
    params = dataclasses.replace(
        prepared, evaluate=dataclasses.replace(prepared.evaluate, generation_examples=0)
    )
    _pipeline(params, tiny_model_dir)  # no reports/train.json: no pipeline run to add to
    result = run(params)
    report = read_json(params.paths.reports / "evaluate.json")
    logged = mlflow.get_run(report["run_id"])
    assert logged.info.run_name == "evaluate"
    assert logged.data.metrics["next_token_accuracy"] == pytest.approx(result.next_token_accuracy)
    assert report["n_generated"] == 0 and not REPLY_KEYS & set(report)
    assert not REPLY_KEYS & set(logged.data.metrics)
    header = result.generations_file.read_text(encoding="utf-8").strip()
    assert header == ",".join(GENERATION_COLUMNS)


@pytest.mark.slow
def test_a_pretrained_base_is_scored_on_the_same_examples(
    prepared: Params, tiny_model_dir: Path
) -> None:
    # The tiny model stands in for both the base and the fine-tuned result (no steps taken),
    # so the base scores exactly what the model does.
    params = dataclasses.replace(
        prepared,
        train=dataclasses.replace(prepared.train, base_model=str(tiny_model_dir)),
        evaluate=dataclasses.replace(prepared.evaluate, generation_examples=0),
    )
    _pipeline(params, tiny_model_dir)
    result = run(params)
    assert result.base_bits_per_byte == pytest.approx(result.bits_per_byte)
    assert result.base_perplexity == pytest.approx(result.perplexity)
    report = read_json(params.paths.reports / "evaluate.json")
    assert report["base_bits_per_byte"] == pytest.approx(result.bits_per_byte)
    assert report["base_perplexity"] == pytest.approx(result.perplexity)


def test_missing_model_names_the_setting_and_the_fix(prepared: Params) -> None:
    tasks.split.run(prepared)
    with pytest.raises(RetuneError, match=r"paths\.model.*run the `preference` stage"):
        run(prepared)
