"""Flow `retrain`: ingest -> validate -> split -> train -> evaluate -> register.

Entered by `retune run` / `make run` (and later by deployments). Each step is the stage's own
`run(params)` wrapped as a Prefect task, so this flow and `dvc repro` execute the same code.
A failed data contract raises in `validate`, and nothing after it runs.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow

from retune.config import DEFAULT_PARAMS, load_params
from retune.env import configure_environment
from retune.reports import write_json
from tasks.evaluate import evaluate_task
from tasks.ingest import ingest_task
from tasks.register import register_task
from tasks.split import split_task
from tasks.train import train_task
from tasks.validate import validate_task

STAGES = (
    ("ingest", ingest_task),
    ("validate", validate_task),
    ("split", split_task),
    ("train", train_task),
    ("evaluate", evaluate_task),
    ("register", register_task),
)


@flow(name="retrain", log_prints=True)
def retrain(
    params_file: str = str(DEFAULT_PARAMS), overrides: list[str] | None = None
) -> dict[str, Any]:
    """Run every stage in order on `params_file` (+ dotted `overrides`); return stage timings
    and the registered model, also written to `reports/flow.json`."""
    configure_environment()
    params = load_params(Path(params_file), overrides or [])
    timings: dict[str, float] = {}
    results: dict[str, Any] = {}
    start = time.perf_counter()
    for name, stage in STAGES:
        t0 = time.perf_counter()
        results[name] = stage(params)
        timings[name] = round(time.perf_counter() - t0, 2)
        print(f"stage {name} done in {timings[name]:.1f}s")
    total = round(time.perf_counter() - start, 2)
    registered = results["register"]
    summary = {
        "stages_s": timings,
        "total_s": total,
        "model_uri": getattr(registered, "model_uri", None),
        "version": getattr(registered, "version", None),
    }
    write_json(params.paths.reports / "flow.json", summary)
    breakdown = ", ".join(f"{k} {v:.1f}s" for k, v in timings.items())
    print(f"retrain finished in {total:.1f}s ({breakdown}); registered {summary['model_uri']}")
    return summary
