"""A loaded registry version and one reply from it: `ServedModel` (model, tokenizer, context),
`load_served`, `render_prompt` (the chat template, its refusals a client's 400), and `generate`
(greedy or sampled, cut at stop strings that `StopStrings` watches for as tokens arrive)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from retune.online.serving.errors import ApiError

# Below this a temperature is served greedy, as 0 is: sampling that cold picks the likeliest
# token anyway, and logits divided by a tinier one overflow to inf and NaN.
MIN_SAMPLING_TEMPERATURE = 0.01


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


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length"]


def _stop_ids(served: ServedModel) -> set[int]:
    eos = served.model.generation_config.eos_token_id
    ids = eos if isinstance(eos, list) else [eos]
    return {int(i) for i in ids if i is not None}


# A character split over tokens decodes whole once its last token is in; a longer run of
# undecodable tokens is taken as it decodes, so no step waits on an unbounded window.
_MAX_PENDING_TOKENS = 8


class StopStrings:
    """A transformers stopping criterion: a row is done once its reply holds one of `stops`.

    Each step decodes only the newest tokens (from the last character boundary) and looks for
    the stops in the text they add plus the `longest stop - 1` characters before it, so a step
    costs the same however long the reply is. (transformers' own `stop_strings` first tabulates
    every vocabulary entry against every stop string: minutes for one long stop string.)"""

    def __init__(
        self, decode: Callable[[list[int]], str], stops: list[str], prompt_width: int, rows: int
    ) -> None:
        self.decode, self.stops, self.width = decode, stops, prompt_width
        self.keep = max(map(len, stops)) - 1
        self.ids: list[list[int]] = [[] for _ in range(rows)]
        # Per row: where the window being decoded starts, and how far it has been read.
        self.offsets = [(0, 0)] * rows
        self.tails = [""] * rows

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        done = []
        for row, ids in enumerate(self.ids):
            ids.extend(input_ids[row, self.width + len(ids) :].tolist())
            seen = self.tails[row] + self._new_text(row)
            done.append(any(s in seen for s in self.stops))
            self.tails[row] = seen[-self.keep :] if self.keep else ""
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    def _new_text(self, row: int) -> str:
        ids, (start, read) = self.ids[row], self.offsets[row]
        # Decoding from an earlier token keeps what depends on the left context (a leading
        # space) as the whole reply's decoding has it.
        before, now = self.decode(ids[start:read]), self.decode(ids[start:])
        if len(now) <= len(before):
            return ""
        if now.endswith("\ufffd") and len(ids) - start <= _MAX_PENDING_TOKENS:
            return ""
        self.offsets[row] = (read, len(ids))
        return now[len(before) :]


def generate(
    served: ServedModel,
    prompt_ids: list[int],
    max_tokens: int,
    temperature: float | None,
    top_p: float | None,
    stop: list[str],
    seed: int | None,
) -> Completion:
    """One reply to `prompt_ids`: greedy when temperature is unset or below
    `MIN_SAMPLING_TEMPERATURE`, sampled otherwise; cut before the first `stop` string. The
    model's generation config says which tokens end a turn (set by `register`)."""
    import torch
    from transformers import StoppingCriteriaList

    from retune.model.scoring import generate_tokens

    kwargs: dict[str, Any] = {"do_sample": False}
    if temperature is not None and temperature >= MIN_SAMPLING_TEMPERATURE:
        kwargs = {"do_sample": True, "temperature": temperature}
        if top_p is not None:
            kwargs["top_p"] = top_p
        if seed is not None:
            torch.manual_seed(seed)
    if stop:
        criterion = StopStrings(served.decode, stop, prompt_width=len(prompt_ids), rows=1)
        kwargs["stopping_criteria"] = StoppingCriteriaList([criterion])
    tokenizer = served.tokenizer
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id
    [tokens] = generate_tokens(served.model, [prompt_ids], max_tokens, pad_id, **kwargs)
    text = served.decode(tokens)
    cut = [text.index(s) for s in stop if s in text]
    if cut:
        text, reason = text[: min(cut)], "stop"
    elif tokens and tokens[-1] in _stop_ids(served):
        reason = "stop"
    else:
        reason = "length" if len(tokens) >= max_tokens else "stop"
    return Completion(
        text=text.strip(),
        prompt_tokens=len(prompt_ids),
        completion_tokens=len(tokens),
        finish_reason=reason,  # type: ignore[arg-type]
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
