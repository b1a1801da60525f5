"""The code version a model came from: git commit and whether the working tree had changes.

`train` tags both on the pipeline's run, `register` on the registry version; outside a git
checkout both are unknown.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class GitState:
    commit: str | None  # full hex sha of HEAD; None outside git or before the first commit
    dirty: bool | None  # uncommitted or untracked (not ignored) files; None when unknown

    @property
    def commit_tag(self) -> str:
        return self.commit or "unknown"

    @property
    def dirty_tag(self) -> str:
        return "unknown" if self.dirty is None else str(self.dirty).lower()


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):  # git not installed, or a hung filesystem
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _data_pointer(name: str) -> bool:
    path = name.split(" -> ")[-1].strip('"')
    return path.endswith(".dvc") or path.rsplit("/", 1)[-1] == "dvc.lock"


def git_state(cwd: Path | None = None) -> GitState:
    """Commit and dirtiness of the git checkout containing `cwd` (default: the current folder)."""
    where = cwd or Path.cwd()
    commit = _git(["rev-parse", "--verify", "--quiet", "HEAD"], where)
    status = _git(["status", "--porcelain", "--untracked-files=all"], where)
    # Untracked files count: a new module that is not committed changes what the code does.
    # DVC's pointers (`*.dvc`, dvc.lock) do not: they move with the data, whose version each
    # run records by its hash, and a run itself updates dvc.lock.
    changed = [] if status is None else [line[3:] for line in status.splitlines()]
    dirty = None if status is None else any(not _data_pointer(name) for name in changed)
    return GitState(commit=commit or None, dirty=dirty)
