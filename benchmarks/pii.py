"""PII redaction quality: recall and precision per kind on the labelled set of
`benchmarks/pii_corpus.py`, and detection throughput.

Run: `python -m benchmarks.pii` (600 items per kind; `--n 20` for a quick check). Writes
benchmarks/results/pii.json and prints a table. `--ingest data/incoming` adds the throughput
of the ingest stage on that folder with no redaction, e-mail and phone only, and every kind.

Span-level matching: a planted item is found when detections of its kind cover every letter
and digit of it (nothing of it stays readable); a detection is correct when it overlaps a
planted item of its kind. A detection anywhere else, look-alikes included, is a false positive.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, row, write_result
from benchmarks.pii_corpus import KINDS, Example, generate
from retune.data.pii import Match, Redactor

RECALL_TARGETS = {"email": 0.99, "card": 0.99, "iban": 0.99, "ip": 0.99, "ssn": 0.99,
                  "phone": 0.95, "secret": 0.95}  # fmt: skip
PRECISION_TARGET = 0.95


def score(examples: list[Example], found: list[list[Match]]) -> dict[str, Any]:
    """Per-kind counts: planted, found (recall), detections, correct (precision); plus the
    false positives grouped by the look-alike family of their text, and examples of misses."""
    planted: Counter[str] = Counter()
    recalled: Counter[str] = Counter()
    detected: Counter[str] = Counter()
    correct: Counter[str] = Counter()
    fp_families: Counter[str] = Counter()
    misses: dict[str, list[str]] = {k: [] for k in KINDS}
    false_pos: dict[str, list[str]] = {k: [] for k in KINDS}
    for ex, matches in zip(examples, found, strict=True):
        for item in ex.items:
            planted[item.kind] += 1
            covered: set[int] = set()
            for m in matches:
                if m.kind == item.kind and m.start < item.end and m.end > item.start:
                    covered.update(range(max(m.start, item.start), min(m.end, item.end)))
            needed = {i for i in range(item.start, item.end) if ex.text[i].isalnum()}
            if needed <= covered:
                recalled[item.kind] += 1
            elif len(misses[item.kind]) < 5:
                misses[item.kind].append(ex.text[item.start : item.end])
        for m in matches:
            detected[m.kind] += 1
            if any(i.kind == m.kind and m.start < i.end and m.end > i.start for i in ex.items):
                correct[m.kind] += 1
            else:
                fp_families.update(f"{m.kind}<-{f}" for f in ex.lookalikes or ("template",))
                if len(false_pos[m.kind]) < 5:
                    false_pos[m.kind].append(ex.text[max(m.start - 15, 0) : m.end + 5])
    return {
        "planted": planted,
        "recalled": recalled,
        "detected": detected,
        "correct": correct,
        "fp_families": fp_families,
        "misses": misses,
        "false_positives": false_pos,
    }


def rows(scores: dict[str, Any], n_texts: int, seconds: float) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for kind in KINDS:
        planted, detected = scores["planted"][kind], scores["detected"][kind]
        recalled, correct = scores["recalled"][kind], scores["correct"][kind]
        out.append(
            row(
                f"recall_{kind}",
                round(recalled / planted if planted else 1.0, 4),
                "fraction",
                f">= {RECALL_TARGETS[kind]}",
                f"{recalled} of {planted} planted items",
            )
        )
        out.append(
            row(
                f"precision_{kind}",
                round(correct / detected if detected else 1.0, 4),
                "fraction",
                f">= {PRECISION_TARGET}",
                f"{correct} of {detected} detections",
            )
        )
    out.append(
        row(
            "throughput",
            round(n_texts / seconds, 1),
            "texts/s",
            None,
            f"retune.data.pii find over {n_texts} texts, every one holding a candidate "
            "(ingest's prefilters skip most real text); 1 CPU core",
        )
    )
    return out


def ingest_rows(incoming: Path, repeats: int = 3) -> list[dict[str, Any]]:
    """Conversations per CPU-second of `tasks.ingest.ingest` on `incoming` (best of `repeats`,
    outputs in a scratch folder) with no redaction, e-mail and phone, and every kind."""
    import contextlib
    import io
    import tempfile

    from retune.config import IngestParams
    from tasks.ingest import ingest

    out = []
    settings: tuple[tuple[str, tuple[Any, ...]], ...] = (
        ("none", ()),
        ("email_phone", ("email", "phone")),
        ("all", KINDS),
    )
    for label, kinds in settings:
        best, n = float("inf"), 0
        for _ in range(repeats):
            with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
                started = time.process_time()
                result = ingest(
                    incoming, IngestParams(redact=kinds), Path(tmp) / "p", Path(tmp) / "q"
                )
                best = min(best, time.process_time() - started)
            n = result.n_records
        out.append(
            row(
                f"ingest_redact_{label}",
                round(n / best, 1),
                "conversations/cpu-s",
                None,
                f"{n} records from {incoming}, redact={list(kinds)}; best of {repeats}",
            )
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=600, help="planted items per kind")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "pii.json", help="result file")
    parser.add_argument("--show", action="store_true", help="print misses and false positives")
    parser.add_argument("--ingest", type=Path, help="also time ingest on this incoming folder")
    args = parser.parse_args(argv)

    examples = generate(args.n, args.seed)
    redactor = Redactor(KINDS)
    started = time.perf_counter()
    found = [redactor.find(ex.text) for ex in examples]
    seconds = time.perf_counter() - started
    scores = score(examples, found)
    table = rows(scores, len(examples), seconds)
    if args.ingest is not None:
        table += ingest_rows(args.ingest)
    command = "python -m benchmarks.pii" + (f" --n {args.n}" if args.n != 600 else "")
    command += f" --ingest {args.ingest}" if args.ingest is not None else ""
    written = write_result("pii", command, table, args.out.parent)
    if written != args.out:
        written.replace(args.out)

    print(f"\n{'kind':8} {'recall':>8} {'target':>7} {'precision':>10} {'planted':>8} {'found':>6}")
    for kind in KINDS:
        r = next(x for x in table if x["metric"] == f"recall_{kind}")["value"]
        p = next(x for x in table if x["metric"] == f"precision_{kind}")["value"]
        print(
            f"{kind:8} {r:8.4f} {RECALL_TARGETS[kind]:7.2f} {p:10.4f} "
            f"{scores['planted'][kind]:8d} {scores['detected'][kind]:6d}"
        )
    if args.show:
        for kind in KINDS:
            for text in scores["misses"][kind]:
                print(f"  missed {kind}: {text!r}")
            for text in scores["false_positives"][kind]:
                print(f"  false {kind}: {text!r}")
        print("  false positives by look-alike:", dict(scores["fp_families"].most_common(15)))
    met = all(
        x["value"] >= float(x["target"].split()[-1]) for x in table if x["target"] is not None
    )
    print(f"targets {'met' if met else 'NOT met'}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
