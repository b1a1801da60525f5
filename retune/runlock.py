"""One run at a time per project folder: `retune run`, each stage `dvc repro` runs, a
deployment's flow run and the CLI's stage commands hold `<folder>/.retune.lock` while they work.

The lock is an OS file lock (`flock`), so it is released when its holder exits, however it
exits: a lock left by a killed process is simply taken by the next command. The file names
the holder (command, PID, start time) so the one refused can say who is running.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from retune.errors import RetuneError

LOCK_FILE = ".retune.lock"
DVC_LOCK = Path(".dvc") / "tmp" / "lock"
WAIT_PROGRESS_S = 30.0


class RunLockedError(RetuneError):
    """Another retune command (or `dvc repro`) is running in this project folder."""


# Locks this process holds, by file: the CLI's `run` takes the lock and the flow it calls takes
# it again; a second flock of the same file from one process would refuse itself.
_held: dict[Path, tuple[IO[str], int]] = {}


def project_folder(params_file: Path | str) -> Path:
    """The project folder a command works in, whose lock it holds: its params file's folder."""
    return Path(params_file).resolve().parent


def command_line() -> str:
    """How this process was started, as a user would type it (`retune run`,
    `python -m tasks.train`)."""
    argv = list(getattr(sys, "orig_argv", None) or sys.argv) or ["python"]
    if Path(argv[0]).name.startswith("python") and len(argv) > 1 and argv[1][:1] != "-":
        argv = argv[1:]  # a script run by the interpreter: the console script `retune`
    argv[0] = Path(argv[0]).name
    return " ".join(argv)[:200].replace("\n", " ")


def holder(path: Path) -> dict[str, Any]:
    """What the lock file says of its holder ({} when it says nothing readable)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _describe(info: dict[str, Any]) -> str:
    if not info:
        return "another retune command"
    return f"`{info.get('command', '?')}` (pid {info.get('pid', '?')}, since {info.get('started')})"


def _try_flock(handle: IO[str]) -> bool:
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return False
        raise
    return True


def dvc_holder(folder: Path) -> str | None:
    """Who holds DVC's repository lock in `folder` (`dvc repro` running there), or None.

    Checked by `retune run` before it starts: the stages of a `dvc repro` each take retune's
    lock, but between two of them only DVC's lock shows that a repro is under way."""
    path = folder / DVC_LOCK
    if not path.exists():
        return None
    try:
        handle = path.open("r")
    except OSError:
        return None
    with handle:
        if _try_flock(handle):
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
            return None
        pid = handle.read().strip() or "?"
    return f"a DVC command (pid {pid}, holding {path})"


@contextlib.contextmanager
def run_lock(folder: Path, wait: bool = False, check_dvc: bool = False) -> Iterator[Path]:
    """Hold the project lock of `folder` for the block (re-entrant within this process).

    Refuses with RunLockedError naming the holder, or with `wait`, waits for it (a line every
    WAIT_PROGRESS_S). `check_dvc`: also refuse while `dvc repro` runs in `folder`."""
    path = (folder / LOCK_FILE).resolve()
    if path in _held:
        handle, depth = _held[path]
        _held[path] = (handle, depth + 1)
        try:
            yield path
        finally:
            _release(path)
        return
    if check_dvc and (dvc := dvc_holder(path.parent)):
        raise RunLockedError(
            f"{dvc} is running in {path.parent}; wait for it to finish, then run again"
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = path.open("a+", encoding="utf-8")
    except OSError as exc:
        raise RunLockedError(
            f"{path}: cannot create the run lock ({exc.strerror}); make {path.parent} writable"
        ) from None
    started = time.monotonic()
    announced = 0.0
    while not _try_flock(handle):
        info = holder(path)
        if not wait:
            handle.close()
            raise RunLockedError(
                f"{_describe(info)} is already running in {path.parent}; wait for it to "
                f"finish (or stop it), then run again. The lock is {path}: it frees itself "
                "when that process ends."
            )
        waited = time.monotonic() - started
        if waited - announced >= WAIT_PROGRESS_S or announced == 0.0:
            print(f"waiting for {_describe(info)} to finish ({waited:.0f} s)", flush=True)
            announced = max(waited, 1e-9)
        time.sleep(1.0)
    handle.seek(0)
    handle.truncate()
    started_at = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    handle.write(json.dumps({"pid": os.getpid(), "command": command_line(), "started": started_at}))
    handle.flush()
    _held[path] = (handle, 1)
    try:
        yield path
    finally:
        _release(path)


def _release(path: Path) -> None:
    handle, depth = _held[path]
    if depth > 1:
        _held[path] = (handle, depth - 1)
        return
    del _held[path]
    # The holder's details stay in the file: harmless, since only the flock counts.
    fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    handle.close()
