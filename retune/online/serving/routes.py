"""The API's routes, on `router`: chat and text completions, the model list, feedback and health.

Handlers hold no state of their own: they get the server's `ServeState` (settings, feedback
store, token, watcher, generation thread) through the `State` dependency, from the app's
`state.retune`, which `create_app` sets.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from retune.config import Params
from retune.online.feedback import FeedbackStore, UnknownInteraction
from retune.online.serving.errors import ApiError
from retune.online.serving.generation import Completion, ServedModel, generate, render_prompt
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
    # One generation at a time: on a few CPU cores concurrent generate calls thrash each other.
    # A dedicated thread, so queued generations never hold the threadpool feedback writes use.
    generator: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="retune-generate")
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


def _check_common(req: GenerationRequest, max_tokens: int) -> None:
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
    if asked is not None and not 1 <= asked <= max_tokens:
        raise ApiError(
            400,
            f"{name}={asked} is out of range: this server generates 1 to "
            f"{max_tokens} tokens per request (serve.max_tokens)",
            param=name,
            code="max_tokens_out_of_range",
        )


@dataclass(frozen=True)
class _Completed:
    id: str  # the logged interaction's
    model: ServedModel
    result: Completion
    created: int  # Unix seconds


async def _complete(
    state: ServeState,
    req: GenerationRequest,
    kind: Literal["chat", "completion"],
    messages: list[dict[str, str]],
) -> _Completed:
    """Generate the reply to `messages` on the generation thread and log it to the store."""
    started = time.perf_counter()
    _check_common(req, state.params.serve.max_tokens)
    stops = req.stops()
    model = state.served(req.model)
    text = render_prompt(model, messages, "messages" if kind == "chat" else "prompt")
    prompt_ids = model.encode(text)
    max_tokens = _max_tokens_for(state.params, req, model, len(prompt_ids))
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
    return _Completed(interaction_id, model, result, int(time.time()))


def _answer(completed: _Completed, kind: str, reply: dict[str, Any]) -> JSONResponse:
    """The response of object `kind` to a completion, its one choice holding `reply`."""
    model, result = completed.model, completed.result
    body = {
        "id": completed.id,
        "object": kind,
        "created": completed.created,
        "model": model.name,
        "system_fingerprint": f"v{model.version}",
        "choices": [{"index": 0, **reply, "finish_reason": result.finish_reason, "logprobs": None}],
        "usage": {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens,
        },
    }
    return JSONResponse(body, headers={"x-retune-model-version": str(model.version)})


router = APIRouter()


@router.post("/v1/chat/completions", dependencies=[Depends(require_token)])
async def chat_completions(req: ChatRequest, state: State) -> JSONResponse:
    messages = [{"role": _ROLES[m.role], "content": m.text()} for m in req.messages]
    completed = await _complete(state, req, "chat", messages)
    reply = {"message": {"role": "assistant", "content": completed.result.text}}
    return _answer(completed, "chat.completion", reply)


@router.post("/v1/completions", dependencies=[Depends(require_token)])
async def completions(req: CompletionRequest, state: State) -> JSONResponse:
    prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    if len(prompts) != 1:
        raise ApiError(400, "prompt must be one string (batches are not supported)", param="prompt")
    # Served like the registered model's pyfunc: the prompt is one user turn.
    messages = [{"role": "user", "content": prompts[0]}]
    completed = await _complete(state, req, "completion", messages)
    return _answer(completed, "text_completion", {"text": completed.result.text})


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
    return {
        "id": feedback_id,
        "object": "feedback",
        "response_id": req.interaction_id,
        "rating": req.rating,
        "score": req.score,
    }


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
