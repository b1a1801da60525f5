"""`retune monitor`: the monitoring page of production, in reports/monitor.html.

Runs as `python -m tasks.monitor` and as `retune monitor`; every drift check (tasks/drift.py)
writes and logs the same page. Reads the feedback store (traffic and ratings, no text), the
registry's alias history and the drift experiment's runs; see retune/online/monitor.py.
"""

from __future__ import annotations

from pathlib import Path

from retune.artifacts import MONITOR_PAGE
from retune.config import Params
from retune.entry import stage_main


def run(params: Params) -> Path:
    """Edge: write the monitoring page of `register.model_name` to reports/monitor.html."""
    from retune.online import monitor

    path = monitor.write(params, MONITOR_PAGE.path(params))
    print(f"monitor: {params.register.model_name} -> {path}", flush=True)
    return path


if __name__ == "__main__":
    stage_main(run)
