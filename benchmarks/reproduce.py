"""Reproducing a registered model from its MLflow run, before and after new data.

Run: `python -m benchmarks.reproduce` (default settings, the sample corpus: about 30 min on
2 cores) or `--smoke` (the tiny model: a minute or two). In a fresh clone of this repository
(committed, so its runs are clean): `retune sample` and `retune run` (what `make run` does,
on this venv), then `retune reproduce models:/<name>/1`; then a new input file arrives, a
second `retune run` registers v2, and v1 is reproduced again. Records each reproduction's wall
time against the run's, and the largest difference of a gated metric, in
benchmarks/results/reproduce.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import (
    BIN,
    ROOT,
    TINY,
    bench_env,
    command_line,
    measure,
    row,
    untimed,
    write_params,
    write_result,
)

NAME = "reproduce"
NEW_FOLDER = "data/incoming/new_batch"
NEW_SEED = 7  # the sample corpus is seed 42 (params.yaml `seed`)


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=bench", "-c", "user.email=bench@example.com", *args],
        cwd=cwd, check=True, capture_output=True, timeout=300,
    )  # fmt: skip


def fresh_clone(work: Path, overrides: dict[str, Any]) -> Path:
    """A clone of this repository's HEAD, with `overrides` committed into its params.yaml."""
    clone = work / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=300)
    if overrides:
        write_params(clone / "params.yaml", overrides, base=clone / "params.yaml")
        _git(clone, "commit", "-qam", "benchmark settings")
    return clone


def _env(clone: Path) -> dict[str, str]:
    # The clone's own code, on this venv's packages (what `make setup` would install there).
    return bench_env({"PYTHONPATH": str(clone), "PREFECT_HOME": str(clone / ".prefect")})


def retune(clone: Path, *args: str) -> float:
    """Wall seconds of `retune <args>` in the clone; stops the benchmark when it fails."""
    done = measure([str(BIN / "retune"), *args], cwd=clone, env=_env(clone))
    if done.returncode != 0:
        raise SystemExit(f"retune {' '.join(args)} failed:\n{done.output[-4000:]}")
    return done.wall_s


def add_data(clone: Path, n: int) -> None:
    """New input files: `n` more sample units from another seed, in a folder of their own."""
    from retune.config import SampleParams
    from tasks.sample import generate

    generate(SampleParams(conversations=n, defect_rate=0.0), NEW_SEED, clone / NEW_FOLDER)


def _registered(clone: Path) -> str:
    """The clean data version of the version the last run registered."""
    report = json.loads((clone / "reports" / "register.json").read_text(encoding="utf-8"))
    return str(report["data_version"])


def reproduce_rows(clone: Path, model: str, label: str, run_s: float) -> list[dict[str, Any]]:
    wall = retune(clone, "reproduce", f"models:/{model}/1")
    report = json.loads((clone / "reports" / "reproduce.json").read_text(encoding="utf-8"))
    gated = [r for r in report["rows"] if r["gated"]]
    worst = max(gated, key=lambda r: r["difference"])
    identical = all(r["recorded"] == r["reproduced"] for r in gated)
    note = (
        f"{len(gated)} gated metrics; worst {worst['metric']}; bit-identical: {identical}; "
        f"data from {report['data_from']}; clean data version matches: "
        f"{report['data_version_matches']}"
    )
    return [
        row(f"{label}_reproduce_v1_wall", wall, "s", note=f"v1's run took {run_s:.0f} s"),
        row(f"{label}_reproduce_over_run_wall", wall / run_s, "x"),
        row(f"{label}_max_gated_difference", 100 * worst["difference"], "%", "<= 1", note),
        row(f"{label}_passed", float(report["passed"]), "bool", "1"),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="the tiny model: a minute or two")
    parser.add_argument("--new", type=int, default=600, help="conversations in the new file")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)

    overrides = dict(TINY) if args.smoke else {}
    work = Path(tempfile.mkdtemp(prefix="retune-bench-reproduce-"))
    try:
        clone = fresh_clone(work, overrides)
        model = "retune-support"
        untimed([str(BIN / "retune"), "sample"], cwd=clone, env=_env(clone))
        first = retune(clone, "run")
        v1_data = _registered(clone)
        rows = [row("run_v1_wall", first, "s", note="`retune run` in a fresh clone")]
        rows += reproduce_rows(clone, model, "v1", first)
        add_data(clone, args.new)
        second = retune(clone, "run")
        v2_data = _registered(clone)
        note = f"{args.new} new units; clean data version {v1_data[:12]} -> {v2_data[:12]}"
        rows.append(row("run_v2_wall", second, "s", note=note))
        rows += reproduce_rows(clone, model, "after_v2", first)
    finally:
        if args.keep:
            print(f"scratch folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    write_result(NAME, command_line(NAME, argv), rows, args.out.resolve())
    print(f"load average at the end: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
