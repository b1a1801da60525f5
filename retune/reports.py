"""Small JSON reports under `paths.reports`: what DVC shows as metrics and stages hand over."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_json(path: Path, data: dict[str, Any]) -> Path:
    """Write `data` as stable, indented JSON (sorted keys keep DVC diffs readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)  # atomic: a crashed stage never leaves half a report behind
    return path


def read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; run the stage that writes it first")
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data
