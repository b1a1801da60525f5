"""Orchestration overhead: the wall time of `make run` (`retune sample`, then `retune run`)
minus the time spent inside training and evaluation compute, as a share of the total.

Run: `python -m benchmarks.overhead` (default params.yaml, ~4-5 min on 2 cores) or `--smoke`
(a tiny model and corpus). Works in a scratch folder (own data, MLflow store, Prefect home),
so the repository's data and runs are untouched. Writes benchmarks/results/overhead.json.

Compute is `train`'s `runtime_s` (reports/train.json: the whole `retune.model.training.train` call)
plus `evaluate`'s scoring time (reports/evaluate.json `score_s` when the stage reports it,
else the whole evaluate stage) plus CV folds when `cv.folds` >= 2. Everything else is
overhead: interpreter start and imports, the Prefect temporary server, MLflow, ingest,
validate, split, register, promote, file I/O.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import (
    BIN,
    RESULTS,
    TINY,
    Measured,
    bench_env,
    command_line,
    first_line,
    measure,
    read_report,
    row,
    untimed,
    write_params,
    write_result,
)

NAME = "overhead"
TARGET_SHARE = 10.0  # per cent of `make run`'s wall time, default config
# Names evaluate.json may give its compute time (the first present wins).
EVALUATE_COMPUTE_KEYS = ("score_s", "compute_s", "runtime_s")


def scratch(folder: Path, overrides: dict[str, Any]) -> dict[str, str]:
    """A folder with params.yaml (+ `overrides`) and its own Prefect home; the environment to
    run retune there."""
    write_params(folder / "params.yaml", overrides)
    return bench_env({"PREFECT_HOME": str(folder / ".prefect")})


def make_run(folder: Path, env: dict[str, str]) -> tuple[Measured, Measured]:
    """What `make run` runs after setup: `retune sample` (the `data` target) and `retune run`."""
    sample = measure([str(BIN / "retune"), "sample"], cwd=folder, env=env)
    run = measure([str(BIN / "retune"), "run"], cwd=folder, env=env)
    if run.returncode != 0:
        raise SystemExit(f"retune run failed (exit {run.returncode}):\n{run.output[-4000:]}")
    return sample, run


def evaluate_compute(folder: Path, stages: dict[str, float]) -> tuple[float, str | None]:
    report = read_report(folder, "evaluate")
    for key in EVALUATE_COMPUTE_KEYS:
        if isinstance(report.get(key), int | float):
            return float(report[key]), None
    return float(stages.get("evaluate", 0.0)), (
        "reports/evaluate.json has no compute time (score_s): the whole evaluate stage, "
        "MLflow logging included, counted as compute, so overhead is slightly understated"
    )


def analyse(folder: Path, sample: Measured, run: Measured) -> list[dict[str, Any]]:
    """Split the wall time of one `make run` into compute and where the overhead goes."""
    flow = read_report(folder, "flow")
    stages: dict[str, float] = {k: float(v) for k, v in flow.get("stages_s", {}).items()}
    flow_s = float(flow.get("total_s", sum(stages.values())))
    train_s = float(read_report(folder, "train").get("runtime_s", 0.0))
    eval_s, eval_note = evaluate_compute(folder, stages)
    cv = read_report(folder, "cv")
    cv_s = float(cv.get("wall_s", 0.0)) if (cv.get("folds") or 0) >= 2 else 0.0
    compute = train_s + eval_s + cv_s
    wall = sample.wall_s + run.wall_s
    overhead = wall - compute

    server = first_line(run, "temporary API server on")
    begun = first_line(run, "Beginning flow run")
    finished = first_line(run, "retrain finished") or (run.wall_s - 0.0)
    stages_start = finished - flow_s  # the summary line is printed right after the stages
    rows = [
        row("make_run_wall", wall, "s", note=f"retune sample {sample.wall_s:.1f}s + retune run"),
        row("compute", compute, "s", note="train runtime_s + evaluate scoring + CV folds"),
        row(
            "overhead_share",
            100.0 * overhead / wall,
            "%",
            target=f"<= {TARGET_SHARE:.0f}",
            note=eval_note,
        ),
        row("overhead", overhead, "s"),
        row("train_compute", train_s, "s"),
        row("evaluate_compute", eval_s, "s"),
        row("data_check_noop", sample.wall_s, "s", note="`retune sample` with data present"),
    ]
    if server is not None and begun is not None:
        rows += [
            row("cli_start_and_imports", server, "s", note="process start to Prefect server"),
            row("prefect_server_start", begun - server, "s", note="temporary server"),
            row("flow_start", stages_start - begun, "s", note="flow run begun to first stage"),
        ]
    else:
        rows.append(row("before_first_stage", stages_start, "s", note="process, Prefect"))
    rows.append(row("after_last_stage", run.wall_s - finished, "s", note="flow end, shutdown"))
    compute_in = {"train": train_s, "evaluate": eval_s, "cv": cv_s}
    for name, seconds in stages.items():
        inside = seconds - compute_in.get(name, 0.0)
        what = "outside compute: MLflow, loading, I/O" if name in compute_in else "whole stage"
        rows.append(row(f"stage_{name}_overhead", inside, "s", note=what))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny model and corpus")
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = parser.parse_args(argv)
    if args.workdir is not None and args.workdir.exists() and any(args.workdir.iterdir()):
        parser.error(f"--workdir {args.workdir} is not empty")
    folder = args.workdir or Path(tempfile.mkdtemp(prefix="retune-bench-overhead-"))
    try:
        env = scratch(folder, TINY if args.smoke else {})
        # The corpus is the user's data already in place: generating it is not `make run`.
        untimed([str(BIN / "retune"), "sample"], folder, env)
        sample, run = make_run(folder, env)
        rows = analyse(folder, sample, run)
    finally:
        if args.workdir is None:
            shutil.rmtree(folder, ignore_errors=True)
    write_result(NAME, command_line(NAME, argv), rows, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
