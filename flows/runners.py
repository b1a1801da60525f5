"""Where a flow runs its independent tasks (CV folds, tuning trials): `params.runner`.

`sequential` runs them one after another in the flow's process; `process` side by side on
Prefect's `ProcessPoolTaskRunner` (spawned processes on this machine, each given its share of
the cores); `ray` on `prefect-ray`'s `RayTaskRunner`, a local Ray cluster on 127.0.0.1 or the
one at `runner.ray_address` (the `ray` extra: `pip install -e '.[ray]'`). retune adds no
scheduler of its own: these are the engines Prefect already ships or integrates.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from retune.config import RunnerParams
from retune.errors import RetuneError
from retune.model.training import available_cores

R = TypeVar("R")
# What a task on another machine needs to reach the Prefect API and the tracking store; Ray
# passes its workers none of the driver's environment unless told (a known prefect-ray gap).
FORWARDED_ENV = (
    "PREFECT_API_URL",
    "PREFECT_API_KEY",
    "MLFLOW_TRACKING_URI",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
)


def workers_for(cfg: RunnerParams, tasks: int) -> int:
    """How many of `tasks` run at once on `cfg`'s runner."""
    if cfg.kind == "sequential" or tasks <= 1:
        return 1
    return max(1, min(tasks, cfg.workers or available_cores()))


def task_runner(cfg: RunnerParams, tasks: int) -> Any:
    """The Prefect task runner `cfg` names, sized for `tasks` tasks (None for sequential)."""
    if cfg.kind == "sequential":
        return None
    workers = workers_for(cfg, tasks)
    if cfg.kind == "process":
        from prefect.task_runners import ProcessPoolTaskRunner

        return ProcessPoolTaskRunner(max_workers=workers)
    try:
        from prefect_ray import RayTaskRunner
    except ImportError:
        raise RetuneError(
            "runner.kind=ray needs Ray and prefect-ray, which retune does not install by "
            "default: `pip install -c constraints.txt -e '.[ray]'`, or set runner.kind to "
            "process or sequential"
        ) from None
    env = {name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)}
    init: dict[str, Any] = {"runtime_env": {"env_vars": env}, "include_dashboard": False}
    if cfg.ray_address is None:
        # A local cluster of this machine only, on loopback, with one slot per worker.
        init |= {"num_cpus": workers, "_node_ip_address": "127.0.0.1"}
    return RayTaskRunner(address=cfg.ray_address, init_kwargs=init)


@contextmanager
def running(cfg: RunnerParams, tasks: int) -> Iterator[Callable[..., Any]]:
    """A `submit(task, **parameters)` that runs `task` on `cfg`'s runner and returns something
    with `.result()`: a Prefect future, or for `sequential` the finished result at once."""
    runner = task_runner(cfg, tasks)
    if runner is None:
        yield lambda task, **parameters: _Done(task(**parameters))
        return
    with runner:
        yield lambda task, **parameters: runner.submit(_prefect_task(task), parameters)


def _prefect_task(task: Any) -> Any:
    """A stage's lazily made task (`retune.entry.stage_task`) as the Task a runner needs."""
    made = getattr(type(task), "prefect_task", None)
    return made(task) if made is not None else task


def results(futures: Sequence[Any]) -> list[Any]:
    """Every future's result, in order; the first failure raises once all have ended (so no
    task is left running behind the error)."""
    errors: list[BaseException] = []
    out = []
    for future in futures:
        try:
            out.append(future.result())
        except BaseException as exc:  # every one waited for, then the first raised
            errors.append(exc)
    if errors:
        raise errors[0]
    return out


class _Done:
    """A result that is already there, shaped like a future."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def result(self) -> Any:
        return self.value
