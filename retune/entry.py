"""How a stage is entered: `python -m tasks.<stage>` (DVC) and as a Prefect task (flows)."""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, cast

from retune.config import DEFAULT_PARAMS, ConfigError, Params, load_params
from retune.env import configure_environment
from retune.errors import RetuneError

if TYPE_CHECKING:
    from prefect import Task

P = ParamSpec("P")
R = TypeVar("R")


def stage_main(run: Callable[[Params], object], params_path: Path = DEFAULT_PARAMS) -> None:
    """Run one stage as DVC does: read params.yaml, call `run` holding the project's run lock,
    exit 1 with the message on an error (no traceback unless RETUNE_DEBUG=1: the message says
    what to fix)."""
    from retune.runlock import project_folder, run_lock

    configure_environment()
    try:
        params = load_params(params_path, sys.argv[1:])
        with run_lock(project_folder(params_path)):
            run(params)
    except Exception as exc:
        if debug_requested():
            raise
        print(f"error: {error_message(exc)}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        skip_final_collection()


DEBUG_ENV = "RETUNE_DEBUG"


def debug_requested() -> bool:
    """Whether the user asked for tracebacks (`--debug` or RETUNE_DEBUG=1)."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def error_message(exc: BaseException) -> str:
    """One line for the user: retune's own message, or what failed and how to see more."""
    if isinstance(exc, ConfigError | RetuneError):
        return str(exc)
    if isinstance(exc, OSError) and exc.filename:
        message = f"{exc.filename}: {exc.strerror or exc}"
    else:
        message = f"unexpected {type(exc).__name__}: {exc}"
    return f"{message}\n(rerun with {DEBUG_ENV}=1, or `retune --debug ...`, for the traceback)"


def skip_final_collection() -> None:
    """Call last, on the way out of a command. Every object alive then is freed at exit anyway;
    frozen, the interpreter's final garbage collections skip them instead of walking the whole
    heap of torch, transformers and GX (1-3 s of every stage's and `retune run`'s wall time)."""
    gc.freeze()


def stage_task(run: Callable[P, R], name: str) -> Task[P, R]:
    """Wrap a stage's `run` (or a piece of a stage, such as one CV fold) as the Prefect task
    the flows call: the same function DVC's cmd runs.

    No result caching: each stage already writes its outputs to files named in params.yaml,
    and a cache keyed on the params alone would skip work after the data changed.

    The task is made on first use, so a stage run by DVC (`python -m tasks.<stage>`) or a CLI
    command other than `run` never imports Prefect (~1.2 s of each such process).
    """
    return cast("Task[P, R]", _LazyTask(run, name))


class _LazyTask:
    """Stands for the Prefect task of `fn`: calls and attributes (`submit`, `name`, ...) go to
    the task, made when first needed."""

    def __init__(self, fn: Callable[..., Any], name: str) -> None:
        self._fn, self._name = fn, name
        self._task: Task[..., Any] | None = None

    def _made(self) -> Task[..., Any]:
        if self._task is None:
            from prefect import task
            from prefect.cache_policies import NO_CACHE

            self._task = task(name=self._name, cache_policy=NO_CACHE)(self._fn)
        return self._task

    def prefect_task(self) -> Task[..., Any]:
        """The task itself, for APIs that check its type (a task runner's `submit`)."""
        return self._made()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._made()(*args, **kwargs)

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("_"):  # its own fields, before unpickling set them (process pools)
            raise AttributeError(attr)
        return getattr(self._made(), attr)

    def __repr__(self) -> str:
        return f"<Prefect task {self._name!r} of {self._fn.__module__}.{self._fn.__qualname__}>"
