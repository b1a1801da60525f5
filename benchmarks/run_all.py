"""Run every benchmark in turn, then write BENCHMARKS.md (`make bench`).

Run: `python -m benchmarks.run_all` (tens of minutes on 2 cores), `--smoke` for each at its
smallest size (results to a scratch folder unless --out is given), `--only a,b` for some.
A benchmark whose module is missing is skipped with a message; one that fails is reported and
the others still run (the exit status is 1 if any failed).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import BENCHMARKS, PYTHON, RESULTS, ROOT, bench_env
from benchmarks.report import OUTPUT, write_report

# The smallest-size flag of each; the others take --smoke.
SMOKE_ARGS = {"pii": ["--n", "20"], "busy_start": ["--smoke", "--runs", "1"]}


def out_args(name: str, out: Path) -> list[str]:
    """How a benchmark is told to write its result elsewhere than benchmarks/results/."""
    if out.resolve() == RESULTS.resolve():
        return []
    if name == "pii":
        return ["--out", str(out / "pii.json")]
    if name == "serve":
        return ["--out-dir", str(out)]
    return ["--out", str(out)]


def run_all(names: list[str], smoke: bool, out: Path) -> list[str]:
    """Run each benchmark module as its own process; return the names that failed."""
    failed: list[str] = []
    for name in names:
        if not (ROOT / "benchmarks" / f"{name}.py").exists():
            print(f"bench: benchmarks/{name}.py not found, skipped", flush=True)
            continue
        args = [*SMOKE_ARGS.get(name, ["--smoke"])] if smoke else []
        cmd = [PYTHON, "-m", f"benchmarks.{name}", *args, *out_args(name, out)]
        print(f"bench: {' '.join(cmd[1:])}", flush=True)
        started = time.perf_counter()
        code = subprocess.run(cmd, cwd=ROOT, env=bench_env(), check=False).returncode
        took = time.perf_counter() - started
        print(f"bench: {name} {'done' if code == 0 else f'FAILED (exit {code})'} in {took:.0f}s")
        if code != 0:
            failed.append(name)
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="each at its smallest size")
    parser.add_argument("--only", help="comma-separated benchmark names")
    parser.add_argument("--out", type=Path, help=f"results folder (default {RESULTS})")
    parser.add_argument(
        "--output", type=Path, help=f"the report (default {OUTPUT}, or in --out's folder)"
    )
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",")] if args.only else list(BENCHMARKS)
    # Smoke figures must not overwrite the real ones; results elsewhere get their report there.
    scratch = Path(tempfile.mkdtemp(prefix="retune-bench-smoke-")) if args.smoke else None
    out = args.out or scratch or RESULTS
    output = args.output or (OUTPUT if out == RESULTS else out / "BENCHMARKS.md")
    failed = run_all(names, args.smoke, out)
    write_report(out, output)
    if failed:
        print(f"bench: failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
