"""Collect benchmarks/results/*.json into BENCHMARKS.md: one table per benchmark with the
latest figures, the date, machine, commit and the command that produced them.

Run: `python -m benchmarks.report` (`make bench` runs it after the benchmarks).
"""

from __future__ import annotations

import argparse
import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.common import BENCHMARKS, RESULTS, ROOT, git_commit, machine

OUTPUT = ROOT / "BENCHMARKS.md"
# The order the tables appear in; others follow alphabetically.
ORDER = BENCHMARKS

INTRO = """\
# Benchmarks

What retune costs and what it delivers, measured on the machine named under each table.
Run them all with `make bench` (tens of minutes on 2 CPU cores: it trains several times and
prepares a million conversations), or one with `python -m benchmarks.<name>`; most take
`--smoke` (or a size option) for a quick run at the smallest size. Each writes
`benchmarks/results/<name>.json`; `python -m benchmarks.report` rewrites this file from them.

Benchmarks are not tests: no timing is asserted anywhere. `make test` runs each benchmark once
at its smallest size (tests/test_benchmarks.py) so that they keep working, and checks only
that they produce their figures. Timings depend on the machine and on whatever else runs on
it: compare figures taken on the same machine, in the same run where a ratio is reported.
"""

_TARGET = re.compile(r"^\s*(<=|>=|<|>|==)\s*(-?[0-9][0-9_,.]*(?:e-?\d+)?)")


def meets(value: float, target: str | None) -> str:
    """'yes' / 'no' when `target` starts with a comparison ("<= 10", ">= 1.0 ..."), else ''."""
    if not target:
        return ""
    m = _TARGET.match(target)
    if not m:
        return ""
    bound = float(m.group(2).replace(",", "").replace("_", ""))
    ok = {
        "<=": value <= bound,
        ">=": value >= bound,
        "<": value < bound,
        ">": value > bound,
        "==": value == bound,
    }[m.group(1)]
    return "yes" if ok else "**no**"


def _number(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 1:
        return f"{value:,.2f}"
    return f"{value:.3g}"


def _cell(text: Any) -> str:
    return "" if text is None else str(text).replace("|", "\\|").replace("\n", " ")


def load(results_dir: Path) -> list[dict[str, Any]]:
    """Every result file, in ORDER; a file that is not a result is reported and skipped."""
    found: list[dict[str, Any]] = []
    for path in sorted(results_dir.glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            print(f"report: skipped {path}: {exc}")
            continue
        if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
            print(f"report: skipped {path}: no `rows` list")
            continue
        data.setdefault("name", path.stem)
        data.setdefault(
            "date",
            datetime.fromtimestamp(path.stat().st_mtime, UTC).strftime("%Y-%m-%d %H:%M UTC"),
        )
        found.append(data)
    rank = {name: i for i, name in enumerate(ORDER)}
    return sorted(found, key=lambda d: (rank.get(d["name"], len(ORDER)), d["name"]))


def section(result: dict[str, Any], fallback_commit: str, fallback_machine: str) -> str:
    """One benchmark's table; what its file does not record is taken from this machine now."""
    lines = [f"## {result['name']}", ""]
    lines.append(f"- date: {result['date']}")
    here = f"{fallback_machine} (when this report was written)"
    lines.append(f"- machine: {result.get('machine') or here}")
    commit = result.get("commit")
    lines.append(f"- commit: {commit or f'{fallback_commit} (when this report was written)'}")
    lines.append(f"- command: `{result.get('command') or 'not recorded'}`")
    if result.get("load"):
        lines.append(f"- {result['load']}")
    lines += ["", "| metric | value | unit | target | met | note |", "|---|---:|---|---|---|---|"]
    for r in result["rows"]:
        try:
            value = float(r.get("value"))
        except (TypeError, ValueError):
            value = float("nan")
        lines.append(
            "| "
            + " | ".join(
                [
                    _cell(r.get("metric")),
                    _number(value),
                    _cell(r.get("unit")),
                    _cell(r.get("target")),
                    meets(value, r.get("target")),
                    _cell(r.get("note")),
                ]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def write_report(results_dir: Path = RESULTS, output: Path = OUTPUT) -> Path:
    """Write `output` from the result files in `results_dir`."""
    results = load(results_dir)
    commit, here = git_commit(), machine()
    parts = [INTRO]
    parts.append(f"Report written {datetime.now(UTC):%Y-%m-%d %H:%M UTC} at commit {commit}.\n")
    parts.append(f"This machine: {here}.\n")
    if not results:
        parts.append(f"No results yet in `{results_dir}`: run `make bench`.\n")
    parts += [section(r, commit, here) for r in results]
    output.write_text("\n".join(parts), encoding="utf-8")
    print(f"report: {len(results)} benchmark(s) -> {output}")
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of result files")
    parser.add_argument("--output", type=Path, default=OUTPUT, help="the Markdown file")
    args = parser.parse_args(argv)
    write_report(args.results, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
