"""LoRA adapters for `train`: wrap a pretrained base so only the adapter trains, say what
trains, and merge the adapter back into the base when the model is saved.

Called by retune.model.training (train and cv); nothing runs here.

Why merged: every later stage (evaluate, cv, register's MLflow transformers flavour, the
registry's `load_version` for promote and drift, `mlflow.pyfunc.load_model` in a fresh process,
`retune serve`) then loads a plain transformers model by one path, with no base to find. A
registered adapter would need its base wherever it is loaded: a hub download, or the local
folder `train.base_model` named, which a serving machine does not have. The adapter weights
are kept beside the merged model (`<paths.model>/adapter/`) as the record of what trained.

Added tokens: a pretrained base gets retune's placeholders ([EMAIL], [PHONE], ...) as single
tokens, as the scratch tokenizer has them, so a redacted value is one unit to every model and
every stage tokenizes alike (`retune.model.modeling.add_placeholders`). Their rows start as the
mean of the rows of the tokens the base spelt them with, and under LoRA they stay so: only the
adapter trains. Training those rows as well (peft's `trainable_token_indices`) was measured
11% slower per step on SmolLM2-135M on a CPU, and more memory, since peft then rebuilds the
whole (tied) embedding matrix at every forward (`python -m benchmarks.lora`); a full fine-tune
trains them with every other weight.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retune.config import LoraParams
from retune.errors import BaseModelError

ADAPTER_DIR = "adapter"  # inside paths.model: the adapter that was merged, for the record
# Families peft's own table (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING) lacks.
_FAMILY_TARGETS = {"phi3": ("qkv_proj",)}


@dataclass(frozen=True)
class Trainable:
    """What trains: the adapter's settings (None for full fine-tuning) and the parameter count."""

    adapter: str  # "none" | "lora"
    trainable_params: int
    total_params: int  # the model as trained, adapter included
    lora: dict[str, Any] | None = None  # r, alpha, dropout, target_modules (resolved)

    @property
    def share(self) -> float:
        return self.trainable_params / self.total_params if self.total_params else 0.0

    def describe(self) -> str:
        what = (
            "all weights"
            if self.lora is None
            else f"a LoRA adapter (r {self.lora['r']}, alpha {self.lora['alpha']}, on "
            f"{', '.join(self.lora['target_modules'])})"
        )
        return (
            f"{what}: {self.trainable_params:,} of {self.total_params:,} parameters train "
            f"({self.share:.2%})"
        )


def target_modules(model: Any, cfg: LoraParams) -> list[str]:
    """`cfg.target_modules`, or the family default for `model`'s model_type."""
    if cfg.target_modules is not None:
        return list(cfg.target_modules)
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT

    model_type = str(getattr(model.config, "model_type", None))
    found = _FAMILY_TARGETS.get(model_type) or PEFT.get(model_type)
    if not found or isinstance(found, str):
        raise BaseModelError(
            f"train.lora.target_modules is null and retune knows no default for model_type "
            f"{model_type}; name the attention projections to adapt, e.g. "
            "train.lora.target_modules=[q_proj,v_proj] (print(model) lists the module names)"
        )
    return list(found)


def add_lora(model: Any, cfg: LoraParams) -> tuple[Any, Trainable]:
    """`model` wrapped in a LoRA adapter (only the adapter trains); returns it and what
    trains."""
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    targets = target_modules(model, cfg)
    present = [m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in targets]
    if not present:
        raise BaseModelError(
            f"train.lora.target_modules={targets}: no module of {type(model).__name__} has "
            "such a name; print(model) lists them"
        )
    config = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
        # GPT-2's projections are Conv1D, their weights stored transposed.
        fan_in_fan_out=any(isinstance(m, Conv1D) for m in present),
    )
    wrapped = get_peft_model(model, config)
    trainable, total = wrapped.get_nb_trainable_parameters()
    lora = {"r": cfg.r, "alpha": cfg.alpha, "dropout": cfg.dropout, "target_modules": targets}
    return wrapped, Trainable("lora", int(trainable), int(total), lora)


def full(model: Any) -> Trainable:
    """Full fine-tuning: every parameter of `model` trains."""
    total = sum(p.numel() for p in model.parameters())
    return Trainable("none", total, total)


def is_adapted(model: Any) -> bool:
    """Whether `model` is wrapped in an adapter (without importing peft, ~2 s, for a plain one)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def save_merged(model: Any, tokenizer: Any, folder: Path) -> None:
    """Write `model` into `folder` in save_pretrained format: a LoRA-wrapped model as its
    adapter (`folder/adapter/`) and then the base with the adapter merged in (the wrapper is
    spent after this); a plain model as it is."""
    if is_adapted(model):
        # With the placeholders' rows the vocabulary grew, so the record keeps the resized
        # embeddings too (peft's "auto" would say so in a warning).
        model.save_pretrained(folder / ADAPTER_DIR, save_embedding_layers=True)
        tokenizer.save_pretrained(folder / ADAPTER_DIR)
        model = model.merge_and_unload()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@contextmanager
def quiet_checkpoints() -> Iterator[None]:
    """Hide peft's warning, at each checkpoint of an adapter, that it saves the resized
    embeddings with it: expected here (see the module docstring), so it is no news."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Setting `save_embedding_layers` to `True`")
        yield


def load_adapter(model: Any, checkpoint: Path) -> None:
    """Load into `model` (`add_lora`'s) the adapter weights a Trainer checkpoint saved."""
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    set_peft_model_state_dict(model, load_peft_weights(str(checkpoint)))
