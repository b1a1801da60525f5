"""Preference tuning of the supervised model: KTO on users' up/down ratings, DPO on corrected
against served replies, with the supervised model itself as the frozen reference.

Entered by the `preference` stage (`tasks.preference`); tests call `tune` directly.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retune.data.preference import set_rows
from retune.errors import RetuneError
from retune.model import adapters
from retune.model.modeling import load_pretrained
from retune.model.training import available_cores, resolve_precision, save_model

if TYPE_CHECKING:
    from datasets import Dataset

    from retune.config import PreferenceParams, TrainParams

# The trainers' per-step figures retune logs (MLflow names: `preference_` + `/` as `_`).
LOGGED = (
    "loss",
    "kl",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


@dataclass(frozen=True)
class PreferenceResult:
    model_dir: Path
    method: str
    steps: int
    examples: int  # tuning examples (kto) or pairs (dpo)
    too_long: int  # left out: the prompt alone fills train.max_seq_len
    weights: tuple[float, float] | None  # kto: (desirable, undesirable)
    trainable: adapters.Trainable
    runtime_s: float
    # Per logging step, the `LOGGED` figures the trainer reported.
    history: tuple[dict[str, float], ...] = field(default_factory=tuple)

    @property
    def final(self) -> dict[str, float]:
        """The last logged value of each figure."""
        last: dict[str, float] = {}
        for entry in self.history:
            last.update({k: v for k, v in entry.items() if k != "step"})
        return last


def training_rows(data_dir: Path, method: str) -> list[dict[str, Any]]:
    """The train split of the preference set in `data_dir` as the trainers read it:
    conversational prompt and completion (kto: with its label; dpo: chosen and rejected)."""
    rows = set_rows(data_dir, method, "train")

    def reply(text: str) -> list[dict[str, str]]:
        return [{"role": "assistant", "content": text}]

    if method == "kto":
        return [
            {"prompt": r["prompt"], "completion": reply(r["completion"]), "label": r["label"]}
            for r in rows
        ]
    return [
        {"prompt": r["prompt"], "chosen": reply(r["chosen"]), "rejected": reply(r["rejected"])}
        for r in rows
    ]


def kto_weights(cfg: PreferenceParams, n_desirable: int, n_undesirable: int) -> tuple[float, float]:
    """(desirable, undesirable) weights: as set, or for a null one balanced, so the rarer
    label weighs as much in all as the commoner (KTO's paper keeps the ratio near 1)."""
    desirable, undesirable = cfg.desirable_weight, cfg.undesirable_weight
    if desirable is None and undesirable is None:
        if n_desirable and n_undesirable:
            common = max(n_desirable, n_undesirable)
            return common / n_desirable, common / n_undesirable
        return 1.0, 1.0
    return desirable or 1.0, undesirable or 1.0


def _trainer_args(
    cfg: PreferenceParams, train: TrainParams, seed: int, work_dir: Path, precision: str, gpu: bool
) -> dict[str, Any]:
    import sys

    return dict(
        output_dir=str(work_dir),
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=cfg.warmup_steps,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        logging_strategy="steps",
        logging_steps=cfg.logging_steps,
        # Short next to the supervised run: no checkpoints, a crash reruns the stage.
        save_strategy="no",
        seed=seed,
        report_to="none",
        use_cpu=not gpu,
        bf16=precision == "bf16",  # the trainers default to bf16 wherever they run
        gradient_checkpointing=False,  # and to checkpointing, which costs a small model time
        beta=cfg.beta,
        max_length=train.max_seq_len,
        dataloader_num_workers=0,
        disable_tqdm=not sys.stdout.isatty(),
    )


def fitting(
    rows: list[dict[str, Any]], tokenizer: Any, max_length: int
) -> tuple[list[dict[str, Any]], int]:
    """The rows whose prompt leaves room for a reply token in `max_length` (the trainers cut
    a longer example from the right, reply first), and how many were left out."""
    from retune.model.chat import render_many

    prompts = render_many(tokenizer, [r["prompt"] for r in rows], add_generation_prompt=True)
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    kept = [r for r, n in zip(rows, lengths, strict=True) if n < max_length]
    return kept, len(rows) - len(kept)


def _dataset(rows: list[dict[str, Any]]) -> Dataset:
    from datasets import Dataset

    return Dataset.from_list(rows)


def tune(
    cfg: PreferenceParams,
    train: TrainParams,
    seed: int,
    sft_dir: Path,
    data_dir: Path,
    model_dir: Path,
    work_dir: Path,
    callbacks: Sequence[Any] = (),
) -> PreferenceResult:
    """Tune the model in `sft_dir` with `cfg.method` ("kto" or "dpo") on the train split of
    the preference set in `data_dir`; save it (merged, when `train.adapter` is lora) to
    `model_dir`. The reference is the supervised model: under LoRA the same weights with the
    adapter off, in a full fine-tune a frozen copy."""
    import torch
    from transformers import set_seed

    if cfg.method not in ("kto", "dpo"):
        raise RetuneError(f"preference.method={cfg.method!r}: tune runs kto or dpo only")
    rows = training_rows(data_dir, cfg.method)
    if not rows:
        raise RetuneError(f"{data_dir}: no {cfg.method} examples in the train split")
    set_seed(seed)
    torch.set_num_threads(available_cores())
    gpu = torch.cuda.is_available()
    precision = resolve_precision(train.precision, "cuda" if gpu else "cpu")
    model, tokenizer = load_pretrained(sft_dir)
    rows, too_long = fitting(rows, tokenizer, train.max_seq_len)
    if not rows:
        raise RetuneError(
            f"{data_dir}: every {cfg.method} prompt is over train.max_seq_len="
            f"{train.max_seq_len} tokens: raise it, or lower preference_data.max_chars"
        )
    if train.adapter == "lora":
        model, trainable = adapters.add_lora(model, train.lora)
        reference = None  # the adapter off: exactly the supervised model
    else:
        trainable = adapters.full(model)
        reference, _ = load_pretrained(sft_dir)
        reference.requires_grad_(False)
        reference.eval()
    args = _trainer_args(cfg, train, seed, work_dir, precision, gpu)
    weights = None
    if cfg.method == "kto":
        from trl import KTOConfig, KTOTrainer

        n_desirable = sum(bool(r["label"]) for r in rows)
        weights = kto_weights(cfg, n_desirable, len(rows) - n_desirable)
        trainer: Any = KTOTrainer(
            model=model,
            ref_model=reference,
            args=KTOConfig(**args, desirable_weight=weights[0], undesirable_weight=weights[1]),
            train_dataset=_dataset(rows),
            processing_class=tokenizer,
            callbacks=list(callbacks),
        )
    else:
        from trl import DPOConfig, DPOTrainer

        trainer = DPOTrainer(
            model=model,
            ref_model=reference,
            args=DPOConfig(**args),
            train_dataset=_dataset(rows),
            processing_class=tokenizer,
            callbacks=list(callbacks),
        )
    weighed = (
        f" (weights desirable {weights[0]:.2f}, undesirable {weights[1]:.2f})" if weights else ""
    )
    print(
        f"preference: {cfg.method} on {len(rows)} "
        + ("examples" if cfg.method == "kto" else "pairs")
        + weighed
        + (f", {too_long} left out: prompt over train.max_seq_len" if too_long else "")
        + f", {cfg.max_steps} steps x {cfg.per_device_train_batch_size}, beta {cfg.beta}, "
        f"{precision}; {trainable.describe()}",
        flush=True,
    )
    started = time.perf_counter()
    trainer.train()
    runtime = time.perf_counter() - started
    save_model(trainer.model, tokenizer, model_dir)
    history = tuple(
        {"step": float(e["step"]), **{k: float(e[k]) for k in LOGGED if k in e}}
        for e in trainer.state.log_history
        if "step" in e and any(k in e for k in LOGGED)
    )
    return PreferenceResult(
        model_dir=model_dir,
        method=cfg.method,
        steps=int(trainer.state.global_step),
        examples=len(rows),
        too_long=too_long,
        weights=weights,
        trainable=trainable,
        runtime_s=runtime,
        history=history,
    )
