"""The temporary Prefect API server of one retune command: `python -m flows.prefect_server PORT`.

Started and stopped by `flows.startup.prefect_api`. It runs the same app, with the same
settings, as the temporary server Prefect itself starts for a flow run with no
`PREFECT_API_URL`; what it adds is that it never outlives the command that started it: the
kernel sends it SIGTERM when that process dies, however it dies (SIGKILL included).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel for SIGTERM when the parent exits; exit now if it already has (it may
    have died before the request was made)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent_pid:
        raise SystemExit(0)


def main(argv: list[str]) -> None:
    port, parent_pid = int(argv[0]), int(argv[1])
    die_with_parent(parent_pid)
    import uvicorn

    uvicorn.run(
        "prefect.server.api.server:create_app",
        factory=True,
        host="127.0.0.1",
        port=port,
        log_level="error",
        lifespan="on",
    )


if __name__ == "__main__":
    main(sys.argv[1:])
