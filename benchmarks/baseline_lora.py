"""The plain peft + `transformers` script a user could write instead of retune to fine-tune a
pretrained chat model with LoRA: load the base and its tokenizer, render each conversation with
the base's chat template, tokenize, concatenate and chunk into blocks (the run_clm recipe,
`benchmarks.baseline_clm.lm_dataset`), wrap the model with `get_peft_model`, train with
`Trainer` as that script does (`benchmarks.baseline_clm.fit`). The baseline of
`benchmarks/lora.py`, which runs it with the same base, rank, alpha, dropout, target modules,
data, sequence length, batch size, steps and learning-rate schedule as retune's train stage.
Run alone: `python -m benchmarks.baseline_lora --help`.

Everything else is left at the libraries' defaults; that is the point. The loss is on every
token (run_clm's labels = inputs), as such a script has it; the compute per token is the
same as retune's reply-only loss, which only sets labels to -100.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.baseline_clm import fit, lm_dataset


@dataclass(frozen=True)
class LoraBaselineConfig:
    block_size: int = 256
    batch_size: int = 4
    max_steps: int = 40
    learning_rate: float = 1.0e-3
    warmup_steps: int = 4
    weight_decay: float = 0.01
    logging_steps: int = 10
    seed: int = 42
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    bf16: bool = False  # TrainingArguments(bf16=True): autocast, as retune's train.precision


def train(
    cfg: LoraBaselineConfig,
    train_file: Path,
    base_dir: Path,
    output_dir: Path,
    callbacks: Sequence[Any] = (),
) -> dict[str, Any]:
    """LoRA-fine-tune the save_pretrained model in `base_dir` on `train_file`; save the adapter
    to `output_dir`; return the Trainer's metrics."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    set_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_dataset = lm_dataset(train_file, tokenizer, cfg.block_size)
    base: Any = AutoModelForCausalLM.from_pretrained(base_dir)
    base.config.pad_token_id = tokenizer.pad_token_id
    model: Any = get_peft_model(
        base,
        LoraConfig(
            r=cfg.r,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=list(cfg.target_modules),
            task_type="CAUSAL_LM",
        ),
    )
    model.print_trainable_parameters()
    return fit(model, tokenizer, train_dataset, cfg, output_dir, callbacks)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-file", type=Path, required=True)
    parser.add_argument("--base", type=Path, required=True, help="a save_pretrained folder")
    parser.add_argument("--output-dir", type=Path, required=True)
    for name, value in asdict(LoraBaselineConfig()).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, tuple):
            parser.add_argument(flag, nargs="+", default=list(value))
        elif isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        else:
            parser.add_argument(flag, type=type(value), default=value)
    args = vars(parser.parse_args(argv))
    paths = [args.pop(k) for k in ("train_file", "base", "output_dir")]
    args["target_modules"] = tuple(args["target_modules"])
    metrics = train(LoraBaselineConfig(**args), *paths)
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
