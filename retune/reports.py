"""Small JSON reports under `paths.reports`: what DVC shows as metrics and stages hand over."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from retune.errors import MissingInputError, RetuneError


def write_json(path: Path, data: dict[str, Any]) -> Path:
    """Write `data` as stable, indented JSON (sorted keys keep DVC diffs readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)  # atomic: a crashed stage never leaves half a report behind
    return path


def read_json(path: Path, written_by: str | None = None) -> dict[str, Any]:
    """Read a report; a missing one is a MissingInputError naming `written_by`, the stage to
    run first, and a damaged one (a half-copied file, an edit) a RetuneError saying so."""
    if not path.is_file():
        raise MissingInputError(path, written_by)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        rerun = f"rerun `retune {written_by}`" if written_by else "rerun the stage that wrote it"
        raise RetuneError(f"{path}: not a readable JSON report ({exc}); {rerun}") from None
    if not isinstance(data, dict):
        raise RetuneError(f"{path}: not a JSON object; rerun the stage that wrote it")
    return data
