"""Flow `drift_check`: run the drift checks and, when one finds drift, emit the Prefect event
that starts retraining.

Entered by `retune drift` and by its deployment (on a schedule). The event is
`retune.drift.detected` on the resource `retune.model.<register.model_name>`: the retraining
deployment's trigger matches exactly these. "not enough data" never emits it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from retune.config import DEFAULT_PARAMS, load_params
from retune.env import configure_environment
from retune.events import DRIFT_EVENT, model_resource_id
from tasks.drift import drift_task


@flow(name="drift-check", log_prints=True)
def drift_check(
    params_file: str = str(DEFAULT_PARAMS), overrides: list[str] | None = None
) -> dict[str, Any]:
    """Check production's ratings and prompts for drift (`tasks.drift`); emit `DRIFT_EVENT` if
    any check found it. Returns the drift summary plus `event_emitted` and `event_id`."""
    from prefect.events import emit_event

    configure_environment()
    params = load_params(Path(params_file), overrides or [])
    result = drift_task(params)
    summary = result.summary()
    event = None
    if result.drift:
        # Figures and statuses only: nothing users wrote travels in the event.
        keys = ("status", "drifted", "model_name", "production_version", "checks", "mlflow_run_id")
        payload = {key: summary[key] for key in keys}
        event = emit_event(
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
            print(f"drift in {', '.join(result.drifted)}: emitted {DRIFT_EVENT} ({event.id})")
    summary["event_emitted"] = event is not None
    summary["event_id"] = str(event.id) if event is not None else None
    return summary
