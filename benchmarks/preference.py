"""The loop learning from ratings, closed on loopback: a simulated user chats with production
through the OpenAI-compatible server and rates each reply; the retrain with preference tuning
is then gated like any candidate; the user's negative share on fresh prompts, before and after.

Run: `python -m benchmarks.preference` (KTO on up/down ratings, the default scratch model,
~15 min on 2 CPU cores), `--method dpo` (the user also corrects what it dislikes),
`--base DIR --lora` (a pretrained base with LoRA), `--smoke` (a tiny corpus and model:
minutes, no figures worth reading). Writes benchmarks/results/preference.json: the rows of
this run, prefixed with `--label` (default: the method), beside those of earlier runs.

The simulated user's rule (`dislikes`): it rates a reply down when the reply apologises
(says "sorry"), up otherwise; its correction (`corrected`) is the reply with the apology
replaced by a thank-you. Round 0 trains and promotes v1 (the stages' own `run(params)`, in the
flow's order). Round 1: the user sends `--rate` prompts (first user turns of the train split)
to production and rates every reply; the retrain runs with `preference.method`; the gate
judges v2 on the holdout and on the held-out ratings. Both versions then answer `--fresh`
prompts no rating came from (first user turns of the holdout split) through the same
server, sampled with the same seeds; the negative share of each has a Wilson interval, their
paired difference a bootstrap one. Holdout bits per byte are evaluate's, of each version.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import re
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import ROOT, command_line, row, write_result
from retune.config import Params, load_params

NAME = "preference"
MODEL_NAME = "bench-preference"
_SORRY = re.compile(r"\bsorry\b", re.IGNORECASE)
_SENTENCE = re.compile(r"[^.!?]*\bsorry\b[^.!?]*[.!?]?\s*", re.IGNORECASE)


def dislikes(reply: str) -> bool:
    """The simulated user's rule: an apology is rated down."""
    return bool(_SORRY.search(reply))


def corrected(reply: str) -> str:
    """The simulated user's correction of a reply it dislikes: the apology out, thanks in."""
    rest = _SENTENCE.sub("", reply).strip()
    return ("Thanks for reaching out. " + rest).strip()


def loop_params(
    work: Path, method: str, extra: list[str], smoke: bool, base: Path | None
) -> Params:
    """params.yaml with every path, the tracking store and the feedback store under `work`."""
    base_params = load_params(ROOT / "params.yaml")
    overrides = [
        *(
            f"paths.{f.name}={work / Path(getattr(base_params.paths, f.name)).name}"
            for f in dataclasses.fields(base_params.paths)
        ),
        f"tracking.uri=sqlite:///{work}/mlruns/mlflow.db",
        f"tracking.artifacts={work}/mlruns/artifacts",
        "tracking.experiment=bench-preference",
        f"feedback.store_url=sqlite:///{work}/feedback.db",
        f"register.model_name={MODEL_NAME}",
        "cv.folds=0",
        "evaluate.generation_examples=16",
        f"preference.method={method}",
        "preference.min_examples=20",
        "preference_data.min_per_label=10",
        "promote.min_rated=5",
        *(
            [
                "sample.conversations=600",
                "validate.min_examples=100",
                "train.max_steps=60",
                "train.scratch={vocab_size: 1024, n_layer: 2, n_head: 2, n_embd: 64}",
                "preference.max_steps=20",
                "promote.max_perplexity=null",
            ]
            if smoke
            else []
        ),
        *([f"train.base_model={base}"] if base else []),
        *extra,
    ]
    return load_params(ROOT / "params.yaml", overrides)


def run_stages(params: Params, names: list[str]) -> dict[str, float]:
    """Each stage's own `run(params)` (what the flow and `dvc repro` run), timed."""
    timings = {}
    for name in names:
        started = time.perf_counter()
        importlib.import_module(f"tasks.{name}").run(params)
        timings[name] = time.perf_counter() - started
    return timings


ROUND = [
    "preference_data",
    "train",
    "preference",
    "evaluate",
    "register",
    "promote",
]


def first_user_turns(split_file: Path, n: int) -> list[str]:
    """The first user message of up to `n` conversations of a split, in file order."""
    import pyarrow.parquet as pq

    found = []
    for messages in pq.read_table(split_file, columns=["messages"]).column(0).to_pylist():
        user = next((m["content"] for m in messages if m["role"] == "user"), None)
        if user and user not in found:
            found.append(user)
        if len(found) >= n:
            break
    return found


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=600) as response:
        answer: dict[str, Any] = json.loads(response.read())
        return answer


def chat(
    params: Params, alias: str, prompts: list[str], rate: str | None, temperature: float
) -> list[str]:
    """Serve `models:/<name>@<alias>` on loopback, send each prompt (sampled at
    `temperature`, the seed its index, so two models answer the same draws), return the
    replies; with `rate` ("ratings" or "corrections"), rate each by the simulated user's rule
    (and correct what it dislikes) through POST /v1/feedback."""
    from retune.online.feedback import FeedbackStore
    from retune.online.serving import create_app, serve_in_thread

    served = dataclasses.replace(params, serve=dataclasses.replace(params.serve, alias=alias))
    store = FeedbackStore.open(params.feedback.store_url)
    replies = []
    try:
        with serve_in_thread(create_app(served, store=store)) as url:
            for i, prompt in enumerate(prompts):
                answer = _post(
                    f"{url}/v1/chat/completions",
                    {
                        "model": MODEL_NAME,
                        "messages": [{"role": "user", "content": prompt}],
                        "max_tokens": 48,
                        "temperature": temperature,
                        "seed": i,
                    },
                )
                reply = answer["choices"][0]["message"]["content"]
                replies.append(reply)
                if rate is None:
                    continue
                feedback: dict[str, Any] = {
                    "response_id": answer["id"],
                    "rating": "down" if dislikes(reply) else "up",
                }
                if rate == "corrections" and dislikes(reply):
                    feedback["corrected_reply"] = corrected(reply)
                _post(f"{url}/v1/feedback", feedback)
    finally:
        store.close()
    return replies


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a share k / n."""
    if n == 0:
        return math.nan, math.nan
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def paired_difference(before: list[bool], after: list[bool], seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of share(after) - share(before) over the same prompts."""
    b, a = np.asarray(before, dtype=float), np.asarray(after, dtype=float)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(b), (5_000, len(b)))
    diffs = a[picks].mean(axis=1) - b[picks].mean(axis=1)
    low, high = np.quantile(diffs, [0.025, 0.975])
    return float(low), float(high)


def _tag_version(params: Params, version: int, alias: str) -> None:
    """Point `alias` at `version` in the benchmark's own registry, so the server serves it."""
    from retune.release.registry import Registry

    Registry.open(params.tracking, MODEL_NAME).move_alias(
        alias, version, kind="promote", why="benchmark measurement", forced=True, actor="bench"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=("kto", "dpo"), default="kto")
    parser.add_argument("--rate", type=int, default=600, help="prompts the user rates")
    parser.add_argument("--fresh", type=int, default=200, help="prompts measured before/after")
    parser.add_argument("--base", type=Path, help="a pretrained save_pretrained folder")
    parser.add_argument("--lora", action="store_true", help="train.adapter: lora (with --base)")
    parser.add_argument("--temperature", type=float, default=1.0, help="of every reply")
    parser.add_argument("--smoke", action="store_true", help="tiny corpus and model")
    parser.add_argument("--set", action="append", default=[], help="a params override")
    parser.add_argument("--keep", type=Path, help="keep the work folder here")
    parser.add_argument("--label", help="the rows' prefix (default: the method)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)

    from retune.env import configure_environment

    configure_environment()
    work = args.keep or Path(tempfile.mkdtemp(prefix="retune-bench-preference-"))
    work.mkdir(parents=True, exist_ok=True)
    extra = [*args.set, *(["train.adapter=lora"] if args.lora else [])]
    base = args.base.resolve() if args.base else None
    before_params = loop_params(work, "none", extra, args.smoke, base)
    tuned_params = loop_params(work, args.method, extra, args.smoke, base)
    try:
        started = time.perf_counter()
        print("round 0: train and promote v1", flush=True)
        run_stages(before_params, ["sample", "ingest", "hygiene", "validate", "split"])
        first_round = run_stages(before_params, ROUND)
        before_eval = json.loads((before_params.paths.reports / "evaluate.json").read_text())
        paths = before_params.paths
        first = json.loads((paths.reports / "promote.json").read_text())
        if first["outcome"] != "promote":
            print(f"v1 was not promoted ({first['reason']}); pointing production at it", flush=True)
            _tag_version(before_params, 1, "production")
        rate_prompts = first_user_turns(paths.split / "train.parquet", args.rate)
        fresh = first_user_turns(paths.split / "holdout.parquet", args.fresh)
        fresh = [p for p in fresh if p not in set(rate_prompts)]
        rate = "corrections" if args.method == "dpo" else "ratings"
        print(f"round 1: the user rates production on {len(rate_prompts)} prompts", flush=True)
        rated = chat(before_params, "production", rate_prompts, rate, args.temperature)
        print(f"round 1: retrain with preference.method={args.method}", flush=True)
        timings = run_stages(tuned_params, ROUND)
        promote = json.loads((paths.reports / "promote.json").read_text())
        preference = json.loads((paths.reports / "preference.json").read_text())
        after_eval = json.loads((paths.reports / "evaluate.json").read_text())
        print(f"measuring v1 and v{promote['version']} on {len(fresh)} fresh prompts", flush=True)
        _tag_version(before_params, 1, "bench-before")
        _tag_version(before_params, int(promote["version"]), "bench-after")
        t = args.temperature
        before = [dislikes(r) for r in chat(before_params, "bench-before", fresh, None, t)]
        after = [dislikes(r) for r in chat(before_params, "bench-after", fresh, None, t)]
        total = time.perf_counter() - started
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)

    n = len(fresh)
    b_low, b_high = wilson(sum(before), n)
    a_low, a_high = wilson(sum(after), n)
    d_low, d_high = paired_difference(before, after)
    ratings = promote.get("ratings") or {}
    model = f"{base.name} + {'LoRA' if args.lora else 'full'}" if base else "the scratch GPT-2"
    what = (
        f"{model}; the simulated user rates down replies that apologise ('sorry'); "
        f"{len(rate_prompts)} rated prompts ({sum(dislikes(r) for r in rated)} rated down), "
        f"{n} fresh prompts; replies sampled at temperature {args.temperature:g} (seeded), "
        "48 tokens"
    )
    rows = [
        row("negative_share_before", sum(before) / n, "share", note=f"v1; 95% Wilson CI "
            f"{b_low:.3f}-{b_high:.3f}; {what}"),
        row("negative_share_after", sum(after) / n, "share", target="clearly lower",
            note=f"v{promote['version']} ({promote['outcome']}); 95% Wilson CI "
            f"{a_low:.3f}-{a_high:.3f}"),
        row("negative_share_change", (sum(after) - sum(before)) / n, "share",
            note=f"paired over the same prompts, 95% bootstrap CI {d_low:+.3f} to {d_high:+.3f}"),
        row("bits_per_byte_before", float(before_eval["bits_per_byte"]), "bits/byte",
            note="holdout, evaluate.json of v1"),
        row("bits_per_byte_after", float(after_eval["bits_per_byte"]), "bits/byte",
            target=f"not worse than before beyond promote.max_holdout_loss="
            f"{tuned_params.promote.max_holdout_loss:g}",
            note=f"holdout, evaluate.json of v{promote['version']}"),
        row("gate_promoted", float(promote["outcome"] == "promote"), "bool",
            note=promote["reason"][:600]),
        row("ratings_auc", float(ratings.get("auc", math.nan)), "share",
            note=(f"held-out rated replies moved toward the liked one vs v1, 95% CI "
                  f"{ratings.get('ci_low', math.nan):.3f}-{ratings.get('ci_high', math.nan):.3f} "
                  f"on {ratings.get('n_desirable')} liked / {ratings.get('n_undesirable')} "
                  "disliked") if ratings else "the ratings check did not run"),
        row("preference_stage_s", timings["preference"], "s",
            note=f"{preference.get('reason')}; the supervised train stage of round 0 took "
            f"{first_round['train']:.1f} s (round 1's resumed from its checkpoint in "
            f"{timings['train']:.1f} s: same data and settings)"),
        row("loop_wall_s", total, "s", note="both rounds, serving and measuring included"),
    ]  # fmt: skip
    label = args.label or args.method
    rows = [{**r, "metric": f"{label}_{r['metric']}"} for r in rows]
    earlier = args.out / f"{NAME}.json"
    if earlier.is_file():
        kept = json.loads(earlier.read_text())["rows"]
        rows = [r for r in kept if not r["metric"].startswith(f"{label}_")] + rows
    write_result(NAME, command_line(NAME, argv), rows, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
