"""How commands start: stages run by DVC or the CLI stay free of Prefect, and `retune run`
starts one temporary Prefect server early, warms up while it starts, and its flow uses it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from retune.config import to_plain
from tests.helpers import tiny_params_for

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_a_stage_outside_a_flow_does_not_import_prefect(tmp_path: Path) -> None:
    out = _python(
        """
        import sys
        import tasks.ingest, tasks.hygiene, tasks.validate, tasks.split, tasks.train
        import tasks.evaluate, tasks.register, tasks.promote, tasks.sample, tasks.cv
        print("prefect" in sys.modules, tasks.ingest.ingest_task)
        print(tasks.cv.fold_task.name, "prefect" in sys.modules)
        """,
        tmp_path,
    )
    before, after = out.splitlines()
    assert before.startswith("False <Prefect task 'ingest' of tasks.ingest.run>")
    # The task is real once used: its attributes are Prefect's.
    assert after == "cv-fold True"


@pytest.mark.slow
def test_run_starts_one_server_early_and_the_flow_uses_it(tmp_path: Path) -> None:
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(to_plain(tiny_params_for(tmp_path))))
    out = _python(
        f"""
        import subprocess, sys
        from pathlib import Path
        from prefect import flow, get_client
        from flows.startup import WARM_IMPORTS, prefect_api
        from retune.config import load_params

        with prefect_api(load_params(Path({str(params_file)!r}))) as url:
            # A fresh Prefect home migrates for seconds: time enough for the first import.
            print("imported", WARM_IMPORTS[0] in sys.modules)

            @flow
            def probe() -> str:
                return str(get_client(sync_client=True).api_url)

            print("same", probe().rstrip("/") == url.rstrip("/"))
            servers = subprocess.run(
                ["pgrep", "-f", "-P", str(__import__("os").getpid()), "flows.prefect_server"],
                capture_output=True, text=True,
            ).stdout.split()
            print("servers", len(servers))
        """,
        tmp_path,
        # A Prefect home of its own and no configured server: what a fresh clone has.
        env={"PREFECT_HOME": str(tmp_path / ".prefect"), "PREFECT_API_URL": ""},
    )
    assert out.splitlines()[-3:] == ["imported True", "same True", "servers 1"]
    # The MLflow store was created while the server started.
    assert (tmp_path / "mlruns" / "mlflow.db").stat().st_size > 0
