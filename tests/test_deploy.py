"""The deployments on a real `prefect server start` on 127.0.0.1: a drift event starts the real
retrain flow, a second one queues behind it; data-check starts retrain only on changed data."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psutil
import pytest
import yaml

from flows.deploy import (
    DRIFT_EVENT,
    RETRAIN_DEPLOYMENT,
    build_deployments,
    model_resource_id,
)
from retune.config import ConfigError, Params, to_plain
from tests.helpers import make_conversations, tiny_params_for

BIN = Path(sys.executable).parent
T = TypeVar("T")
# Far from any test run: the crons are registered and shown, but never fire during a test.
NEVER = {"retrain_cron": "0 0 1 1 *", "data_check_cron": "0 0 1 1 *", "drift_check_cron": None}


def write_params(tmp: Path, **sections: dict[str, Any]) -> tuple[Params, Path]:
    """Tiny params under `tmp` with 80 conversations in paths.incoming, and its params file."""
    params = tiny_params_for(tmp, schedule=NEVER, **sections)
    params.paths.incoming.mkdir(parents=True, exist_ok=True)
    lines = [
        json.dumps({"messages": [{"role": r, "content": c} for r, c in conv]})
        for conv in make_conversations(80)
    ]
    (params.paths.incoming / "chats.jsonl").write_text("\n".join(lines) + "\n")
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(to_plain(params)))
    return params, path


def wait_for(what: str, check: Callable[[], T | None], timeout_s: float, every_s: float = 0.2) -> T:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop `proc`'s process group (it was started in a session of its own) and any
    descendant that left it: nothing outlives the test."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    for sig, grace_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)
                proc.wait(grace_s)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
    for child in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A real Prefect server on a free loopback port; yields the environment that points a
    process at it. The test process talks to it through `temporary_settings`."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    home = tmp_path_factory.mktemp("prefect-home")
    url = f"http://127.0.0.1:{free_port()}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        # A queued run retries for the slot every 2 s rather than 30 s: a shorter test.
        "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "2",
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
    }
    host, port = url.removeprefix("http://").removesuffix("/api").split(":")
    log = (home / "server.log").open("wb")
    proc = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", host, "--port", port],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:

        def healthy() -> bool:
            assert proc.poll() is None, (home / "server.log").read_text()[-3000:]
            try:
                return httpx.get(f"{url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for("the Prefect server's /api/health", healthy, timeout_s=120, every_s=0.5)
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield env
            # Flush this process's logs and events while the server still listens.
            APILogWorker.drain_all(timeout=10)
            EventsWorker.drain_all(timeout=10)
    finally:
        stop(proc)
        log.close()


def emit_drift(model_name: str) -> None:
    """Emit the drift event as flows.drift does, and wait until it has been sent."""
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker

    emit_event(DRIFT_EVENT, resource={"prefect.resource.id": model_resource_id(model_name)})
    EventsWorker.drain_all(timeout=30)


def runs_of(deployment: str, created_by_automation: bool = False) -> list[Any]:
    """Runs of `deployment`, oldest first, excluding the cron runs scheduled ahead."""
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name(deployment)
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])),
            sort=FlowRunSort.START_TIME_ASC,
        )
    runs = [r for r in runs if not r.auto_scheduled]
    if created_by_automation:
        runs = [r for r in runs if r.created_by and r.created_by.type == "AUTOMATION"]
    return sorted(runs, key=lambda r: r.created)


def read_run(run_id: Any) -> Any:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(run_id)


def state_names(run_id: Any) -> list[str]:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return [s.name or "" for s in client.read_flow_run_states(run_id)]


def test_deployments_carry_the_schedules_trigger_and_concurrency_limit(tmp_path: Path) -> None:
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

    params = tiny_params_for(tmp_path, schedule={"timezone": "Europe/Paris"})
    deployments = {
        f"{d.flow_name}/{d.name}": d
        for d in build_deployments(Path("params.yaml"), params, ["train.max_steps=5"])
    }
    retrain = deployments[RETRAIN_DEPLOYMENT]
    assert [(s.schedule.cron, s.schedule.timezone) for s in retrain.schedules] == [  # type: ignore[union-attr]
        ("0 3 * * 0", "Europe/Paris")
    ]
    assert retrain.parameters == {
        "params_file": str(Path("params.yaml").resolve()),
        "overrides": ["train.max_steps=5"],
        "export_feedback": True,
    }
    assert retrain.concurrency_limit == 1
    assert retrain.concurrency_options is not None
    assert retrain.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.ENQUEUE
    (trigger,) = retrain.triggers
    assert isinstance(trigger, DeploymentEventTrigger)
    assert trigger.expect == {DRIFT_EVENT}
    assert trigger.match.model_dump() == {"prefect.resource.id": "retune.model.retune-test"}  # type: ignore[union-attr]
    check = deployments["data-check/data-check"]
    assert check.parameters["retrain_deployment"] == RETRAIN_DEPLOYMENT
    assert [s.schedule.cron for s in check.schedules] == ["*/15 * * * *"]  # type: ignore[union-attr]

    off = tiny_params_for(tmp_path, schedule={"retrain_cron": None})
    assert build_deployments(Path("params.yaml"), off)[0].schedules == []
    bad = tiny_params_for(tmp_path, schedule={"data_check_cron": "every 15 minutes"})
    with pytest.raises(ConfigError, match=r"schedule\.data_check_cron"):
        build_deployments(Path("params.yaml"), bad)
    with pytest.raises(ConfigError, match=r"schedule\.timezone"):
        build_deployments(
            Path("params.yaml"), tiny_params_for(tmp_path, schedule={"timezone": "Mars/Olympus"})
        )


@pytest.mark.slow
def test_data_check_starts_retrain_only_when_the_content_changed(
    server: dict[str, str], tmp_path: Path
) -> None:
    import mlflow
    from prefect.deployments.runner import EntrypointType, RunnerDeployment

    from flows.data_check import data_check
    from flows.retrain import retrain
    from retune.data.datastate import incoming_fingerprint, record_fingerprint
    from retune.release.tracking import setup_tracking
    from retune.reports import write_json

    params, params_file = write_params(tmp_path)
    # A retrain deployment nobody serves: the runs data-check asks for stay Scheduled.
    target = "retrain/unserved"
    unserved = retrain.to_deployment(
        name="unserved",
        parameters={"params_file": str(params_file)},
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
    assert isinstance(unserved, RunnerDeployment)
    unserved.apply()
    # What a finished retrain leaves: its training run, tagged with the data it trained on.
    setup_tracking(params.tracking)
    with mlflow.start_run() as run:
        write_json(params.paths.reports / "train.json", {"run_id": run.info.run_id})
    record_fingerprint(params, incoming_fingerprint(params.paths.incoming))

    unchanged = data_check(str(params_file), retrain_deployment=target)
    assert unchanged["status"] == "unchanged"
    assert runs_of(target) == []

    # An edit that keeps the size and the modification time: only the content tells.
    chats = params.paths.incoming / "chats.jsonl"
    before = chats.stat()
    chats.write_text(chats.read_text().replace("router", "ROUTER", 1))
    os.utime(chats, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert chats.stat().st_size == before.st_size
    started = data_check(str(params_file), retrain_deployment=target)
    assert started["status"] == "started"
    (requested,) = runs_of(target)
    assert str(requested.id) == started["flow_run_id"]
    assert requested.parameters["params_file"] == str(params_file)
    print(f"data-check requested retrain run {requested.name} ({requested.id})")

    # Checked again before that retrain ran: folded into the queued run, not a second one.
    again = data_check(str(params_file), retrain_deployment=target)
    assert again["status"] == "coalesced"
    assert again["flow_run_id"] == started["flow_run_id"]
    assert len(runs_of(target)) == 1


@pytest.fixture
def served(server: dict[str, str], tmp_path: Path) -> Iterator[tuple[Params, Path]]:
    """`retune deploy` on tiny params in a process of its own; yields the params and their
    file once the retrain deployment and its drift automation exist on the server."""
    from prefect import get_client

    params, params_file = write_params(tmp_path)
    log = (tmp_path / "deploy.log").open("wb")
    proc = subprocess.Popen(
        [str(BIN / "retune"), "deploy", "--params", str(params_file)],
        env=server,
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )

    def registered() -> bool:
        assert proc.poll() is None, (tmp_path / "deploy.log").read_text()[-3000:]
        with get_client(sync_client=True) as client:
            names = [a.name for a in client.read_automations()]
            try:
                client.read_deployment_by_name(RETRAIN_DEPLOYMENT)
            except Exception:
                return False
        return f"retrain {params.register.model_name} on drift" in names

    try:
        wait_for("retune deploy to register its deployments", registered, timeout_s=90)
        yield params, params_file
    finally:
        stop(proc)
        log.close()
        print((tmp_path / "deploy.log").read_text()[-2000:])


def final_state(run_id: Any) -> Any:
    state = read_run(run_id).state
    return state if state.is_final() else None


def started(run_id: Any) -> bool:
    state = read_run(run_id).state
    return bool(state.is_running() or state.is_final())


@pytest.mark.slow
def test_drift_event_runs_retrain_and_a_second_one_queues_behind_it(
    served: tuple[Params, Path],
) -> None:
    params, params_file = served
    model = params.register.model_name

    # An event about another model must not retrain this one (checked by the count below).
    emit_drift("some-other-model")
    emitted = time.monotonic()
    emit_drift(model)
    (first,) = wait_for(
        "the trigger's retrain run", lambda: runs_of(RETRAIN_DEPLOYMENT, True), timeout_s=60
    )
    print(
        f"drift event -> retrain run {first.name} ({first.id}) created in "
        f"{time.monotonic() - emitted:.2f}s by automation {first.created_by.display_value!r}"
    )
    assert first.parameters["params_file"] == str(params_file)
    wait_for("the first retrain to start", lambda: read_run(first.id).state.is_running(), 120)

    emit_drift(model)
    second = wait_for(
        "a second retrain run",
        lambda: (runs_of(RETRAIN_DEPLOYMENT, True)[1:] or [None])[0],
        timeout_s=60,
    )
    print(f"second drift event -> retrain run {second.name} ({second.id})")
    # The real retrain on tiny data takes ~30-60 s here; the second one waits for the slot.
    done = wait_for("the first retrain to finish", lambda: final_state(first.id), 240)
    assert done.is_completed(), done.message
    wait_for("the queued retrain to start", lambda: started(second.id), timeout_s=90)
    history = state_names(second.id)
    print(f"queued run's states: {' -> '.join(dict.fromkeys(history))}")
    # Queued while the first ran, then given the slot: not cancelled, not dropped.
    assert "AwaitingConcurrencySlot" in history
    assert "Pending" in history[history.index("AwaitingConcurrencySlot") :]
    assert "Cancelled" not in history
    first_end, second_start = read_run(first.id).end_time, read_run(second.id).start_time
    assert first_end is not None and second_start is not None
    assert second_start >= first_end, "two retrains ran at once"
    # Two drift events about this model, two runs; the other model's event started none.
    assert len(runs_of(RETRAIN_DEPLOYMENT, True)) == 2


@pytest.mark.slow
def test_deployments_on_a_work_pool_run_on_a_real_process_worker(
    server: dict[str, str], tmp_path: Path
) -> None:
    from prefect import get_client
    from prefect.deployments import run_deployment

    from retune.online.events import DRIFT_CHECK_DEPLOYMENT

    params, params_file = write_params(tmp_path / "project")
    project, pool = params_file.parent, "retune-test-pool"
    done = subprocess.run(
        [str(BIN / "retune"), "deploy", "--pool", pool, "--params", "params.yaml"],
        env=server,
        cwd=project,
        capture_output=True,
        text=True,
        timeout=180,
    )
    # It registers and returns: the pool's workers run the flows, not this command.
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"prefect worker start --pool {pool} --type process" in done.stdout
    with get_client(sync_client=True) as client:
        assert client.read_work_pool(pool).type == "process"  # made, as none existed
        for name in (RETRAIN_DEPLOYMENT, DRIFT_CHECK_DEPLOYMENT):
            deployment = client.read_deployment_by_name(name)
            assert deployment.work_pool_name == pool
            # Runs start in the project, and read the params relative to it.
            assert deployment.job_variables == {"working_dir": str(project)}
            assert deployment.parameters["params_file"] == "params.yaml"
        retrain = client.read_deployment_by_name(RETRAIN_DEPLOYMENT)
        assert [s.schedule.cron for s in retrain.schedules] == ["0 0 1 1 *"]  # type: ignore[union-attr]

    # A worker started elsewhere, as on another machine with the same checkout.
    elsewhere = tmp_path / "worker"
    elsewhere.mkdir()
    log = (tmp_path / "worker.log").open("wb")
    worker = subprocess.Popen(
        [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process"],
        env={**server, "PREFECT_WORKER_QUERY_SECONDS": "1"},
        cwd=elsewhere,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        run = run_deployment(DRIFT_CHECK_DEPLOYMENT, timeout=0)
        state = wait_for("the worker to run drift-check", lambda: final_state(run.id), 300)
        output = (tmp_path / "worker.log").read_text()
        assert state.is_completed(), output[-3000:]
        ran = read_run(run.id)
        assert ran.work_pool_name == pool and ran.infrastructure_pid  # a worker's subprocess
        assert "Worker" in output and str(run.id) in output
        # It did the drift check of these params, in the project folder.
        assert json.loads((params.paths.reports / "drift.json").read_text())["status"]
        assert not any(elsewhere.iterdir())
    finally:
        stop(worker)
        log.close()
