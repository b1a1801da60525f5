"""Starting a flow run in this process (`retune run`) without waiting idle for Prefect.

With no `PREFECT_API_URL`, Prefect starts a temporary API server for the run on the flow's
first API call: a subprocess that takes ~4 s to come up (~9 s on a fresh `PREFECT_HOME`,
which it first migrates) while this process waits. `warm_start` starts that server in the
background instead and spends the wait on work the run does anyway: creating or opening the
MLflow store, then importing the libraries the stages use. The server is Prefect's own
(`SubprocessASGIServer`, one per process), so the flow's first API call finds it running.
"""

from __future__ import annotations

import gc
import importlib
import threading

from retune.config import Params
from retune.tracking import setup_tracking

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


def start_temporary_server() -> threading.Thread | None:
    """Start Prefect's temporary server on a background thread; None when the run will use a
    configured server (`PREFECT_API_URL`) or none may be started."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return None
    # Imported here, not on the thread: two threads importing at once can meet halfway through
    # a package's circular imports.
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()

    def start() -> None:
        try:
            server.start()
        except Exception:
            # The flow's first API call starts it again and reports the error to the user.
            return

    thread = threading.Thread(target=start, name="prefect-temporary-server", daemon=True)
    thread.start()
    return thread


def warm_start(params: Params) -> None:
    """Start the temporary server (see the module doc) and, until it is up, open the tracking
    store and import what the stages need; return once the server answers."""
    starting = start_temporary_server()
    if starting is None:
        return
    setup_tracking(params.tracking)  # creates (migrates) the MLflow store on a first run
    for name in WARM_IMPORTS:
        if not starting.is_alive():
            break
        try:
            importlib.import_module(name)
        except ImportError:
            continue  # the stage that needs it says what to install
    # What was imported lives as long as the process: keep the collector's passes during
    # training off it.
    gc.freeze()
    starting.join()
