"""The flow and DVC agree: after `retune run`, `dvc repro` has nothing to do, `dvc metrics show`
lists the headline figures, and a change in a module reruns exactly the stages that import it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT, TINY, make_conversations

pytestmark = pytest.mark.slow


def _project(tmp_path: Path) -> Path:
    """A copy of this checkout's files (what git tracks or would), as a fresh git repository
    with params.yaml edited for a tiny model and 80 conversations in data/incoming."""
    project = tmp_path / "project"
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    for name in listed:
        source = ROOT / name
        if source.is_file() and not name.startswith("data/incoming"):
            (project / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, project / name)
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    params = yaml.safe_load((project / "params.yaml").read_text())
    for section, values in TINY.items():
        for key, value in values.items():
            if isinstance(value, dict):
                params[section][key].update(value)
            else:
                params[section][key] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    incoming = project / "data" / "incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    lines = [
        json.dumps({"messages": [{"role": r, "content": c} for r, c in conv]})
        for conv in make_conversations(80)
    ]
    (incoming / "chats.jsonl").write_text("\n".join(lines) + "\n")
    return project


def _run(project: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = os.environ | {
        "PREFECT_HOME": str(project / ".prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DVC_NO_ANALYTICS": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        # The project's own copy of the code, as `dvc repro` would run it.
        "PYTHONPATH": str(project),
    }
    env.pop("PREFECT_API_URL", None)
    return subprocess.run(
        [sys.executable, *args], cwd=project, env=env, capture_output=True, text=True,
        timeout=timeout, check=False,
    )  # fmt: skip


def test_dvc_repro_has_nothing_to_do_after_a_run_and_a_code_change_reruns_its_stages(
    tmp_path: Path,
) -> None:
    project = _project(tmp_path)
    done = _run(project, "-c", "from flows.cli import main; main()", "run")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "dvc.lock records this run" in done.stdout + done.stderr

    status = _run(project, "-m", "dvc", "status", "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout) == {}  # every stage is what dvc.lock records
    repro = _run(project, "-m", "dvc", "repro")
    assert repro.returncode == 0 and "Data and pipelines are up to date" in repro.stdout

    # The headline figures, one small file per stage; the full reports stay files.
    shown = _run(project, "-m", "dvc", "metrics", "show", "--json")
    metrics = json.loads(shown.stdout)
    files = next(iter(metrics.values()))["data"]
    assert all(path.startswith("reports/metrics/") for path in files)
    columns = {key for entry in files.values() for key in entry["data"]}
    assert "perplexity" in columns and "eval_loss" in columns and len(columns) <= 30
    assert files["reports/metrics/evaluate.json"]["data"]["perplexity"] > 1

    # A change in the chat template reruns the stages whose code imports it, and no other.
    chat = project / "retune" / "model" / "chat.py"
    chat.write_text(chat.read_text() + "\n# a change\n")
    status = _run(project, "-m", "dvc", "status", "--json")
    assert set(json.loads(status.stdout)) == {
        "train",
        "preference",
        "cv",
        "evaluate",
        "register",
        "promote",
    }
