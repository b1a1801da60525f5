"""What a command does when the machine is slow or the run is interrupted: Prefect's API is
waited for as long as it takes, no process of the run outlives it, one run at a time holds a
project folder, and errors read as one line naming the fix."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from benchmarks.common import session_processes
from flows.cli import app
from retune.config import ConfigError, load_params, to_plain
from retune.errors import MissingInputError
from retune.runlock import LOCK_FILE, RunLockedError, run_lock
from tests.helpers import tiny_params_for

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def hold_lock(folder: Path, seconds: float) -> subprocess.Popen[str]:
    """Another process holding `folder`'s run lock for `seconds`; returns once it holds it."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; from pathlib import Path; from retune.runlock import run_lock\n"
            f"with run_lock(Path({str(folder)!r})):\n"
            f"    print('held', flush=True); time.sleep({seconds})",
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


def run_stage_as_dvc(stage: str, folder: Path) -> subprocess.CompletedProcess[str]:
    """`python -m tasks.<stage>` in `folder`, as dvc.yaml's cmd runs it."""
    return subprocess.run(
        [sys.executable, "-m", f"tasks.{stage}"],
        cwd=folder,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def wait_until_gone(sid: int, timeout_s: float = 60.0) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while (left := session_processes(sid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def slow_server_site(tmp_path: Path, delay_s: float) -> Path:
    """A sitecustomize that delays only the Prefect API server's start by `delay_s`: the
    server process is the one with Prefect's ephemeral-server variable set."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import os, time\n"
        "if os.environ.get('PREFECT__SERVER_EPHEMERAL') == '1':\n"
        f"    time.sleep({delay_s})\n"
    )
    return site


PROBE = """
    import os, signal, sys, time
    # Ctrl-C as in a terminal, even when the tests run in the background of a shell, which
    # starts them with SIGINT ignored (and a Python with SIGINT ignored never raises
    # KeyboardInterrupt).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from prefect import flow, task
    from flows.startup import prefect_api
    from retune.errors import RetuneError

    @flow
    def probe() -> int:
        return 42

    @task
    def refuse() -> None:
        raise RetuneError("data/x is missing: run the `ingest` stage first")

    @flow
    def failing() -> None:
        refuse()

    with prefect_api() as url:
        print("ready", url, flush=True)
        print("result", probe(), flush=True)
        if os.environ.get("FAIL_IN_TASK"):
            try:
                failing()
            except RetuneError as exc:
                print("caught", exc, flush=True)
        if os.environ.get("HOLD"):
            time.sleep(600)
        if os.environ.get("FAIL"):
            raise RuntimeError("the stage failed")
"""


def start_probe(tmp_path: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    """The probe in a session of its own, with a fresh Prefect home and no configured server
    (what a first run on a fresh clone has); `SITE` goes first on its PYTHONPATH."""
    full = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([env.pop("SITE", ""), str(ROOT)]).strip(os.pathsep),
        "PREFECT_HOME": str(tmp_path / ".prefect"),
        **env,
    }
    full.pop("PREFECT_API_URL", None)
    if "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" not in env:
        full.pop("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", None)  # retune's default
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(PROBE)],
        cwd=tmp_path,
        env=full,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its session id finds every process it started
    )


@pytest.mark.slow
def test_a_server_slower_than_prefects_default_timeout_is_waited_for(tmp_path: Path) -> None:
    site = slow_server_site(tmp_path, delay_s=25)  # Prefect's own limit is 20 s
    proc = start_probe(tmp_path, {"SITE": str(site)})
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "result 42" in out
    assert "waiting for Prefect's temporary API server to start" in out
    assert wait_until_gone(proc.pid) == []


@pytest.mark.slow
def test_a_start_past_the_limit_names_the_setting_and_leaves_no_process(tmp_path: Path) -> None:
    site = slow_server_site(tmp_path, delay_s=60)
    proc = start_probe(
        tmp_path, {"SITE": str(site), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "3"}
    )
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "did not answer within 3 s" in out
    assert "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in out
    assert wait_until_gone(proc.pid) == []


@pytest.mark.slow
@pytest.mark.parametrize("debug", ["", "1"])
def test_a_failed_task_shows_its_traceback_only_when_asked(tmp_path: Path, debug: str) -> None:
    proc = start_probe(tmp_path, {"FAIL_IN_TASK": "1", "RETUNE_DEBUG": debug})
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "caught data/x is missing" in out
    assert "Task run failed with exception" in out  # Prefect still says what failed
    assert ("Traceback (most recent call last)" in out) == bool(debug)


@pytest.mark.slow
@pytest.mark.parametrize("ending", ["exception", "SIGTERM", "SIGKILL", "SIGINT"])
def test_no_process_of_a_run_survives_it(tmp_path: Path, ending: str) -> None:
    env = {"FAIL": "1"} if ending == "exception" else {"HOLD": "1"}
    proc = start_probe(tmp_path, env)
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("result"):
            break
    assert lines and lines[-1].startswith("result 42"), "".join(lines)
    # The server is up: the run's session holds at least the run and its server.
    assert len(session_processes(proc.pid)) >= 2
    if ending != "exception":
        os.kill(proc.pid, getattr(signal, ending))
    # communicate, not wait: what the run still prints must be read, or a full pipe blocks it.
    rest, _ = proc.communicate(timeout=300)
    assert wait_until_gone(proc.pid) == [], rest[-3000:]


def test_a_second_command_in_the_folder_is_refused_naming_the_first(tmp_path: Path) -> None:
    params = tiny_params_for(tmp_path)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(to_plain(params)))
    holder = hold_lock(tmp_path, seconds=600)
    try:
        result = runner.invoke(app, ["ingest", "--params", str(params_file)])
        assert result.exit_code == 1
        assert f"pid {holder.pid}" in result.output and "already running" in result.output
        assert not (params.paths.prepared / "records.parquet").exists()  # nothing was written
        # DVC's way in: the stage's own entry point refuses the same way.
        dvc_stage = run_stage_as_dvc("split", tmp_path)
        assert dvc_stage.returncode == 1
        assert f"pid {holder.pid}" in dvc_stage.stderr and "Traceback" not in dvc_stage.stderr
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone (killed, never released): the next command takes the lock over.
    with run_lock(tmp_path) as path:
        assert path == (tmp_path / LOCK_FILE).resolve()
        with run_lock(tmp_path):  # the flow inside `retune run` takes it again: re-entrant
            pass


def test_a_run_waits_for_the_holder_when_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    holder = hold_lock(tmp_path, seconds=3)
    with pytest.raises(RunLockedError), run_lock(tmp_path):
        pass
    with run_lock(tmp_path, wait=True):
        # Taken once the holder let go (it exits right after).
        assert holder.wait(timeout=30) == 0
    # The holder's command as it was started (`python -c ...`, or `python3.11 -c ...`).
    assert re.search(r"waiting for `python[\d.]* -c", capsys.readouterr().out)


def test_a_run_refuses_while_dvc_holds_the_repository(tmp_path: Path) -> None:
    (tmp_path / ".dvc" / "tmp").mkdir(parents=True)
    dvc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time, zc.lockfile\n"
            f"lock = zc.lockfile.LockFile({str(tmp_path / '.dvc' / 'tmp' / 'lock')!r})\n"
            "print('held', flush=True); time.sleep(600)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert dvc.stdout is not None and dvc.stdout.readline().strip() == "held"
        with (
            pytest.raises(RunLockedError, match=rf"DVC command \(pid {dvc.pid}"),
            run_lock(tmp_path, check_dvc=True),
        ):
            pass
    finally:
        dvc.kill()
        dvc.wait()
    with run_lock(tmp_path, check_dvc=True):
        pass


def test_a_stage_run_too_early_names_the_stage_to_run_first(tmp_path: Path) -> None:
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(to_plain(tiny_params_for(tmp_path))))
    result = runner.invoke(app, ["split", "--params", str(params_file)])
    assert result.exit_code == 1
    assert "records.parquet is missing: run the `hygiene` stage (`retune hygiene`)" in (
        result.output
    )
    done = run_stage_as_dvc("hygiene", tmp_path)
    assert done.returncode == 1
    assert "run the `ingest` stage" in done.stderr and "Traceback" not in done.stderr
    assert issubclass(MissingInputError, FileNotFoundError)


def test_an_unexpected_error_is_one_line_unless_debug_is_asked_for(tmp_path: Path) -> None:
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(to_plain(tiny_params_for(tmp_path))))
    # A records file that is not Parquet: a fault retune has no message of its own for.
    bad = tmp_path / "data" / "clean" / "records.parquet"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not parquet at all")
    retune = str(Path(sys.executable).parent / "retune")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RETUNE_DEBUG": ""}
    plain = subprocess.run(
        [retune, "split", "--params", str(params_file)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert plain.returncode == 1
    assert "Traceback" not in plain.stderr
    assert "error: unexpected" in plain.stderr and "--debug" in plain.stderr
    debug = subprocess.run(
        [retune, "--debug", "split", "--params", str(params_file)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert debug.returncode == 1 and "Traceback" in debug.stderr


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty"),
        (b"# only a comment\n", "empty"),
        (b"seed: 42\ntrain:\n  base_model: caf\xe9\n", ":3: not UTF-8"),
        (None, "not a file"),
    ],
)
def test_a_broken_params_file_is_a_config_error(
    tmp_path: Path, content: bytes | None, message: str
) -> None:
    path = tmp_path / "params.yaml"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        load_params(path)
