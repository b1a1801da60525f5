"""The hygiene stage's figures: near-duplicate recall on planted paraphrases and false
positives on distinct conversations; abuse caught and civil complaints kept; throughput
(conversations/s) and peak RSS of `python -m tasks.hygiene` at 10k and 100k conversations.

Run: `python -m benchmarks.hygiene` (~3 min on 2 cores) or `--smoke` (1,000 conversations,
small labelled sets). Writes benchmarks/results/hygiene.json and prints the figures.
Labelled sets are built with the sample generator's own templates and edits
(`tasks.sample.paraphrase`); the throughput corpora are `tasks.sample` output through
`tasks.ingest` (neither timed).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import (
    PYTHON,
    RESULTS,
    bench_env,
    chosen_sizes,
    command_line,
    measure,
    row,
    write_params,
    write_result,
)

NAME = "hygiene"
SIZES = (10_000, 100_000)
SMOKE_SIZES = (1_000,)

# Held out from the sample generator (whose insults and complaints tuned the defaults): what a
# threshold and blocklist must also get right. Abuse aimed at a person; anger that is not.
HELD_OUT_ABUSE = (
    "You're a complete idiot.",
    "Are you brain dead or what?",
    "Listen here, you worthless clown.",
    "You are all a bunch of lying scumbags.",
    "What a load of bullshit.",
    "Fuck off with your scripted answers.",
    "Get your head out of your ass and fix it.",
    "You're pathetic, all of you.",
    "Shove your warranty up your ass.",
    "Damn you and your crappy products.",
    "You moronic bots can't do anything right.",
    "Go screw yourself.",
    "Don't be such a dumbass.",
    "Nobody cares, loser.",
    "You are too stupid to understand.",
    "Shut your mouth and do your job.",
    "What a bunch of useless assholes.",
    "Stop whining, you crybaby.",
    "Read the manual, dummy.",
    "Your product is shit and so are you.",
)
HELD_OUT_CIVIL = (
    "This is really frustrating.",
    "I'm extremely disappointed.",
    "This is unacceptable, I want my money back.",
    "I've called three times and nobody helps me.",
    "This is the last time I buy from you.",
    "Your app is terrible.",
    "This product is garbage.",
    "What a waste of money.",
    "I'm so angry right now.",
    "This is a joke.",
    "Are you kidding me?",
    "I demand a refund immediately.",
    "I'm going to leave a bad review.",
    "This is insane, it broke after two days.",
    "Stop sending me the same useless answer.",
    "Worst customer service ever.",
    "I hate this thermostat.",
    "I'm sick of waiting.",
    "What the heck is going on?",
    "The camera is dead and the battery died.",
)


def label(n: int) -> str:
    return f"{n // 1_000}k" if n >= 1_000 else str(n)


def _text(msgs: list[list[Any]]) -> str:
    return "\n".join(c for _, c in msgs)


def near_duplicate_rows(n_originals: int, n_paraphrases: int, seed: int = 7) -> list[dict]:
    """Recall on paraphrases of generated conversations; false positives on the originals
    (independently generated) and on unrelated texts."""
    import numpy as np
    import pyarrow as pa

    from retune.config import NearDuplicateParams
    from retune.data import dedup
    from tasks.sample import _CATEGORY_KEYS, _conversation, _slots, paraphrase

    cfg = NearDuplicateParams()
    rng = random.Random(seed)
    originals = []
    for _ in range(n_originals):
        _, s = _slots(rng)
        originals.append(_conversation(rng, rng.choice(_CATEGORY_KEYS), s))
    copies = [paraphrase(rng, originals[i]) for i in range(n_paraphrases)]
    texts = [_text(m) for m in originals] + [_text(m) for m in copies]
    with dedup.sketch_batches(
        [pa.array(texts)], cfg.threshold, cfg.num_perm, cfg.shingle_words
    ) as sk:
        removed = {m.index: m for m in dedup.deduplicate(sk)}
    caught = [i for i in range(n_paraphrases) if n_originals + i in removed]

    def root(i: int) -> int:
        return removed[i].of if i in removed else i

    own = [i for i in caught if removed[n_originals + i].of == root(i)]
    flagged = [i for i in range(n_originals) if i in removed]
    # Exact Jaccard of the shingle sets: a "false positive" above the threshold is a template
    # twin (same template, other names and numbers), a near-duplicate by content.
    hashes, counts = dedup.shingle_hashes(pa.array(texts), cfg.shingle_words)
    starts = np.concatenate(([0], np.cumsum(counts)))

    def shingles(i: int) -> set[int]:
        return set(hashes[starts[i] : starts[i + 1]].tolist())

    def exact(i: int, j: int) -> float:
        a, b = shingles(i), shingles(j)
        return len(a & b) / len(a | b)

    below = [i for i in flagged if exact(i, removed[i].of) < cfg.threshold]
    missed_j = [exact(n_originals + i, i) for i in range(n_paraphrases) if i not in caught]
    # Unrelated texts: random words, no shared template.
    words = [f"w{k}" for k in range(20_000)]
    unrelated = [" ".join(rng.choice(words) for _ in range(60)) for _ in range(n_originals)]
    with dedup.sketch_batches(
        [pa.array(unrelated)], cfg.threshold, cfg.num_perm, cfg.shingle_words
    ) as sk:
        unrelated_flagged = len(dedup.deduplicate(sk))
    note = f"threshold {cfg.threshold}, {cfg.shingle_words}-word shingles, "
    note += f"{cfg.num_perm} permutations"
    return [
        row(
            "near_duplicate_recall",
            len(caught) / n_paraphrases,
            "share",
            target=">= 0.95",
            note=f"{len(caught)}/{n_paraphrases} paraphrases (1-3 edits: word, punctuation, "
            f"casing, greeting) of generated conversations; {note}",
        ),
        row(
            "near_duplicate_points_at_original",
            len(own) / max(len(caught), 1),
            "share",
            note="caught paraphrases whose representative is their original (or the text "
            "their original was merged into)",
        ),
        row(
            "missed_paraphrase_max_jaccard",
            max(missed_j) if missed_j else 0.0,
            "jaccard",
            note=f"{len(missed_j)} missed; exact Jaccard of the missed pairs' shingle sets",
        ),
        row(
            "false_positive_rate_generated",
            len(flagged) / n_originals,
            "share",
            note=f"{len(flagged)}/{n_originals} independently generated conversations merged; "
            f"{len(flagged) - len(below)} of them have exact Jaccard >= the threshold with "
            "their representative (template twins that differ only in names and numbers)",
        ),
        row(
            "false_positive_rate_exact",
            len(below) / n_originals,
            "share",
            target="<= 0.01",
            note="merged although the exact Jaccard with the representative is below the "
            "threshold (MinHash estimation error)",
        ),
        row(
            "false_positive_rate_unrelated",
            unrelated_flagged / n_originals,
            "share",
            target="0",
            note=f"{n_originals} texts of 60 random words",
        ),
    ]


def safety_rows(n_clean: int, seed: int = 11) -> list[dict]:
    """Abusive sentences (the generator's and held-out ones) and civil complaints, each
    inside a generated conversation; plus clean conversations: what the screen flags."""
    import pyarrow as pa

    from retune.config import HygieneParams
    from retune.data.records import MESSAGE_TYPE
    from retune.data.safety import Screen
    from tasks.sample import (
        _ABUSE_AGENT,
        _ABUSE_USER,
        _CATEGORY_KEYS,
        _COMPLAINTS,
        _conversation,
        _slots,
    )

    cfg = HygieneParams()
    rng = random.Random(seed)

    def conv(sentence: str | None, role: str = "user") -> list[dict[str, str]]:
        _, s = _slots(rng)
        msgs = _conversation(rng, rng.choice(_CATEGORY_KEYS), s)
        if sentence is not None:
            i = rng.choice([k for k, m in enumerate(msgs) if m[0] == role])
            msgs[i][1] = (
                f"{sentence} {msgs[i][1]}" if rng.random() < 0.5 else f"{msgs[i][1]} {sentence}"
            )
        return [{"role": r, "content": c} for r, c in msgs]

    sets = {
        "tuned_abuse": [conv(a) for a in _ABUSE_USER]
        + [conv(a, "assistant") for a in _ABUSE_AGENT],
        "held_out_abuse": [conv(a) for a in HELD_OUT_ABUSE],
        "tuned_civil": [conv(c) for c in _COMPLAINTS],
        "held_out_civil": [conv(c) for c in HELD_OUT_CIVIL],
        "clean": [conv(None) for _ in range(n_clean)],
    }
    screen = Screen(cfg.safety_threshold, cfg.blocklist)
    rate = {}
    for name, convs in sets.items():
        _, flags = screen.screen(pa.array(convs, type=pa.list_(MESSAGE_TYPE)))
        rate[name] = (len(flags), len(convs), sum(1 for f in flags if f.term is None))
    note = f"threshold {cfg.safety_threshold} + {len(cfg.blocklist)}-term blocklist"
    out = []
    for name, target in (
        ("tuned_abuse", "1.0"),
        ("held_out_abuse", None),
        ("tuned_civil", "0"),
        ("held_out_civil", "0"),
        ("clean", "0"),
    ):
        flagged, total, by_model = rate[name]
        metric = f"unsafe_recall_{name}" if "abuse" in name else f"unsafe_false_positive_{name}"
        out.append(
            row(
                metric,
                flagged / total,
                "share",
                target=(">= 0.95" if target == "1.0" else "0") if target else None,
                note=f"{flagged}/{total} conversations flagged ({by_model} by the classifier "
                f"alone); {note}",
            )
        )
    return out


def throughput(folder: Path, n: int) -> dict[str, Any]:
    """Generate and ingest `n` conversations in `folder` (not timed), then time the stage."""
    write_params(folder / "params.yaml", {"sample.conversations": n})
    env = bench_env()
    for stage in ("sample", "ingest"):
        m = measure([PYTHON, "-m", f"tasks.{stage}"], cwd=folder, env=env, echo=False)
        if m.returncode != 0:
            raise SystemExit(f"tasks.{stage} failed ({m.returncode}):\n{m.output[-3000:]}")
    m = measure([PYTHON, "-m", "tasks.hygiene"], cwd=folder, env=env)
    if m.returncode != 0:
        raise SystemExit(f"tasks.hygiene failed ({m.returncode}):\n{m.output[-3000:]}")
    report = json.loads((folder / "reports" / "hygiene.json").read_text(encoding="utf-8"))
    size = (folder / "data" / "prepared" / "records.parquet").stat().st_size
    return {"n": n, "m": m, "report": report, "bytes": size}


def throughput_rows(results: list[dict[str, Any]]) -> list[dict]:
    rows = []
    for res in results:
        rep, m, at = res["report"], res["m"], label(res["n"])
        records = rep["input"]
        secs = rep["seconds"]
        rows += [
            row(
                f"hygiene@{at}",
                records / m.wall_s,
                "conversations/s",
                note=f"{records:,} prepared records in {m.wall_s:.1f} s, process start and "
                "imports included",
            ),
            row(
                f"hygiene_stage@{at}",
                rep["records_per_s"],
                "conversations/s",
                note=f"inside the stage: safety {secs['safety']} s, sketch {secs['sketch']} s, "
                f"deduplicate {secs['deduplicate']} s, total {secs['total']} s",
            ),
            row(f"hygiene_peak_rss@{at}", m.peak_rss_mb, "MB"),
            row(
                f"hygiene_removed@{at}",
                sum(rep["removed"].values()),
                "records",
                note=f"unsafe {rep['removed']['unsafe']}, near_duplicate "
                f"{rep['removed']['near_duplicate']}; kept {rep['kept']:,}",
            ),
        ]
    if len(results) >= 2:
        small, big = results[0], results[-1]
        data = big["report"]["input"] / small["report"]["input"]
        rss = big["m"].peak_rss_mb / small["m"].peak_rss_mb
        rows.append(
            row(
                f"hygiene_peak_rss_ratio_{label(big['n'])}/{label(small['n'])}",
                rss,
                "x",
                target=f"<= {data:.1f}",
                note=f"records grew {data:.1f}x; the fixed part is the models loaded "
                "(classifier, language detector)",
            )
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help=f"one size: {SMOKE_SIZES[0]:,}")
    parser.add_argument("--sizes", help="comma-separated conversation counts")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = parser.parse_args(argv)
    sizes = chosen_sizes(args.sizes, args.smoke, SIZES, SMOKE_SIZES)
    rows = near_duplicate_rows(300, 100) if args.smoke else near_duplicate_rows(4_000, 2_000)
    rows += safety_rows(200 if args.smoke else 5_000)
    workdir = Path(tempfile.mkdtemp(prefix="retune-bench-hygiene-"))
    try:
        results = [throughput(workdir / label(n), n) for n in sorted(sizes)]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    rows += throughput_rows(results)
    write_result(NAME, command_line(NAME, argv), rows, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
