"""Stage `evaluate`: score the fine-tuned model on the holdout against a unigram baseline.

Runs as `python -m tasks.evaluate` (the dvc.yaml stage) and as `evaluate_task` in Prefect flows.
Writes per-example scores (which a promotion gate can bootstrap over) and sample generations.
"""

from __future__ import annotations

import csv
import math
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from retune.chat import SPECIAL_TOKENS, render
from retune.config import EvaluateParams, Params, TrackingParams
from retune.entry import stage_main, stage_task
from retune.errors import RetuneError
from retune.metrics import load_metric
from retune.reports import read_json, write_json

SCORES_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("conversation_id", pa.string()),
        ("nll_sum", pa.float64()),  # summed token NLL in nats
        ("n_tokens", pa.int64()),  # predicted positions (the first token is never predicted)
        ("n_correct", pa.int64()),  # positions where the argmax was the actual next token
    ]
)
GENERATION_COLUMNS = ("id", "prompt", "reference", "generated")
_TRAIN_CHUNK = 512  # train conversations tokenised at once when counting the baseline


@dataclass(frozen=True)
class EvaluateResult:
    perplexity: float
    next_token_accuracy: float
    baseline_perplexity: float
    perplexity_vs_baseline: float  # model / baseline: below 1 means the model beats unigrams
    n_examples: int
    n_tokens: int
    mean_nll: float
    n_generations: int
    scores_file: Path
    generations_file: Path

    def metrics(self) -> dict[str, float | int]:
        """The numbers for reports/evaluate.json and MLflow."""
        skip = {"scores_file", "generations_file", "n_generations"}
        return {k: v for k, v in asdict(self).items() if k not in skip}


def encode(
    tokenizer: Any, conversations: list[list[dict[str, str]]], max_len: int
) -> list[list[int]]:
    """Token ids of each conversation exactly as `train` sees it (chat template, no added
    special tokens, closed with eos), truncated to the first `max_len` positions."""
    if not conversations:
        return []
    texts = [render(tokenizer, messages) for messages in conversations]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [(row + eos)[:max_len] for row in ids]


def unigram_counts(sequences: Sequence[Sequence[int]], vocab_size: int) -> np.ndarray:
    """How often each token id occurs as a prediction target (every position but the first)."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for seq in sequences:
        if len(seq) > 1:
            counts += np.bincount(np.asarray(seq[1:], dtype=np.int64), minlength=vocab_size)
    return counts


def unigram_perplexity(train_counts: np.ndarray, eval_counts: np.ndarray) -> float:
    """Perplexity on the `eval_counts` tokens of a unigram model fitted to `train_counts`.

    Add-one (Laplace) smoothing over the whole vocabulary (`len(train_counts)`): p(t) =
    (c_t + 1) / (N + V), so a token never seen in train still has a finite cost.
    """
    if train_counts.shape != eval_counts.shape:
        raise ValueError(f"vocabularies differ: {train_counts.shape} vs {eval_counts.shape}")
    n_eval = int(eval_counts.sum())
    if n_eval == 0:
        raise ValueError("no evaluation tokens to score the unigram baseline on")
    log_p = np.log(train_counts + 1.0) - math.log(float(train_counts.sum()) + len(train_counts))
    mean_nll = -float(np.dot(eval_counts.astype(np.float64), log_p)) / n_eval
    return math.exp(mean_nll)


def _score_batch(
    model: Any, batch: list[list[int]], pad_id: int, device: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per example: summed NLL, predicted positions, correct argmax predictions."""
    import torch
    import torch.nn.functional as F

    width = max(len(s) for s in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, seq in enumerate(batch):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    ids, mask = ids.to(device), mask.to(device)
    # Right padding plus causal attention: real positions never see the pads after them.
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    targets = ids[:, 1:]
    # The mask comes from lengths, not `ids == pad_id`: where pad is eos, eos targets still count.
    counted = mask[:, 1:].bool()
    nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none") * counted
    correct = (logits.argmax(dim=-1) == targets) & counted
    return (
        nll.sum(dim=1).double().cpu().numpy(),
        counted.sum(dim=1).cpu().numpy().astype(np.int64),
        correct.sum(dim=1).cpu().numpy().astype(np.int64),
    )


def _train_counts(train_file: Path, tokenizer: Any, max_len: int) -> np.ndarray:
    """Unigram target counts over the whole train split, streamed in chunks."""
    counts = np.zeros(len(tokenizer), dtype=np.int64)
    for batch in pq.ParquetFile(train_file).iter_batches(
        batch_size=_TRAIN_CHUNK, columns=["messages"]
    ):
        counts += unigram_counts(
            encode(tokenizer, batch.column(0).to_pylist(), max_len), len(counts)
        )
    return counts


def _sorted_holdout(holdout_file: Path) -> pa.Table:
    """The holdout ordered by record id: a fixed order that, unlike file order, does not favour
    whichever source file came first, and keeps the same examples in when data is added."""
    table = pq.read_table(holdout_file, columns=["id", "conversation_id", "messages"])
    return table.take(pc.sort_indices(table, sort_keys=[("id", "ascending")]))


def _prompt_and_reference(
    messages: list[dict[str, str]],
) -> tuple[list[dict[str, str]], str] | None:
    """The turns before the first assistant reply, and that reply; None if there is none."""
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            return (messages[:i], m["content"]) if i > 0 else None
    return None


def generate_replies(
    model: Any,
    tokenizer: Any,
    holdout: pa.Table,
    n: int,
    max_new_tokens: int,
    max_len: int,
    device: str,
) -> list[dict[str, str]]:
    """Greedy replies to the first `n` holdout conversations that have an assistant turn."""
    import torch

    end = SPECIAL_TOKENS["roles"][-1]  # <|end|> closes every turn in retune's template
    stop = [tokenizer.convert_tokens_to_ids(end)] if end in tokenizer.get_vocab() else []
    if tokenizer.eos_token_id is not None:
        stop.append(tokenizer.eos_token_id)
    rows: list[dict[str, str]] = []
    for rid, messages in zip(
        holdout.column("id").to_pylist(), holdout.column("messages").to_pylist(), strict=True
    ):
        if len(rows) >= n:
            break
        found = _prompt_and_reference(messages)
        if found is None:
            continue
        prompt_messages, reference = found
        prompt_text = render(tokenizer, prompt_messages, add_generation_prompt=True)
        ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        # Keep the prompt's end (it holds the question) and room for the reply within max_len.
        ids = ids[-max(1, max_len - max_new_tokens) :]
        input_ids = torch.tensor([ids], dtype=torch.long, device=device)
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            max_new_tokens=max(1, min(max_new_tokens, max_len - len(ids))),
            eos_token_id=stop or None,
            pad_token_id=tokenizer.pad_token_id,
        )
        users = [m["content"] for m in prompt_messages if m["role"] == "user"]
        rows.append(
            {
                "id": rid,
                "prompt": users[-1] if users else prompt_messages[-1]["content"],
                "reference": reference,
                "generated": tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True).strip(),
            }
        )
    return rows


def _batches(items: list[list[int]], size: int) -> Iterator[list[list[int]]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def score(
    model_dir: Path,
    holdout_file: Path,
    train_file: Path,
    cfg: EvaluateParams,
    max_seq_len: int,
    scores_file: Path,
    generations_file: Path,
) -> EvaluateResult:
    """Score the model in `model_dir` on up to `cfg.max_examples` holdout records.

    Reads the model, the holdout and (for the unigram baseline) the train split; writes
    per-example scores to `scores_file` (Parquet, `SCORES_SCHEMA`) and greedy replies to
    `cfg.prompts` holdout prompts to `generations_file` (CSV, `GENERATION_COLUMNS`).
    """
    import torch

    from retune.modeling import load_pretrained

    if not model_dir.is_dir():
        raise RetuneError(f"{model_dir}: no model here (paths.model); run the train stage first")
    for split_file in (holdout_file, train_file):
        if not split_file.exists():
            raise RetuneError(f"{split_file}: missing (paths.split); run the split stage first")
    model, tokenizer = load_pretrained(model_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).eval()
    limit = getattr(model.config, "max_position_embeddings", None) or max_seq_len
    max_len = min(max_seq_len, limit)

    holdout = _sorted_holdout(holdout_file)
    scored = holdout.slice(0, cfg.max_examples)
    total = scored.num_rows
    encoded = encode(tokenizer, scored.column("messages").to_pylist(), max_len)
    eval_counts = unigram_counts(encoded, len(tokenizer))
    if int(eval_counts.sum()) == 0:
        raise RetuneError(
            f"{holdout_file}: the {total} holdout examples give no token to predict "
            f"(each is at most one token long under train.max_seq_len={max_seq_len})"
        )
    print(f"evaluate: scoring {total} of {holdout.num_rows} holdout examples", flush=True)

    scores_file.parent.mkdir(parents=True, exist_ok=True)
    ids, conv_ids = scored.column("id").to_pylist(), scored.column("conversation_id").to_pylist()
    every = max(1, total // 10)
    done = 0
    with tempfile.TemporaryDirectory(prefix="retune-metrics-") as cache:
        perplexity = load_metric("perplexity", Path(cache))
        accuracy = load_metric("next_token_accuracy", Path(cache))
        with pq.ParquetWriter(scores_file, SCORES_SCHEMA) as writer, torch.inference_mode():
            for batch in _batches(encoded, cfg.batch_size):
                nll_sum, n_tokens, n_correct = _score_batch(
                    model, batch, tokenizer.pad_token_id, device
                )
                # Only per-example sums are kept, so memory stays flat as the holdout grows.
                perplexity.add_batch(nll_sum=nll_sum.tolist(), n_tokens=n_tokens.tolist())
                accuracy.add_batch(n_correct=n_correct.tolist(), n_tokens=n_tokens.tolist())
                end = done + len(batch)
                writer.write_table(
                    pa.table(
                        {
                            "id": ids[done:end],
                            "conversation_id": conv_ids[done:end],
                            "nll_sum": nll_sum,
                            "n_tokens": n_tokens,
                            "n_correct": n_correct,
                        },
                        schema=SCORES_SCHEMA,
                    )
                )
                if end // every > done // every or end == total:
                    print(f"evaluate: scored {end}/{total} examples", flush=True)
                done = end
        ppl = perplexity.compute()
        acc = accuracy.compute()

    print("evaluate: counting the unigram baseline over the train split", flush=True)
    baseline = unigram_perplexity(_train_counts(train_file, tokenizer, max_len), eval_counts)

    with torch.inference_mode():
        rows = generate_replies(
            model, tokenizer, holdout, cfg.prompts, cfg.max_new_tokens, max_len, device
        )
    generations_file.parent.mkdir(parents=True, exist_ok=True)
    with generations_file.open("w", newline="", encoding="utf-8") as fh:
        out = csv.DictWriter(fh, fieldnames=GENERATION_COLUMNS)
        out.writeheader()
        out.writerows(rows)

    return EvaluateResult(
        perplexity=float(ppl["perplexity"]),
        next_token_accuracy=float(acc["next_token_accuracy"]),
        baseline_perplexity=baseline,
        perplexity_vs_baseline=float(ppl["perplexity"]) / baseline,
        n_examples=total,
        n_tokens=int(ppl["n_tokens"]),
        mean_nll=float(ppl["mean_nll"]),
        n_generations=len(rows),
        scores_file=scores_file,
        generations_file=generations_file,
    )


def _pipeline_run_id(train_report: Path) -> str | None:
    """The MLflow run `train` started, if the model came through the pipeline."""
    if not train_report.exists():
        return None
    run_id = read_json(train_report).get("run_id")
    return str(run_id) if run_id else None


def log_to_mlflow(cfg: TrackingParams, run_id: str | None, result: EvaluateResult) -> str:
    """Add the metrics and generations to run `run_id` (a new run "evaluate" if None)."""
    import mlflow
    import pandas as pd
    from mlflow.exceptions import MlflowException

    from retune.tracking import resume_run, setup_tracking

    if run_id is None:
        setup_tracking(cfg)
        context: Any = mlflow.start_run(run_name="evaluate")
    else:
        context = resume_run(cfg, run_id)
    try:
        with context as active:
            mlflow.log_metrics({k: float(v) for k, v in result.metrics().items()})
            table = pd.read_csv(result.generations_file, dtype=str, keep_default_na=False)
            mlflow.log_table(data=table, artifact_file="generations.json")
            mlflow.log_artifact(str(result.generations_file))
            return str(active.info.run_id)
    except MlflowException as exc:
        if run_id is None:
            raise
        raise RetuneError(
            f"reports/train.json names MLflow run {run_id}, which tracking.uri={cfg.uri} "
            f"cannot reopen ({exc.message}); re-run the train stage"
        ) from exc


def run(params: Params) -> EvaluateResult:
    """Edge: score paths.model on the split, log to the pipeline's MLflow run, write
    reports/evaluate.json, reports/holdout_scores.parquet and reports/generations.csv."""
    reports = params.paths.reports
    result = score(
        model_dir=params.paths.model,
        holdout_file=params.paths.split / "holdout.parquet",
        train_file=params.paths.split / "train.parquet",
        cfg=params.evaluate,
        max_seq_len=params.train.max_seq_len,
        scores_file=reports / "holdout_scores.parquet",
        generations_file=reports / "generations.csv",
    )
    run_id = log_to_mlflow(params.tracking, _pipeline_run_id(reports / "train.json"), result)
    write_json(reports / "evaluate.json", {**result.metrics(), "run_id": run_id})
    print(
        f"evaluate: perplexity {result.perplexity:.2f} (unigram baseline "
        f"{result.baseline_perplexity:.2f}, ratio {result.perplexity_vs_baseline:.3f}), "
        f"next-token accuracy {result.next_token_accuracy:.3f} over {result.n_tokens} tokens",
        flush=True,
    )
    return result


evaluate_task = stage_task(run, name="evaluate")

if __name__ == "__main__":
    stage_main(run)
