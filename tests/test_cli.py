"""The `retune` command: help, strict params before any work, clean errors and exit codes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import Result
from typer.testing import CliRunner

from flows.cli import app
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
        "gate",
        "params",
        "models",
        "promote",
        "rollback",
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


@pytest.mark.slow
def test_promote_refuses_worse_force_overrides_rollback_and_models_show_it_all(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    from tests.test_promote import gate_params, register_candidate, trained_copy

    params = gate_params(tmp_path)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(to_plain(params)))
    fair = trained_copy(tiny_model_dir, tmp_path / "fair", steps=8)
    bad = trained_copy(fair, tmp_path / "bad", steps=0, noise=0.1)

    def retune(*args: str) -> Result:
        return runner.invoke(app, [*args, "--params", str(params_file)])

    register_candidate(params, fair)
    first = retune("gate")  # the promote stage: nothing in production yet
    assert first.exit_code == 0, first.output
    assert "retune-test v1 -> @production: first model" in first.output
    register_candidate(params, bad)
    gated = retune("gate")
    assert gated.exit_code == 0, gated.output  # a rejection is a verdict, not a failure
    assert "retune-test v2 REJECTED" in gated.output

    refused = retune("promote", "2")
    assert refused.exit_code == 1
    assert "refused: retune-test v2 REJECTED" in refused.output
    assert "worse than production v1" in refused.output
    no_reason = retune("promote", "2", "--force")
    assert no_reason.exit_code == 1 and '--force needs --reason "..."' in no_reason.output
    forced = retune("promote", "2", "--force", "--reason", "customer demo needs v2")
    assert forced.exit_code == 0, forced.output
    verdict = "\nproduction: v1 -> v2. retune-test v2 -> @production: forced: customer demo"
    assert verdict in forced.output

    listed = retune("models")
    assert listed.exit_code == 0, listed.output
    lines = listed.output.splitlines()
    assert lines[0].split() == [
        "version",
        "aliases",
        "data_version",
        "perplexity",
        "decision",
        "created",
        "(UTC)",
    ]
    assert lines[1].split()[:5] == ["v2", "production", "d" * 12, lines[1].split()[3], "promote"]
    assert "(forced)" in lines[1] and lines[2].split()[:2] == ["v1", "-"]

    back = retune("rollback")
    assert back.exit_code == 0, back.output
    assert back.output.strip() == "retune-test@production: v2 -> v1"
    again = retune("rollback")
    assert again.exit_code == 1 and "no earlier production version" in again.output

    history = retune("models", "--history")
    assert history.exit_code == 0, history.output
    rows = history.output.splitlines()
    assert rows[0].split()[:4] == ["when", "(UTC)", "version", "from"]
    assert "v2 -> v1" in rows[1] and "rollback" in rows[1] and "cli:" in rows[1]
    assert "v1 -> v2" in rows[2] and "yes" in rows[2] and "customer demo needs v2" in rows[2]
    assert "- -> v1" in rows[3] and "gate" in rows[3] and "first model" in rows[3]
    assert len(rows) == 4


@pytest.mark.slow
def test_models_on_an_empty_registry_says_how_to_get_one(
    tmp_path: Path, tiny_params: Params
) -> None:
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(to_plain(tiny_params)))
    result = runner.invoke(app, ["models", "--params", str(params_file)])
    assert result.exit_code == 0
    assert "no versions registered" in result.output and "retune run" in result.output
    gate = runner.invoke(app, ["gate", "--params", str(params_file)])
    assert (
        gate.exit_code == 1 and "register.json is missing: run the `register` stage" in gate.output
    )
