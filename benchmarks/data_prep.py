"""Data preparation at scale: ingest, hygiene (when the stage exists) and validate on 10k, 100k
and 1M generated conversations; conversations per second and peak RSS of each stage.

Run: `python -m benchmarks.data_prep` (all three sizes, ~10 min on 2 cores) or `--smoke`
(1,000 conversations). Writes benchmarks/results/data_prep.json and prints the figures.
Each stage runs as DVC runs it (`python -m tasks.<stage>` in a scratch folder with its own
params.yaml), so its time includes the interpreter start and imports; generating the corpus
(`tasks.sample`) is not timed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import (
    PYTHON,
    RESULTS,
    ROOT,
    bench_env,
    chosen_sizes,
    command_line,
    measure,
    row,
    untimed,
    write_params,
    write_result,
)

NAME = "data_prep"
SIZES = (10_000, 100_000, 1_000_000)
SMOKE_SIZES = (1_000,)
TOTAL_TARGET_S = 300.0  # 1M conversations prepared in under 5 minutes on 2 cores
RSS_RATIO_TARGET = 10.0  # peak memory grows at most a tenth as fast as the data


def stages() -> list[str]:
    """The data-preparation stages in pipeline order, hygiene only where it exists."""
    names = [s for s in ("ingest", "hygiene", "validate") if (ROOT / "tasks" / f"{s}.py").exists()]
    for s in ("hygiene",):
        if s not in names:
            print(f"data_prep: tasks/{s}.py not found; stage {s} skipped", flush=True)
    return names


def label(n: int) -> str:
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1_000}k" if n >= 1000 else str(n)


def prepare_corpus(folder: Path, n: int) -> None:
    """A scratch folder with params.yaml (paths relative to it) and `n` generated conversations
    in data/incoming; reused when it already holds exactly that corpus."""
    params = write_params(
        folder / "params.yaml",
        # The contract's size floor is for the real corpus; a 1k smoke corpus must pass too.
        {"sample.conversations": n, "validate.min_examples": 1},
    )
    sample_report = folder / "reports" / "sample.json"
    if (
        sample_report.exists()
        and (folder / "data" / "incoming").exists()
        and json.loads(sample_report.read_text(encoding="utf-8")).get("conversations") == n
    ):
        print(f"data_prep: reusing the {label(n)} corpus in {folder}", flush=True)
        return
    shutil.rmtree(folder / "data", ignore_errors=True)
    print(f"data_prep: generating {n:,} conversations in {folder} (not timed)", flush=True)
    untimed([PYTHON, "-m", "tasks.sample"], params.parent)


def _clear_outputs(folder: Path) -> None:
    for sub in ("data/prepared", "data/quarantine", "data/clean", "mlruns"):
        shutil.rmtree(folder / sub, ignore_errors=True)


def run_size(folder: Path, n: int, names: list[str]) -> dict[str, Any]:
    """Run each stage once on the `n`-conversation corpus in `folder`; return its figures."""
    prepare_corpus(folder, n)
    _clear_outputs(folder)
    out: dict[str, Any] = {"n": n, "stages": {}}
    for name in names:
        print(f"data_prep: {label(n)}: {name}", flush=True)
        m = measure([PYTHON, "-m", f"tasks.{name}"], cwd=folder, env=bench_env())
        ok = m.returncode == 0
        out["stages"][name] = {"s": m.wall_s, "rss_mb": m.peak_rss_mb, "ok": ok}
        print(
            f"data_prep: {label(n)}: {name} {m.wall_s:.1f}s, peak RSS {m.peak_rss_mb:.0f} MB"
            + ("" if ok else f" (exit {m.returncode})"),
            flush=True,
        )
        if not ok and name != "validate":
            # Later stages read this one's output; a broken contract still has a timing.
            break
    ingest = folder / "reports" / "ingest.json"
    if ingest.exists():
        out["records"] = json.loads(ingest.read_text(encoding="utf-8")).get("records")
    return out


def to_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for res in results:
        n, at = res["n"], label(res["n"])
        total = 0.0
        for name, st in res["stages"].items():
            total += st["s"]
            note = None if st["ok"] else "the stage failed (non-zero exit); time still counted"
            rows.append(row(f"{name}@{at}", n / st["s"], "conversations/s", note=note))
            rows.append(row(f"{name}_time@{at}", st["s"], "s"))
            rows.append(row(f"{name}_peak_rss@{at}", st["rss_mb"], "MB"))
        target = f"<= {TOTAL_TARGET_S:.0f}" if n == 1_000_000 else None
        rows.append(
            row(
                f"total_time@{at}",
                total,
                "s",
                target=target,
                note=f"{'+'.join(res['stages'])}; {res.get('records') or '?'} records",
            )
        )
        rows.append(row(f"total@{at}", n / total if total else 0.0, "conversations/s"))
    if len(results) >= 2:
        small, big = results[0], results[-1]
        growth = big["n"] / small["n"]
        for name in big["stages"]:
            if name in small["stages"]:
                ratio = big["stages"][name]["rss_mb"] / small["stages"][name]["rss_mb"]
                rows.append(
                    row(
                        f"{name}_peak_rss_ratio_{label(big['n'])}/{label(small['n'])}",
                        ratio,
                        "x",
                        target=f"<= {RSS_RATIO_TARGET:.0f}",
                        note=f"data grew {growth:.0f}x",
                    )
                )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help=f"one size: {SMOKE_SIZES[0]:,}")
    parser.add_argument("--sizes", help="comma-separated conversation counts, e.g. 10000,100000")
    parser.add_argument("--workdir", type=Path, help="keep the corpora here (reused next time)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = parser.parse_args(argv)
    sizes = chosen_sizes(args.sizes, args.smoke, SIZES, SMOKE_SIZES)
    names = stages()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="retune-bench-data-"))
    try:
        results = [run_size(workdir / label(n), n, names) for n in sorted(sizes)]
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    write_result(NAME, command_line(NAME, argv), to_rows(results), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
