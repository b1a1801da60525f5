"""Does anything of a `retune run` outlive it? The run is ended each way a run ends badly (a
stage's error, Ctrl-C, SIGTERM, SIGKILL) while its Prefect server is up and training runs,
and the processes left in its session are counted.

Run: `python -m benchmarks.interrupt` (a tiny model trained long enough to be interrupted,
~1-2 min per ending on 2 cores), `--endings SIGTERM,SIGKILL`. Writes
benchmarks/results/interrupt.json. Each run is started in a session of its own, so its
session id finds everything it started, reparented or not.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    BIN,
    RESULTS,
    TINY,
    bench_env,
    command_line,
    row,
    session_processes,
    untimed,
    write_params,
    write_result,
)

NAME = "interrupt"
ENDINGS = ("exception", "SIGINT", "SIGTERM", "SIGKILL")
# The line after which the run is ended, a few seconds later: training starts right after it.
TRAINING = "stage split done"


def _ctrl_c_as_in_a_terminal() -> None:
    # A benchmark started in the background of a shell inherits SIGINT ignored, and so would
    # the run: then Ctrl-C (SIGINT) would not stop it, as it does in a terminal.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def end_run(folder: Path, ending: str) -> dict[str, Any]:
    """One `retune run` in `folder`, ended by `ending`; what was alive before and after."""
    env = bench_env({"PREFECT_HOME": str(folder / ".prefect")})
    env.pop("PREFECT_API_URL", None)
    overrides = {**TINY, "train.max_steps": 100_000, "train.save_steps": 100_000}
    if ending == "exception":
        overrides = {**TINY, "validate.min_examples": 10**9}  # the contract fails mid-run
    write_params(folder / "params.yaml", overrides)
    untimed([str(BIN / "retune"), "sample"], folder, env)
    proc = subprocess.Popen(
        [str(BIN / "retune"), "run"],
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=_ctrl_c_as_in_a_terminal,
    )
    assert proc.stdout is not None
    alive_during = 0
    output = []
    for line in proc.stdout:
        output.append(line)
        if ending != "exception" and TRAINING in line:
            time.sleep(8.0)  # into training
            alive_during = len(session_processes(proc.pid))
            proc.send_signal(getattr(signal, ending))
            break
    rest, _ = proc.communicate(timeout=300)
    output.append(rest or "")
    returncode = proc.wait()
    deadline = time.monotonic() + 30.0
    while (left := session_processes(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    text = "".join(output)
    return {
        "returncode": returncode,
        "alive_during": alive_during,
        "left_behind": len(left),
        "traceback": "Traceback (most recent call last)" in text,
        "last_line": next((x for x in reversed(text.splitlines()) if x.strip()), ""),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endings", default=",".join(ENDINGS), help="comma-separated")
    parser.add_argument("--smoke", action="store_true", help="SIGKILL only")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = parser.parse_args(argv)
    endings = ["SIGKILL"] if args.smoke else args.endings.split(",")
    rows = []
    failed = False
    for ending in endings:
        folder = Path(tempfile.mkdtemp(prefix="retune-bench-interrupt-"))
        try:
            result = end_run(folder, ending)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        print(f"{ending}: {result}", flush=True)
        failed |= result["left_behind"] > 0 or result["traceback"]
        note = (
            f"exit {result['returncode']}; {result['alive_during'] or 'n/a'} processes in the "
            f"run's session while training; traceback printed: {result['traceback']}; "
            f"last line: {result['last_line'][:120]}"
        )
        rows.append(row(f"left_behind_{ending}", result["left_behind"], "processes", "== 0", note))
    write_result(NAME, command_line(NAME, argv), rows, args.out)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
