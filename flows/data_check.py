"""Flow `data-check`: start the retrain deployment when the content of `paths.incoming` changed
since the last retrain recorded its fingerprint.

Entered by the `data-check` deployment's cron (flows/deploy.py); cheap: it hashes the folder and
asks MLflow for one tag, and does nothing else unless the data changed.
"""

from __future__ import annotations

import datetime
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

from prefect import flow

from retune.config import DEFAULT_PARAMS, load_params
from retune.data.datastate import incoming_files, incoming_fingerprint, last_fingerprint
from retune.env import configure_environment
from retune.errors import RetuneError
from retune.online.events import RETRAIN_DEPLOYMENT

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun

Status = Literal["no_data", "unchanged", "started", "coalesced"]


@dataclass(frozen=True)
class DataCheckResult:
    status: Status
    fingerprint: str | None
    last_fingerprint: str | None
    # The retrain run started, or the queued/running one this change was folded into.
    flow_run_id: str | None = None


def pending_retrain(deployment: str) -> FlowRun | None:
    """A run of `deployment` that is queued or running, if any: a change is folded into it.
    A queued run reads the new data; a running one records the fingerprint of the data it
    started with, so the next check after it still sees the change.

    Cron runs the scheduler creates ahead of time count only once they are due."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.exceptions import ObjectNotFound

    now = datetime.datetime.now(datetime.UTC)
    with get_client(sync_client=True) as client:
        try:
            dep = client.read_deployment_by_name(deployment)
        except ObjectNotFound:
            raise RetuneError(
                f"deployment {deployment} is not on the Prefect server at PREFECT_API_URL; "
                "register it with `make deploy` (`retune deploy`)"
            ) from None
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(
                    type=FlowRunFilterStateType(
                        any_=[StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING]
                    )
                )
            ),
        )
    for run in runs:
        due = run.expected_start_time is None or run.expected_start_time <= now
        if not run.auto_scheduled or due or not (run.state and run.state.is_scheduled()):
            return run
    return None


@flow(name="data-check", log_prints=True)
def data_check(
    params_file: str = str(DEFAULT_PARAMS),
    overrides: list[str] | None = None,
    retrain_deployment: str = RETRAIN_DEPLOYMENT,
) -> dict[str, Any]:
    """Fingerprint `paths.incoming`; when it differs from the one the last retrain recorded
    (or none was recorded), start `retrain_deployment` without waiting for it."""
    from prefect.deployments import run_deployment

    configure_environment()
    params = load_params(Path(params_file), overrides or [])
    incoming = params.paths.incoming
    if not incoming_files(incoming):
        print(f"{incoming}: no data files, nothing to do")
        return asdict(DataCheckResult("no_data", None, None))
    now, last = incoming_fingerprint(incoming), last_fingerprint(params)
    if now == last:
        print(f"{incoming}: unchanged since the last retrain ({now[:12]}), nothing to do")
        return asdict(DataCheckResult("unchanged", now, last))
    was = last[:12] if last else "none recorded"
    pending = pending_retrain(retrain_deployment)
    if pending is not None:
        print(
            f"{incoming}: changed ({was} -> {now[:12]}); {retrain_deployment} run "
            f"{pending.name} ({pending.id}) is already queued or running, not starting another"
        )
        return asdict(DataCheckResult("coalesced", now, last, str(pending.id)))
    # timeout=0: return once the run exists; the retrain deployment's runner executes it.
    run = cast("FlowRun", run_deployment(name=retrain_deployment, timeout=0, tags=["data-changed"]))
    print(
        f"{incoming}: changed ({was} -> {now[:12]}); started {retrain_deployment} run "
        f"{run.name} ({run.id})"
    )
    return asdict(DataCheckResult("started", now, last, str(run.id)))
