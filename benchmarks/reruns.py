"""No-op and incremental reruns: the retraining flow run twice on unchanged data and params,
then `dvc repro` with nothing changed and after one param change (which stages ran).

Run: `python -m benchmarks.reruns` (default params.yaml: one full training, ~8 min on 2 cores)
or `--smoke` (a tiny model and corpus); `--parts flow` or `--parts dvc` for one half. DVC
adopts the flow's outputs with `dvc commit` (both run the same stages on the same params);
`--parts dvc` alone runs a first `dvc repro` instead.
Works on a copy of the working tree (tracked and untracked files, git-ignored ones left out)
in a scratch folder, committed there to a throwaway git repository, with its own data,
MLflow store and Prefect home. Writes benchmarks/results/reruns.json.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import (
    BIN,
    PYTHON,
    RESULTS,
    ROOT,
    TINY,
    Measured,
    bench_env,
    command_line,
    measure,
    read_report,
    row,
    untimed,
    write_params,
    write_result,
)

NAME = "reruns"
NOOP_TARGET_S = 3.0
NOOP_REPEATS = 3
# The one param changed: it alters the generated replies, so evaluate and what reads its
# report rerun, and nothing upstream of evaluate may.
CHANGED_PARAM = ("evaluate.max_new_tokens", 40)
# `retune` with the copy's own code: the console script would import the repository's.
RETUNE = [PYTHON, "-c", "import sys; from flows.cli import main; sys.argv[0] = 'retune'; main()"]
_RAN = re.compile(r"Running stage '([^']+)'")
_EDGE = re.compile(r'^"([^"]+)" -> "([^"]+)";', re.MULTILINE)
_NODE = re.compile(r'^"([^"]+)";', re.MULTILINE)


def copy_tree(dest: Path) -> None:
    """The working tree as git sees it (tracked + untracked, ignored files left out) at `dest`,
    committed to a new repository there: DVC wants git, and the copy must not touch ROOT."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for rel in filter(None, (p.decode() for p in listed)):
        src = ROOT / rel
        if src.is_file():  # a file deleted but not yet staged is still listed
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    git = ["git", "-c", "user.name=retune-bench", "-c", "user.email=bench@localhost"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "benchmark snapshot"]):
        subprocess.run([*git, *args], cwd=dest, check=True, capture_output=True)


def dvc(folder: Path, env: dict[str, str], *args: str) -> Measured:
    return measure([str(BIN / "dvc"), *args], cwd=folder, env=env)


def _dvc(folder: Path, env: dict[str, str], *args: str) -> str:
    """stdout of `dvc <args>` run in `folder`."""
    return subprocess.run(
        [str(BIN / "dvc"), *args], cwd=folder, env=env, capture_output=True, text=True, check=True
    ).stdout


def dvc_status(folder: Path, env: dict[str, str]) -> list[str]:
    """Stages `dvc status` says changed, in dvc.yaml order."""
    out = _dvc(folder, env, "status", "--json")
    changed = json.loads(out[out.index("{") :] if "{" in out else "{}")
    return [name for name in changed if not name.endswith(".dvc")]


def dag(folder: Path, env: dict[str, str]) -> tuple[list[str], list[tuple[str, str]]]:
    """The pipeline's stages (dvc.yaml order) and its edges, from `dvc dag`."""
    dot = _dvc(folder, env, "dag", "--dot")
    stages = [n for n in _NODE.findall(dot) if not n.endswith(".dvc")]
    return stages, _EDGE.findall(dot)


def downstream(folder: Path, env: dict[str, str], stages: list[str]) -> list[str]:
    """`stages` and every stage that depends on them, in pipeline order."""
    order, edges = dag(folder, env)
    found = set(stages)
    grew = True
    while grew:
        new = {b for a, b in edges if a in found and b not in found}
        found |= new
        grew = bool(new)
    return [s for s in order if s in found]


def ran(m: Measured) -> list[str]:
    return _RAN.findall(m.output)


def dvc_part(folder: Path, env: dict[str, str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    # After a flow run the outputs are there (the flow runs the stages DVC runs, on the same
    # params): `dvc commit` records them in dvc.lock instead of training all over again.
    adopted = dvc(folder, env, "commit", "--force")
    if adopted.returncode == 0:
        stages = dag(folder, env)[0]
        rows.append(row("dvc_commit_flow_outputs", adopted.wall_s, "s", note="setup, not a rerun"))
    else:
        first = dvc(folder, env, "repro")
        if first.returncode != 0:
            raise SystemExit(f"dvc repro failed (exit {first.returncode}):\n{first.output[-4000:]}")
        stages = ran(first)
        rows.append(row("dvc_repro_first", first.wall_s, "s", note=f"{len(stages)} stages"))
    noops = [dvc(folder, env, "repro") for _ in range(NOOP_REPEATS)]
    noop_ran = sorted({s for m in noops for s in ran(m)})
    key, value = CHANGED_PARAM
    write_params(folder / "params.yaml", {key: value}, base=folder / "params.yaml")
    changed_stages = dvc_status(folder, env)
    expected = downstream(folder, env, changed_stages)
    changed = dvc(folder, env, "repro")
    if changed.returncode != 0:
        raise SystemExit(f"dvc repro after {key}={value} failed:\n{changed.output[-4000:]}")
    after = ran(changed)
    unexpected = [s for s in after if s not in expected]
    rows += [
        row(
            "dvc_repro_noop",
            statistics.median(m.wall_s for m in noops),
            "s",
            target=f"<= {NOOP_TARGET_S:g}",
            note=f"median of {NOOP_REPEATS}; stages run: {', '.join(noop_ran) or 'none'}",
        ),
        row(
            "dvc_repro_one_param",
            changed.wall_s,
            "s",
            note=f"{key}={value}: ran {', '.join(after) or 'none'}",
        ),
        row(
            "dvc_repro_one_param_stages",
            len(after),
            "stages",
            target=f"<= {len(expected)}",
            note=(
                f"of {len(stages)}; changed: {', '.join(changed_stages) or 'none'} (dvc status), "
                f"and what depends on it: {', '.join(expected) or 'none'}"
                + (f"; NOT expected: {', '.join(unexpected)}" if unexpected else "")
            ),
        ),
    ]
    return rows


def _trained(folder: Path) -> str | None:
    """The MLflow run id of the last training (reports/train.json)."""
    run_id = read_report(folder, "train").get("run_id")
    return str(run_id) if run_id else None


def flow_part(folder: Path, env: dict[str, str]) -> list[dict[str, Any]]:
    first = measure([*RETUNE, "run"], cwd=folder, env=env)
    if first.returncode != 0:
        raise SystemExit(f"retune run failed (exit {first.returncode}):\n{first.output[-4000:]}")
    trained_first = _trained(folder)
    second = measure([*RETUNE, "run"], cwd=folder, env=env)
    if second.returncode != 0:
        raise SystemExit(f"second retune run failed:\n{second.output[-4000:]}")
    retrained = _trained(folder) != trained_first
    summary = read_report(folder, "flow")
    stages = ", ".join(summary.get("stages_s", {})) or "none"
    return [
        row("flow_first", first.wall_s, "s", note="`retune run`: every stage"),
        row(
            "flow_rerun_unchanged",
            second.wall_s,
            "s",
            note=(
                "same data and params: " + ("TRAINED AGAIN" if retrained else "training skipped")
            ),
        ),
        row(
            "flow_rerun_trained",
            1.0 if retrained else 0.0,
            "runs",
            target="== 0",
            note="0: skipped, 1: trained again (a new run_id in reports/train.json); "
            f"reports/flow.json: skipped={summary.get('skipped', False)}, stages run: {stages}",
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny model and corpus")
    parser.add_argument("--parts", default="dvc,flow", help="dvc, flow or both (default)")
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = parser.parse_args(argv)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not parts or parts - {"dvc", "flow"}:
        parser.error(f"--parts takes dvc, flow or both, not {args.parts!r}")
    if args.workdir is not None and args.workdir.exists() and any(args.workdir.iterdir()):
        parser.error(f"--workdir {args.workdir} is not empty")
    folder = args.workdir or Path(tempfile.mkdtemp(prefix="retune-bench-reruns-"))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        copy_tree(folder)
        if args.smoke:
            write_params(folder / "params.yaml", TINY, base=folder / "params.yaml")
        env = bench_env({"PREFECT_HOME": str(folder / ".prefect")})
        untimed([*RETUNE, "sample"], folder, env)
        rows: list[dict[str, Any]] = []
        if "flow" in parts:
            rows += flow_part(folder, env)
        if "dvc" in parts:
            rows += dvc_part(folder, env)
    finally:
        if args.workdir is None:
            shutil.rmtree(folder, ignore_errors=True)
    write_result(NAME, command_line(NAME, argv), rows, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
