"""The API's routes, on `router`: chat and text completions, the model list, feedback and health.

Handlers hold no state of their own: they get the server's `ServeState` (settings, feedback
store, token, watcher, generation thread) through the `State` dependency, from the app's
`state.retune`, which `create_app` sets.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from retune.config import Params, ServeParams
from retune.online.feedback import FeedbackStore, UnknownInteraction, new_interaction_id
from retune.online.serving.batching import Batcher, Event, Job, QueueFull, Sampling
from retune.online.serving.errors import ApiError
from retune.online.serving.generation import ServedModel, render_prompt
from retune.online.serving.metrics import Metrics
from retune.online.serving.schemas import (
    ChatRequest,
    CompletionRequest,
    FeedbackRequest,
    GenerationRequest,
)
from retune.online.serving.watcher import ModelWatcher

# torch seeds its generator with a 64-bit integer; OpenAI's seed is a signed 64-bit one.
MAX_SEED = 2**63 - 1
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass
class ServeState:
    """What the handlers share: set up by `create_app`, the watcher by the app's startup."""

    params: Params
    store: FeedbackStore
    token: str | None
    watcher: ModelWatcher | None = None
    # Generation runs in batches on the batcher's own thread, so queued generations never
    # hold the threadpool feedback writes use.
    batcher: Batcher = field(default_factory=lambda: Batcher(8, 32))
    metrics: Metrics = field(default_factory=Metrics)
    # Logs what a disconnected stream generated, without holding up the event loop.
    background: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(2, thread_name_prefix="retune-log")
    )

    def served(self, requested: str | None = None) -> ServedModel:
        """The model now served; a 503 when there is none, a 404 when `requested` names
        another."""
        assert self.watcher is not None
        model = self.watcher.current
        if model is None:
            raise self.watcher.unavailable()
        alias = self.params.serve.alias
        names = {model.name, f"{model.name}@{alias}", f"models:/{model.name}@{alias}"}
        if requested is not None and requested not in names:
            raise ApiError(
                404,
                f"model {requested!r} is not served here; this server serves {model.name!r} "
                "(GET /v1/models lists it)",
                param="model",
                code="model_not_found",
            )
        return model

    def model_card(self, model: ServedModel) -> dict[str, Any]:
        return {
            "id": model.name,
            "object": "model",
            "created": int(model.loaded_at.timestamp()),
            "owned_by": "retune",
            "version": model.version,
            "alias": self.params.serve.alias,
        }


async def _state(request: Request) -> ServeState:
    state: ServeState = request.app.state.retune
    return state


State = Annotated[ServeState, Depends(_state)]


def require_token(request: Request, state: State) -> None:
    """Refuse (401) a request without the server's bearer token, when it has one."""
    if state.token is None:
        return
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    given = value.strip().encode() if scheme.lower() == "bearer" else b""
    if not hmac.compare_digest(given, state.token.encode()):
        raise ApiError(
            401,
            "missing or wrong bearer token: send `Authorization: Bearer <token>` with the "
            f"token from the server's {state.params.serve.token_env} environment variable",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )


def _max_tokens_for(
    params: Params, req: GenerationRequest, model: ServedModel, prompt_tokens: int
) -> int:
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
        return max(1, min(params.register.max_new_tokens, params.serve.max_tokens, room))
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


def _check_common(req: GenerationRequest, cfg: ServeParams) -> int:
    """Refuse what the server cannot do for `req`; the number of choices it asks for."""
    n = 1 if req.n is None else req.n
    most = min(cfg.max_n, cfg.max_batch)
    if not 1 <= n <= most:
        raise ApiError(
            400,
            f"n={n} is out of range: this server returns 1 to {most} choices per request "
            "(serve.max_n, at most serve.max_batch)",
            param="n",
            code="n_out_of_range",
        )
    if req.stream_options is not None and not req.stream:
        raise ApiError(
            400,
            "stream_options is only allowed with stream=true",
            param="stream_options",
        )
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
    return n


@dataclass
class _Choice:
    text: str = ""
    finish_reason: str | None = None
    tokens: int = 0


@dataclass
class _Generation:
    """One request's generation under way: its id and model, its choices as they grow, and
    the events of the batcher's thread on an asyncio queue."""

    id: str  # the interaction's, handed out before generation so a stream carries it
    kind: Literal["chat", "completion"]
    model: ServedModel
    messages: list[dict[str, str]]
    prompt_tokens: int
    job: Job
    events: asyncio.Queue[Event]
    started: float  # perf_counter at the request's arrival
    created: int = field(default_factory=lambda: int(time.time()))
    choices: list[_Choice] = field(default_factory=list)
    first_token_at: float | None = None

    async def next(self) -> tuple[str, int, str | tuple[str, int, str]]:
        """The next event; a fault of the model is raised here."""
        kind, index, value = await self.events.get()
        if kind == "error":
            raise value
        assert index is not None
        if kind == "delta":
            if self.first_token_at is None:
                self.first_token_at = time.perf_counter()
            self.choices[index].text += value
        else:
            reason, tokens, text = value
            self.choices[index] = _Choice(text, reason, tokens)
        return kind, index, value

    @property
    def done(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)

    def usage(self) -> dict[str, int]:
        completion = sum(c.tokens for c in self.choices)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }

    def record(self, state: ServeState) -> None:
        """Log the interaction (the first choice's reply) and count it; from a worker thread."""
        usage = self.usage()
        state.metrics.tokens.inc(usage["completion_tokens"])
        state.metrics.prompt_tokens.inc(usage["prompt_tokens"])
        if self.first_token_at is not None:
            state.metrics.first_token.observe(self.first_token_at - self.started)
        state.store.log_interaction(
            interaction_id=self.id,
            model_name=self.model.name,
            model_version=str(self.model.version),
            kind=self.kind,
            messages=self.messages,
            reply=self.choices[0].text,
            latency_ms=(time.perf_counter() - self.started) * 1000.0,
            prompt_tokens=usage["prompt_tokens"],
            completion_tokens=usage["completion_tokens"],
        )


def _put(loop: asyncio.AbstractEventLoop, events: asyncio.Queue[Event], event: Event) -> None:
    """Hand `event` from the batcher's thread to the request's task."""
    if not loop.is_closed():
        loop.call_soon_threadsafe(events.put_nowait, event)


def _start(
    state: ServeState,
    req: GenerationRequest,
    kind: Literal["chat", "completion"],
    messages: list[dict[str, str]],
) -> _Generation:
    """Check `req`, queue its generation (429 when the queue is full) and return it."""
    started = time.perf_counter()
    cfg = state.params.serve
    n = _check_common(req, cfg)
    stops = req.stops()
    model = state.served(req.model)
    text = render_prompt(model, messages, "messages" if kind == "chat" else "prompt")
    prompt_ids = model.encode(text)
    max_tokens = _max_tokens_for(state.params, req, model, len(prompt_ids))
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()
    # No temperature is greedy, retune's default; but top_p alone asks for sampling, at
    # OpenAI's default temperature of 1, rather than being ignored.
    temperature = 1.0 if req.temperature is None and req.top_p is not None else req.temperature
    sampling = Sampling(
        temperature=temperature,
        top_p=req.top_p,
        seed=req.seed,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
    )
    job = Job(
        model=model,
        prompt_ids=prompt_ids,
        max_tokens=max_tokens,
        stops=stops,
        sampling=sampling,
        n=n,
        emit=lambda event: _put(loop, events, event),
    )
    try:
        state.batcher.submit(job)
    except QueueFull:
        state.metrics.rejected.inc()
        wait = state.batcher.retry_after_s(max_tokens)
        raise ApiError(
            429,
            f"the server is busy: {cfg.max_queue} requests are already waiting "
            f"(serve.max_queue); retry in {wait} s",
            code="queue_full",
            headers={"Retry-After": str(wait)},
        ) from None
    return _Generation(
        id=new_interaction_id(kind),
        kind=kind,
        model=model,
        messages=messages,
        prompt_tokens=len(prompt_ids),
        job=job,
        events=events,
        started=started,
        choices=[_Choice() for _ in range(n)],
    )


async def _finish(state: ServeState, gen: _Generation) -> None:
    """Wait for every choice, then log the interaction."""
    try:
        while not gen.done:
            await gen.next()
    except BaseException:
        gen.job.cancelled.set()  # the client went away (or the model failed): stop its rows
        raise
    await run_in_threadpool(gen.record, state)


def _answer(gen: _Generation, kind: str, reply: Callable[[_Choice], dict[str, Any]]) -> Any:
    """The response of object `kind` to a finished generation, each choice as `reply` has it."""
    body = {
        "id": gen.id,
        "object": kind,
        "created": gen.created,
        "model": gen.model.name,
        "system_fingerprint": f"v{gen.model.version}",
        "choices": [
            {"index": i, **reply(c), "finish_reason": c.finish_reason, "logprobs": None}
            for i, c in enumerate(gen.choices)
        ],
        "usage": gen.usage(),
    }
    return JSONResponse(body, headers=_version_header(gen))


def _version_header(gen: _Generation) -> dict[str, str]:
    return {"x-retune-model-version": str(gen.model.version)}


def _sse(data: Any) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


def _stream(
    state: ServeState,
    gen: _Generation,
    req: GenerationRequest,
    chunk: Callable[[dict[str, Any]], dict[str, Any]],
) -> StreamingResponse:
    """Server-sent events of `gen` in OpenAI's shape: `chunk` wraps each choice's piece (a
    delta or text and finish_reason) into the route's chunk object; usage last when asked;
    `data: [DONE]`. The interaction is logged before [DONE]; a client that disconnects stops
    its rows, and what it was sent is logged."""
    include_usage = req.stream_options is not None and req.stream_options.include_usage

    def envelope(choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": gen.id,
            "created": gen.created,
            "model": gen.model.name,
            "system_fingerprint": f"v{gen.model.version}",
            "choices": choices,
        }

    async def events() -> AsyncIterator[bytes]:
        finished = False
        try:
            yield _sse(chunk(envelope([{"index": i, "start": True} for i in range(req.n or 1)])))
            while not gen.done:
                kind, index, value = await gen.next()
                piece = value if kind == "delta" else ""
                reason = None if kind == "delta" else gen.choices[index].finish_reason
                if piece or reason:
                    one = {"index": index, "piece": piece, "finish_reason": reason}
                    yield _sse(chunk(envelope([one])))
            finished = True
            await run_in_threadpool(gen.record, state)
            if include_usage:
                yield _sse({**chunk(envelope([])), "usage": gen.usage()})
            yield b"data: [DONE]\n\n"
        finally:
            if not finished:
                gen.job.cancelled.set()
                # Not awaited: a cancelled task cannot wait; the id was handed out, so what
                # was generated is logged for a rating to refer to.
                state.background.submit(gen.record, state)

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={**_version_header(gen), "Cache-Control": "no-cache"},
    )


def _chat_chunk(body: dict[str, Any]) -> dict[str, Any]:
    choices = []
    for c in body["choices"]:
        if c.get("start"):
            delta: dict[str, Any] = {"role": "assistant", "content": ""}
        else:
            delta = {"content": c["piece"]} if c["piece"] else {}
        choices.append(
            {
                "index": c["index"],
                "delta": delta,
                "finish_reason": c.get("finish_reason"),
                "logprobs": None,
            }
        )
    return {**body, "object": "chat.completion.chunk", "choices": choices}


def _text_chunk(body: dict[str, Any]) -> dict[str, Any]:
    choices = [
        {
            "index": c["index"],
            "text": c.get("piece", ""),
            "finish_reason": c.get("finish_reason"),
            "logprobs": None,
        }
        for c in body["choices"]
        if not c.get("start")
    ]
    return {**body, "object": "text_completion", "choices": choices}


router = APIRouter()


@router.post("/v1/chat/completions", dependencies=[Depends(require_token)])
async def chat_completions(req: ChatRequest, state: State) -> Any:
    messages = [{"role": _ROLES[m.role], "content": m.text()} for m in req.messages]
    gen = _start(state, req, "chat", messages)
    if req.stream:
        return _stream(state, gen, req, _chat_chunk)
    await _finish(state, gen)
    return _answer(
        gen, "chat.completion", lambda c: {"message": {"role": "assistant", "content": c.text}}
    )


@router.post("/v1/completions", dependencies=[Depends(require_token)])
async def completions(req: CompletionRequest, state: State) -> Any:
    prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    if len(prompts) != 1:
        raise ApiError(400, "prompt must be one string (batches are not supported)", param="prompt")
    # Served like the registered model's pyfunc: the prompt is one user turn.
    messages = [{"role": "user", "content": prompts[0]}]
    gen = _start(state, req, "completion", messages)
    if req.stream:
        return _stream(state, gen, req, _text_chunk)
    await _finish(state, gen)
    return _answer(gen, "text_completion", lambda c: {"text": c.text})


@router.get("/v1/models")
def list_models(state: State) -> dict[str, Any]:
    return {"object": "list", "data": [state.model_card(state.served())]}


@router.get("/v1/models/{model_id:path}")
def get_model(model_id: str, state: State) -> dict[str, Any]:
    return state.model_card(state.served(model_id))


# A plain def: runs in the threadpool, never behind the generation queue.
@router.post("/v1/feedback", status_code=201, dependencies=[Depends(require_token)])
def post_feedback(req: FeedbackRequest, state: State) -> dict[str, Any]:
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
    state.metrics.ratings.labels(req.rating or "score").inc()
    return {
        "id": feedback_id,
        "object": "feedback",
        "response_id": req.interaction_id,
        "rating": req.rating,
        "score": req.score,
    }


@router.get("/metrics")
def metrics(state: State) -> Response:
    """Prometheus' text format: requests, latency, tokens, ratings, version, queue depth."""
    model = state.watcher.current if state.watcher else None
    gauge = state.metrics.model_version.labels(state.params.register.model_name)
    gauge.set(model.version if model else 0)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/healthz")
def healthz(state: State) -> JSONResponse:
    watcher = state.watcher
    model = watcher.current if watcher else None
    body: dict[str, Any] = {
        "status": "ok" if model else "no_model",
        "model_uri": watcher.uri if watcher else None,
        "model": model.name if model else state.params.register.model_name,
        "version": model.version if model else None,
        "loaded_at": model.loaded_at.isoformat() if model else None,
        "context_tokens": model.context if model else None,
        "last_error": watcher.last_error if watcher else None,
    }
    return JSONResponse(body, status_code=200 if model else 503)
