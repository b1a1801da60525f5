"""Scratch model, pretrained base zero-shot, LoRA and full fine-tuning at one token budget.

Holdout bits per byte, train wall time, tokens/s and peak RSS of each, on the sample corpus.

Run: `python -m benchmarks.finetune` (~30-40 min on 2 CPU cores: 30 steps x 4 x 256 tokens
per trained row), `--smoke` (3 steps x 2 x 128 tokens, a few minutes: every row runs),
`--rows scratch,smollm2_lora` for some rows, `--steps N` for another budget.
Writes benchmarks/results/finetune.json (or under --out).

The rows (each through retune's own stage commands, `retune <stage> --params FILE`):
  scratch            train.base_model: scratch, the default GPT-2 trained from random weights
  smollm2_zero_shot  SmolLM2-135M-Instruct as `retune base` prepares it, not trained: the
                     evaluate stage with paths.model at the base folder
  smollm2_lora       that base, train.adapter: lora
  smollm2_full       that base, train.adapter: none (every weight), when it fits in memory
Every row trains on the same split for the same tokens (train.max_steps x
per_device_train_batch_size x max_seq_len, each model's own tokens) with train.loss_on:
replies, and is scored by `retune evaluate` on the same holdout examples with the same
scoring settings and no generation. Bits per byte (reports/evaluate.json) is the holdout NLL
of the scored tokens (the replies: evaluate scores what train.loss_on trains) per UTF-8 byte
of their text, so models with different tokenizers compare on the same text. The learning
rate is the one setting that differs: what suits each (LEARNING_RATES, `--lr ROW=VALUE`).

Works in a scratch folder: a copy of the working tree (as benchmarks/reruns.py makes it), whose
code and params.yaml every command runs with, so edits to the tree during the run change
nothing; the data, prepared there once (sample, ingest, hygiene, validate, split); one params
file per row, with its own paths.model, paths.checkpoints and paths.reports; an MLflow store.
The base is prepared with `retune base` into the repository's models/base (a no-op when it is
there), which the rows read. The zero-shot row keeps train.base_model: scratch, so evaluate
does not score the base a second time as "the base before fine-tuning"; the trained SmolLM2
rows do, which checks that figure against the zero-shot row's.

Train wall time and peak RSS are those of the `retune train` process
(`benchmarks.common.measure`: start, data, model load, steps, the final checkpoint and save);
tokens/s is train's own figure (reports/train.json: trained tokens over the Trainer's loop
time, its in-loop eval and checkpoint included), the steps alone in the note. Target: LoRA's
bits per byte below the scratch model's and the zero-shot base's.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import (
    RESULTS,
    ROOT,
    Measured,
    bench_env,
    command_line,
    measure,
    read_report,
    row,
    untimed,
    write_params,
    write_result,
)
from benchmarks.reruns import RETUNE, copy_tree

NAME = "finetune"
BASE_NAME = "smollm2-135m-instruct"
BASE_DIR = ROOT / "models" / "base" / BASE_NAME
TREE = "tree"  # the copy of the working tree inside the scratch folder


@dataclass(frozen=True)
class Budget:
    """What every trained row gets, and how every row is scored."""

    steps: int
    batch: int
    seq_len: int
    conversations: int  # sample.conversations
    holdout_fraction: float
    eval_examples: int  # scoring.max_examples
    in_loop_eval_examples: int  # train.eval_max_examples (one in-loop eval, at the last step)

    @property
    def tokens(self) -> int:
        return self.steps * self.batch * self.seq_len

    def describe(self) -> str:
        return (
            f"{self.steps} steps x {self.batch} x {self.seq_len} tokens = {self.tokens:,} "
            "tokens per trained row"
        )


FULL = Budget(
    steps=30,
    batch=4,
    seq_len=256,
    conversations=1_500,
    holdout_fraction=0.1,
    eval_examples=100,
    in_loop_eval_examples=20,
)
SMOKE = Budget(
    steps=3,
    batch=2,
    seq_len=128,
    conversations=400,
    holdout_fraction=0.2,
    eval_examples=8,
    in_loop_eval_examples=4,
)


@dataclass(frozen=True)
class Row:
    key: str  # metric prefix
    label: str
    # Params overrides of its training; None: not trained, the base scored as it is.
    train: dict[str, Any] | None


ROWS = (
    Row("scratch", "(a) scratch GPT-2", {"train.base_model": "scratch", "train.adapter": "none"}),
    Row("smollm2_zero_shot", "(b) SmolLM2-135M-Instruct zero-shot", None),
    Row(
        "smollm2_lora",
        "(c) SmolLM2 + LoRA on replies",
        {"train.base_model": str(BASE_DIR), "train.adapter": "lora"},
    ),
    Row(
        "smollm2_full",
        "(d) SmolLM2 full fine-tune",
        {"train.base_model": str(BASE_DIR), "train.adapter": "none"},
    ),
)
ROW_KEYS = tuple(r.key for r in ROWS)
# Per trained row: the scratch model's params.yaml rate; a LoRA adapter takes a high one (its
# update starts at zero and is scaled by alpha / r); every weight of a pretrained model a low
# one, or it forgets what it knew within a few steps.
LEARNING_RATES = {"scratch": 2.0e-3, "smollm2_lora": 1.0e-3, "smollm2_full": 1.0e-4}
# Full fine-tuning holds fp32 weights, gradients and AdamW's two moments (16 bytes a weight)
# plus activations: what `fits` asks of the free memory besides the weights' file size x 4.
ACTIVATIONS_GIB = 3.0
_PRECISION = re.compile(r"tokens, (bf16|fp32) on ")
_STEP = re.compile(r"train: step (\d+)/\d+ loss ")
_TARGET_SHARE = re.compile(r"loss on \w+ \((\d+)% of the tokens\)")


def common_overrides(work: Path, budget: Budget) -> dict[str, Any]:
    """Params shared by every row: data, tracking and the budget, all inside `work`."""
    data = work / "data"
    return {
        "paths.incoming": str(data / "incoming"),
        "paths.prepared": str(data / "prepared"),
        "paths.quarantine": str(data / "quarantine"),
        "paths.clean": str(data / "clean"),
        "paths.split": str(data / "split"),
        "paths.model": str(work / "prep" / "model"),
        "paths.checkpoints": str(work / "prep" / "checkpoints"),
        "paths.reports": str(work / "prep" / "reports"),
        "paths.base_models": str(BASE_DIR.parent),
        "tracking.uri": f"sqlite:///{work / 'mlruns' / 'mlflow.db'}",
        "tracking.artifacts": str(work / "mlruns" / "artifacts"),
        "sample.conversations": budget.conversations,
        "validate.min_examples": 50,
        "split.holdout_fraction": budget.holdout_fraction,
        "train.max_steps": budget.steps,
        "train.per_device_train_batch_size": budget.batch,
        "train.gradient_accumulation_steps": 1,
        "train.max_seq_len": budget.seq_len,
        "train.warmup_steps": max(1, budget.steps // 10),
        "train.logging_steps": max(1, budget.steps // 6),
        # One in-loop eval and one checkpoint, at the last step: the same for every row.
        "train.eval_steps": budget.steps,
        "train.save_steps": budget.steps,
        "train.eval_max_examples": budget.in_loop_eval_examples,
        "train.loss_on": "replies",
        "train.resume": False,
        "scoring.max_examples": budget.eval_examples,
        "scoring.max_seq_len": budget.seq_len,
        "evaluate.generation_examples": 0,
        "evaluate.prompts": 0,
    }


def row_params(work: Path, budget: Budget, r: Row, lr: dict[str, float]) -> Path:
    """The row's params file: the shared settings, its training and its own model/reports."""
    own = work / r.key
    overrides = common_overrides(work, budget) | {
        "paths.model": str(own / "model" if r.train is not None else BASE_DIR),
        "paths.checkpoints": str(own / "checkpoints"),
        "paths.reports": str(own / "reports"),
    }
    if r.train is not None:
        overrides |= r.train | {"train.learning_rate": lr[r.key]}
    return write_params(work / f"params-{r.key}.yaml", overrides, base=work / TREE / "params.yaml")


def stage(stage_name: str, params: Path, work: Path) -> Measured:
    """`retune <stage_name> --params <params>` with the copy's code."""
    return measure([*RETUNE, stage_name, "--params", str(params)], cwd=work / TREE, env=bench_env())


def prepare(work: Path, budget: Budget, rows: list[Row], lr: dict[str, float]) -> dict[str, Path]:
    """The copy of the tree, every row's params file (a bad one fails before any work), the
    base (`retune base`) and the data (sample ... split), once; the params file of each row."""
    copy_tree(work / TREE)
    params = write_params(
        work / "params-prep.yaml", common_overrides(work, budget), base=work / TREE / "params.yaml"
    )
    files = {r.key: row_params(work, budget, r, lr) for r in rows}
    env = bench_env()
    for args in (["base", BASE_NAME], ["sample"], ["ingest"], ["hygiene"], ["validate"], ["split"]):
        print(f"finetune: {' '.join(args)}", flush=True)
        untimed([*RETUNE, *args, "--params", str(params)], work / TREE, env)
    return files


def fits(base: Path) -> tuple[bool, str]:
    """Whether full fine-tuning of `base` should fit in the free memory, and why."""
    import psutil

    weights = sum(p.stat().st_size for p in base.glob("*.safetensors")) or sum(
        p.stat().st_size for p in base.glob("*.bin")
    )
    need = 4 * weights + ACTIVATIONS_GIB * 2**30
    free = psutil.virtual_memory().available
    why = f"needs ~{need / 2**30:.1f} GiB (4 x {weights / 2**30:.2f} GiB of weights + "
    why += f"{ACTIVATIONS_GIB:g} GiB), {free / 2**30:.1f} GiB free"
    return need <= free, why


def _failure(m: Measured) -> str:
    last = [line for line in m.output.splitlines() if line.strip()][-3:]
    return f"exit {m.returncode}: " + " / ".join(last)[-400:]


@dataclass
class Outcome:
    row: Row
    bits_per_byte: float = math.nan
    train: Measured | None = None
    evaluate: Measured | None = None
    train_report: dict[str, Any] | None = None
    evaluate_report: dict[str, Any] | None = None
    skipped: str | None = None  # why the row did not run or failed

    @property
    def tokens_per_s(self) -> float:
        return float((self.train_report or {}).get("tokens_per_s", math.nan))

    @property
    def peak_rss_mb(self) -> float:
        return self.train.peak_rss_mb if self.train is not None else math.nan


def run_row(work: Path, r: Row, params: Path) -> Outcome:
    """Train (unless the row is zero-shot) and evaluate with the row's `params`."""
    out = Outcome(r)
    if r.key == "smollm2_full":
        ok, why = fits(BASE_DIR)
        print(f"finetune: full fine-tuning {why}", flush=True)
        if not ok:
            out.skipped = f"not run: {why}"
            return out
    print(f"\nfinetune: {r.label}", flush=True)
    if r.train is not None:
        out.train = stage("train", params, work)
        if out.train.returncode != 0:
            out.skipped = f"train failed ({_failure(out.train)})"
            return out
        out.train_report = read_report(work / r.key, "train")
    out.evaluate = stage("evaluate", params, work)
    if out.evaluate.returncode != 0:
        out.skipped = f"evaluate failed ({_failure(out.evaluate)})"
        return out
    out.evaluate_report = read_report(work / r.key, "evaluate")
    out.bits_per_byte = float(out.evaluate_report.get("bits_per_byte", math.nan))
    return out


def _found(pattern: re.Pattern[str], m: Measured | None) -> str | None:
    found = pattern.search(m.output) if m is not None else None
    return found.group(1) if found else None


def bpb_note(o: Outcome, lr: dict[str, float]) -> str:
    if o.skipped:
        return o.skipped
    ev = o.evaluate_report or {}
    parts = [
        f"{ev.get('n_examples', 0)} holdout examples, {ev.get('n_tokens', 0):,} tokens, "
        f"{ev.get('n_bytes', 0):,} bytes scored; perplexity {ev.get('perplexity', math.nan):.2f}",
    ]
    if o.row.train is not None:
        parts.append(f"lr {lr[o.row.key]:g}")
    if "base_bits_per_byte" in ev:
        parts.append(f"its base before training {ev['base_bits_per_byte']:.4f}")
    if o.evaluate is not None:
        parts.append(f"evaluate {o.evaluate.wall_s:.0f} s")
    return "; ".join(parts)


def train_note(o: Outcome) -> str:
    rep = o.train_report or {}
    parts = [f"{rep.get('steps')} steps, train_loss {rep.get('train_loss', math.nan):.3f}"]
    if rep.get("eval_loss") is not None:
        parts.append(f"eval_loss {rep['eval_loss']:.3f}")
    share = _found(_TARGET_SHARE, o.train)
    if share:
        parts.append(f"loss on {share}% of the tokens")
    precision = _found(_PRECISION, o.train)
    if precision:
        parts.append(precision)
    if rep.get("trainable_params") is not None:
        parts.append(
            f"{rep['trainable_params']:,} parameters train "
            f"({100 * float(rep.get('trainable_share') or 0):.2f}%)"
        )
    return ", ".join(parts)


def step_tokens_per_s(o: Outcome, budget: Budget) -> float:
    """Tokens/s of the steps alone: from the first progress line train prints to the last (the
    final step's, printed before its eval and checkpoint), by when the lines were printed."""
    logged = [
        (t, int(found.group(1)))
        for t, line in (o.train.lines if o.train is not None else ())
        if (found := _STEP.search(line))
    ]
    if len(logged) < 2 or logged[-1][1] == logged[0][1]:
        return math.nan
    (t0, s0), (t1, s1) = logged[0], logged[-1]
    return (s1 - s0) * budget.batch * budget.seq_len / (t1 - t0)


def result_rows(outcomes: list[Outcome], budget: Budget, lr: dict[str, float]) -> list[dict]:
    by_key = {o.row.key: o for o in outcomes}
    rows = [
        row(
            "budget_tokens",
            budget.tokens,
            "tokens",
            note=f"{budget.describe()} (each model's own tokenizer); train.loss_on replies; "
            f"scored: scoring.max_examples {budget.eval_examples}, scoring.max_seq_len "
            f"{budget.seq_len}, no generation; sample corpus of {budget.conversations:,} "
            f"conversations, holdout fraction {budget.holdout_fraction:g}. The bytes scored "
            "differ a little between tokenizer families: each reply's closing marker is its "
            "template's own, and a window cuts long conversations by each tokenizer's count",
        )
    ]
    lora = by_key.get("smollm2_lora")
    others = [
        by_key[k].bits_per_byte
        for k in ("scratch", "smollm2_zero_shot")
        if k in by_key and not math.isnan(by_key[k].bits_per_byte)
    ]
    for o in outcomes:
        target = None
        if o is lora and others:
            target = f"< {min(others):.4f} (scratch and zero-shot)"
        rows.append(
            row(
                f"{o.row.key}_bits_per_byte",
                o.bits_per_byte,
                "bits/byte",
                target=target,
                note=f"{o.row.label}: {bpb_note(o, lr)}",
            )
        )
    for o in outcomes:
        if o.row.train is None or o.train is None or o.skipped:
            continue
        rows += [
            row(f"{o.row.key}_train_wall", o.train.wall_s, "s", note=train_note(o)),
            row(
                f"{o.row.key}_train_tokens_per_s",
                o.tokens_per_s,
                "tokens/s",
                note="reports/train.json: trained tokens / the Trainer loop's time (in-loop "
                f"eval and checkpoint included); the steps alone "
                f"{step_tokens_per_s(o, budget):,.0f} (from train's first progress line to "
                "its last)",
            ),
            row(
                f"{o.row.key}_train_peak_rss",
                o.peak_rss_mb,
                "MB",
                note="the `retune train` process tree",
            ),
        ]
    full = by_key.get("smollm2_full")
    if lora and full and lora.train and full.train and not (lora.skipped or full.skipped):
        rows += [
            row(
                "lora_vs_full_tokens_per_s",
                lora.tokens_per_s / full.tokens_per_s,
                "x",
                note=f"LoRA {lora.tokens_per_s:,.0f} / full {full.tokens_per_s:,.0f} tokens/s, "
                "same base and budget; the steps alone "
                f"{step_tokens_per_s(lora, budget) / step_tokens_per_s(full, budget):.2f}x",
            ),
            row(
                "lora_vs_full_peak_rss",
                lora.peak_rss_mb / full.peak_rss_mb,
                "x",
                note=f"LoRA {lora.peak_rss_mb:,.0f} / full {full.peak_rss_mb:,.0f} MB",
            ),
        ]
    return rows


def _learning_rates(items: list[str], parser: argparse.ArgumentParser) -> dict[str, float]:
    rates = dict(LEARNING_RATES)
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in rates:
            parser.error(f"--lr takes ROW=VALUE with ROW one of {', '.join(rates)}, not {item!r}")
        rates[key] = float(value)
    return rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny budget; every row runs")
    parser.add_argument("--rows", help=f"comma-separated, of {', '.join(ROW_KEYS)} (default all)")
    parser.add_argument("--steps", type=int, help="train.max_steps of every trained row")
    parser.add_argument(
        "--lr", action="append", default=[], metavar="ROW=VALUE", help="a row's learning rate"
    )
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = parser.parse_args(argv)
    keys = [k.strip() for k in args.rows.split(",")] if args.rows else list(ROW_KEYS)
    unknown = [k for k in keys if k not in ROW_KEYS]
    if unknown or not keys:
        parser.error(f"--rows takes {', '.join(ROW_KEYS)}, not {args.rows!r}")
    if args.workdir is not None and args.workdir.exists() and any(args.workdir.iterdir()):
        parser.error(f"--workdir {args.workdir} is not empty")
    lr = _learning_rates(args.lr, parser)
    budget = SMOKE if args.smoke else FULL
    if args.steps:
        budget = dataclasses.replace(budget, steps=args.steps)
    work = (args.workdir or Path(tempfile.mkdtemp(prefix="retune-bench-finetune-"))).resolve()
    print(f"finetune: {budget.describe()}; rows {', '.join(keys)}; in {work}", flush=True)
    try:
        work.mkdir(parents=True, exist_ok=True)
        rows = [r for r in ROWS if r.key in keys]
        files = prepare(work, budget, rows, lr)
        outcomes = [run_row(work, r, files[r.key]) for r in rows]
    finally:
        if args.keep or args.workdir is not None:
            print(f"finetune: scratch folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    write_result(NAME, command_line(NAME, argv), result_rows(outcomes, budget, lr), args.out)
    # A row that broke is in the result, noted; the full fine-tune may simply not fit.
    broken = [o.row.key for o in outcomes if o.skipped and not o.skipped.startswith("not run")]
    return 1 if broken else 0


if __name__ == "__main__":
    raise SystemExit(main())
