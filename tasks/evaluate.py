"""Stage `evaluate`: score the fine-tuned model on the holdout against a unigram baseline.

Runs as `python -m tasks.evaluate` (the dvc.yaml stage) and as `evaluate_task` in Prefect flows.
Writes per-example scores (which a promotion gate can bootstrap over) and scored generations;
a pretrained base is scored too, so the report shows what fine-tuning bought.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from retune.artifacts import (
    EVALUATE_REPORT,
    GENERATIONS,
    HOLDOUT_SCORES,
    HOLDOUT_SPLIT,
    MODEL,
    PREFERENCE_SET,
    RATED_SCORES,
    TRAIN_REPORT,
    TRAIN_SPLIT,
    pipeline_run_id,
)
from retune.config import EvaluateParams, Params, ScoringParams, TrackingParams
from retune.data.preference import set_rows
from retune.entry import stage_main, stage_task
from retune.errors import RetuneError
from retune.model.scoring import (
    aggregate,
    bits_per_byte,
    encode_targets,
    max_positions,
    score_examples,
    score_rated,
    score_replies,
    select_holdout,
)

_TRAIN_CHUNK = 512  # train conversations tokenised at once when counting the baseline


@dataclass(frozen=True)
class EvaluateResult:
    perplexity: float
    next_token_accuracy: float
    baseline_perplexity: float
    perplexity_vs_baseline: float  # model / baseline: below 1 means the model beats unigrams
    # NLL in bits per UTF-8 byte of the scored text (retune.model.scoring.score_examples): the
    # same text whatever the tokenizer, so it compares models that tokenize differently.
    bits_per_byte: float
    baseline_bits_per_byte: float  # the unigram baseline on the same tokens and bytes
    bits_per_byte_vs_baseline: float  # model / baseline
    n_examples: int
    n_tokens: int
    n_bytes: int
    mean_nll: float
    # Holdout records with an assistant turn: what replies can be generated for. 0 (documents
    # only) tells the gate that reply metrics cannot exist, rather than that they went missing.
    n_reply_examples: int
    n_generated: int  # replies generated and scored; the reply metrics are None when 0
    rouge_l: float | None
    chrf: float | None
    distinct_1: float | None
    distinct_2: float | None
    mean_reply_words: float | None
    empty_reply_share: float | None
    unsafe_share: float | None
    # The pretrained base itself (train.base_model) on the same examples, before fine-tuning;
    # None for a scratch model, which has no base to score.
    base_bits_per_byte: float | None
    base_perplexity: float | None
    scores_file: Path
    generations_file: Path
    # Users' held-out rated replies scored (`rated_file`), for the gate's ratings check.
    n_rated: int = 0

    def metrics(self) -> dict[str, float | int]:
        """The numbers for reports/evaluate.json and MLflow (reply metrics only if any)."""
        skip = {"scores_file", "generations_file"}
        return {k: v for k, v in asdict(self).items() if k not in skip and v is not None}


def unigram_counts(
    sequences: Sequence[Sequence[int]],
    vocab_size: int,
    targets: Sequence[Sequence[int]] | None = None,
) -> np.ndarray:
    """How often each token id occurs as a prediction target: every position but the first,
    and of those only where `targets` (aligned with the tokens, as scoring takes it) is 1."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for k, seq in enumerate(sequences):
        if len(seq) > 1:
            ids = np.asarray(seq[1:], dtype=np.int64)
            if targets is not None:
                ids = ids[np.asarray(targets[k][1 : len(seq)], dtype=bool)]
            counts += np.bincount(ids, minlength=vocab_size)
    return counts


def unigram_nll(train_counts: np.ndarray, eval_counts: np.ndarray) -> float:
    """Summed NLL (nats) of the `eval_counts` tokens under a unigram model of `train_counts`.

    Add-one (Laplace) smoothing over the whole vocabulary (`len(train_counts)`): p(t) =
    (c_t + 1) / (N + V), so a token never seen in train still has a finite cost.
    """
    if train_counts.shape != eval_counts.shape:
        raise ValueError(f"vocabularies differ: {train_counts.shape} vs {eval_counts.shape}")
    if int(eval_counts.sum()) == 0:
        raise ValueError("no evaluation tokens to score the unigram baseline on")
    log_p = np.log(train_counts + 1.0) - math.log(float(train_counts.sum()) + len(train_counts))
    return -float(np.dot(eval_counts.astype(np.float64), log_p))


def unigram_perplexity(train_counts: np.ndarray, eval_counts: np.ndarray) -> float:
    """Perplexity on the `eval_counts` tokens of a unigram model fitted to `train_counts`
    (`unigram_nll` per token)."""
    return math.exp(unigram_nll(train_counts, eval_counts) / int(eval_counts.sum()))


def count_reply_examples(holdout_file: Path) -> int:
    """Records of `holdout_file` with an assistant turn (conversations, not documents)."""
    import pyarrow.compute as pc

    roles = pq.read_table(holdout_file, columns=["roles"]).column("roles")
    return int(pc.sum(pc.match_substring(roles, "assistant")).as_py() or 0)


def _train_counts(train_file: Path, tokenizer: Any, max_len: int, loss_on: str) -> np.ndarray:
    """Unigram target counts over the whole train split (the tokens `loss_on` trains on),
    streamed in chunks."""
    counts = np.zeros(len(tokenizer), dtype=np.int64)
    for batch in pq.ParquetFile(train_file).iter_batches(
        batch_size=_TRAIN_CHUNK, columns=["messages"]
    ):
        ids, targets = encode_targets(tokenizer, batch.column(0).to_pylist(), max_len, loss_on)
        counts += unigram_counts(ids, len(counts), targets)
    return counts


def score_base(
    base_model: str, holdout_file: Path, scoring: ScoringParams, loss_on: str = "all"
) -> dict[str, float]:
    """Bits per byte and perplexity of the pretrained `base_model` (train.base_model) itself on
    the holdout examples (and tokens, `loss_on`) the fine-tuned model is scored on: what
    fine-tuning started from."""
    import torch

    from retune.model.modeling import load_pretrained

    model, tokenizer = load_pretrained(base_model)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    figures = aggregate(
        score_examples(
            model,
            tokenizer,
            holdout_file,
            scoring.max_examples,
            scoring.batch_size,
            scoring.max_seq_len,
            loss_on=loss_on,
            log_prefix="evaluate: base",
        )
    )
    return {k: float(figures[k]) for k in ("bits_per_byte", "perplexity")}


def score(
    model_dir: Path,
    holdout_file: Path,
    train_file: Path,
    cfg: EvaluateParams,
    scoring: ScoringParams,
    scores_file: Path,
    generations_file: Path,
    base_model: str = "scratch",
    loss_on: str = "all",
    rated: Sequence[Mapping[str, Any]] = (),
    rated_file: Path | None = None,
) -> EvaluateResult:
    """Score the model in `model_dir` on up to `scoring.max_examples` holdout records.

    Reads the model, the holdout and (for the unigram baseline) the train split; writes
    per-example scores to `scores_file` (Parquet, `retune.model.scoring.SCORES_SCHEMA`) and greedy
    replies to `cfg.generation_examples` holdout prompts, scored against the references, to
    `generations_file` (CSV, `retune.model.scoring.GENERATION_COLUMNS`). A pretrained
    `base_model` (train.base_model other than "scratch") is scored on the same examples too.
    `loss_on` (train.loss_on) picks the tokens scored, and counted by the unigram baseline:
    the ones train's loss trains on. `rated` (the preference set's held-out KTO rows) are
    scored into `rated_file` (`retune.model.scoring.RATED_SCHEMA`), for the gate.
    """
    import torch

    from retune.model.modeling import load_pretrained

    if not model_dir.is_dir():
        raise MODEL.missing(model_dir)
    for split_file in (holdout_file, train_file):
        if not split_file.exists():
            raise TRAIN_SPLIT.missing(split_file)
    max_seq_len = scoring.max_seq_len
    model, tokenizer = load_pretrained(model_dir)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    max_len = max_positions(model, max_seq_len)

    print(f"evaluate: {pq.ParquetFile(holdout_file).metadata.num_rows} holdout records", flush=True)
    scores = score_examples(
        model,
        tokenizer,
        holdout_file,
        scoring.max_examples,
        scoring.batch_size,
        max_seq_len,
        loss_on=loss_on,
        log_prefix="evaluate",
    )
    scores_file.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(scores, scores_file)
    figures = aggregate(scores)

    print("evaluate: counting the unigram baseline over the train split", flush=True)
    selected = select_holdout(holdout_file, scoring.max_examples).column("messages").to_pylist()
    eval_ids, eval_targets = encode_targets(tokenizer, selected, max_len, loss_on)
    eval_counts = unigram_counts(eval_ids, len(tokenizer), eval_targets)
    train_counts = _train_counts(train_file, tokenizer, max_len, loss_on)
    baseline_nll = unigram_nll(train_counts, eval_counts)
    baseline = math.exp(baseline_nll / int(eval_counts.sum()))
    # The baseline predicts the very tokens scored above, so it covers the very same bytes.
    baseline_bpb = bits_per_byte(baseline_nll, int(figures["n_bytes"]))
    base = None
    if base_model != "scratch":
        print(f"evaluate: scoring the base model {base_model} before fine-tuning", flush=True)
        base = score_base(base_model, holdout_file, scoring, loss_on)

    replies = score_replies(
        model,
        tokenizer,
        holdout_file,
        cfg.generation_examples,
        cfg.generation_batch_size,
        cfg.max_new_tokens,
        max_seq_len,
        cfg.safety_blocklist,
        generations_file,
        log_prefix="evaluate",
    )

    def reply(name: str) -> float | None:
        return float(replies[name]) if name in replies else None

    if rated_file is not None:
        rated_scores = score_rated(
            model, tokenizer, rated, scoring.batch_size, max_seq_len, log_prefix="evaluate"
        )
        rated_file.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(rated_scores, rated_file)

    return EvaluateResult(
        perplexity=float(figures["perplexity"]),
        next_token_accuracy=float(figures["next_token_accuracy"]),
        baseline_perplexity=baseline,
        perplexity_vs_baseline=float(figures["perplexity"]) / baseline,
        bits_per_byte=float(figures["bits_per_byte"]),
        baseline_bits_per_byte=baseline_bpb,
        bits_per_byte_vs_baseline=float(figures["bits_per_byte"]) / baseline_bpb,
        n_examples=int(figures["n_examples"]),
        n_tokens=int(figures["n_tokens"]),
        n_bytes=int(figures["n_bytes"]),
        mean_nll=float(figures["mean_nll"]),
        n_reply_examples=count_reply_examples(holdout_file),
        n_generated=int(replies["n_generated"]),
        rouge_l=reply("rouge_l"),
        chrf=reply("chrf"),
        distinct_1=reply("distinct_1"),
        distinct_2=reply("distinct_2"),
        mean_reply_words=reply("mean_reply_words"),
        empty_reply_share=reply("empty_reply_share"),
        unsafe_share=reply("unsafe_share"),
        base_bits_per_byte=base["bits_per_byte"] if base is not None else None,
        base_perplexity=base["perplexity"] if base is not None else None,
        scores_file=scores_file,
        generations_file=generations_file,
        n_rated=len(rated) if rated_file is not None else 0,
    )


# The per-holdout-example MLflow table: sort by bits_per_byte in the UI for the worst examples.
EXAMPLES_TABLE = "holdout_examples.json"


def holdout_examples(scores_file: Path, holdout_file: Path) -> Any:
    """One row per scored holdout example, worst (most bits per byte) first: its conversation
    id, the input file and line it came from, mean NLL per token (nats) and bits per byte."""
    import pandas as pd

    scores = pq.read_table(scores_file).to_pandas()
    origin = pq.read_table(holdout_file, columns=["id", "source", "line"]).to_pandas()
    rows = scores.merge(origin, on="id", how="left")
    table = pd.DataFrame(
        {
            "conversation_id": rows["conversation_id"],
            "source": rows["source"].fillna("?") + ":" + rows["line"].astype("Int64").astype(str),
            "nll": rows["nll_sum"] / rows["n_tokens"].where(rows["n_tokens"] > 0),
            "bits_per_byte": [
                bits_per_byte(n, b) for n, b in zip(rows["nll_sum"], rows["n_bytes"], strict=True)
            ],
            "n_tokens": rows["n_tokens"],
            "record_id": rows["id"],
        }
    )
    return table.sort_values("bits_per_byte", ascending=False, kind="stable").reset_index(drop=True)


def log_to_mlflow(
    cfg: TrackingParams,
    run_id: str | None,
    result: EvaluateResult,
    table_rows: int,
    examples: Any = None,
) -> str:
    """Add the metrics and generations to run `run_id` (a new run "evaluate" if None): the
    first `table_rows` generations as an MLflow table, the whole CSV as an artifact, and the
    per-holdout-example scores (`holdout_examples`) as the table EXAMPLES_TABLE."""
    import mlflow
    import pandas as pd
    from mlflow.exceptions import MlflowException

    from retune.release.tracking import resume_run, setup_tracking

    if run_id is None:
        setup_tracking(cfg)
        context: Any = mlflow.start_run(run_name="evaluate")
    else:
        context = resume_run(cfg, run_id)
    try:
        with context as active:
            mlflow.log_metrics({k: float(v) for k, v in result.metrics().items()})
            if table_rows and result.n_generated:
                table = pd.read_csv(
                    result.generations_file, dtype=str, keep_default_na=False, nrows=table_rows
                )
                mlflow.log_table(data=table, artifact_file="generations.json")
            mlflow.log_artifact(str(result.generations_file))
            if examples is not None:
                mlflow.log_table(data=examples, artifact_file=EXAMPLES_TABLE)
            return str(active.info.run_id)
    except MlflowException as exc:
        if run_id is None:
            raise
        raise RetuneError(
            f"{TRAIN_REPORT.file} names MLflow run {run_id}, which tracking.uri={cfg.uri} "
            f"cannot reopen ({exc.message}); re-run the train stage"
        ) from exc


def run(params: Params) -> EvaluateResult:
    """Edge: score paths.model on the split, log to the pipeline's MLflow run, write
    reports/evaluate.json, reports/holdout_scores.parquet and reports/generations.csv."""
    started = time.perf_counter()
    result = score(
        model_dir=MODEL.path(params),
        holdout_file=HOLDOUT_SPLIT.path(params),
        train_file=TRAIN_SPLIT.path(params),
        cfg=params.evaluate,
        scoring=params.scoring,
        scores_file=HOLDOUT_SCORES.path(params),
        generations_file=GENERATIONS.path(params),
        base_model=params.train.base_model,
        loss_on=params.train.loss_on,
        rated=set_rows(PREFERENCE_SET.path(params), "kto", "holdout"),
        rated_file=RATED_SCORES.path(params),
    )
    # Compute alone (loading, scoring, generating), apart from MLflow logging: what the
    # overhead benchmark subtracts from the flow's wall time.
    score_s = round(time.perf_counter() - started, 2)
    examples = holdout_examples(result.scores_file, HOLDOUT_SPLIT.path(params))
    run_id = log_to_mlflow(
        params.tracking, pipeline_run_id(params), result, params.evaluate.prompts, examples
    )
    EVALUATE_REPORT.write(params, {**result.metrics(), "run_id": run_id, "score_s": score_s})
    print(
        f"evaluate: perplexity {result.perplexity:.2f} (unigram baseline "
        f"{result.baseline_perplexity:.2f}, ratio {result.perplexity_vs_baseline:.3f}), "
        f"bits per byte {result.bits_per_byte:.3f} (baseline "
        f"{result.baseline_bits_per_byte:.3f}), next-token accuracy "
        f"{result.next_token_accuracy:.3f} over {result.n_tokens} tokens",
        flush=True,
    )
    if result.base_bits_per_byte is not None:
        print(
            f"evaluate: the base model before fine-tuning: bits per byte "
            f"{result.base_bits_per_byte:.3f}, perplexity {result.base_perplexity:.2f}",
            flush=True,
        )
    if result.n_generated:
        print(
            f"evaluate: {result.n_generated} replies: ROUGE-L {result.rouge_l:.3f}, "
            f"chrF {result.chrf:.1f}, distinct-1 {result.distinct_1:.3f}, "
            f"distinct-2 {result.distinct_2:.3f}, {result.mean_reply_words:.1f} words per reply, "
            f"unsafe share {result.unsafe_share:.3f}",
            flush=True,
        )
    return result


evaluate_task = stage_task(run, name="evaluate")

if __name__ == "__main__":
    stage_main(run)
