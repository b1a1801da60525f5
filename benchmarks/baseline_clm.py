"""The plain `transformers` script a user could write instead of retune: the `run_clm` recipe
(render each conversation with the chat template, tokenize, concatenate, chunk into blocks,
`Trainer` on a fresh GPT-2). The baseline of `benchmarks/train.py`, which runs it with the
same tokenizer, data, model size, sequence length, batch size, steps and learning-rate schedule
as retune's train stage. Run alone: `python -m benchmarks.baseline_clm --help`.

Everything is left at the library's defaults except what must match retune; that is the point.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from itertools import chain
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class BaselineConfig:
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    block_size: int = 256
    batch_size: int = 8
    max_steps: int = 300
    learning_rate: float = 2.0e-3
    warmup_steps: int = 20
    weight_decay: float = 0.01
    logging_steps: int = 10
    seed: int = 42
    bf16: bool = False


def lm_dataset(train_file: Path, tokenizer: Any, block_size: int) -> Any:
    """run_clm's data pipeline on a Parquet file of chat records (a `messages` column)."""
    from datasets import load_dataset

    raw = load_dataset("parquet", data_files=str(train_file), split="train")

    def tokenize(batch: dict[str, list[Any]]) -> Any:
        texts = [
            tokenizer.apply_chat_template(m, tokenize=False) + tokenizer.eos_token
            for m in batch["messages"]
        ]
        return tokenizer(texts)

    def group_texts(examples: dict[str, list[Any]]) -> dict[str, list[Any]]:
        # As in run_clm: concatenate a map batch, drop its remainder, labels = inputs.
        joined = {k: list(chain(*examples[k])) for k in examples}
        total = len(joined["input_ids"]) // block_size * block_size
        result = {
            k: [t[i : i + block_size] for i in range(0, total, block_size)]
            for k, t in joined.items()
        }
        result["labels"] = result["input_ids"].copy()
        return result

    tokenized = raw.map(tokenize, batched=True, remove_columns=raw.column_names)
    return tokenized.map(group_texts, batched=True)


def train(
    cfg: BaselineConfig,
    train_file: Path,
    tokenizer_dir: Path,
    output_dir: Path,
    callbacks: Sequence[Any] = (),
) -> dict[str, Any]:
    """Train a fresh GPT-2 on `train_file` with `tokenizer_dir`'s tokenizer; save the model and
    tokenizer to `output_dir`; return the Trainer's metrics."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, set_seed

    set_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    train_dataset = lm_dataset(train_file, tokenizer, cfg.block_size)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=cfg.block_size,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = GPT2LMHeadModel(config)
    return fit(model, tokenizer, train_dataset, cfg, output_dir, callbacks)


def fit(
    model: Any,
    tokenizer: Any,
    train_dataset: Any,
    cfg: Any,
    output_dir: Path,
    callbacks: Sequence[Any] = (),
) -> dict[str, Any]:
    """`Trainer` at its defaults but for the settings `cfg` holds (max_steps, batch_size,
    learning_rate, warmup_steps, weight_decay, logging_steps, seed, bf16 if it has one), cosine
    schedule; save the model and tokenizer to `output_dir`; return the Trainer's metrics."""
    import torch
    from transformers import Trainer, TrainingArguments, default_data_collator

    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        logging_steps=cfg.logging_steps,
        seed=cfg.seed,
        bf16=getattr(cfg, "bf16", False),
        use_cpu=not torch.cuda.is_available(),
        report_to="none",
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        data_collator=default_data_collator,
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )
    output = trainer.train()
    trainer.save_model(str(output_dir))
    return dict(output.metrics)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-file", type=Path, required=True)
    parser.add_argument("--tokenizer", type=Path, required=True, help="a save_pretrained folder")
    parser.add_argument("--output-dir", type=Path, required=True)
    for name, value in asdict(BaselineConfig()).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action="store_true")
        else:
            parser.add_argument(flag, type=type(value), default=value)
    args = vars(parser.parse_args(argv))
    paths = [args.pop(k) for k in ("train_file", "tokenizer", "output_dir")]
    metrics = train(BaselineConfig(**args), *paths)
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
