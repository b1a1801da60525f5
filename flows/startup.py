"""The Prefect API of one command (`retune run`, `retune drift`): found, or started and stopped.

With `PREFECT_API_URL` set (e.g. to `make prefect-server`), runs go to that server: it is
waited for, never started. Without it, Prefect would start a temporary API server of its own
on the flow's first call and give up after 20 s, which a fresh `PREFECT_HOME` (it migrates its
database first) can exceed on a busy machine, and that failed start left its subprocess
running. `prefect_api` starts the same server itself instead (`flows.prefect_server`, one per
command), waits for it as long as a slow machine needs, with progress lines, and stops it on
the way out whatever way the command ends; the server also dies with the command if that is
killed outright. While it starts, the command opens the MLflow store and imports the
libraries its stages use, so the wait is not idle.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import importlib
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import IO

from retune.config import Params
from retune.entry import debug_requested
from retune.errors import RetuneError
from retune.release.tracking import setup_tracking

# Prefect's own name for the limit, and retune's default for it: Prefect's 20 s is too short
# for a first start on a loaded laptop or CI runner.
TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
DEFAULT_TIMEOUT_S = 120.0
FIRST_PROGRESS_S = 5.0
PROGRESS_EVERY_S = 15.0
# What the stages import before their compute starts: train's, then hygiene's (the safety
# classifier and its model, MinHash, language id), then validate's. Shorter imports first: a
# run that turns out to have nothing to do waits at most for the one under way when the server
# answers (Great Expectations, the longest, ~2.6 s, goes last).
WARM_IMPORTS = (
    "torch",
    "transformers",
    "profanity_check.profanity_check",
    "datasketch",
    "py3langid.langid",
    "great_expectations",
)
# What Prefect's own temporary server runs with: no UI, the services of an ephemeral server.
_SERVER_ENV = {
    "PREFECT_UI_ENABLED": "0",
    "PREFECT__SERVER_EPHEMERAL": "1",
    "PREFECT__SERVER_FINAL": "1",
}
_START_ATTEMPTS = 3  # a port taken between choosing it and binding it: try another


class PrefectStartupError(RetuneError):
    """The Prefect API did not answer within the limit."""


def startup_timeout_s() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise PrefectStartupError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    return value if value > 0 else DEFAULT_TIMEOUT_S


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _healthy(api_url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{api_url}/health", timeout=10.0).status_code == 200
    except httpx.HTTPError:
        return False


def _progress(what: str, started: float) -> Callable[[], None]:
    """A callable that prints a line after FIRST_PROGRESS_S, then every PROGRESS_EVERY_S."""
    due = [started + FIRST_PROGRESS_S]

    def tick() -> None:
        now = time.monotonic()
        if now >= due[0]:
            print(f"{what} ({now - started:.0f} s so far)", flush=True)
            due[0] = now + PROGRESS_EVERY_S

    return tick


class TemporaryServer:
    """One Prefect API server process on 127.0.0.1, owned by this process."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self._log: IO[bytes] | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def spawn(self) -> None:
        """Start the process (returns at once). Called on the main thread: the kernel's
        die-with-parent signal is tied to the thread that started the child."""
        from prefect.settings import get_current_settings

        self.port = _free_port()
        if self._log is None:
            self._log = tempfile.TemporaryFile(prefix="retune-prefect-server-")  # noqa: SIM115 (closed by stop)
        env = {
            **os.environ,
            **_SERVER_ENV,
            **get_current_settings().to_environment_variables(exclude_unset=True),
        }
        env.pop("PREFECT_API_URL", None)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "flows.prefect_server", str(self.port), str(os.getpid())],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, deadline: float, started: float) -> None:
        """Until the API answers; a server that exits early (its port was taken) is started
        again on another port; past `deadline` a PrefectStartupError names the setting."""
        tick = _progress(
            "waiting for Prefect's temporary API server to start (a first run also sets up "
            "its database)",
            started,
        )
        attempts = 1
        while self.process is not None:  # None: stopped while it started
            if self.process.poll() is not None:
                if attempts >= _START_ATTEMPTS:
                    raise PrefectStartupError(
                        f"Prefect's temporary API server exited with code "
                        f"{self.process.returncode}: {self.output_tail()}"
                    )
                attempts += 1
                self.spawn()
            elif _healthy(self.api_url):
                return
            if time.monotonic() > deadline:
                raise PrefectStartupError(
                    f"Prefect's temporary API server did not answer within "
                    f"{deadline - started:.0f} s. On a busy machine, allow it longer "
                    f"({TIMEOUT_ENV}=300), or start a server once (`make prefect-server`) and "
                    "point runs at it (PREFECT_API_URL=http://127.0.0.1:4200/api)."
                )
            tick()
            time.sleep(0.2)

    def output_tail(self, limit: int = 2000) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        text = self._log.read().decode("utf-8", "replace").strip()
        return text[-limit:] or "(no output)"

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None


def _wait_for_configured(api_url: str, timeout_s: float) -> None:
    started = time.monotonic()
    tick = _progress(f"waiting for the Prefect API at {api_url} (PREFECT_API_URL)", started)
    while not _healthy(api_url):
        if time.monotonic() - started > timeout_s:
            raise PrefectStartupError(
                f"the Prefect API at {api_url} (PREFECT_API_URL) does not answer: start it "
                "(`make prefect-server`), or unset PREFECT_API_URL and retune starts a "
                "temporary one for the command"
            )
        tick()
        time.sleep(0.5)


def _warm(params: Params, until: threading.Event) -> None:
    """Work the run does anyway, done while the server starts."""
    setup_tracking(params.tracking)  # creates (migrates) the MLflow store on a first run
    for name in WARM_IMPORTS:
        if until.is_set():
            break
        try:
            importlib.import_module(name)
        except ImportError:
            continue  # the stage that needs it says what to install
    # What was imported lives as long as the process: keep the collector's passes during
    # training off it.
    gc.freeze()


class _WithoutTraceback(logging.Formatter):
    """Formats a record as `inner` does, less its traceback: the command ends with one line
    that says what failed and how to see the traceback (--debug)."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info or record.exc_text or record.stack_info:
            # A copy: the same record also goes to the Prefect server, traceback and all.
            record = copy.copy(record)
            record.exc_info, record.exc_text, record.stack_info = None, None, None
        return self.inner.format(record)


def console_without_tracebacks() -> None:
    """Keep tracebacks of failed tasks and flows out of the terminal unless the user asked for
    them (--debug / RETUNE_DEBUG=1); the Prefect server's copy of each log keeps them."""
    if debug_requested():
        return
    import prefect.main  # noqa: F401  (sets up Prefect's logging, console handler included)
    from prefect.logging.handlers import PrefectConsoleHandler

    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler) and not isinstance(
            handler.formatter, _WithoutTraceback
        ):
            handler.setFormatter(_WithoutTraceback(handler.formatter or logging.Formatter()))


@contextlib.contextmanager
def prefect_api(params: Params | None = None) -> Iterator[str]:
    """The Prefect API URL for the flows run inside the block (see the module doc).

    With `params`, the MLflow store is opened and the stages' libraries imported while a
    temporary server starts. A temporary server is stopped when the block exits."""
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings

    console_without_tracebacks()
    timeout_s = startup_timeout_s()
    configured = PREFECT_API_URL.value()
    if configured:
        _wait_for_configured(str(configured).rstrip("/"), timeout_s)
        yield str(configured)
        return
    server = TemporaryServer()
    started = time.monotonic()
    ready = threading.Event()
    failure: list[BaseException] = []

    def wait() -> None:
        try:
            server.wait_ready(started + timeout_s, started)
        except BaseException as exc:
            failure.append(exc)
        finally:
            ready.set()

    try:
        server.spawn()
        print(
            f"Starting Prefect's temporary API server on {server.api_url} (it stops when this "
            "command ends; set PREFECT_API_URL to use a server of your own)",
            flush=True,
        )
        waiter = threading.Thread(target=wait, name="prefect-server-start", daemon=True)
        waiter.start()
        if params is not None:
            _warm(params, ready)
        waiter.join()
        if failure:
            raise failure[0]
        waited = time.monotonic() - started
        if waited > FIRST_PROGRESS_S:
            print(f"Prefect's temporary API server answered after {waited:.0f} s", flush=True)
        # Processes this one starts (a process pool's workers) use the same server.
        previous = os.environ.get("PREFECT_API_URL")
        os.environ["PREFECT_API_URL"] = server.api_url
        try:
            # No UI on a temporary server: no "View at" link to a page that does not exist.
            updates = {PREFECT_API_URL: server.api_url, PREFECT_UI_URL: ""}
            with temporary_settings(updates=updates):
                yield server.api_url
        finally:
            if previous is None:
                os.environ.pop("PREFECT_API_URL", None)
            else:
                os.environ["PREFECT_API_URL"] = previous
    finally:
        _drain_prefect_workers()
        server.stop()


def _drain_prefect_workers(timeout_s: float = 30.0) -> None:
    """Send the logs and events still queued to the server before it stops (else they fail
    at exit with "Error logging to API")."""
    workers = (
        ("prefect.logging.handlers", "APILogWorker"),
        ("prefect.events.worker", "EventsWorker"),
    )
    for module, name in workers:
        if module not in sys.modules:
            continue  # never used in this process: nothing queued
        with contextlib.suppress(Exception):
            getattr(sys.modules[module], name).drain_all(timeout=timeout_s)
