"""How a record becomes model text: one chat template for training, evaluation and serving.

A base model that ships its own chat template keeps it; the scratch model and base models
without one get `CHAT_TEMPLATE`, saved with the tokenizer so every later loader agrees.
"""

from __future__ import annotations

from typing import Any

SPECIAL_TOKENS = {
    "bos": "<|endoftext|>",
    "eos": "<|endoftext|>",
    "pad": "<|pad|>",
    "roles": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
}

# Documents (role "text") are rendered bare; speakers are marked and closed with <|end|>.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'text' %}{{ m['content'] }}"
    "{% else %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def ensure_chat_template(tokenizer: Any) -> Any:
    """Give `tokenizer` retune's template if it has none (mutates and returns it)."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def render(
    tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = False
) -> str:
    """Render messages to the text the model is trained on (no tokenisation)."""
    text: str = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    return text
