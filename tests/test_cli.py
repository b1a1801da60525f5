"""The `retune` command: help, strict params before any work, clean errors and exit codes."""

from __future__ import annotations

from pathlib import Path

import yaml
from typer.testing import CliRunner

from retune.cli import app
from retune.config import Params, to_plain

runner = CliRunner()


def test_help_lists_the_flow_and_every_stage() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in (
        "run",
        "sample",
        "ingest",
        "validate",
        "split",
        "train",
        "evaluate",
        "register",
        "params",
    ):
        assert command in result.output


def test_misspelt_override_fails_before_any_work(tmp_path: Path) -> None:
    result = runner.invoke(app, ["run", "train.max_stepz=5", "--params", "params.yaml"])
    assert result.exit_code == 1
    assert "train.max_stepz: unknown key" in result.output


def test_params_shows_resolved_overrides() -> None:
    result = runner.invoke(app, ["params", "train.max_steps=7"])
    assert result.exit_code == 0
    assert yaml.safe_load(result.output)["train"]["max_steps"] == 7


def test_stage_error_exits_1_with_the_fix_and_no_traceback(
    tmp_path: Path, prepared: Params
) -> None:
    # `prepared` holds 80 records; ask the contract for more and validate must refuse.
    params_file = tmp_path / "p.yaml"
    params_file.write_text(yaml.safe_dump(to_plain(prepared)))
    result = runner.invoke(
        app, ["validate", "validate.min_examples=500", "--params", str(params_file)]
    )
    assert result.exit_code == 1
    assert "min_examples" in result.output
    assert "Traceback" not in result.output
