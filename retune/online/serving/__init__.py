"""`retune serve`: an OpenAI-compatible HTTP API of `models:/<register.model_name>@<serve.alias>`.

`create_app(params)` builds the FastAPI app; `serve(params)` runs it with uvicorn. Every
completion, streamed or not, is logged to the feedback store (its id is the response id),
`POST /v1/feedback` rates one, a watcher thread swaps in a new version when the alias moves,
and `GET /metrics` shows what the server did in Prometheus' format.

The package's modules: `schemas` (request bodies), `errors` (OpenAI-shaped errors),
`generation` (a loaded version), `batching` (concurrent requests' replies generated together,
token by token), `watcher` (following the alias), `metrics` (counters and the access log),
`routes` (the handlers and their shared state), `app` (putting it together and running it).
"""

from retune.online.serving.app import create_app, serve, serve_in_thread
from retune.online.serving.errors import ApiError
from retune.online.serving.generation import ServedModel, load_served, render_prompt
from retune.online.serving.watcher import ModelWatcher

__all__ = [
    "ApiError",
    "ModelWatcher",
    "ServedModel",
    "create_app",
    "load_served",
    "render_prompt",
    "serve",
    "serve_in_thread",
]
