"""Data versions of folders retune writes outside `dvc repro` (exported feedback, the
preference set): `dvc add` where DVC tracks the folder. Entered by the export stages."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from retune.data.snapshot import dvc_root


def _dvc_executable() -> str | None:
    beside = Path(sys.executable).parent / "dvc"
    return str(beside) if beside.exists() else shutil.which("dvc")


def dvc_add(folder: Path, stage: str) -> tuple[str, str | None]:
    """`dvc add` `folder` if DVC tracks it (`<folder>.dvc` in a DVC repository): what `stage`
    wrote there becomes a new data version. Returns (what happened, the user's next step)."""
    resolved = folder.resolve()
    pointer = resolved.with_name(resolved.name + ".dvc")
    root = dvc_root(resolved.parent)
    if root is None:
        return f"skipped: {folder} is not in a DVC repository", None
    if not pointer.exists():
        return f"skipped: DVC does not track {folder} (no {pointer.name} beside it)", None
    dvc = _dvc_executable()
    if dvc is None:
        return "skipped: the dvc command is not installed", f"dvc add {folder}"
    target = resolved.relative_to(root)
    print(f"{stage}: dvc add {target}", flush=True)
    done = subprocess.run(
        [dvc, "add", str(target)], cwd=root, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        error = (done.stderr or done.stdout).strip().splitlines()
        why = error[-1] if error else f"exit {done.returncode}"
        print(f"{stage}: warning: dvc add failed: {why}", flush=True)
        return f"failed: {why}", f"dvc add {target}"
    return "added", f"git add {pointer.relative_to(root)}"
