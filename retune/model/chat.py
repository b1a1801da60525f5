"""How a record becomes model text: one chat template for training, evaluation and serving.

A base model that ships its own chat template keeps it; the scratch model and base models
without one get `CHAT_TEMPLATE`, saved with the tokenizer so every later loader agrees. A plain
document (one "text" message) is its text, whatever the template: it is no conversation.
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


def is_document(messages: list[dict[str, Any]]) -> bool:
    """A plain document (one "text" message, from .txt or a text column), not a conversation."""
    return len(messages) == 1 and messages[0]["role"] == "text"


def render(
    tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool = False
) -> str:
    """Render messages to the text the model is trained on (no tokenisation)."""
    return render_many(tokenizer, [messages], add_generation_prompt)[0]


def render_many(
    tokenizer: Any, conversations: list[list[dict[str, Any]]], add_generation_prompt: bool = False
) -> list[str]:
    """`render` of each conversation, the template applied in one call (a third faster than one
    call each). A document is rendered bare: a chat template would frame it as a turn of an
    unknown "text" speaker (and add its default system prompt)."""
    chats = [m for m in conversations if not is_document(m)]
    texts: list[str] = (
        tokenizer.apply_chat_template(
            chats, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        if chats
        else []
    )
    rendered = iter(texts)
    return [str(m[0]["content"]) if is_document(m) else next(rendered) for m in conversations]


_PROBE = "retune end-of-turn probe"


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """The token ids that end a reply, first the marker the chat template writes right after an
    assistant message (`<|end|>`, `<|im_end|>`, `<|eot_id|>`, `</s>`), then eos if it differs.

    A generation stopped at eos alone runs past the turn wherever the two differ: Llama 3.0
    (eos `<|end_of_text|>`, turns closed by `<|eot_id|>`), Phi-3 (`<|endoftext|>`, `<|end|>`),
    retune's own template (`<|endoftext|>`, `<|end|>`). The marker is read off a rendering of
    one exchange: the longest special token the text after the reply starts with."""
    ids: list[int] = []
    try:
        text = render(
            tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
        )
    except (
        Exception
    ):  # a template that refuses the probe (e.g. demands a system turn) has no marker found
        text = ""
    after = text[text.find(_PROBE) + len(_PROBE) :].lstrip() if _PROBE in text else ""
    specials = sorted(
        {str(t) for t in tokenizer.all_special_tokens}
        | {str(t) for t in getattr(tokenizer, "additional_special_tokens", None) or []},
        key=len,
        reverse=True,
    )
    marker = next((t for t in specials if t and after.startswith(t)), None)
    if marker is not None:
        ids.append(int(tokenizer.convert_tokens_to_ids(marker)))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(int(tokenizer.eos_token_id))
    return ids
