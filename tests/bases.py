"""What the training tests share: tiny pretrained-style bases of several families (random
weights from a config, a small byte-level BPE tokenizer carrying the family's special tokens and
its real chat template, saved with `save_pretrained` so they load through the users' path), a
corpus written straight into the split stage's files, the train core on them, and a stand-in
for a process killed mid-run.

Used by tests/test_train.py, tests/test_masks.py, tests/test_lora.py and
tests/test_early_stopping.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from retune.config import Params
from retune.data.records import Record, write_records
from retune.model.chat import CHAT_TEMPLATE
from retune.model.training import TrainResult, train
from tests.helpers import make_conversations

# SmolLM2-Instruct's template (Qwen2-Instruct's is the same with its own default system prompt).
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
QWEN2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Meta-Llama-3-8B-Instruct's.
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ "
    "message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
# Mistral-7B-Instruct-v0.2's: no system role, no generation prompt, replies closed by eos.
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
    "{% endif %}{% endfor %}"
)
# Phi-3-mini-4k-instruct's: a conversation (not a turn) ends with eos.
PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


@dataclass(frozen=True)
class Family:
    name: str
    template: str
    end_of_turn: str  # what closes an assistant reply: supervised with it
    specials: tuple[str, ...]
    bos: str | None
    eos: str
    pad: str
    model_type: str  # gpt2 | llama | qwen2 (the config a tiny model of it is built from)


FAMILIES = {
    "retune": Family(
        "retune",
        CHAT_TEMPLATE,
        "<|end|>",
        ("<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
        "<|endoftext|>",
        "<|endoftext|>",
        "<|pad|>",
        "gpt2",
    ),
    "smollm2": Family(
        "smollm2",
        CHATML,
        "<|im_end|>",
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
        "llama",
    ),
    "qwen2": Family(
        "qwen2",
        QWEN2,
        "<|im_end|>",
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        None,
        "<|im_end|>",
        "<|endoftext|>",
        "qwen2",
    ),
    "llama3": Family(
        "llama3",
        LLAMA3,
        "<|eot_id|>",
        ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        "<|begin_of_text|>",
        "<|eot_id|>",
        "<|eot_id|>",
        "llama",
    ),
    "mistral": Family(
        "mistral", MISTRAL, "</s>", ("<unk>", "<s>", "</s>"), "<s>", "</s>", "</s>", "llama"
    ),
    "phi3": Family(
        "phi3",
        PHI3,
        "<|end|>",
        ("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
        "<|endoftext|>",
        "<|endoftext|>",
        "<|endoftext|>",
        "llama",
    ),
}


def family_tokenizer(family: Family, vocab_size: int = 400) -> Any:
    """A byte-level BPE tokenizer trained on the test corpus, with `family`'s special tokens
    (each one token) and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(family.specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [" ".join(c for _, c in conv) for conv in make_conversations(80)]
    tok.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=family.bos,
        eos_token=family.eos,
        pad_token=family.pad,
        additional_special_tokens=[
            t for t in family.specials if t not in (family.bos, family.eos, family.pad)
        ],
    )
    hf.chat_template = family.template
    return hf


def tiny_model(model_type: str, tokenizer: Any, max_positions: int = 256) -> Any:
    """A randomly initialised causal LM of `model_type`, two layers, 32 wide."""
    import torch
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(0)
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if model_type == "gpt2":
        config: Any = GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=max_positions,
            n_embd=32,
            n_layer=2,
            n_head=2,
            **ids,
        )
        return GPT2LMHeadModel(config)
    shape = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": max_positions,
        **ids,
    }
    if model_type == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**shape))
    return LlamaForCausalLM(LlamaConfig(**shape))


def save_tiny_base(name: str, folder: Path) -> Path:
    """`tiny_model` + `family_tokenizer` of the family `name`, saved into `folder`."""
    family = FAMILIES[name]
    tokenizer = family_tokenizer(family)
    model = tiny_model(family.model_type, tokenizer)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def chats(n: int) -> list[list[dict[str, Any]]]:
    """`make_conversations(n)` as chat-template messages."""
    return [[{"role": r, "content": c} for r, c in conv] for conv in make_conversations(n)]


def write_split(params: Params, conversations: list[list[dict[str, Any]]]) -> None:
    """`conversations` as the split stage's train file (from support.jsonl, line i + 1), and
    their last 8 as its holdout, with any message `weight`s."""
    rows = [
        Record(
            messages=tuple((m["role"], m["content"]) for m in conv),
            source="support.jsonl",
            line=i + 1,
            format="chat_jsonl",
            weights=tuple(m.get("weight") for m in conv),
        ).to_row()
        for i, conv in enumerate(conversations)
    ]
    write_records(rows, params.paths.split / "train.parquet")
    write_records(rows[-8:], params.paths.split / "holdout.parquet")


def train_core(params: Params, callbacks: Sequence[Any] = (), **overrides: Any) -> TrainResult:
    """`train` on the split files of `params`, its train section changed by `overrides`."""
    paths = params.paths
    return train(
        dataclasses.replace(params.train, **overrides),
        params.seed,
        paths.split / "train.parquet",
        paths.split / "holdout.parquet",
        paths.model,
        paths.checkpoints,
        callbacks=callbacks,
    )


class Interrupted(Exception):
    pass


class KillAfterCheckpoint(TrainerCallback):
    """Stands in for a killed process: raises right after `step`'s checkpoint is written."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step:
            raise Interrupted
