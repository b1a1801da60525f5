"""`retune serve`: an OpenAI-compatible HTTP API of `models:/<register.model_name>@<serve.alias>`.

`create_app(params)` builds the FastAPI app; `serve(params)` runs it with uvicorn. Every
completion is logged to the feedback store (its id is the response id), `POST /v1/feedback`
rates one, and a watcher thread swaps in a new version when the alias moves.
"""

from __future__ import annotations

import asyncio
import copy
import hmac
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from retune.config import Params
from retune.data import pii
from retune.errors import RetuneError
from retune.online.feedback import FeedbackStore, UnknownInteraction

if TYPE_CHECKING:
    from retune.release.registry import Registry

# A failed load of one version is retried no sooner than this, so a broken artifact does not
# reload every poll.
RETRY_FAILED_LOAD_S = 60.0
# OpenAI accepts at most 4 stop sequences; more is a client bug rather than a need. A stop
# string longer than a few sentences is one too, and each costs per generated token.
MAX_STOP = 4
MAX_STOP_CHARS = 256
# Below this a temperature is served greedy, as 0 is: sampling that cold picks the likeliest
# token anyway, and logits divided by a tinier one overflow to inf and NaN.
MIN_SAMPLING_TEMPERATURE = 0.01
# torch seeds its generator with a 64-bit integer; OpenAI's seed is a signed 64-bit one.
MAX_SEED = 2**63 - 1
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _log(message: str) -> None:
    print(f"serve: {message}", flush=True)


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.code, self.headers)


_ERROR_TYPES = {
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    503: "service_unavailable",
}


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    kind = _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    message, param = _encodable(message), None if param is None else _encodable(param)
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _encodable(text: str) -> str:
    """`text` with any lone surrogate (from a client's input) written as `\\udXXX`, so the
    answer can be encoded as UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


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


class ModelWatcher:
    """Serves the version the alias points at; a background thread polls the registry and,
    when the alias moves, loads the new version fully before swapping it in."""

    def __init__(
        self,
        registry: Registry,
        alias: str,
        interval_s: float,
        loader: Callable[[str, int], ServedModel] = load_served,
    ) -> None:
        self.registry, self.alias, self.interval_s = registry, alias, interval_s
        self._loader = loader
        self._current: ServedModel | None = None
        self._failed: tuple[int, float] | None = None  # version, monotonic time of the failure
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._poll_lock = threading.Lock()

    @property
    def current(self) -> ServedModel | None:
        return self._current

    @property
    def uri(self) -> str:
        return f"models:/{self.registry.model_name}@{self.alias}"

    def poll(self) -> None:
        """One check: where does the alias point; load and swap if it moved."""
        with self._poll_lock:
            try:
                target = self.registry.aliases().get(self.alias)
            except Exception as exc:  # the store may be briefly unreachable: keep serving
                self.last_error = f"could not read {self.uri} from the registry: {exc}"
                _log(self.last_error)
                return
            current = self._current
            if target is None:
                if current is not None:
                    self.last_error = (
                        f"{self.uri} points nowhere now; still serving v{current.version}"
                    )
                return
            if current is not None and current.version == target:
                return
            failed = self._failed
            if (
                failed
                and failed[0] == target
                and time.monotonic() - failed[1] < RETRY_FAILED_LOAD_S
            ):
                return
            started = time.perf_counter()
            try:
                loaded = self._loader(self.registry.model_name, target)
            except Exception as exc:
                self._failed = (target, time.monotonic())
                self.last_error = f"loading {self.registry.model_name} v{target} failed: {exc}"
                _log(
                    self.last_error
                    + ("" if current is None else f"; still serving v{current.version}")
                )
                return
            # One reference assignment: a request sees the old model or the new, never a mix.
            self._current = loaded
            self._failed, self.last_error = None, None
            before = "nothing" if current is None else f"v{current.version}"
            _log(
                f"{self.uri} -> v{target} (was {before}): loaded in "
                f"{time.perf_counter() - started:.1f} s, now serving v{target}"
            )

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="retune-model-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def unavailable(self) -> ApiError:
        detail = f" Last error: {self.last_error}" if self.last_error else ""
        return ApiError(
            503,
            f"no model to serve: {self.uri} points at no version yet. Run `retune run` to "
            "train and register one (its gate promotes it), or `retune promote <version>` "
            f"to point {self.alias} at a registered version; this server picks it up within "
            f"{self.interval_s:g} s (serve.reload_interval_s).{detail}",
            code="model_not_loaded",
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
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none", "auto"),
    "function_call": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}),
}


class _GenerationRequest(_Lenient, _Body):
    model: str
    max_tokens: int | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)] | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool | None = None
    seed: int | None = None

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


class ChatRequest(_GenerationRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = None  # newer clients' name for max_tokens

    def asked_tokens(self) -> tuple[int | None, str]:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return super().asked_tokens()


class CompletionRequest(_GenerationRequest):
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


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` gets 413 before any handler runs."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self, size: str) -> JSONResponse:
        return error_response(
            413,
            f"request body is {size}, over this server's limit of {self.max_bytes} bytes "
            "(serve.max_body_bytes)",
            code="body_too_large",
        )

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(f"{int(declared)} bytes")(scope, receive, send)
            return
        # Read the whole (bounded) body here: a chunked upload has no declared length.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._too_large("larger than that")(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> Any:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


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


def _parse_failure(cause: BaseException | None) -> str:
    """What FastAPI's "There was an error parsing the body" was, in words a client can act on."""
    if isinstance(cause, UnicodeDecodeError):
        return f"the body is not UTF-8 text ({cause.reason} at byte {cause.start})"
    if isinstance(cause, RecursionError):
        return "the body's JSON nests too deeply to parse"
    if isinstance(cause, ValueError) and "integer string conversion" in str(cause):
        return f"a number in the body has more than {sys.get_int_max_str_digits()} digits"
    if cause is not None:
        return f"the body is not valid JSON ({cause})"
    return "the body could not be parsed"


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts, first = [], None
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        where = ".".join(loc) or "body"
        first = first or where
        if err.get("type") == "json_invalid":
            parts.append(f"the body is not valid JSON ({err.get('ctx', {}).get('error', '')})")
        elif where == "body" and err.get("type") in ("model_attributes_type", "dict_type"):
            parts.append("the body must be a JSON object (Content-Type: application/json)")
        else:
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts), first


@dataclass
class _State:
    params: Params
    store: FeedbackStore
    token: str | None
    watcher: ModelWatcher | None = None
    # One generation at a time: on a few CPU cores concurrent generate calls thrash each other.
    # A dedicated thread, so queued generations never hold the threadpool feedback writes use.
    generator: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="retune-generate")
    )


def create_app(
    params: Params,
    *,
    store: FeedbackStore | None = None,
    token: str | None = None,
    watcher: ModelWatcher | None = None,
) -> FastAPI:
    """The API for `params`: serves `models:/<register.model_name>@<serve.alias>` from the
    registry at `params.tracking`, logs to `store` (default: `feedback.store_url`).

    `token` (default: the environment variable named by `serve.token_env`, when set and not
    empty) is required as `Authorization: Bearer <token>` on every request that writes.
    """
    cfg = params.serve
    if token is None:
        token = os.environ.get(cfg.token_env) or None
    state = _State(
        params=params,
        store=store or FeedbackStore.open(params.feedback.store_url),
        token=token,
        watcher=watcher,
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if state.watcher is None:
            from retune.release.registry import Registry

            registry = Registry.open(params.tracking, params.register.model_name)
            state.watcher = ModelWatcher(registry, cfg.alias, cfg.reload_interval_s)
        watcher = state.watcher
        await run_in_threadpool(watcher.poll)
        if watcher.current is None:
            _log(watcher.unavailable().message)
        watcher.start()
        auth = "bearer token required for writes" if state.token else "no token set: writes open"
        _log(f"serving {watcher.uri}; feedback store {state.store.url}; {auth}")
        try:
            yield
        finally:
            watcher.stop()
            state.generator.shutdown(wait=True, cancel_futures=True)

    app = FastAPI(
        title="retune",
        summary="OpenAI-compatible completions of the production model, with feedback.",
        lifespan=lifespan,
    )
    app.state.retune = state
    app.add_middleware(BodyLimit, max_bytes=cfg.max_body_bytes)

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(422, message, param=param, code="invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
            return error_response(400, _parse_failure(exc.__cause__), code="invalid_body")
        return error_response(exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(Exception)
    async def _fault(_request: Request, exc: Exception) -> JSONResponse:
        # Reached only by a fault of the server (client mistakes are ApiErrors above); the
        # traceback goes to the server's log, not to the client.
        return error_response(
            500, "internal server error: the server's log has the details", code="internal_error"
        )

    def require_token(request: Request) -> None:
        if state.token is None:
            return
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        given = value.strip().encode() if scheme.lower() == "bearer" else b""
        if not hmac.compare_digest(given, state.token.encode()):
            raise ApiError(
                401,
                "missing or wrong bearer token: send `Authorization: Bearer <token>` with the "
                f"token from the server's {cfg.token_env} environment variable",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def served(requested: str | None = None) -> ServedModel:
        assert state.watcher is not None
        model = state.watcher.current
        if model is None:
            raise state.watcher.unavailable()
        names = {model.name, f"{model.name}@{cfg.alias}", f"models:/{model.name}@{cfg.alias}"}
        if requested is not None and requested not in names:
            raise ApiError(
                404,
                f"model {requested!r} is not served here; this server serves {model.name!r} "
                "(GET /v1/models lists it)",
                param="model",
                code="model_not_found",
            )
        return model

    def model_card(model: ServedModel) -> dict[str, Any]:
        return {
            "id": model.name,
            "object": "model",
            "created": int(model.loaded_at.timestamp()),
            "owned_by": "retune",
            "version": model.version,
            "alias": cfg.alias,
        }

    def max_tokens_for(req: _GenerationRequest, model: ServedModel, prompt_tokens: int) -> int:
        asked, name = req.asked_tokens()
        room = model.context - prompt_tokens
        if room < 1:
            raise ApiError(
                400,
                f"the prompt is {prompt_tokens} tokens, and the model's context is "
                f"{model.context} tokens (prompt plus reply): shorten the prompt",
                param="messages" if isinstance(req, ChatRequest) else "prompt",
                code="context_length_exceeded",
            )
        if asked is None:
            return max(1, min(params.register.max_new_tokens, cfg.max_tokens, room))
        if asked > room:
            raise ApiError(
                400,
                f"{name}={asked} plus the prompt's {prompt_tokens} tokens exceed the "
                f"model's context of {model.context} tokens: lower {name} to at most "
                f"{room} or shorten the prompt",
                param=name,
                code="context_length_exceeded",
            )
        return asked

    def check_common(req: _GenerationRequest) -> None:
        if req.stream:
            raise ApiError(
                400,
                "stream=true is not supported by this server; send stream=false",
                param="stream",
                code="unsupported",
            )
        if req.n not in (None, 1):
            raise ApiError(400, "n must be 1: one choice per request", param="n")
        if req.seed is not None and not 0 <= req.seed <= MAX_SEED:
            raise ApiError(
                400,
                f"seed must be an integer from 0 to {MAX_SEED}",
                param="seed",
                code="seed_out_of_range",
            )
        req.refuse_unsupported()
        asked, name = req.asked_tokens()
        if asked is not None and not 1 <= asked <= cfg.max_tokens:
            raise ApiError(
                400,
                f"{name}={asked} is out of range: this server generates 1 to "
                f"{cfg.max_tokens} tokens per request (serve.max_tokens)",
                param=name,
                code="max_tokens_out_of_range",
            )

    async def complete(
        req: _GenerationRequest,
        kind: Literal["chat", "completion"],
        messages: list[dict[str, str]],
    ) -> tuple[str, ServedModel, Completion, int]:
        started = time.perf_counter()
        check_common(req)
        stops = req.stops()
        model = served(req.model)
        text = render_prompt(model, messages, "messages" if kind == "chat" else "prompt")
        prompt_ids = model.encode(text)
        max_tokens = max_tokens_for(req, model, len(prompt_ids))
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(
            state.generator,
            lambda: generate(
                model, prompt_ids, max_tokens, req.temperature, req.top_p, stops, req.seed
            ),
        )
        latency_ms = (time.perf_counter() - started) * 1000.0
        interaction_id = await run_in_threadpool(
            lambda: state.store.log_interaction(
                model_name=model.name,
                model_version=str(model.version),
                kind=kind,
                messages=messages,
                reply=result.text,
                latency_ms=latency_ms,
                prompt_tokens=result.prompt_tokens,
                completion_tokens=result.completion_tokens,
            )
        )
        return interaction_id, model, result, int(time.time())

    def usage(result: Completion) -> dict[str, int]:
        return {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens,
        }

    def version_headers(model: ServedModel) -> dict[str, str]:
        return {"x-retune-model-version": str(model.version)}

    @app.post("/v1/chat/completions", dependencies=[Depends(require_token)])
    async def chat_completions(req: ChatRequest) -> JSONResponse:
        messages = [{"role": _ROLES[m.role], "content": m.text()} for m in req.messages]
        rid, model, result, created = await complete(req, "chat", messages)
        body = {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": model.name,
            "system_fingerprint": f"v{model.version}",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": result.text},
                    "finish_reason": result.finish_reason,
                    "logprobs": None,
                }
            ],
            "usage": usage(result),
        }
        return JSONResponse(body, headers=version_headers(model))

    @app.post("/v1/completions", dependencies=[Depends(require_token)])
    async def completions(req: CompletionRequest) -> JSONResponse:
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if len(prompts) != 1:
            raise ApiError(
                400, "prompt must be one string (batches are not supported)", param="prompt"
            )
        # Served like the registered model's pyfunc: the prompt is one user turn.
        messages = [{"role": "user", "content": prompts[0]}]
        rid, model, result, created = await complete(req, "completion", messages)
        body = {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": model.name,
            "system_fingerprint": f"v{model.version}",
            "choices": [
                {
                    "index": 0,
                    "text": result.text,
                    "finish_reason": result.finish_reason,
                    "logprobs": None,
                }
            ],
            "usage": usage(result),
        }
        return JSONResponse(body, headers=version_headers(model))

    @app.get("/v1/models")
    def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(served())]}

    @app.get("/v1/models/{model_id:path}")
    def get_model(model_id: str) -> dict[str, Any]:
        return model_card(served(model_id))

    # A plain def: runs in the threadpool, never behind the generation queue.
    @app.post("/v1/feedback", status_code=201, dependencies=[Depends(require_token)])
    def post_feedback(req: FeedbackRequest) -> dict[str, Any]:
        try:
            feedback_id = state.store.add_feedback(
                interaction_id=req.interaction_id,
                rating=req.rating,
                score=req.score,
                corrected_reply=req.corrected_reply,
            )
        except UnknownInteraction as exc:
            raise ApiError(404, str(exc), param="response_id", code="unknown_response") from None
        except ValueError as exc:
            raise ApiError(422, str(exc), code="invalid_feedback") from None
        return {
            "id": feedback_id,
            "object": "feedback",
            "response_id": req.interaction_id,
            "rating": req.rating,
            "score": req.score,
        }

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        watcher = state.watcher
        model = watcher.current if watcher else None
        body: dict[str, Any] = {
            "status": "ok" if model else "no_model",
            "model_uri": watcher.uri if watcher else None,
            "model": model.name if model else params.register.model_name,
            "version": model.version if model else None,
            "loaded_at": model.loaded_at.isoformat() if model else None,
            "context_tokens": model.context if model else None,
            "last_error": watcher.last_error if watcher else None,
        }
        return JSONResponse(body, status_code=200 if model else 503)

    return app


class RedactAccessLog(logging.Filter):
    """Hides what a client may have put a secret in from uvicorn's access log: the query string
    (`?token=...`) goes, and a key in the path is redacted as retune.data.pii redacts secrets."""

    def filter(self, record: logging.LogRecord) -> bool:
        # uvicorn logs (client, method, path with query, HTTP version, status).
        args = record.args
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str):
            path, query, _ = args[2].partition("?")
            shown = pii.redact(path, ("secret",))[0] + ("?[REDACTED]" if query else "")
            record.args = (*args[:2], shown, *args[3:])
        return True


def _uvicorn_config(app: Any, host: str, port: int, log_level: str) -> Any:
    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    log_config = copy.deepcopy(LOGGING_CONFIG)
    log_config.setdefault("filters", {})["redact"] = {"()": RedactAccessLog}
    log_config["loggers"]["uvicorn.access"]["filters"] = ["redact"]
    return uvicorn.Config(
        app, host=host, port=port, log_level=log_level, log_config=log_config, lifespan="on"
    )


def serve(params: Params) -> None:
    """Run the API on `serve.host`:`serve.port` until interrupted."""
    import uvicorn

    app = create_app(params)
    uvicorn.Server(_uvicorn_config(app, params.serve.host, params.serve.port, "info")).run()


@contextmanager
def serve_in_thread(
    app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"
) -> Iterator[str]:
    """Run `app` with uvicorn in a background thread, logging as `serve` does at `log_level`;
    yield its base URL (`http://host:port`, the port picked by the OS when 0) once it accepts
    requests; stop it on exit."""
    import uvicorn

    server = uvicorn.Server(_uvicorn_config(app, host, port, log_level))
    thread = threading.Thread(target=server.run, name="retune-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 300
    while not server.started:
        if not thread.is_alive():
            raise RetuneError(f"the server did not start on {host}:{port} (see the log above)")
        if time.monotonic() > deadline:
            raise RetuneError(f"the server did not start on {host}:{port} within 300 s")
        time.sleep(0.05)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)
