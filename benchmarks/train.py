"""Training throughput, model FLOPs utilisation and holdout quality: retune's train core against
the plain `transformers` script (benchmarks/baseline_clm.py), on the same machine in one run.

Run: `python -m benchmarks.train` (the default params.yaml model, ~8 min on 2 cores), `--smoke`
(a tiny model, seconds of training), `--config gpt2-small --device cuda --dtype bf16` on a GPU.
Writes benchmarks/results/train.json (or under --out).

How the ratio holds on a noisy machine: retune and the baseline train in two processes that
take turns, `--block-steps` optimizer steps at a time (benchmarks/interleave.py; the order flips
every round), and the fp32 matmul peak is measured between rounds; throughput, their ratio and
MFU are medians over rounds, each round's pair of blocks having seen the same load. retune's
blocks include what its train loop does besides steps (holdout evaluation, checkpoints); data
preparation before the first step is reported apart.

FLOPs per token = 6·N + 12·L·d·T (PaLM's convention; attention counted over the full T×T
matrix), N = the weights of every matmul: 12·L·d² in the blocks plus the V·d lm head. Embedding
lookups and biases are not matmuls and are not counted; the lm head shares its weights with the
token embedding but is counted once, as the matmul it is.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.common import RESULTS, ROOT, command_line, row, write_result
from benchmarks.interleave import Side, take_turns

if TYPE_CHECKING:
    from retune.config import Params

NAME = "train"
TARGET_RATIO = 1.0
TARGET_MFU = 45.0  # per cent of the fp32 matmul peak, default model on CPU

# Dotted params overrides per model size; "default" is params.yaml as it stands.
CONFIGS: dict[str, list[str]] = {
    "default": [],
    "tiny": [
        "train.scratch={vocab_size: 400, n_layer: 2, n_head: 2, n_embd: 32}",
        "train.max_seq_len=64",
        "train.per_device_train_batch_size=4",
        "train.max_steps=6",
        "train.warmup_steps=0",
        "train.logging_steps=2",
        "train.eval_steps=3",
        "train.save_steps=3",
        "train.eval_max_examples=8",
        "scoring.max_examples=16",
        "scoring.batch_size=4",
        "scoring.max_seq_len=64",
    ],
    # GPT-2 small's shape (12 x 768, 1024 positions); the vocabulary is the corpus tokenizer's.
    "gpt2-small": [
        "train.scratch.n_layer=12",
        "train.scratch.n_head=12",
        "train.scratch.n_embd=768",
        "train.max_seq_len=1024",
        "scoring.max_seq_len=1024",
    ],
}
SMOKE_CONVERSATIONS = 400


def flops_per_token(n_layer: int, n_embd: int, vocab: int, seq_len: int) -> tuple[int, int]:
    """(N, training FLOPs per token) of a GPT-2 with 4·d MLPs (see the module docstring)."""
    n = 12 * n_layer * n_embd**2 + vocab * n_embd
    return n, 6 * n + 12 * n_layer * n_embd * seq_len


def matmul_peak(device: str, dtype: str, size: int, seconds: float = 1.0) -> float:
    """FLOP/s of `size`² matmuls run back to back for about `seconds`: the median of the
    timings (each one matmul, or a batch of them on a GPU where one is too short to time).

    A median over a second rather than the best of a few: the training blocks it is divided
    into also last seconds, so on a shared machine both see the same load."""
    import torch

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    a = torch.randn(size, size, device=device, dtype=torch_dtype)
    b = torch.randn(size, size, device=device, dtype=torch_dtype)
    out = torch.matmul(a, b)
    per_timing = 1 if device == "cpu" else 20
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    timings: list[float] = []
    until = time.perf_counter() + seconds
    while len(timings) < 3 or time.perf_counter() < until:
        sync()
        started = time.perf_counter()
        for _ in range(per_timing):
            torch.matmul(a, b, out=out)
        sync()
        timings.append(time.perf_counter() - started)
    return 2 * size**3 * per_timing / statistics.median(timings)


def prepare_split(params: Params, work: Path, smoke: bool) -> tuple[Path, Path]:
    """Run ingest, hygiene and split on `params.paths.incoming` (the tiny sample corpus for
    `smoke`, or when that folder is empty) into `work`; return (train, holdout) files."""
    import dataclasses

    from tasks import hygiene, ingest, sample, split

    incoming = params.paths.incoming.resolve()
    has_data = incoming.is_dir() and any(p.is_file() for p in incoming.rglob("*"))
    paths = {
        f.name: work / Path(getattr(params.paths, f.name)).name
        for f in dataclasses.fields(params.paths)
    }
    if has_data and not smoke:
        paths["incoming"] = incoming
    local = dataclasses.replace(params, paths=dataclasses.replace(params.paths, **paths))
    if smoke:
        local = dataclasses.replace(
            local,
            sample=dataclasses.replace(local.sample, conversations=SMOKE_CONVERSATIONS),
            split=dataclasses.replace(local.split, holdout_fraction=0.2),
        )
    if local.paths.incoming != incoming:
        sample.run(local)
    ingest.run(local)
    hygiene.run(local)
    result = split.run(local)
    return result.train_file, result.holdout_file


def _train_retune(spec: dict[str, Any], baton: Any) -> dict[str, Any]:
    from retune.config import load_params
    from retune.env import configure_environment
    from retune.model.training import train

    configure_environment()
    params = load_params(ROOT / "params.yaml", spec["overrides"])
    work = Path(spec["work"])
    result = train(
        params.train,
        params.seed,
        Path(spec["train_file"]),
        Path(spec["holdout_file"]),
        work / "retune-model",
        work / "retune-checkpoints",
        callbacks=[baton],
    )
    return {
        "model_dir": str(result.model_dir),
        "steps": result.steps,
        "precision": result.precision,
    }


def _train_baseline(spec: dict[str, Any], baton: Any) -> dict[str, Any]:
    from benchmarks.baseline_clm import BaselineConfig, train
    from retune.config import load_params
    from retune.env import configure_environment

    configure_environment()  # offline hub and quiet libraries; no training setting
    params = load_params(ROOT / "params.yaml", spec["overrides"])
    cfg = params.train
    if cfg.max_steps is None:
        raise SystemExit("benchmarks.train compares equal steps: set train.max_steps (or --steps)")
    work = Path(spec["work"])
    out = work / "baseline-model"
    metrics = train(
        BaselineConfig(
            n_layer=cfg.scratch.n_layer,
            n_head=cfg.scratch.n_head,
            n_embd=cfg.scratch.n_embd,
            block_size=cfg.max_seq_len,
            batch_size=cfg.per_device_train_batch_size,
            max_steps=cfg.max_steps,
            learning_rate=cfg.learning_rate,
            warmup_steps=cfg.warmup_steps,
            weight_decay=cfg.weight_decay,
            logging_steps=cfg.logging_steps,
            seed=params.seed,
            bf16=spec["baseline_bf16"],
        ),
        Path(spec["train_file"]),
        work / "retune-checkpoints" / "tokenizer",  # the tokenizer retune trained for this data
        out,
        callbacks=[baton],
    )
    return {
        "model_dir": str(out),
        "steps": int(metrics.get("global_step", cfg.max_steps)),
        "precision": "bf16" if spec["baseline_bf16"] else "fp32",
    }


def holdout_perplexity(
    model_dir: Path, tokenizer_dir: Path, holdout_file: Path, params: Params, device: str
) -> float:
    """Perplexity on the evaluate stage's holdout examples, scored as `evaluate` scores."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from retune.model.scoring import aggregate, score_examples

    model: Any = AutoModelForCausalLM.from_pretrained(model_dir)
    model.to(device)
    # One tokenizer for both models: the same token ids, so per-token perplexities compare.
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    scores = score_examples(
        model,
        tokenizer,
        holdout_file,
        params.scoring.max_examples,
        params.scoring.batch_size,
        params.scoring.max_seq_len,
        log_prefix="bench",
    )
    return float(aggregate(scores)["perplexity"])


@dataclass(frozen=True)
class Setup:
    """How the two sides are run and measured."""

    device: str  # "cpu" or "cuda"
    dtype: str | None  # both sides in this precision; None: retune's setting, baseline fp32
    block_steps: int
    peak_size: int  # side of the square matmuls timed for the peak
    peak_seconds: float

    @property
    def peak_dtype(self) -> str:
        # The yardstick on CPU is the fp32 peak whatever retune trains in.
        return "bf16" if self.device == "cuda" and self.dtype == "bf16" else "fp32"


@dataclass
class Measured:
    retune: Side
    baseline: Side
    peaks: list[float]  # one before each round and one after the last, FLOP/s
    bf16_peaks: list[float]  # CPU runs with bf16: at the same times
    load: str
    perplexity: dict[str, float]


def run_benchmark(
    params: Params,
    overrides: list[str],
    train_file: Path,
    holdout_file: Path,
    work: Path,
    setup: Setup,
) -> Measured:
    """Train both sides in turns under `work`, score both on the holdout."""
    import torch

    from retune.model.training import available_cores, resolve_precision

    torch.set_num_threads(available_cores())
    dtype = setup.dtype
    retune_overrides = [*overrides, f"train.precision={dtype}"] if dtype else list(overrides)
    spec = {
        "overrides": retune_overrides,
        "train_file": str(train_file),
        "holdout_file": str(holdout_file),
        "work": str(work),
        "block_steps": setup.block_steps,
        # The plain script trains in fp32 unless told otherwise, as a user's would.
        "baseline_bf16": dtype == "bf16",
    }
    # With --dtype both sides train in it; else the baseline is fp32 and retune as configured.
    any_bf16 = (dtype or resolve_precision(params.train.precision, setup.device)) == "bf16"

    peaks: list[float] = []
    bf16_peaks: list[float] = []

    def between_rounds() -> str:
        peaks.append(
            matmul_peak(setup.device, setup.peak_dtype, setup.peak_size, setup.peak_seconds)
        )
        if any_bf16 and setup.device == "cpu":
            bf16_peaks.append(
                matmul_peak(setup.device, "bf16", setup.peak_size, setup.peak_seconds)
            )
        return f"peak {peaks[-1] / 1e9:,.0f} GFLOP/s"

    # The baseline reads the tokenizer retune trains: retune prepares first.
    (retune, baseline), load = take_turns(
        {"retune": _train_retune, "baseline": _train_baseline}, spec, between_rounds
    )
    perplexity = {
        side.role: holdout_perplexity(
            Path(str(side.done["model_dir"])),
            work / "retune-checkpoints" / "tokenizer",
            holdout_file,
            params,
            setup.device,
        )
        for side in (retune, baseline)
        if side.done is not None
    }
    return Measured(retune, baseline, peaks, bf16_peaks, load, perplexity)


def result_rows(params: Params, setup: Setup, m: Measured) -> list[dict[str, Any]]:
    """The figures of a finished run, in benchmarks/results' row shape."""
    from transformers import AutoConfig

    retune, baseline = m.retune, m.baseline
    assert retune.done is not None and baseline.done is not None
    cfg = params.train
    config = AutoConfig.from_pretrained(retune.done["model_dir"])
    n, per_token = flops_per_token(
        config.n_layer, config.n_embd, config.vocab_size, cfg.max_seq_len
    )
    pairs = list(zip(retune.blocks, baseline.blocks, strict=True))
    # Round i's peak: the one measured right before it (there is one more, after the last).
    round_peaks = m.peaks[: len(pairs)]
    peak = statistics.median(m.peaks)

    def total_rate(side: Side) -> float:
        return sum(b.tokens for b in side.blocks) / sum(b.seconds for b in side.blocks)

    def mfu(side: Side) -> float:
        return 100 * statistics.median(
            b.rate * per_token / p for b, p in zip(side.blocks, round_peaks, strict=True)
        )

    tokens = {s.role: sum(b.tokens for b in s.blocks) for s in (retune, baseline)}
    threads = f"{retune.done['threads']} / {baseline.done['threads']} torch threads"
    where = f"cpu, {threads} (retune / baseline)" if setup.device == "cpu" else setup.device
    precision = f"retune {retune.done['precision']}, baseline {baseline.done['precision']}"
    shape = (
        f"GPT-2 {config.n_layer}x{config.n_embd}, vocab {config.vocab_size}, seq "
        f"{cfg.max_seq_len}, batch {cfg.per_device_train_batch_size}, {cfg.max_steps} steps; "
        f"{len(pairs)} rounds of {setup.block_steps} steps, alternating; {where}; {precision}"
    )
    flops = (
        f"flops/token = 6N + 12*L*d*T = {per_token / 1e6:.1f}M, N = {n / 1e6:.2f}M matmul "
        f"weights (blocks + lm head); against the {setup.peak_dtype} peak"
    )
    retune_note = f"median over rounds of block FLOP/s / that round's peak; {flops}"
    if m.bf16_peaks:
        share = statistics.median(
            b.rate * per_token / p
            for b, p in zip(retune.blocks, m.bf16_peaks[: len(pairs)], strict=True)
        )
        retune_note += f"; {100 * share:.0f}% of the bf16 matmul peak"
    rows = [
        row(
            "retune_tokens_per_s",
            statistics.median(b.rate for b in retune.blocks),
            "tokens/s",
            note=f"median block; whole loop incl. in-loop eval and checkpoints "
            f"{total_rate(retune):,.0f}; {shape}",
        ),
        row(
            "baseline_tokens_per_s",
            statistics.median(b.rate for b in baseline.blocks),
            "tokens/s",
            note=f"median block; whole loop {total_rate(baseline):,.0f}; plain Trainer recipe, "
            "GPT2Config defaults (dropout 0.1, gelu_new)",
        ),
        row(
            "throughput_ratio",
            statistics.median(r.rate / b.rate for r, b in pairs),
            "x",
            target=f">= {TARGET_RATIO}",
            note=f"retune / baseline non-padding tokens/s, median of per-round ratios; "
            f"whole-loop ratio {total_rate(retune) / total_rate(baseline):.2f}",
        ),
        row(
            "matmul_peak",
            peak / 1e9,
            "GFLOP/s",
            note=f"{setup.peak_dtype} torch.matmul {setup.peak_size}x{setup.peak_size} for "
            f"{setup.peak_seconds:g} s before each round and after the last: median of "
            f"{len(m.peaks)} ({min(m.peaks) / 1e9:,.0f}-{max(m.peaks) / 1e9:,.0f}); "
            f"load average {m.load}",
        ),
    ]
    if m.bf16_peaks:
        rows.append(
            row(
                "matmul_peak_bf16",
                statistics.median(m.bf16_peaks) / 1e9,
                "GFLOP/s",
                note="bf16 torch.matmul, same size, before each round; for reference",
            )
        )
    rows += [
        row(
            "retune_mfu",
            mfu(retune),
            "%",
            target=f">= {TARGET_MFU:g}%" if setup.device == "cpu" else None,
            note=retune_note,
        ),
        row("baseline_mfu", mfu(baseline), "%", note=flops),
    ]
    if m.perplexity:
        rows += [
            row(
                "retune_holdout_perplexity",
                m.perplexity["retune"],
                "perplexity",
                target="<= baseline",
                note=f"up to {params.scoring.max_examples} holdout examples, scored as "
                f"`evaluate` scores them; both saw {tokens['retune']:,} / "
                f"{tokens['baseline']:,} tokens",
            ),
            row("baseline_holdout_perplexity", m.perplexity["baseline"], "perplexity"),
        ]
    rows += [
        row(
            "retune_prep_s",
            retune.prep_s,
            "s",
            note="before the first step: tokenizer training, packing, model and Trainer setup",
        ),
        row(
            "baseline_prep_s",
            baseline.prep_s,
            "s",
            note="before the first step: tokenize, group, model and Trainer setup",
        ),
    ]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model and corpus, 6 steps")
    parser.add_argument("--config", choices=sorted(CONFIGS), help="model size (default: default)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--dtype",
        choices=("fp32", "bf16"),
        help="both sides in this precision (default: retune's train.precision, baseline fp32)",
    )
    parser.add_argument("--steps", type=int, help="optimizer steps (default: train.max_steps)")
    parser.add_argument("--block-steps", type=int, help="steps per turn (default 10; smoke 2)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="params override"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = parser.parse_args(argv)

    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # children inherit it: a GPU box trains on CPU
    from retune.config import load_params
    from retune.env import configure_environment

    configure_environment()
    config = args.config or ("tiny" if args.smoke else "default")
    # The plain Trainer script trains on every token for a number of steps: retune does the same
    # here, so the two are compared on one objective and one schedule.
    overrides = [*CONFIGS[config], "train.loss_on=all", *args.set]
    if args.steps:
        overrides.append(f"train.max_steps={args.steps}")
    params = load_params(ROOT / "params.yaml", overrides)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("error: --device cuda but torch sees no GPU", file=sys.stderr)
            return 1
    setup = Setup(
        device=args.device,
        dtype=args.dtype,
        block_steps=args.block_steps or (2 if args.smoke else 10),
        peak_size=1024 if args.smoke else (2048 if args.device == "cpu" else 8192),
        peak_seconds=0.2 if args.smoke else 1.0,
    )
    work = Path(tempfile.mkdtemp(prefix="retune-bench-train-"))
    try:
        train_file, holdout_file = prepare_split(params, work, smoke=args.smoke)
        measured = run_benchmark(params, overrides, train_file, holdout_file, work, setup)
        rows = result_rows(params, setup, measured)
    finally:
        if args.keep:
            print(f"bench: scratch folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    write_result(NAME, command_line(NAME, argv), rows, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
