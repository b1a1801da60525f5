"""Flow `tune`: the Optuna search of `tasks.tune`, a Prefect task per trial on `params.runner`.

Entered by `retune tune`. With `runner.kind: process` (or ray) as many trials as there are
workers run at once, each asked of the study together and trained with its share of the
cores; `sequential` runs them in turn. Returns the report that reports/tune.json holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefect import flow

from flows.runners import results, running, workers_for
from retune.config import DEFAULT_PARAMS, load_params
from retune.env import configure_environment
from tasks.tune import TrialResult, search, trial_task


@flow(name="tune", log_prints=True)
def tune(params_file: str = str(DEFAULT_PARAMS), overrides: list[str] | None = None) -> Any:
    """Search `tune.space` for `tune.trials` trials; the best settings go to
    reports/tune_best.txt as `retune run` overrides."""
    configure_environment()
    params = load_params(Path(params_file), overrides or [])
    workers = workers_for(params.runner, params.tune.trials)
    with running(params.runner, workers) as submit:

        def run_batch(batch: Sequence[dict[str, Any]]) -> list[TrialResult]:
            return results([submit(trial_task, **kwargs) for kwargs in batch])

        return search(params, run_batch, workers).report()
