"""Base models and tokenizers: the scratch GPT-2 (offline default) or a user's model.

`train` builds or loads the base here; `evaluate`, `register` and tests load the fine-tuned
result with `load_pretrained`, the same `from_pretrained` path a user's model takes.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from retune.config import ScratchModelParams
from retune.data.pii import PLACEHOLDERS
from retune.errors import BaseModelError
from retune.model.chat import SPECIAL_TOKENS, ensure_chat_template, render


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Any:
    """Train a byte-level BPE tokenizer on `texts`; chat markers and PII placeholders stay whole."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [SPECIAL_TOKENS["eos"], SPECIAL_TOKENS["pad"], *SPECIAL_TOKENS["roles"]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        # Every byte is in the vocabulary, so no input is ever unknown.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        pad_token=SPECIAL_TOKENS["pad"],
        additional_special_tokens=SPECIAL_TOKENS["roles"],
    )
    hf.add_tokens(sorted(PLACEHOLDERS.values()))
    return ensure_chat_template(hf)


def scratch_model(cfg: ScratchModelParams, tokenizer: Any, max_seq_len: int) -> Any:
    """A freshly initialised GPT-2 sized by `cfg`, its vocabulary matching `tokenizer`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=max_seq_len,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        # GPT-2's own tanh GELU ("gelu_new") as one fused kernel rather than eight elementwise
        # passes in Python: the same function, a CPU training step 15-20 % shorter.
        activation_function="gelu_pytorch_tanh",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return GPT2LMHeadModel(config)


def load_pretrained(name_or_path: str | Path) -> tuple[Any, Any]:
    """Load (model, tokenizer) from a `save_pretrained` directory or a hub id (online only).

    Adds what retune needs and the base may lack: a pad token, the chat template and the PII
    placeholder tokens (resizing the embeddings when tokens were added).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref = str(name_or_path)
    looks_local = ref.startswith((".", "/", "~")) or Path(ref).exists()
    if looks_local and not Path(ref).expanduser().is_dir():
        raise BaseModelError(
            f"train.base_model={ref!r}: no such directory. Point it at a folder written by "
            "save_pretrained (config.json, weights, tokenizer files), or use 'scratch'."
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(Path(ref).expanduser() if looks_local else ref)
        model = AutoModelForCausalLM.from_pretrained(Path(ref).expanduser() if looks_local else ref)
    # An empty or foreign folder makes AutoTokenizer raise ValueError rather than OSError.
    except (OSError, ValueError) as exc:
        hint = (
            "It is not a local directory, and the Hugging Face hub is offline (HF_HUB_OFFLINE=1 "
            "is retune's default): set HF_HUB_OFFLINE=0 when online, or download the model and "
            "point train.base_model at its folder."
            if not looks_local
            else "The folder lacks a model or tokenizer saved with save_pretrained."
        )
        raise BaseModelError(
            f"train.base_model={ref!r} could not be loaded: {exc}\n{hint}"
        ) from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    ensure_chat_template(tokenizer)
    add_placeholders(model, tokenizer)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def add_placeholders(model: Any, tokenizer: Any) -> None:
    """Give a pretrained base retune's placeholders ([EMAIL], ...) as single tokens, each row
    (input embedding, and output layer where untied) the mean of the rows of the tokens the base
    spelt it with: the model starts out reading `[EMAIL]` roughly as it read the text, rather
    than as random noise. A no-op for a tokenizer that has them (the scratch one, a base
    retune saved)."""
    import torch

    wanted = sorted(PLACEHOLDERS.values())
    spelt = {t: tokenizer(t, add_special_tokens=False)["input_ids"] for t in wanted}
    before = len(tokenizer)
    if not tokenizer.add_tokens(wanted):
        return
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    layers = [inputs.weight]
    if outputs is not None and outputs.weight is not inputs.weight:
        layers.append(outputs.weight)
    with torch.no_grad():
        for token, ids in spelt.items():
            row = tokenizer.convert_tokens_to_ids(token)
            if ids and row >= before:  # a token this call added
                for weight in layers:
                    weight[row] = weight[ids].mean(dim=0)


def train_chat_tokenizer(conversations: Iterable[list[dict[str, str]]], vocab_size: int) -> Any:
    """Train the scratch tokenizer on `conversations` rendered with retune's chat template,
    i.e. on exactly the text the model will read."""
    # An alphabet-only tokenizer already carries the template, which is all rendering needs.
    renderer = train_tokenizer([], vocab_size)
    return train_tokenizer((render(renderer, m) for m in conversations), vocab_size)
