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
        assert not _imports(path) & {"tasks", "flows"}, f"{path} imports a higher layer"
    for path in (ROOT / "tasks").glob("*.py"):
        imported = _imports(path)
        assert "flows" not in imported, f"{path} imports flows"
        others = {i for i in imported if i.startswith("tasks.")}
        assert not others, f"{path} imports another stage: {others}"


LAYERS = ("retune", "tasks", "flows")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_imports(path: Path) -> set[str]:
    """Every dotted name a file can import when it runs, lazy imports inside functions
    included; `from a import b` names both `a` and `a.b`. Imports under `if TYPE_CHECKING:`
    never run, so they cannot take part in an import cycle, and are left out."""
    tree = ast.parse(path.read_text())
    type_only = {
        id(child)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for stmt in node.body
        for child in ast.walk(stmt)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of retune/, tasks/ and flows/ it imports."""
    files = {_module_name(p): p for layer in LAYERS for p in (ROOT / layer).rglob("*.py")}
    return {
        name: {m for m in _runtime_imports(path) if m in files and m != name}
        for name, path in files.items()
    }


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """At least one cycle through every group of mutually importing modules, each as the
    path `a -> b -> ... -> a` (depth-first search: an edge back into the current path)."""
    done: set[str] = set()
    path: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt in path:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in done:
                visit(nxt)
        path.pop()
        done.add(node)

    for node in sorted(graph):
        if node not in done:
            visit(node)
    return cycles


def test_find_cycles_names_each_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "e"}, "e": set()}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    graph = import_graph()
    assert "flows.cli" in graph and "flows.deploy" in graph["flows.cli"]  # lazy imports count
    cycles = [" -> ".join(c) for c in find_cycles(graph)]
    assert not cycles, f"import cycles: {cycles}"


def _retune_modules(path: Path) -> set[str]:
    """The `retune` modules a file imports (anywhere in it: lazy imports count), dotted."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from retune import dedup` imports the module retune.data.dedup.
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {n for n in names if n == "retune" or n.startswith("retune.")}
    return found


def _module_file(name: str) -> Path | None:
    base = ROOT / Path(*name.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def retune_closure(path: Path) -> set[str]:
    """Every file under retune/ that running `path` can import, as repo-relative paths: the
    stage's real code dependencies."""
    seen: set[Path] = set()
    todo = [path]
    while todo:
        current = todo.pop()
        for name in _retune_modules(current):
            file = _module_file(name)
            if file is not None and file not in seen:
                seen.add(file)
                todo.append(file)
    # Metric modules are loaded by path (`evaluate.load("retune/model/metrics/x.py")`), not
    # imported.
    return {f.relative_to(ROOT).as_posix() for f in seen if f.name != "__init__.py"}


def test_dvc_code_deps_are_each_stages_import_closure() -> None:
    for name, stage in DVC.items():
        listed = {d for d in stage.get("deps", []) if isinstance(d, str) and "${" not in d}
        listed_code = {d for d in listed if d.startswith("retune/") and d.endswith(".py")}
        needed = retune_closure(ROOT / "tasks" / f"{name}.py")
        assert f"tasks/{name}.py" in listed, f"dvc.yaml stage {name}: its own module"
        missing, extra = sorted(needed - listed_code), sorted(listed_code - needed)
        assert not missing and not extra, (
            f"dvc.yaml stage {name}: add {missing} to its deps, remove {extra}"
        )
