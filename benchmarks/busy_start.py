"""A first `retune run` on a machine whose cores are all busy: does it start, how long does it
wait for Prefect, and is any of its processes left behind?

Run: `python -m benchmarks.busy_start` (5 runs of the default config, each in a fresh folder
with a fresh Prefect home, while one busy loop per core runs), `--runs N`, `--max-steps N` (a
shorter training: start-up is what is measured), `--smoke` (a tiny model and corpus). Writes
benchmarks/results/busy_start.json. The busy loops start before each run and stop after it.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
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
    row,
    untimed,
    write_params,
    write_result,
)

NAME = "busy_start"
BUSY_LOOP = "while True: pass"


def processes_of(folder: Path) -> list[int]:
    """PIDs of live processes whose environment names `folder`'s Prefect home (the run and
    anything it started), found through /proc."""
    marker = f"PREFECT_HOME={folder / '.prefect'}".encode()
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except OSError:
            continue
    return [pid for pid in found if pid != os.getpid()]


def busy(n: int) -> list[subprocess.Popen[bytes]]:
    return [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(n)]


def prefect_wait(run: Measured) -> float | None:
    """Seconds from starting the temporary server to its answer (the run's own lines)."""
    started = first_line(run, "temporary API server on")
    answered = next(
        (t for t, line in run.lines if "answered after" in line or "Beginning flow run" in line),
        None,
    )
    return None if started is None or answered is None else answered - started


def one_run(folder: Path, overrides: dict[str, Any], loops: int) -> dict[str, Any]:
    write_params(folder / "params.yaml", overrides)
    env = bench_env({"PREFECT_HOME": str(folder / ".prefect")})
    env.pop("PREFECT_API_URL", None)
    env.pop("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", None)
    untimed([str(BIN / "retune"), "sample"], folder, env)
    loaders = busy(loops)
    try:
        run = measure([str(BIN / "retune"), "run"], cwd=folder, env=env, echo=False)
        load = os.getloadavg()[0]
    finally:
        for p in loaders:
            p.kill()
            p.wait()
    time.sleep(2.0)  # what is left behind would still be there; what is stopping has stopped
    left = processes_of(folder)
    tracebacks = run.output.count("Traceback (most recent call last)")
    finished = re.search(r"retrain finished in ([0-9.]+)s", run.output)
    return {
        "returncode": run.returncode,
        "wall_s": run.wall_s,
        "prefect_wait_s": prefect_wait(run),
        "flow_s": float(finished.group(1)) if finished else None,
        "left_behind": len(left),
        "tracebacks": tracebacks,
        "load_1min": load,
        "tail": "" if run.returncode == 0 else run.output[-2000:],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="a tiny model and corpus")
    parser.add_argument("--max-steps", type=int, help="train.max_steps (default: params.yaml)")
    parser.add_argument("--loops", type=int, default=os.cpu_count() or 2, help="busy loops")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = dict(TINY) if args.smoke else {}
    if args.max_steps is not None:
        overrides["train.max_steps"] = args.max_steps
    runs = []
    for i in range(args.runs):
        folder = Path(tempfile.mkdtemp(prefix="retune-bench-busy-"))
        try:
            result = one_run(folder, overrides, args.loops)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        runs.append(result)
        print(
            f"run {i + 1}/{args.runs}: exit {result['returncode']}, {result['wall_s']:.1f} s, "
            f"Prefect wait {result['prefect_wait_s']} s, left behind {result['left_behind']}, "
            f"load {result['load_1min']:.1f}",
            flush=True,
        )
        if result["tail"]:
            print(result["tail"], flush=True)
    passed = sum(r["returncode"] == 0 for r in runs)
    waits = [r["prefect_wait_s"] for r in runs if r["prefect_wait_s"] is not None]
    walls = [r["wall_s"] for r in runs]
    setting = "default params.yaml" if not overrides else f"overrides {sorted(overrides)}"
    rows = [
        row("runs_passed", passed, f"of {len(runs)}", target=f"== {len(runs)}"),
        row("processes_left_behind", sum(r["left_behind"] for r in runs), "processes", "== 0"),
        row("tracebacks", sum(r["tracebacks"] for r in runs), "lines", target="== 0"),
        row("prefect_wait_max", max(waits, default=0.0), "s", note="server start to answer"),
        row("prefect_wait_mean", sum(waits) / max(len(waits), 1), "s"),
        row("run_wall_mean", sum(walls) / max(len(walls), 1), "s", note=setting),
        row("load_1min_mean", sum(r["load_1min"] for r in runs) / max(len(runs), 1), "load"),
    ]
    write_result(NAME, command_line(NAME, argv), rows, args.out)
    return 0 if passed == len(runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
