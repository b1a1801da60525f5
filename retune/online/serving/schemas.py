"""The request bodies the API accepts, as pydantic models: chat and text completion requests
(with the OpenAI fields this server refuses rather than ignores) and feedback; every string in
a body must be text (`check_text`)."""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, model_validator

from retune.online.serving.errors import ApiError

# OpenAI accepts at most 4 stop sequences; more is a client bug rather than a need. A stop
# string longer than a few sentences is one too, and each costs per generated token.
MAX_STOP = 4
MAX_STOP_CHARS = 256


_SURROGATE = re.compile("[\ud800-\udfff]")


def check_text(body: Any) -> None:
    """Raise a 400 naming a string in `body` (a parsed JSON value, keys included) that holds a
    lone surrogate: JSON may escape one ("\\ud800"), but it is not text, and the tokenizer,
    the store and the answer would fail on it."""
    todo: list[tuple[str, Any]] = [("", body)]  # a loop, not recursion: JSON may nest deeply
    while todo:
        where, value = todo.pop()
        if isinstance(value, str):
            if bad := _SURROGATE.search(value):
                raise ApiError(
                    400,
                    f"{where or 'body'} is not valid text: it holds a lone surrogate "
                    f"({bad[0]!a} at character {bad.start()}); send UTF-8 text (an escaped "
                    "pair such as \\ud83d\\ude00 is fine)",
                    param=where or None,
                    code="invalid_unicode",
                )
        elif isinstance(value, dict):
            for key, item in value.items():
                path = f"{where}.{key}" if where else str(key)
                todo += [(path, key), (path, item)]
        elif isinstance(value, list):
            todo += [(f"{where}.{i}" if where else str(i), item) for i, item in enumerate(value)]


class _Body(BaseModel):
    """A request body: its strings are text (see `check_text`)."""

    @model_validator(mode="before")
    @classmethod
    def _text(cls, data: Any) -> Any:
        # An ApiError is not a ValueError: pydantic lets it through, FastAPI answers it.
        check_text(data)
        return data


class _Lenient(BaseModel):
    # OpenAI clients send fields retune has no use for (user, metadata, ...).
    model_config = ConfigDict(extra="allow")


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


# OpenAI fields that change what a reply is, and the values that ask for nothing: with any
# other value the request is refused, not answered as if the field were not there.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none", "auto"),
    "function_call": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}),
}


# OpenAI fields that change nothing about a reply: accepted, not used. Any other field not in
# the request's schema or `_NEUTRAL` is refused, so a misspelt key is not quietly dropped.
IGNORED = frozenset(
    {
        "user",
        "metadata",
        "store",
        "service_tier",
        "parallel_tool_calls",
        "prompt_cache_key",
        "safety_identifier",
    }
)

# OpenAI's range for presence_penalty and frequency_penalty.
Penalty = Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class GenerationRequest(_Lenient, _Body):
    """What chat and text completion requests share."""

    model: str
    max_tokens: int | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)] | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    stream: StrictBool | None = None  # "yes" is a client's bug, not a yes
    stream_options: StreamOptions | None = None
    seed: int | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP:
            raise ApiError(
                400, f"stop takes at most {MAX_STOP} strings, not {len(stops)}", param="stop"
            )
        if too_long := [i for i, s in enumerate(stops) if len(s) > MAX_STOP_CHARS]:
            which = "stop" if isinstance(self.stop, str) else f"stop[{too_long[0]}]"
            raise ApiError(
                400,
                f"{which} is {len(stops[too_long[0]])} characters; a stop string is at most "
                f"{MAX_STOP_CHARS}",
                param="stop",
                code="stop_too_long",
            )
        return [s for s in stops if s]

    def asked_tokens(self) -> tuple[int | None, str]:
        """The reply length asked for (None: the default), and the field that asked."""
        return self.max_tokens, "max_tokens"

    def refuse_unsupported(self) -> None:
        """Raise a 400 naming the first field that asks for what this server cannot do."""
        extra = self.model_extra or {}
        for name, neutral in _NEUTRAL.items():
            if name in extra and extra[name] not in neutral:
                raise ApiError(
                    400,
                    f"{name} is not supported by this server: leave it out (or send "
                    f"{json.dumps(neutral[-1])})",
                    param=name,
                    code="unsupported",
                )
        unknown = sorted(set(extra) - set(_NEUTRAL) - IGNORED)
        if unknown:
            known = sorted({*type(self).model_fields, *_NEUTRAL, *IGNORED})
            raise ApiError(
                400,
                f"unknown field {unknown[0]!r}: this server does not know what it asks for, so "
                f"it does not answer as if it were not there; the fields it takes: "
                f"{', '.join(known)}",
                param=unknown[0],
                code="unknown_field",
            )


class ChatRequest(GenerationRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = None  # newer clients' name for max_tokens

    def asked_tokens(self) -> tuple[int | None, str]:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return super().asked_tokens()


class CompletionRequest(GenerationRequest):
    prompt: str | list[str]


class FeedbackRequest(_Body):
    """A rating of one response: `response_id` (or `id`), a rating and/or score, and an
    optional corrected reply. Unknown fields are refused so a misspelt key is not lost."""

    model_config = ConfigDict(extra="forbid")
    response_id: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    id: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    rating: Literal["up", "down"] | None = None
    score: Annotated[float, Field(strict=True, ge=0.0, le=1.0, allow_inf_nan=False)] | None = None
    corrected_reply: Annotated[str, Field(min_length=1)] | None = None

    @model_validator(mode="after")
    def _complete(self) -> FeedbackRequest:
        if (self.response_id is None) == (self.id is None):
            raise ValueError("give the response's id as `response_id` (or `id`), exactly once")
        if self.rating is None and self.score is None:
            raise ValueError("give a `rating` ('up' or 'down') or a `score` in [0, 1], or both")
        if self.corrected_reply is not None and not self.corrected_reply.strip():
            raise ValueError("`corrected_reply` is blank: leave it out or send the reply text")
        return self

    @property
    def interaction_id(self) -> str:
        found = self.response_id if self.response_id is not None else self.id
        assert found is not None
        return found
