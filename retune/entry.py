"""The `python -m tasks.<stage>` entry: environment, params, one stage, a clean exit code."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from retune.config import DEFAULT_PARAMS, ConfigError, Params, load_params
from retune.env import configure_environment
from retune.errors import RetuneError


def stage_main(run: Callable[[Params], object], params_path: Path = DEFAULT_PARAMS) -> None:
    """Run one stage as DVC does: read params.yaml, call `run`, exit 1 with the message on a
    user-fixable error (no traceback: the message says what to fix)."""
    configure_environment()
    try:
        run(load_params(params_path, sys.argv[1:]))
    except (ConfigError, RetuneError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
