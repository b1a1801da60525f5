"""retune's Prefect deployments: `retrain` (cron + drift trigger), `data-check` and `drift-check`.

Entered by `retune deploy` (`make deploy`): registers them with the server at PREFECT_API_URL
(visible in its UI) and runs their flow runs from this process with `prefect.serve`; or, with
`--pool NAME`, registers them on a work pool whose workers (`prefect worker start --pool NAME`,
on this machine or another) run them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from retune.config import ConfigError, Params
from retune.errors import RetuneError
from retune.online.events import (
    DATA_CHECK_DEPLOYMENT,
    DRIFT_CHECK_DEPLOYMENT,
    DRIFT_EVENT,
    RETRAIN_DEPLOYMENT,
    model_resource_id,
)

if TYPE_CHECKING:
    from prefect import Flow
    from prefect.deployments.runner import RunnerDeployment
    from prefect.schedules import Schedule

TAGS = ["retune"]


def _cron(params: Params, key: str) -> list[Schedule]:
    """The schedule `schedule.<key>` in `schedule.timezone`; none when the cron is null."""
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.schedules import Cron

    cron: str | None = getattr(params.schedule, key)
    if cron is None:
        return []
    from pydantic import ValidationError

    try:
        # CronSchedule checks the timezone as well as the cron string (Cron checks the cron).
        CronSchedule(cron=cron, timezone=params.schedule.timezone)
    except ValidationError as exc:
        why = "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors())
        raise ConfigError(
            f"schedule.{key} {cron!r} / schedule.timezone {params.schedule.timezone!r}: "
            f"{why}; use five cron fields and an IANA zone, e.g. '0 3 * * 0' and 'UTC'"
        ) from None
    return [Cron(cron, timezone=params.schedule.timezone)]


def _drift_check_flow() -> Any:
    """`flows.drift:drift_check`, or None (with a printed reason) where it cannot be imported."""
    try:
        from flows.drift import drift_check
    except ModuleNotFoundError as exc:
        if exc.name != "flows.drift":
            raise
        print(f"{DRIFT_CHECK_DEPLOYMENT}: flows/drift.py not found; not deployed", flush=True)
        return None
    return drift_check


def _deployment(flow: Flow[..., Any], name: str, **options: Any) -> RunnerDeployment:
    """`flow` as the deployment `name` ("<flow>/<deployment>"), tagged retune.

    The entry point is a module path (`flows.retrain.retrain`): a run imports the installed
    package, whatever directory `retune deploy` was started in."""
    from prefect.deployments.runner import EntrypointType, RunnerDeployment

    flow_name, _, deployment_name = name.partition("/")
    assert flow.name == flow_name, f"{name}: the flow is named {flow.name!r}"
    deployment = flow.to_deployment(
        name=deployment_name, tags=TAGS, entrypoint_type=EntrypointType.MODULE_PATH, **options
    )
    assert isinstance(deployment, RunnerDeployment)  # to_deployment is sync outside asyncio
    return deployment


def build_deployments(
    params_file: Path,
    params: Params,
    overrides: list[str] | None = None,
    job_variables: dict[str, Any] | None = None,
) -> list[RunnerDeployment]:
    """The deployments, with `params.schedule`'s crons, the drift trigger and retrain's
    concurrency limit; their runs get `params_file` (absolute, unless it is relative to a
    work pool's `working_dir` in `job_variables`) and `overrides`.

    Served, runs execute in the directory `retune deploy` was started in; on a work pool, in
    `job_variables["working_dir"]`: the relative paths in params.yaml resolve as they do for
    `retune run` there.
    """
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

    from flows.data_check import data_check
    from flows.retrain import retrain

    run_params: dict[str, Any] = {
        "params_file": str(params_file if job_variables else params_file.resolve()),
        "overrides": list(overrides or []),
    }
    options: dict[str, Any] = {"job_variables": job_variables} if job_variables else {}
    model = params.register.model_name
    drift_trigger = DeploymentEventTrigger(
        name=f"retrain {model} on drift",
        description=f"{DRIFT_EVENT} about {model_resource_id(model)} runs {RETRAIN_DEPLOYMENT}",
        expect={DRIFT_EVENT},
        match={"prefect.resource.id": model_resource_id(model)},
        # Reactive, threshold 1: every drift event asks for a retrain; the concurrency limit
        # below queues the ones that arrive while another retrain runs.
        threshold=1,
    )
    # Retraining one model twice at once would race on the same files and registry. ENQUEUE:
    # a run that finds the slot taken waits as Scheduled "AwaitingConcurrencySlot" and is
    # retried (server setting deployments.concurrency_slot_wait_seconds), never cancelled.
    one_at_a_time = ConcurrencyLimitConfig(
        limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE
    )
    # A check still running when its next one is due makes the next one redundant.
    skip_overlap = ConcurrencyLimitConfig(
        limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW
    )
    deployments = [
        _deployment(
            retrain,
            RETRAIN_DEPLOYMENT,
            schedules=_cron(params, "retrain_cron"),
            triggers=[drift_trigger],
            concurrency_limit=one_at_a_time,
            # Feedback first: a retrain after drift learns from users' corrections.
            parameters={**run_params, "export_feedback": True},
            description=f"Retrain and gate {model}: on its cron, on drift, on new data.",
            **options,
        ),
        _deployment(
            data_check,
            DATA_CHECK_DEPLOYMENT,
            schedules=_cron(params, "data_check_cron"),
            concurrency_limit=skip_overlap,
            parameters={**run_params, "retrain_deployment": RETRAIN_DEPLOYMENT},
            description="Start retrain when the content of paths.incoming changed.",
            **options,
        ),
    ]
    drift_check = _drift_check_flow()
    if drift_check is not None:
        deployments.append(
            _deployment(
                drift_check,
                DRIFT_CHECK_DEPLOYMENT,
                schedules=_cron(params, "drift_check_cron"),
                concurrency_limit=skip_overlap,
                parameters=run_params,
                description=f"Test logged feedback for drift; on drift, emit {DRIFT_EVENT}.",
                **options,
            )
        )
    return deployments


def api_url() -> str:
    """PREFECT_API_URL of a server that answers, or a RetuneError saying how to start one.

    Schedules and triggers live in a long-running server: the temporary one Prefect starts
    when no URL is set has neither its scheduler nor its automations."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise RetuneError(
            "PREFECT_API_URL is not set: start the server with `make prefect-server`, then "
            "run `make deploy` (or export PREFECT_API_URL=http://127.0.0.1:4200/api)"
        )
    try:
        httpx.get(f"{url.rstrip('/')}/health", timeout=5.0).raise_for_status()
    except httpx.HTTPError as exc:
        raise RetuneError(
            f"no Prefect server answers at PREFECT_API_URL={url} ({exc}); "
            "start it with `make prefect-server`"
        ) from None
    return str(url)


def serve_deployments(params_file: Path, params: Params, overrides: list[str] | None) -> None:
    """Register the deployments with the server and run their flow runs here until stopped
    (Ctrl-C pauses their schedules; `retune deploy` again resumes them)."""
    from prefect import serve

    deployments = build_deployments(params_file, params, overrides)  # bad crons fail first
    url = api_url()
    names = ", ".join(f"{d.flow_name}/{d.name}" for d in deployments)
    print(f"serving {names} on {url}; UI: {url.removesuffix('/api')}", flush=True)
    serve(*deployments, print_starting_message=False)


def deploy_to_pool(
    params_file: Path,
    params: Params,
    overrides: list[str] | None,
    pool: str,
    working_dir: Path | None = None,
) -> list[str]:
    """Register the deployments on the work pool `pool` (made as a `process` pool when none
    has that name) and return their names; this process then exits, and the pool's workers
    run the flow runs.

    A run starts in `working_dir` (default: this directory) on the worker's machine, with the
    worker's environment, and reads `params_file` there: given relative to `working_dir`, the
    same checkout can live at another path on another machine.
    """
    from prefect import deploy, get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    where = (working_dir or Path.cwd()).resolve()
    file = params_file.resolve()
    relative = file.relative_to(where) if file.is_relative_to(where) else file
    build_deployments(params_file, params, overrides)  # bad crons fail before the server
    url = api_url()
    with get_client(sync_client=True) as client:
        try:
            kind = client.read_work_pool(pool).type
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
            kind = "process"
            print(f"made the process work pool {pool!r}", flush=True)
    # A process worker otherwise starts each run in a fresh temporary folder.
    job_variables = {"working_dir": str(where)} if kind == "process" else {}
    deployments = build_deployments(relative, params, overrides, job_variables or None)
    deploy(
        *deployments,
        work_pool_name=pool,
        build=False,
        push=False,
        print_next_steps_message=False,
        ignore_warnings=True,
    )
    names = [f"{d.flow_name}/{d.name}" for d in deployments]
    print(
        f"deployed {', '.join(names)} to the {kind} work pool {pool!r} on {url}; runs start "
        f"in {where}. Start a worker (here or on another machine, see README "
        f"'Run retraining on workers'):\n  prefect worker start --pool {pool} --type {kind}",
        flush=True,
    )
    return names
