"""What the server counts, for `GET /metrics` (Prometheus' text format), and its access log.

`Metrics` holds one app's collectors in a registry of its own (two apps in one process, as in
tests, never share counts). `Observe` is the ASGI middleware that times every request, counts
it by route and status, and writes one JSON line per request to the `retune.access` logger:
method, path (its query string dropped, a key in it redacted), status, milliseconds, the model
version that answered; never a prompt, a reply or a token.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from retune.data import pii

ACCESS_LOG = logging.getLogger("retune.access")

# Generation on a CPU takes from tens of milliseconds to a minute.
_LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# Routes are labels as declared, so a path holding ids or junk does not add a series.
_ROUTES = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/feedback",
    "/v1/models",
    "/healthz",
    "/metrics",
)


def route_of(path: str) -> str:
    if path.startswith("/v1/models/"):
        return "/v1/models/{id}"
    return path if path in _ROUTES else "other"


class Metrics:
    """The server's collectors, in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "retune_requests", "HTTP requests answered", ["route", "status"], registry=r
        )
        self.latency = Histogram(
            "retune_request_duration_seconds",
            "Time from a request's arrival to its answer's last byte",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.first_token = Histogram(
            "retune_time_to_first_token_seconds",
            "Time from a completion request's arrival to its first generated text",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "retune_generated_tokens", "Tokens generated, all choices", registry=r
        )
        self.prompt_tokens = Counter("retune_prompt_tokens", "Prompt tokens read", registry=r)
        self.ratings = Counter(
            "retune_ratings",
            "Feedback received, by rating (up, down; score when only a score was sent)",
            ["rating"],
            registry=r,
        )
        self.rejected = Counter(
            "retune_queue_rejections", "Completion requests answered 429: queue full", registry=r
        )
        self.model_version = Gauge(
            "retune_model_version",
            "Registry version of the model served (0: none yet)",
            ["model"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "retune_queue_depth", "Completion requests waiting for a batch", registry=r
        )
        self.batch_rows = Gauge(
            "retune_batch_rows", "Rows (choices) being generated now", registry=r
        )

    def track(self, depth: Callable[[], int], rows: Callable[[], int]) -> None:
        """Read the queue's depth and the running rows when scraped."""
        self.queue_depth.set_function(depth)
        self.batch_rows.set_function(rows)


class Observe:
    """ASGI middleware: times and counts each request, and logs it as one JSON line."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        seen: dict[str, Any] = {"status": 500, "version": None}

        async def watched(message: Any) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
                headers = dict(message.get("headers") or [])
                seen["version"] = headers.get(b"x-retune-model-version", b"").decode() or None
            await send(message)

        try:
            await self.app(scope, receive, watched)
        finally:
            elapsed = time.perf_counter() - started
            route = route_of(scope["path"])
            self.metrics.requests.labels(route, str(seen["status"])).inc()
            self.metrics.latency.labels(route).observe(elapsed)
            client = scope.get("client")
            ACCESS_LOG.info(
                json.dumps(
                    {
                        "method": scope["method"],
                        "path": shown_path(scope["path"], scope.get("query_string", b"")),
                        "status": seen["status"],
                        "ms": round(elapsed * 1000.0, 1),
                        "model_version": seen["version"],
                        "client": f"{client[0]}:{client[1]}" if client else None,
                    }
                )
            )


def shown_path(path: str, query: bytes) -> str:
    """`path` as logged: a key in it redacted as retune.data.pii redacts secrets, and a query
    string (where a client may have put `?token=...`) replaced by `?[REDACTED]`."""
    return pii.redact(path, ("secret",))[0] + ("?[REDACTED]" if query else "")
