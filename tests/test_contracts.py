"""dvc.yaml, params.yaml, the flow and the code agree; imports go flows -> tasks -> retune."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import re
from pathlib import Path

import yaml

from retune.config import Params, load_params

ROOT = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_every_dvc_stage_runs_the_same_function_as_the_flow_task() -> None:
    from flows.retrain import STAGES

    assert [name for name, _ in STAGES] == list(DVC)
    for name, flow_task in STAGES:
        assert DVC[name]["cmd"] == f"python -m tasks.{name}"
        module = importlib.import_module(f"tasks.{name}")
        # The Prefect task wraps the very `run` that DVC's cmd calls.
        assert flow_task.fn is module.run
        assert flow_task.name == name
        assert getattr(module, f"{name}_task") is flow_task


def test_dvc_params_and_paths_exist_in_params_yaml() -> None:
    params = load_params(ROOT / "params.yaml")
    for name, stage in DVC.items():
        for dotted in stage.get("params", []):
            node: object = params
            for part in dotted.split("."):
                assert hasattr(node, part), f"dvc.yaml stage {name}: params key {dotted!r}"
                node = getattr(node, part)
        text = yaml.safe_dump(stage)
        for ref in re.findall(r"\$\{paths\.(\w+)\}", text):
            assert hasattr(params.paths, ref), f"dvc.yaml stage {name}: ${{paths.{ref}}}"
        for dep in stage.get("deps", []):
            if "${" not in dep:
                assert (ROOT / dep).exists(), f"dvc.yaml stage {name}: dep {dep} missing"


def test_each_stage_with_settings_has_a_params_section_of_its_name() -> None:
    sections = {f.name for f in dataclasses.fields(Params)}
    # `cv` is cross-validated *evaluation*: its one setting is `evaluate.folds`.
    for name in set(DVC) - {"cv"}:
        assert name in sections, f"stage {name} has no params.yaml section"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
            if node.module == "tasks" or node.module.startswith("tasks."):
                found.add(node.module)
    return found


def test_imports_go_one_way() -> None:
    for path in (ROOT / "retune").rglob("*.py"):
        if path.name == "cli.py":  # the outer edge, imports lazily by design
            continue
        assert not _imports(path) & {"tasks", "flows"}, f"{path} imports a higher layer"
    for path in (ROOT / "tasks").glob("*.py"):
        imported = _imports(path)
        assert "flows" not in imported, f"{path} imports flows"
        others = {i for i in imported if i.startswith("tasks.")}
        assert not others, f"{path} imports another stage: {others}"
