"""Registered tiny models for the server tests (test_serve, test_serve_fuzz): the real
register stage writes them to a temporary MLflow store, the way `retune run` does."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from retune.config import Params
from retune.online.feedback import FeedbackStore
from retune.online.serving import create_app, serve_in_thread
from retune.release.registry import Registry
from tests.helpers import tiny_params_for

TOKEN = "test-token-" + "x" * 20


def auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def register_versions(params: Params, model_dir: Path, times: int) -> list[int]:
    """Register `model_dir` `times` times under `params.register.model_name` with the real
    register stage (a bare MLflow run stands in for train's); return the versions."""
    import mlflow

    from retune.release.gitinfo import GitState
    from retune.release.tracking import setup_tracking
    from tasks.register import ModelFacts, register

    setup_tracking(params.tracking)
    with mlflow.start_run() as run:
        pass
    facts = ModelFacts(
        model_name=params.register.model_name,
        run_id=run.info.run_id,
        params={},
        git=GitState(commit=None, dirty=None),
    )
    return [
        register(params.register, params.tracking, model_dir, facts).version for _ in range(times)
    ]


def serve_params(tmp: Path, **sections: dict) -> Params:
    """Tiny params with the feedback store under `tmp` and a fast reload interval."""
    return tiny_params_for(
        tmp,
        serve={"reload_interval_s": 0.2, **sections.pop("serve", {})},
        feedback={"store_url": f"sqlite:///{tmp}/feedback/feedback.db"},
        **sections,
    )


def registered_params(tmp: Path, model_dir: Path) -> Params:
    """Params of a store under `tmp` holding `retune-test` v1 (production) and v2 (no alias),
    both `model_dir`."""
    params = serve_params(tmp)
    v1, v2 = register_versions(params, model_dir, times=2)
    assert (v1, v2) == (1, 2)
    Registry.open(params.tracking, "retune-test").move_alias(
        "production", v1, kind="promote", why="test", forced=False, actor="test"
    )
    return params


@contextmanager
def serving(params: Params, **options: Any) -> Iterator[tuple[str, FeedbackStore]]:
    """`params`' server on loopback, writes behind `TOKEN`: its base URL and feedback store.
    `options` go to `serve_in_thread` (log_level)."""
    store = FeedbackStore.open(params.feedback.store_url)
    with serve_in_thread(create_app(params, store=store, token=TOKEN), **options) as url:
        yield url, store
