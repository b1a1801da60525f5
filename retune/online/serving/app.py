"""The app and how it runs: `create_app` puts the state, the routes, the error handlers, the
body limit and the metrics together; `serve` runs it with uvicorn, `serve_in_thread` in a
background thread, both with retune's JSON access log (`metrics.Observe`) instead of uvicorn's."""

from __future__ import annotations

import copy
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from retune.config import Params
from retune.errors import RetuneError
from retune.online.feedback import FeedbackStore
from retune.online.serving.batching import Batcher
from retune.online.serving.errors import add_error_handlers, error_response
from retune.online.serving.metrics import ACCESS_LOG, Observe
from retune.online.serving.routes import ServeState, router
from retune.online.serving.watcher import ModelWatcher, log


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


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start watching the registry (the first poll before any request), stop on shutdown."""
    state: ServeState = app.state.retune
    params = state.params
    if state.watcher is None:
        from retune.release.registry import Registry

        registry = Registry.open(params.tracking, params.register.model_name)
        state.watcher = ModelWatcher(registry, params.serve.alias, params.serve.reload_interval_s)
    watcher = state.watcher
    await run_in_threadpool(watcher.poll)
    if watcher.current is None:
        log(watcher.unavailable().message)
    watcher.start()
    state.metrics.track(lambda: state.batcher.depth, lambda: state.batcher.running_rows)
    state.batcher.start()
    auth = "bearer token required for writes" if state.token else "no token set: writes open"
    log(f"serving {watcher.uri}; feedback store {state.store.url}; {auth}")
    try:
        yield
    finally:
        watcher.stop()
        state.batcher.stop()
        state.background.shutdown(wait=True)


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
    state = ServeState(
        params=params,
        store=store or FeedbackStore.open(params.feedback.store_url),
        token=token,
        watcher=watcher,
        batcher=Batcher(cfg.max_batch, cfg.max_queue),
    )
    app = FastAPI(
        title="retune",
        summary="OpenAI-compatible completions of the production model, with feedback.",
        lifespan=_lifespan,
    )
    app.state.retune = state
    app.add_middleware(BodyLimit, max_bytes=cfg.max_body_bytes)
    app.add_middleware(Observe, metrics=state.metrics)  # outermost: sees the 413s too
    add_error_handlers(app)
    app.include_router(router)
    return app


def _uvicorn_config(app: Any, host: str, port: int, log_level: str) -> Any:
    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    log_config = copy.deepcopy(LOGGING_CONFIG)
    log_config["formatters"]["line"] = {"format": "%(message)s"}
    log_config["handlers"]["access_json"] = {
        "formatter": "line",
        "class": "logging.StreamHandler",
        "stream": "ext://sys.stdout",
    }
    log_config["loggers"][ACCESS_LOG.name] = {
        "handlers": ["access_json"],
        "level": "DEBUG" if log_level == "trace" else log_level.upper(),
        "propagate": False,
    }
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        log_config=log_config,
        lifespan="on",
        access_log=False,
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
