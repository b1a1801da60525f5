"""How a stage is entered: `python -m tasks.<stage>` (DVC) and as a Prefect task (flows)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, ParamSpec, TypeVar

from retune.config import DEFAULT_PARAMS, ConfigError, Params, load_params
from retune.env import configure_environment
from retune.errors import RetuneError

if TYPE_CHECKING:
    from prefect import Task

P = ParamSpec("P")
R = TypeVar("R")


def stage_main(run: Callable[[Params], object], params_path: Path = DEFAULT_PARAMS) -> None:
    """Run one stage as DVC does: read params.yaml, call `run`, exit 1 with the message on a
    user-fixable error (no traceback: the message says what to fix)."""
    configure_environment()
    try:
        run(load_params(params_path, sys.argv[1:]))
    except (ConfigError, RetuneError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def stage_task(run: Callable[P, R], name: str) -> Task[P, R]:
    """Wrap a stage's `run` (or a piece of a stage, such as one CV fold) as the Prefect task
    the flows call: the same function DVC's cmd runs.

    No result caching: each stage already writes its outputs to files named in params.yaml,
    and a cache keyed on the params alone would skip work after the data changed.
    """
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    return task(name=name, cache_policy=NO_CACHE)(run)
