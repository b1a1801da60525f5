"""A loaded registry version: `ServedModel` (model, tokenizer, context), `load_served`, and
`render_prompt` (the chat template, its refusals a client's 400). `batching` generates."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from retune.online.serving.errors import ApiError


@dataclass(frozen=True)
class ServedModel:
    """One loaded registry version; requests hold on to it, so a swap never affects them."""

    name: str
    version: int
    model: Any
    tokenizer: Any
    context: int  # positions the model can attend to: prompt plus reply
    loaded_at: datetime
    # The fast tokenizer is not safe to call from two threads at once.
    tokenizer_lock: threading.Lock = field(default_factory=threading.Lock, compare=False)

    def encode(self, text: str) -> list[int]:
        with self.tokenizer_lock:
            ids: list[int] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids

    def decode(self, ids: list[int]) -> str:
        with self.tokenizer_lock:
            text: str = self.tokenizer.decode(ids, skip_special_tokens=True)
        return text


def _context_of(model: Any, tokenizer: Any) -> int:
    context = getattr(model.config, "max_position_embeddings", None)
    return int(context or tokenizer.model_max_length)


def load_served(name: str, version: int) -> ServedModel:
    """Load `name` version `version` from the registry, ready to generate."""
    from retune.model.chat import ensure_chat_template
    from retune.release.registry import load_version

    model, tokenizer = load_version(name, version, log_prefix="serve")
    model.eval()
    ensure_chat_template(tokenizer)
    return ServedModel(
        name=name,
        version=version,
        model=model,
        tokenizer=tokenizer,
        context=_context_of(model, tokenizer),
        loaded_at=datetime.now(UTC),
    )


def render_prompt(model: ServedModel, messages: list[dict[str, str]], param: str) -> str:
    """The prompt text of `messages` by the model's chat template; a template that refuses
    them (some require alternating roles) is the client's 400, naming `param`."""
    from jinja2 import TemplateError, TemplateSyntaxError

    from retune.model.chat import render

    try:
        with model.tokenizer_lock:
            return render(model.tokenizer, messages, add_generation_prompt=True)
    except TemplateSyntaxError:
        raise  # the template itself is broken: the server's fault
    except TemplateError as exc:
        raise ApiError(
            400,
            f"the model's chat template refuses these messages: {exc}",
            param=param,
            code="invalid_messages",
        ) from None
