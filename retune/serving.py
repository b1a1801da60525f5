"""`retune serve`: an OpenAI-compatible HTTP API of `models:/<register.model_name>@<serve.alias>`.

`create_app(params)` builds the FastAPI app; `serve(params)` runs it with uvicorn. Every
completion is logged to the feedback store (its id is the response id), `POST /v1/feedback`
rates one, and a watcher thread swaps in a new version when the alias moves.
"""

from __future__ import annotations

import asyncio
import hmac
import os
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
from retune.errors import RetuneError
from retune.feedback import FeedbackStore, UnknownInteraction

if TYPE_CHECKING:
    from retune.registry import Registry

# A failed load of one version is retried no sooner than this, so a broken artifact does not
# reload every poll.
RETRY_FAILED_LOAD_S = 60.0
# OpenAI accepts at most 4 stop sequences; more is a client bug rather than a need.
MAX_STOP = 4
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
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


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
    from retune.chat import ensure_chat_template
    from retune.registry import load_version

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


def generate(
    served: ServedModel,
    prompt_ids: list[int],
    max_tokens: int,
    temperature: float | None,
    top_p: float | None,
    stop: list[str],
    seed: int | None,
) -> Completion:
    """One reply to `prompt_ids`: greedy when temperature is 0 or unset, sampled otherwise;
    cut before the first `stop` string. The model's generation config says which tokens end
    a turn (set by `register`)."""
    import torch

    from retune.scoring import generate_tokens

    kwargs: dict[str, Any] = {"do_sample": False}
    if temperature:
        kwargs = {"do_sample": True, "temperature": temperature}
        if top_p is not None:
            kwargs["top_p"] = top_p
        if seed is not None:
            torch.manual_seed(seed)
    if stop:
        kwargs.update(stop_strings=stop, tokenizer=served.tokenizer)
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


class _Lenient(BaseModel):
    # OpenAI clients send fields retune has no use for (user, metadata, penalties, ...).
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


class _GenerationRequest(_Lenient):
    model: str
    max_tokens: int | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool | None = None
    seed: int | None = None

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        stops = [s for s in stops if s]
        if len(stops) > MAX_STOP:
            raise ApiError(400, f"stop takes at most {MAX_STOP} strings", param="stop")
        return stops


class ChatRequest(_GenerationRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = None  # newer clients' name for max_tokens


class CompletionRequest(_GenerationRequest):
    prompt: str | list[str]


class FeedbackRequest(BaseModel):
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
            from retune.registry import Registry

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
        return error_response(exc.status_code, str(exc.detail), headers=exc.headers)

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

    def max_tokens_for(
        req: _GenerationRequest, asked: int | None, model: ServedModel, prompt_tokens: int
    ) -> int:
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
                f"max_tokens={asked} plus the prompt's {prompt_tokens} tokens exceed the "
                f"model's context of {model.context} tokens: lower max_tokens to at most "
                f"{room} or shorten the prompt",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return asked

    def check_common(req: _GenerationRequest, asked: int | None) -> None:
        if req.stream:
            raise ApiError(
                400,
                "stream=true is not supported by this server; send stream=false",
                param="stream",
                code="unsupported",
            )
        if req.n not in (None, 1):
            raise ApiError(400, "n must be 1: one choice per request", param="n")
        if asked is not None and not 1 <= asked <= cfg.max_tokens:
            raise ApiError(
                400,
                f"max_tokens={asked} is out of range: this server generates 1 to "
                f"{cfg.max_tokens} tokens per request (serve.max_tokens)",
                param="max_tokens",
                code="max_tokens_out_of_range",
            )

    async def complete(
        req: _GenerationRequest,
        kind: Literal["chat", "completion"],
        messages: list[dict[str, str]],
        asked: int | None,
    ) -> tuple[str, ServedModel, Completion, int]:
        started = time.perf_counter()
        check_common(req, asked)
        stops = req.stops()
        model = served(req.model)
        from retune.chat import render

        with model.tokenizer_lock:
            text = render(model.tokenizer, messages, add_generation_prompt=True)
        prompt_ids = model.encode(text)
        max_tokens = max_tokens_for(req, asked, model, len(prompt_ids))
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
        asked = (
            req.max_completion_tokens if req.max_completion_tokens is not None else (req.max_tokens)
        )
        rid, model, result, created = await complete(req, "chat", messages, asked)
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
        rid, model, result, created = await complete(req, "completion", messages, req.max_tokens)
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


def serve(params: Params) -> None:
    """Run the API on `serve.host`:`serve.port` until interrupted."""
    import uvicorn

    app = create_app(params)
    uvicorn.run(app, host=params.serve.host, port=params.serve.port, log_level="info")


@contextmanager
def serve_in_thread(app: Any, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run `app` with uvicorn in a background thread; yield its base URL (`http://host:port`,
    the port picked by the OS when 0) once it accepts requests; stop it on exit."""
    import uvicorn

    server = uvicorn.Server(
        uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on")
    )
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
