"""Flow `drift_check`: run the drift checks and, when one finds drift, emit the Prefect event
that starts retraining.

Entered by `retune drift` and by its deployment (on a schedule). The event is
`retune.online.drift.detected` on the resource `retune.model.<register.model_name>`: the retraining
deployment's trigger matches exactly these. "not enough data" never emits it, and neither does
a drift already acted on, until new ratings or prompts (or another production) arrive.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow

from retune.config import DEFAULT_PARAMS, Params, load_params
from retune.env import configure_environment
from retune.online.events import DRIFT_EVENT, model_resource_id
from tasks.drift import DriftResult, drift_task, log_monitor_page, record_action


def respond(params: Params, result: DriftResult, emit: Callable[..., Any]) -> dict[str, Any]:
    """Act on `result`: emit `DRIFT_EVENT` through `emit` (`prefect.events.emit_event`) for
    drift not yet acted on, and record that it was (`tasks.drift.record_action`), so the same
    evidence never starts a second retrain. Returns the drift summary plus `event_emitted` and
    `event_id`."""
    summary = result.summary()
    event = None
    if result.drift and not result.act:
        print(f"drift in {', '.join(result.drifted)}, {result.note}: {DRIFT_EVENT} not sent")
    elif result.act:
        # Figures and statuses only: nothing users wrote travels in the event.
        keys = ("status", "drifted", "model_name", "production_version", "checks", "mlflow_run_id")
        payload = {key: summary[key] for key in keys}
        event = emit(
            event=DRIFT_EVENT,
            resource={
                "prefect.resource.id": model_resource_id(params.register.model_name),
                "prefect.resource.name": params.register.model_name,
            },
            payload=payload,
        )
        if event is None:
            print(f"drift found, but Prefect events are off here: {DRIFT_EVENT} not sent")
        else:
            record_action(params.tracking, result, str(event.id))
            if result.run_id is not None:  # the page the check logged, now saying "acted on"
                log_monitor_page(params, result.run_id)
            print(f"drift in {', '.join(result.drifted)}: emitted {DRIFT_EVENT} ({event.id})")
    summary["event_emitted"] = event is not None
    summary["event_id"] = str(event.id) if event is not None else None
    return summary


@flow(name="drift-check", log_prints=True)
def drift_check(
    params_file: str = str(DEFAULT_PARAMS), overrides: list[str] | None = None
) -> dict[str, Any]:
    """Check production's ratings and prompts for drift (`tasks.drift`); emit `DRIFT_EVENT` if
    a check found drift not yet acted on (`respond`). Returns the drift summary plus
    `event_emitted` and `event_id`."""
    from prefect.events import emit_event

    configure_environment()
    params = load_params(Path(params_file), overrides or [])
    return respond(params, drift_task(params), emit_event)
