"""`retune reproduce`: a registered version rebuilt from its run (commit, data version, params)
gives its metrics, even after new data; a dirty run and a lost data version are refused with
the reason and the fix, leaving no work tree behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app
from retune.config import Params, to_plain
from retune.release.reproduce import compare, parse_ref, passed, replay_overrides
from retune.release.tracking import setup_tracking
from tests.helpers import make_conversations
from tests.test_dvc import _project, _run


def _git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
        cwd=root, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip


def _worktrees(root: Path) -> list[str]:
    return [
        line for line in _git(root, "worktree", "list", "--porcelain").splitlines()
        if line.startswith("worktree ")
    ]  # fmt: skip


def test_references_and_overrides_and_the_comparison() -> None:
    assert parse_ref("models:/support/3").version == 3
    assert parse_ref("support@production").alias == "production"
    assert parse_ref("models:/support@champion").model_name == "support"
    assert parse_ref("a" * 32).run_id == "a" * 32
    with pytest.raises(Exception, match="names no run: give an MLflow run id"):
        parse_ref("support")

    recorded = {"train.max_steps": "50", "train.num_train_epochs": "None", "seed": "42",
                "paths.model": "/elsewhere", "tracking.uri": "sqlite:///x.db",
                "serve.api_key": "***", "ingest.role_map.rep": "assistant",
                "max_new_tokens": "64"}  # fmt: skip
    committed = {"train.max_steps": "300", "train.num_train_epochs": "2", "seed": "42",
                 "paths.model": "models/candidate", "tracking.uri": "sqlite:///y.db",
                 "serve.api_key": "***", "ingest.columns.text": "text"}  # fmt: skip
    assert replay_overrides(recorded, committed) == (
        ["train.max_steps=50", "train.num_train_epochs=null"],
        ["ingest.role_map.rep"],
    )

    rows = compare(
        {"perplexity": 40.0, "bits_per_byte": 2.0, "unsafe_share": 0.0, "train_loss": 3.0},
        {"perplexity": 40.2, "bits_per_byte": 2.0, "unsafe_share": 0.0},
        ["perplexity", "bits_per_byte", "unsafe_share", "next_token_accuracy"],
        0.01,
    )
    by = {r.metric: r for r in rows}
    assert by["perplexity"].difference == pytest.approx(0.005) and by["perplexity"].within
    assert by["unsafe_share"].difference == 0.0  # absolute when the recorded value is 0
    assert "next_token_accuracy" not in by  # not recorded: nothing to compare
    assert not by["train_loss"].gated and by["train_loss"].reproduced is None
    assert passed(rows)
    assert not passed(compare({"perplexity": 40.0}, {"perplexity": 41.0}, ["perplexity"], 0.01))
    assert not passed(compare({"perplexity": 40.0}, {}, ["perplexity"], 0.01))


def _recorded_run(params: Params, tags: dict[str, str]) -> str:
    import mlflow

    setup_tracking(params.tracking)
    with mlflow.start_run(tags=tags) as active:
        mlflow.log_metric("perplexity", 40.0)
    return str(active.info.run_id)


def _repo_with_params(root: Path, params: Params) -> Path:
    """A committed git + DVC repository holding `params` as its params.yaml."""
    root.mkdir(parents=True, exist_ok=True)
    _git(root, "init", "-q")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump(to_plain(params)), encoding="utf-8")
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", "project")
    return params_file


def test_a_run_from_a_dirty_tree_is_refused_without_allow_dirty(
    tiny_params: Params, tmp_path: Path
) -> None:
    params_file = _repo_with_params(tmp_path / "repo", tiny_params)
    head = _git(tmp_path / "repo", "rev-parse", "HEAD")
    run_id = _recorded_run(
        tiny_params, {"git_commit": head, "git_dirty": "true", "incoming_dvc": "0" * 32}
    )
    out = CliRunner().invoke(app, ["reproduce", run_id, "--params", str(params_file)])
    assert out.exit_code == 1
    assert "uncommitted changes" in out.output and "--allow-dirty" in out.output
    assert "Traceback" not in out.output
    assert len(_worktrees(tmp_path / "repo")) == 1  # nothing was checked out

    # With --allow-dirty it goes on, to the next thing this run lacks: its data.
    out = CliRunner().invoke(
        app, ["reproduce", run_id, "--allow-dirty", "--params", str(params_file)]
    )
    assert out.exit_code == 1 and "data version " + "0" * 32 in out.output


def test_a_data_version_in_neither_cache_nor_remote_names_it_and_the_fix(
    tiny_params: Params, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    params_file = _repo_with_params(repo, tiny_params)
    head = _git(repo, "rev-parse", "HEAD")
    lost = "0123456789abcdef0123456789abcdef.dir"
    run_id = _recorded_run(
        tiny_params, {"git_commit": head, "git_dirty": "false", "incoming_dvc": lost}
    )
    out = CliRunner().invoke(app, ["reproduce", run_id, "--params", str(params_file)])
    assert out.exit_code == 1, out.output
    assert f"data version {lost} is not in the DVC cache" in out.output
    assert "no DVC remote is configured" in out.output and "dvc remote add -d" in out.output
    assert len(_worktrees(repo)) == 1  # the work tree made for it is gone

    remote = tmp_path / "remote"
    remote.mkdir()
    subprocess.run(
        [sys.executable, "-m", "dvc", "remote", "add", "-d", "store", str(remote)],
        cwd=repo, check=True,
    )  # fmt: skip
    out = CliRunner().invoke(app, ["reproduce", run_id, "--params", str(params_file)])
    assert out.exit_code == 1
    assert "neither in the DVC cache" in out.output and "nor on DVC remote 'store'" in out.output
    assert len(_worktrees(repo)) == 1

    unknown = CliRunner().invoke(
        app, ["reproduce", "models:/retune-test/7", "-p", str(params_file)]
    )
    assert unknown.exit_code == 1 and "models:/retune-test/7 is not in this MLflow store" in (
        unknown.output
    )


@pytest.mark.slow
def test_a_registered_version_is_rebuilt_with_its_own_data_after_new_data_came(
    tmp_path: Path,
) -> None:
    from mlflow import MlflowClient

    project = _project(tmp_path)
    _git(project, "add", "-A")
    _git(project, "commit", "-qm", "project")
    cli = "from flows.cli import main; main()"
    for round_ in (1, 2):
        done = _run(project, "-c", cli, "run")
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        if round_ == 1:  # new data arrives: v2 trains on more
            lines = [
                json.dumps({"messages": [{"role": r, "content": c + " (new)"} for r, c in conv]})
                for conv in make_conversations(40)
            ]
            (project / "data" / "incoming" / "more.jsonl").write_text("\n".join(lines) + "\n")

    uri = f"sqlite:///{project / 'mlruns' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    v1, v2 = (client.get_model_version("retune-test", v) for v in ("1", "2"))
    assert v1.tags["data_version"] != v2.tags["data_version"]
    before = {v: client.get_model_version("retune-test", v).tags for v in ("1", "2")}
    aliases = client.get_registered_model("retune-test").aliases

    done = _run(project, "-c", cli, "reproduce", "models:/retune-test/1", timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    assert "reproduced: every gated metric is within tolerance" in done.stdout

    report = json.loads((project / "reports" / "reproduce.json").read_text())
    assert report["run_id"] == v1.run_id and report["passed"]
    assert report["data_from"] == "the DVC cache" and report["data_version_matches"]
    gated = {r["metric"]: r for r in report["rows"] if r["gated"]}
    assert {"perplexity", "bits_per_byte"} <= set(gated)
    assert all(r["difference"] <= 0.01 for r in gated.values())

    rebuilt = client.get_run(report["reproduction_run_id"])
    assert rebuilt.data.tags["retune.reproduction_of"] == v1.run_id
    assert rebuilt.data.tags["data_version"] == v1.tags["data_version"]
    assert rebuilt.data.tags["git_commit"] == v1.tags["git_commit"]
    # Nothing in the registry moved: the same two versions, tags and aliases.
    assert len(client.search_model_versions("name='retune-test'")) == 2
    assert {v: client.get_model_version("retune-test", v).tags for v in ("1", "2")} == before
    assert client.get_registered_model("retune-test").aliases == aliases
    assert len(_worktrees(project)) == 1


def test_a_base_model_inside_the_project_is_read_from_the_project(tmp_path: Path) -> None:
    from flows.reproduce import _base_model

    (tmp_path / "models" / "base" / "smol").mkdir(parents=True)
    base = tmp_path / "models" / "base" / "smol"
    assert _base_model(tmp_path, {"train.base_model": "models/base/smol"}) == [
        f"train.base_model={base.resolve()}"
    ]
    assert _base_model(tmp_path, {"train.base_model": "scratch"}) == []
    assert _base_model(tmp_path, {"train.base_model": str(base)}) == []  # absolute already
