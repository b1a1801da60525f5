"""dvc.yaml, params.yaml, the flow and the code agree; imports go flows -> tasks -> retune."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import re
from pathlib import Path

import pytest
import yaml

from retune import artifacts
from retune.artifacts import PIPELINE, STAGES, Stage
from retune.config import Params, load_params
from retune.errors import MissingInputError
from tests.helpers import tiny_params_for

ROOT = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
STAGES_BY_NAME = STAGES


def test_the_flow_dvc_and_the_cli_run_the_declared_stages_in_order() -> None:
    from flows.cli import STAGE_COMMANDS, STAGE_HELP
    from flows.retrain import STAGES

    declared = [stage.name for stage in PIPELINE]
    assert [name for name, _ in STAGES] == declared
    assert list(DVC) == declared
    assert set(declared) <= set(STAGE_HELP)
    for name, flow_task in STAGES:
        assert DVC[name]["cmd"] == f"python -m tasks.{name}"
        module = importlib.import_module(f"tasks.{name}")
        # The Prefect task wraps the very `run` that DVC's cmd calls.
        assert flow_task.fn is module.run
        assert flow_task.name == name
        assert getattr(module, f"{name}_task") is flow_task
        assert STAGE_HELP[name] == STAGES_BY_NAME[name].summary
        assert STAGE_COMMANDS.get(name, name)  # every stage has a CLI command


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
    for stage in PIPELINE:
        assert stage.name in sections, f"stage {stage.name} has no params.yaml section"
        assert stage.name in stage.params, f"stage {stage.name} does not declare its section"
        for dotted in stage.params:
            assert dotted.split(".")[0] in sections, f"stage {stage.name}: {dotted}"


def _declared_dvc_stage(stage: Stage) -> dict[str, object]:
    """What dvc.yaml must say of `stage` (its code deps aside): deps from what it reads, outs,
    metrics and plots from what it writes, params from the sections it declares."""
    deps = list(dict.fromkeys(a.dvc_path() for a in stage.reads))
    outs: list[object] = []
    metrics: list[object] = []
    plots: list[object] = []
    for artifact in stage.writes:
        path = artifact.dvc_path()
        if artifact.tracking == "plot":
            plots.append({path: PLOT_AXES[artifact.file or ""]})
        elif path not in outs:
            outs.append(path)
        if artifact.headline:
            metrics.append(artifact.headline_dvc_path())
    found: dict[str, object] = {"deps": deps, "params": list(stage.params)}
    for key, value in (("outs", outs), ("metrics", metrics), ("plots", plots)):
        if value:
            found[key] = value
    return found


# How dvc.yaml draws each plot: axes are presentation, not part of the stage graph.
PLOT_AXES = {"train_loss.csv": {"x": "step", "y": "loss"}}


def test_dvc_yaml_says_what_the_declaration_says() -> None:
    for stage in PIPELINE:
        listed = DVC[stage.name]
        expected = _declared_dvc_stage(stage)
        actual = {
            "deps": [d for d in listed.get("deps", []) if "${" in d],
            "params": list(listed.get("params", [])),
            **{k: listed[k] for k in ("outs", "metrics", "plots") if k in listed},
        }
        assert actual == expected, (
            f"dvc.yaml stage {stage.name} differs from retune/artifacts.py; it should read\n"
            + yaml.safe_dump(expected, sort_keys=False)
        )


def _params_read(path: Path) -> set[str]:
    """`params.<section>` and `params.<section>.<key>` read anywhere in a module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.value.id == "params":
                found.add(node.attr)
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Attribute)
            and isinstance(node.value.value, ast.Name)
            and node.value.value.id == "params"
        ):
            found.add(f"{node.value.attr}.{node.attr}")
    return found


# Where files live and where runs are tracked: every stage may read these.
SHARED_SECTIONS = {"paths", "tracking"}


def test_each_stage_reads_only_the_sections_it_declares() -> None:
    for stage in PIPELINE:
        allowed = set(stage.params) | SHARED_SECTIONS
        for read in _params_read(ROOT / "tasks" / f"{stage.name}.py"):
            section = read.split(".")[0]
            if read in allowed or section in allowed:
                continue
            if "." not in read and any(a.startswith(f"{read}.") for a in allowed):
                continue  # `params.validate` on the way to a declared `validate.min_chars`
            raise AssertionError(f"tasks/{stage.name}.py reads params.{read}, not declared")


def test_hand_off_file_names_are_written_once() -> None:
    names = {
        a.file
        for a in vars(artifacts).values()
        if isinstance(a, artifacts.Artifact) and a.file is not None
    } | {artifacts.RECORDS_FILE, artifacts.MANIFEST_FILE, artifacts.QUARANTINE_FILE}
    for layer in LAYERS:
        for path in (ROOT / layer).rglob("*.py"):
            if path == ROOT / "retune" / "artifacts.py":
                continue
            text = path.read_text()
            for name in names:
                assert f'"{name}"' not in text and f"'{name}'" not in text, (
                    f"{path.relative_to(ROOT)} spells {name!r}: take it from retune.artifacts"
                )


@pytest.mark.parametrize(
    ("stage", "first"),
    [
        ("hygiene", "ingest"),
        ("validate", "hygiene"),
        ("split", "hygiene"),
        ("train", "split"),
        ("cv", "split"),
        ("preference", "train"),
        ("evaluate", "preference"),
        ("register", "train"),
        ("promote", "register"),
    ],
)
def test_a_missing_input_names_the_stage_to_run_first(
    tmp_path: Path, stage: str, first: str
) -> None:
    params = tiny_params_for(tmp_path, cv={"folds": 2})
    module = importlib.import_module(f"tasks.{stage}")
    with pytest.raises(MissingInputError) as caught:
        module.run(params)
    command = STAGES_BY_NAME[first].name if first != "promote" else "gate"
    assert f"`retune {command}`" in str(caught.value)
    assert str(tmp_path) in str(caught.value)  # the path of the missing file


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
