"""LoRA fine-tuning throughput and memory of a pretrained chat model: retune's train core against
the plain peft + Trainer script (benchmarks/baseline_lora.py), and against retune's own full
fine-tune of the same base, on the same machine in one interleaved run.

Run: `python -m benchmarks.lora` (SmolLM2-135M-Instruct as `retune base` prepares it, 40 steps x
4 x 256 tokens per side: ~30-40 min on 2 fp32 CPU cores, ~10 in bf16), `--no-full` (the two
LoRA sides only), `--smoke` (with `--base`, a tiny save_pretrained model: seconds),
`--device cuda` on a GPU. Writes benchmarks/results/lora.json (or under --out).

The three sides train in their own processes, taking turns `--block-steps` steps at a time
(benchmarks/interleave.py, the order rotating every round); the matmul peak of the precision
trained in is measured between rounds. Tokens/s, ratios and MFU are medians over rounds. Every
side has the same base, sequence length, batch, steps and schedule; the two LoRA sides the same
rank, alpha, dropout and target modules (retune's defaults for the family). retune trains on
the replies (its default; the plain script on every token, as run_clm does: the compute is the
same) and does what its train stage always does besides: placeholder-token rows, the in-loop
holdout eval and checkpoint at the last step, the merge on save. Peak RSS is each process's
whole life (imports, data, model, steps, saving).

FLOPs per token (PaLM's convention, attention over the full T x T matrix), N = the weights of
every matmul (attention and MLP projections, the lm head; embedding lookups are not matmuls):
full fine-tune 6N + 12·L·d·T; LoRA 4N + 6·N_adapter + 12·L·d·T, since frozen weights need the
forward (2N) and the gradient of their input (2N) but no gradient of their own (2N saved).
MFU is against the peak of the precision actually used: the one retune's `train.precision`
resolves to (`auto`: bf16 autocast on a CPU with AMX or AVX512-BF16 and on a bf16 GPU, else
fp32; `--dtype` sets it), in which the plain script trains too (`TrainingArguments(bf16=True)`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from benchmarks.common import RESULTS, ROOT, command_line, row, write_result
from benchmarks.interleave import Side, take_turns
from benchmarks.reruns import RETUNE
from benchmarks.train import _train_retune, matmul_peak, prepare_split

if TYPE_CHECKING:
    from retune.config import Params

NAME = "lora"
TARGET_RATIO = 1.0
BASE_NAME = "smollm2-135m-instruct"
BASE_DIR = ROOT / "models" / "base" / BASE_NAME
LORA_LR = 1.0e-3  # an adapter starts at zero: a high rate (benchmarks/finetune.py's)
FULL_LR = 1.0e-4  # every weight of a pretrained model: a low one


@dataclass(frozen=True)
class Budget:
    steps: int
    batch: int
    seq_len: int
    block_steps: int
    peak_size: int
    peak_seconds: float


FULL_BUDGET = Budget(
    steps=40, batch=4, seq_len=256, block_steps=4, peak_size=2048, peak_seconds=1.0
)
SMOKE = Budget(steps=4, batch=2, seq_len=64, block_steps=2, peak_size=512, peak_seconds=0.2)


def overrides(base: Path, budget: Budget, adapter: str, dtype: str | None) -> list[str]:
    """The train settings of one retune side."""
    return [
        f"train.base_model={base}",
        f"train.adapter={adapter}",
        f"train.learning_rate={LORA_LR if adapter == 'lora' else FULL_LR}",
        f"train.max_steps={budget.steps}",
        f"train.per_device_train_batch_size={budget.batch}",
        "train.gradient_accumulation_steps=1",
        f"train.max_seq_len={budget.seq_len}",
        f"train.warmup_steps={max(1, budget.steps // 10)}",
        f"train.logging_steps={max(1, budget.steps // 4)}",
        # One in-loop eval and one checkpoint, at the last step (the last block has them).
        f"train.eval_steps={budget.steps}",
        f"train.save_steps={budget.steps}",
        "train.eval_max_examples=20",
        "train.resume=false",
        *([f"train.precision={dtype}"] if dtype else []),
    ]


def _retune_lora(spec: dict[str, Any], baton: Any) -> dict[str, Any]:
    sub = spec | {"overrides": spec["lora"], "work": str(Path(spec["work"]) / "lora")}
    return _train_retune(sub, baton)


def _retune_full(spec: dict[str, Any], baton: Any) -> dict[str, Any]:
    sub = spec | {"overrides": spec["full"], "work": str(Path(spec["work"]) / "full")}
    return _train_retune(sub, baton)


def _peft_lora(spec: dict[str, Any], baton: Any) -> dict[str, Any]:
    from benchmarks.baseline_lora import LoraBaselineConfig, train
    from retune.config import load_params
    from retune.env import configure_environment

    configure_environment()  # offline hub and quiet libraries; no training setting
    cfg = load_params(ROOT / "params.yaml", spec["lora"]).train
    assert cfg.max_steps is not None
    out = Path(spec["work"]) / "peft" / "model"
    metrics = train(
        LoraBaselineConfig(
            block_size=cfg.max_seq_len,
            batch_size=cfg.per_device_train_batch_size,
            max_steps=cfg.max_steps,
            learning_rate=cfg.learning_rate,
            warmup_steps=cfg.warmup_steps,
            weight_decay=cfg.weight_decay,
            logging_steps=cfg.logging_steps,
            seed=spec["seed"],
            r=cfg.lora.r,
            alpha=cfg.lora.alpha,
            dropout=cfg.lora.dropout,
            target_modules=tuple(spec["target_modules"]),
            bf16=spec["bf16"],
        ),
        Path(spec["train_file"]),
        Path(spec["base"]),
        out,
        callbacks=[baton],
    )
    return {
        "model_dir": str(out),
        "steps": int(metrics.get("global_step", cfg.max_steps)),
        "precision": "bf16" if spec["bf16"] else "fp32",
        "trainable": None,
    }


SIDES = {"retune_lora": _retune_lora, "peft_lora": _peft_lora, "retune_full": _retune_full}


def _dims(config: Any) -> tuple[int, int, int, int]:
    """(hidden size, query width, key/value width, MLP width) of a Llama-style decoder."""
    d = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q = config.num_attention_heads * head_dim
    return d, q, config.num_key_value_heads * head_dim, config.intermediate_size


def matmul_weights(config: Any) -> int:
    """N: the weights of every matmul of a Llama-style decoder (q/k/v/o, gate/up/down, lm head)."""
    d, q, kv, ffn = _dims(config)
    per_layer = d * q + 2 * d * kv + q * d + 3 * d * ffn
    return config.num_hidden_layers * per_layer + config.vocab_size * d


def adapter_weights(config: Any, r: int, targets: list[str]) -> int:
    """The LoRA weights on `targets` (A: r x in, B: out x r per adapted projection)."""
    d, q, kv, ffn = _dims(config)
    shapes = {
        "q_proj": (d, q),
        "k_proj": (d, kv),
        "v_proj": (d, kv),
        "o_proj": (q, d),
        "gate_proj": (d, ffn),
        "up_proj": (d, ffn),
        "down_proj": (ffn, d),
    }
    return config.num_hidden_layers * sum(r * (i + o) for i, o in (shapes[t] for t in targets))


def flops_per_token(config: Any, seq_len: int, lora: tuple[int, list[str]] | None) -> int:
    """Training FLOPs per token (module docstring): full fine-tune, or LoRA (rank, targets)."""
    n = matmul_weights(config)
    attention = 12 * config.num_hidden_layers * config.hidden_size * seq_len
    if lora is None:
        return 6 * n + attention
    return 4 * n + 6 * adapter_weights(config, *lora) + attention


def ensure_base(base: Path) -> None:
    """`retune base` for the default base when its folder is missing (a no-op otherwise)."""
    if (base / "config.json").is_file():
        return
    if base != BASE_DIR:
        raise SystemExit(f"error: --base {base}: no config.json there (a save_pretrained folder)")
    print(f"lora: preparing {BASE_NAME} with `retune base` (once)", flush=True)
    subprocess.run([*RETUNE, "base", BASE_NAME], cwd=ROOT, check=True)


@dataclass
class Measured:
    sides: dict[str, Side]
    peaks: list[float]
    load: str
    peak_dtype: str
    targets: list[str]  # the LoRA target modules both LoRA sides adapted


def run_benchmark(
    params: Params,
    base: Path,
    budget: Budget,
    roles: list[str],
    train_file: Path,
    holdout_file: Path,
    work: Path,
    device: str,
    dtype: str | None,
) -> Measured:
    """Train the `roles` in turns under `work`."""
    import torch
    from transformers import AutoConfig

    from retune.model.adapters import target_modules
    from retune.model.training import available_cores

    torch.set_num_threads(available_cores())

    # target_modules reads the family off model.config: the config alone will do.
    targets = target_modules(
        SimpleNamespace(config=AutoConfig.from_pretrained(base)), params.train.lora
    )
    lora = overrides(base, budget, "lora", dtype)
    spec = {
        "lora": lora,
        "full": overrides(base, budget, "none", dtype),
        "target_modules": targets,
        "base": str(base),
        "seed": params.seed,
        "train_file": str(train_file),
        "holdout_file": str(holdout_file),
        "work": str(work),
        "block_steps": budget.block_steps,
    }
    from retune.model.training import resolve_precision

    # The precision retune's train resolves (train.precision, or --dtype) is the one both
    # LoRA sides train in and the one whose matmul peak the MFU is against.
    peak_dtype = resolve_precision(dtype or params.train.precision, device)
    spec["bf16"] = peak_dtype == "bf16"
    peaks: list[float] = []

    def between_rounds() -> str:
        peaks.append(matmul_peak(device, peak_dtype, budget.peak_size, budget.peak_seconds))
        return f"peak {peaks[-1] / 1e9:,.0f} GFLOP/s"

    handles, load = take_turns({r: SIDES[r] for r in roles}, spec, between_rounds, print_every=2)
    return Measured({s.role: s for s in handles}, peaks, load, peak_dtype, targets)


def result_rows(params: Params, base: Path, budget: Budget, m: Measured) -> list[dict[str, Any]]:
    """The figures of a finished run, in benchmarks/results' row shape."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base)
    targets = m.targets
    lora_per_token = flops_per_token(config, budget.seq_len, (params.train.lora.r, targets))
    full_per_token = flops_per_token(config, budget.seq_len, None)
    rounds = len(m.sides["retune_lora"].blocks)
    round_peaks = m.peaks[:rounds]

    def rate(role: str) -> float:
        return statistics.median(b.rate for b in m.sides[role].blocks)

    def ratio(a: str, b: str) -> float:
        pairs = zip(m.sides[a].blocks, m.sides[b].blocks, strict=True)
        return statistics.median(x.rate / y.rate for x, y in pairs)

    def mfu(role: str, per_token: int) -> float:
        blocks = zip(m.sides[role].blocks, round_peaks, strict=True)
        return 100 * statistics.median(b.rate * per_token / p for b, p in blocks)

    def rss_gb(role: str) -> float:
        return float(m.sides[role].finished["peak_rss_bytes"]) / 1e9

    shape = (
        f"{base.name} ({type(config).__name__}, {config.num_hidden_layers} x "
        f"{config.hidden_size}), seq {budget.seq_len}, batch {budget.batch}, {budget.steps} "
        f"steps; {rounds} rounds of {budget.block_steps} steps, rotating; LoRA r "
        f"{params.train.lora.r} alpha {params.train.lora.alpha} on {', '.join(targets)}; "
        f"{m.sides['retune_lora'].finished['threads']} torch threads; "
        f"{m.sides['retune_lora'].finished['precision']}"
    )
    flops = (
        f"LoRA {lora_per_token / 1e6:.0f}M flops/token (4N + 6N_adapter + 12LdT), full "
        f"{full_per_token / 1e6:.0f}M (6N + 12LdT), N = {matmul_weights(config) / 1e6:.1f}M"
    )
    rows = [
        row(
            "retune_lora_tokens_per_s",
            rate("retune_lora"),
            "tokens/s",
            note=f"median block, in-loop eval, checkpoint and merge included; {shape}",
        ),
        row(
            "peft_lora_tokens_per_s",
            rate("peft_lora"),
            "tokens/s",
            note="median block; the plain peft + Trainer script (benchmarks/baseline_lora.py)",
        ),
        row(
            "lora_throughput_ratio",
            ratio("retune_lora", "peft_lora"),
            "x",
            target=f">= {TARGET_RATIO}",
            note="retune / plain script non-padding tokens/s, median of per-round ratios",
        ),
        row(
            "retune_lora_peak_rss",
            rss_gb("retune_lora"),
            "GB",
            target="<= plain script",
            note="the process's peak RSS (VmHWM), imports to saved model",
        ),
        row("peft_lora_peak_rss", rss_gb("peft_lora"), "GB"),
    ]
    if "retune_full" in m.sides:
        rows += [
            row(
                "retune_full_tokens_per_s",
                rate("retune_full"),
                "tokens/s",
                note="median block; retune, train.adapter: none, same base and budget",
            ),
            row(
                "lora_vs_full_ratio",
                ratio("retune_lora", "retune_full"),
                "x",
                note="retune LoRA / retune full fine-tune tokens/s, median of per-round ratios",
            ),
            row("retune_full_peak_rss", rss_gb("retune_full"), "GB"),
        ]
    rows += [
        row(
            "matmul_peak",
            statistics.median(m.peaks) / 1e9,
            "GFLOP/s",
            note=f"{m.peak_dtype} torch.matmul {budget.peak_size}^2 for {budget.peak_seconds:g} s "
            f"before each round and after the last: median of {len(m.peaks)} "
            f"({min(m.peaks) / 1e9:,.0f}-{max(m.peaks) / 1e9:,.0f}); load average {m.load}",
        ),
        row(
            "retune_lora_mfu",
            mfu("retune_lora", lora_per_token),
            "%",
            note=f"median over rounds of block FLOP/s / that round's {m.peak_dtype} peak; "
            f"{flops}; counted as 6N per token: "
            f"{mfu('retune_lora', full_per_token):.1f}%",
        ),
        row("peft_lora_mfu", mfu("peft_lora", lora_per_token), "%", note=flops),
    ]
    if "retune_full" in m.sides:
        rows.append(row("retune_full_mfu", mfu("retune_full", full_per_token), "%", note=flops))
    rows += [
        row(f"{role}_prep_s", side.prep_s, "s", note="before the first step")
        for role, side in m.sides.items()
    ]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=BASE_DIR, help="a save_pretrained folder")
    parser.add_argument("--smoke", action="store_true", help="4 steps x 2 x 64 tokens")
    parser.add_argument("--no-full", action="store_true", help="leave the full fine-tune out")
    parser.add_argument("--steps", type=int, help=f"optimizer steps (default {FULL_BUDGET.steps})")
    parser.add_argument("--block-steps", type=int, help="steps per turn")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), help="retune's train.precision")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = parser.parse_args(argv)

    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # children inherit it
    from retune.config import load_params
    from retune.env import configure_environment

    configure_environment()
    budget = SMOKE if args.smoke else FULL_BUDGET
    if args.steps or args.block_steps:
        budget = Budget(
            args.steps or budget.steps,
            budget.batch,
            budget.seq_len,
            args.block_steps or budget.block_steps,
            budget.peak_size,
            budget.peak_seconds,
        )
    base = args.base.resolve()
    ensure_base(base)
    params = load_params(ROOT / "params.yaml", overrides(base, budget, "lora", args.dtype))
    roles = [r for r in SIDES if not (args.no_full and r == "retune_full")]
    work = Path(tempfile.mkdtemp(prefix="retune-bench-lora-"))
    try:
        train_file, holdout_file = prepare_split(params, work, smoke=args.smoke)
        m = run_benchmark(
            params, base, budget, roles, train_file, holdout_file, work, args.device, args.dtype
        )
        rows = result_rows(params, base, budget, m)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_result(NAME, command_line(NAME, argv), rows, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
