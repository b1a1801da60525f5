"""What the benchmarks share: the result file they write, the machine they ran on, and a
subprocess timed with its peak memory. Imported by `benchmarks.<name>`; nothing runs here.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# Every benchmark, in the order `make bench` runs them and BENCHMARKS.md shows them: the
# training comparison first, while the machine is freshest.
BENCHMARKS = (
    "train",
    "finetune",
    "lora",
    "preference",
    "overhead",
    "busy_start",
    "interrupt",
    "reruns",
    "data_prep",
    "pii",
    "hygiene",
    "serve",
    "malformed",
)
RESULTS = ROOT / "benchmarks" / "results"
PYTHON = sys.executable
# `retune`, `dvc` and `python -m tasks.<stage>` resolve to the interpreter's own environment.
BIN = Path(sys.executable).parent


def row(
    metric: str, value: float, unit: str, target: str | None = None, note: str | None = None
) -> dict[str, Any]:
    """One figure in the shape every benchmark shares."""
    return {"metric": metric, "value": float(value), "unit": unit, "target": target, "note": note}


def machine() -> str:
    """The machine in one line: CPU model, cores, RAM, OS, Python, torch."""
    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        torch = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch = "not installed"
    ram = psutil.virtual_memory().total / 2**30
    return (
        f"{cpu}, {cores} cores, {ram:.0f} GiB RAM, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, torch {torch}"
    )


def git_commit(cwd: Path = ROOT) -> str:
    """Short sha of HEAD, with `-dirty` when the working tree has changes."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    sha = git("rev-parse", "--short", "HEAD")
    if not sha:
        return "unknown"
    return sha + ("-dirty" if git("status", "--porcelain") else "")


def write_result(
    name: str, command: str, rows: list[dict[str, Any]], out_dir: Path = RESULTS
) -> Path:
    """Write benchmarks/results/<name>.json (or under `out_dir`) and print the figures."""
    result = {
        "name": name,
        "command": command,
        "machine": machine(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        # Others' work on a shared machine slows a benchmark down; this says how busy it was.
        "load": "load average 1/5/15 min at the end: "
        + ", ".join(f"{x:.1f}" for x in os.getloadavg())
        + f" on {os.cpu_count()} cores",
        "rows": rows,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"\n{name}: {len(rows)} figures -> {path}")
    for r in rows:
        extra = f"  (target {r['target']})" if r.get("target") else ""
        note = f"  [{r['note']}]" if r.get("note") else ""
        print(f"  {r['metric']:<40} {r['value']:>12,.3f} {r['unit']}{extra}{note}")
    return path


@dataclass(frozen=True)
class Measured:
    wall_s: float
    peak_rss_mb: float  # the process and its children, sampled every `interval_s`
    returncode: int
    output: str  # stdout and stderr together
    lines: tuple[tuple[float, str], ...]  # (seconds since start, line) of the output


def bench_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment `make` gives retune's commands (tools of this venv first, no telemetry)."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env["PYTHONUNBUFFERED"] = "1"  # timestamps of output lines are when they were printed
    env.update(extra or {})
    return env


def untimed(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> None:
    """Run a preparation step that is not part of what a benchmark measures (writing the sample
    corpus); stop the benchmark with its output if it fails."""
    done = measure(cmd, cwd=cwd, env=env, echo=False)
    if done.returncode != 0:
        raise SystemExit(
            f"{shlex.join(cmd)} failed (exit {done.returncode}):\n{done.output[-3000:]}"
        )


def command_line(name: str, argv: list[str] | None) -> str:
    """How benchmark `name` was run, for its results: `python -m benchmarks.<name> <args>`."""
    args = argv if argv is not None else sys.argv[1:]
    return shlex.join(["python", "-m", f"benchmarks.{name}", *args])


def measure(
    cmd: list[str],
    cwd: Path,
    env: dict[str, str] | None = None,
    interval_s: float = 0.05,
    echo: bool = True,
    timeout_s: float | None = None,
) -> Measured:
    """Run `cmd`; return its wall time, peak RSS (sum over its process tree, polled with psutil,
    and at least the kernel's own maximum for the process) and its timestamped output lines."""
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env or bench_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    peak = 0
    done = threading.Event()

    def poll() -> None:
        nonlocal peak
        try:
            root = psutil.Process(proc.pid)
        except psutil.Error:
            return
        while not done.is_set():
            total = 0
            try:
                for p in [root, *root.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):  # it ended between the two calls
                        total += p.memory_info().rss
            except psutil.Error:
                break
            peak = max(peak, total)
            done.wait(interval_s)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    lines: list[tuple[float, str]] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append((time.perf_counter() - start, line.rstrip("\n")))
        if echo:
            print(f"    | {line}", end="", flush=True)
        if timeout_s is not None and time.perf_counter() - start > timeout_s:
            proc.kill()
    # wait4 reaps the child with its own rusage: ru_maxrss is the kernel's peak (KiB on Linux).
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    poller.join()
    peak = max(peak, usage.ru_maxrss * 1024)
    return Measured(
        wall_s=wall,
        peak_rss_mb=peak / 2**20,
        returncode=proc.returncode,
        output="\n".join(text for _, text in lines),
        lines=tuple(lines),
    )


def write_params(path: Path, overrides: dict[str, Any], base: Path = ROOT / "params.yaml") -> Path:
    """A copy of `base` with dotted `overrides` applied (e.g. {"train.max_steps": 5}): the
    params file of a benchmark's scratch copy. Checked by retune's own loader."""
    import yaml

    from retune.config import load_params

    raw = yaml.safe_load(base.read_text(encoding="utf-8"))
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = raw
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    load_params(path)  # a misspelt override fails here, before minutes of work
    return path


# A model and corpus small enough that a whole pipeline run is a smoke test (as in tests/helpers).
TINY: dict[str, Any] = {
    "sample.conversations": 400,
    "validate.min_examples": 1,
    "split.holdout_fraction": 0.2,
    "train.scratch": {"vocab_size": 400, "n_layer": 2, "n_head": 2, "n_embd": 32},
    "train.max_seq_len": 64,
    "train.per_device_train_batch_size": 4,
    "train.max_steps": 6,
    "train.warmup_steps": 0,
    "train.logging_steps": 2,
    "train.eval_steps": 3,
    "train.save_steps": 3,
    "train.eval_max_examples": 8,
    "scoring.batch_size": 4,
    "scoring.max_examples": 16,
    "scoring.max_seq_len": 64,
    "evaluate.prompts": 2,
    "evaluate.max_new_tokens": 8,
    "evaluate.generation_examples": 8,
    # A few steps of a tiny model stay far above the production thresholds.
    "promote.max_perplexity": 1000.0,
    "promote.max_perplexity_vs_baseline": None,
}


def read_report(folder: Path, name: str) -> dict[str, Any]:
    """reports/<name>.json under `folder`, or {} when the stage did not write it."""
    path = folder / "reports" / f"{name}.json"
    if not path.exists():
        return {}
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def first_line(m: Measured, text: str) -> float | None:
    """Seconds into the command when a line containing `text` was printed."""
    return next((t for t, line in m.lines if text in line), None)


def chosen_sizes(
    sizes: str | None, smoke: bool, full: tuple[int, ...], smallest: tuple[int, ...]
) -> tuple[int, ...]:
    """The sizes a benchmark runs at: `--sizes a,b`, else the smallest with `--smoke`, else all."""
    if sizes:
        return tuple(int(s) for s in sizes.split(","))
    return smallest if smoke else full


def session_processes(sid: int) -> list[str]:
    """Processes alive in session `sid` (what a command started in a session of its own, and
    may have left behind), from /proc: Linux only."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        # Fields after the parenthesised command: state, ppid, pgrp, session, ...
        fields = text.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[3]) == sid:
            found.append(text.split(" ", 2)[1])
    return found
