"""Serving: latency of 32-token completions, sequential and with concurrent clients, time to
the first streamed token, and feedback writes per second with 50 clients for 20 s.

Run: `python -m benchmarks.serve` (the default scratch model's architecture, params.yaml's
`train.scratch`, untrained, in a throwaway registry), `--model smollm2` (SmolLM2-135M-Instruct
from `make base`, as a LoRA fine-tune registers it: merged, the base's shapes),
`--model production` (the production version of params.yaml's registry, after `make run`),
`--smoke` (a tiny untrained model: seconds, no figures worth reading).

Every completion is `--max-tokens` long: the served model's end-of-turn tokens are switched
off through the watcher's loader, so each request generates the same work. Starts `retune
serve`'s app on loopback with a bearer token and a throwaway feedback store (the rows never
reach feedback.store_url). Writes benchmarks/results/serve.json: this model's rows (prefixed
with its name) beside those of earlier runs of other models.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import secrets
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, command_line, row, write_result
from retune.config import Params, load_params
from retune.env import configure_environment

NAME = "serve"
# Support questions of the kind the sample corpus holds; cycled through by every client.
PROMPTS = (
    "Hi, my router keeps disconnecting. What should I do?",
    "My thermostat won't turn on after the update.",
    "I was charged twice for order 4417, can you help?",
    "The camera I ordered arrived damaged.",
    "How do I reset my doorbell to factory settings?",
    "My speaker keeps disconnecting from the app.",
)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))])


def _model_dir(kind: str, tmp: Path, params: Params, base: Path) -> Path:
    """The folder to register: a tiny or default-sized untrained GPT-2, or `base`."""
    from retune.config import ScratchModelParams
    from retune.model.modeling import scratch_model, train_tokenizer

    if kind == "smollm2":
        if not (base / "config.json").is_file():
            raise SystemExit(f"error: no model in {base}: run `make base` first")
        return base
    scratch = (
        ScratchModelParams(vocab_size=400, n_layer=2, n_head=2, n_embd=32)
        if kind == "tiny"
        else params.train.scratch
    )
    import torch

    context = 128 if kind == "tiny" else params.train.max_seq_len
    # Enough varied text (retune's own source) to fill the configured vocabulary: every token
    # the untrained model picks decodes to text, so a stream has text to send.
    text = [
        line
        for path in sorted((ROOT / "retune").rglob("*.py"))
        for line in path.read_text().splitlines()
        if line.strip()
    ]
    tokenizer = train_tokenizer(text, vocab_size=scratch.vocab_size)
    torch.manual_seed(0)
    model = scratch_model(scratch, tokenizer, context)
    if len(tokenizer) < scratch.vocab_size:  # the output layer as the trained model has it
        model.resize_token_embeddings(scratch.vocab_size)
    out = tmp / "model"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def throwaway_params(tmp: Path, model_dir: Path, max_tokens: int) -> Params:
    """Params of a registry under `tmp` whose production version is `model_dir`."""
    import mlflow

    from retune.config import parse_params
    from retune.release.gitinfo import GitState
    from retune.release.registry import Registry
    from retune.release.tracking import setup_tracking
    from tasks.register import ModelFacts, register

    params = parse_params(
        {
            "tracking": {
                "uri": f"sqlite:///{tmp}/mlruns/mlflow.db",
                "artifacts": str(tmp / "mlruns" / "artifacts"),
                "experiment": "bench-serve",
            },
            "register": {"model_name": "bench-serve", "max_new_tokens": max_tokens},
        }
    )
    setup_tracking(params.tracking)
    with mlflow.start_run() as run:
        pass
    facts = ModelFacts(
        model_name="bench-serve", run_id=run.info.run_id, params={}, git=GitState(None, None)
    )
    version = register(params.register, params.tracking, model_dir, facts).version
    Registry.open(params.tracking, "bench-serve").move_alias(
        "production", version, kind="promote", why="benchmark", forced=False, actor="benchmark"
    )
    return params


def _full_length(name: str, version: int) -> Any:
    """The served version with its end-of-turn tokens off: every reply runs to max_tokens."""
    from retune.online.serving import load_served

    served = load_served(name, version)
    served.model.generation_config.eos_token_id = None
    return served


def completions(
    url: str, token: str, model: str, clients: int, per_client: int, max_tokens: int, stream: bool
) -> dict[str, Any]:
    """`clients` threads, each with its own connection, send `per_client` chat completions one
    after another; per request the client-side latency (HTTP included), the time to the first
    streamed text (`stream`), and the tokens generated; and the wall time of them all."""
    import httpx

    done: list[dict[str, float]] = []
    failures: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)

    def one(http: httpx.Client, prompt: str) -> dict[str, float]:
        body: dict[str, Any] = {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
        }
        if stream:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        began = time.perf_counter()
        first, tokens = None, 0
        if not stream:
            answer = http.post("/v1/chat/completions", json=body, timeout=600)
            answer.raise_for_status()
            tokens = answer.json()["usage"]["completion_tokens"]
        else:
            with http.stream("POST", "/v1/chat/completions", json=body, timeout=600) as answer:
                answer.raise_for_status()
                for line in answer.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    content = (
                        chunk["choices"][0]["delta"].get("content") if chunk["choices"] else None
                    )
                    if content and first is None:
                        first = time.perf_counter()
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
        ended = time.perf_counter()
        ttft = (first - began) * 1000.0 if first is not None else float("nan")
        return {"ms": (ended - began) * 1000.0, "ttft_ms": ttft, "tokens": tokens}

    def client(n: int) -> None:
        mine = []
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}) as http:
            start.wait()
            for i in range(per_client):
                try:
                    mine.append(one(http, PROMPTS[(n + i) % len(PROMPTS)]))
                except httpx.HTTPError as exc:
                    with lock:
                        failures.append(repr(exc))
        with lock:
            done.extend(mine)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    began = time.perf_counter()
    for t in threads:
        t.join()
    return {"wall_s": time.perf_counter() - began, "requests": done, "failures": failures}


def feedback_for(
    url: str, token: str, ids: list[str], clients: int, seconds: float
) -> dict[str, Any]:
    """`clients` threads, each with its own connection, post ratings as fast as the server
    takes them for `seconds`; the wall time and the status of every post (0: no answer)."""
    import httpx

    statuses: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)
    deadline: list[float] = []

    def client(n: int) -> None:
        mine: list[int] = []
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}) as http:
            start.wait()
            i = 0
            while time.perf_counter() < deadline[0]:
                body = {
                    "response_id": ids[(n * 7919 + i) % len(ids)],
                    "rating": "up" if i % 3 else "down",
                    "score": round((i % 11) / 10, 3),
                }
                try:
                    mine.append(http.post("/v1/feedback", json=body, timeout=300).status_code)
                except httpx.HTTPError:
                    mine.append(0)
                i += 1
        with lock:
            statuses.extend(mine)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    deadline.append(time.perf_counter() + seconds)
    began = time.perf_counter()
    start.wait()
    for t in threads:
        t.join()
    return {"wall_s": time.perf_counter() - began, "statuses": statuses}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--model", choices=("default", "smollm2", "production"), default="default")
    parser.add_argument("--base", type=Path, default=ROOT / "models/base/smollm2-135m-instruct")
    parser.add_argument("--smoke", action="store_true", help="tiny throwaway model, small N")
    parser.add_argument("--requests", type=int, help="timed requests per run (default 48)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--feedback-clients", type=int, default=50)
    parser.add_argument("--feedback-s", type=float, help="seconds of ratings (default 20)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    requests = args.requests or (8 if args.smoke else 48)
    feedback_s = args.feedback_s or (2.0 if args.smoke else 20.0)
    kind = "tiny" if args.smoke else args.model
    max_tokens = min(args.max_tokens, 24) if args.smoke else args.max_tokens
    configure_environment()
    load_at_start = os.getloadavg()[0]

    from retune.online.feedback import FeedbackStore
    from retune.online.serving import ModelWatcher, create_app, serve_in_thread
    from retune.online.serving.watcher import in_passing_thread
    from retune.release.registry import Registry

    with tempfile.TemporaryDirectory(prefix="retune-bench-serve-") as tmp_dir:
        tmp = Path(tmp_dir)
        params = load_params(args.params)
        if kind != "production":
            # Off this thread: one that ran torch's CPU ops and lives on slows generation.
            params = in_passing_thread(
                lambda p: throwaway_params(tmp, _model_dir(kind, tmp, p, args.base), max_tokens),
                params,
            )
        params = dataclasses.replace(
            params,
            serve=dataclasses.replace(
                params.serve,
                max_tokens=max(max_tokens, params.serve.max_tokens),
                max_batch=max(args.clients, params.serve.max_batch),
                max_queue=max(4 * args.clients, params.serve.max_queue),
            ),
        )
        name = params.register.model_name
        registry = Registry.open(params.tracking, name)
        production = registry.aliases().get(params.serve.alias)
        if production is None:
            print(
                f"error: {name} has no version with alias {params.serve.alias} in "
                f"{params.tracking.uri}: run `make run` first (or pass --model default)",
                file=sys.stderr,
            )
            return 1
        token = secrets.token_urlsafe(24)
        store = FeedbackStore.open(f"sqlite:///{tmp}/feedback.db")
        watcher = ModelWatcher(registry, params.serve.alias, 3600, loader=_full_length)
        app = create_app(params, store=store, token=token, watcher=watcher)
        print(f"serving {name} v{production} ({kind}) on loopback", flush=True)
        with serve_in_thread(app) as url:
            completions(url, token, name, 1, 3, max_tokens, stream=False)  # warm-up
            runs = {}
            for label, clients, stream in (
                ("sequential", 1, False),
                ("streamed", 1, True),
                (f"concurrent{args.clients}", args.clients, False),
            ):
                per_client = max(1, requests // clients)
                print(f"{label}: {clients} client(s) x {per_client} requests", flush=True)
                runs[label] = completions(url, token, name, clients, per_client, max_tokens, stream)
            ids = store.interactions_frame()["id"].tolist()
            before = store.count_feedback()
            print(f"feedback: {args.feedback_clients} clients for {feedback_s:g} s", flush=True)
            fb = feedback_for(url, token, ids, args.feedback_clients, feedback_s)
            stored = store.count_feedback() - before
        load_at_end = os.getloadavg()[0]

    label = {"tiny": "smoke", "default": "default", "smollm2": "smollm2", "production": "prod"}[
        kind
    ]
    what = {
        "tiny": "tiny untrained 2x32 GPT-2",
        "default": f"default scratch GPT-2 ({params.train.scratch.n_layer}x"
        f"{params.train.scratch.n_embd}, vocab {params.train.scratch.vocab_size}), untrained",
        "smollm2": "SmolLM2-135M-Instruct (a merged LoRA fine-tune's shapes)",
        "production": f"{name} v{production}",
    }[kind]
    seq, streamed = runs["sequential"], runs["streamed"]
    conc = runs[f"concurrent{args.clients}"]

    def ms(run: dict[str, Any], key: str = "ms") -> list[float]:
        return [r[key] for r in run["requests"] if r[key] == r[key]]  # NaN: no text came

    def tokens_per_s(run: dict[str, Any]) -> float:
        return sum(r["tokens"] for r in run["requests"]) / run["wall_s"]

    speedup = tokens_per_s(conc) / tokens_per_s(seq)
    tokens = [r["tokens"] for run in runs.values() for r in run["requests"]]
    failures = sum(len(run["failures"]) for run in runs.values())
    sent, ok = len(fb["statuses"]), fb["statuses"].count(201)
    quiet = f"load {load_at_start:.1f} at start, {load_at_end:.1f} at end on {os.cpu_count()} cores"
    target_p50 = "<= 100" if kind == "default" else None
    c = args.clients
    rows = [
        row(
            "latency_p50",
            _percentile(ms(seq), 50),
            "ms",
            target_p50,
            f"{what}, {max_tokens}-token completions, one client; {quiet}",
        ),
        row("latency_p95", _percentile(ms(seq), 95), "ms", None, f"{len(ms(seq))} requests"),
        row(
            "ttft_p50",
            _percentile(ms(streamed, "ttft_ms"), 50),
            "ms",
            None,
            "time to the first streamed text, one client",
        ),
        row("ttft_p95", _percentile(ms(streamed, "ttft_ms"), 95), "ms"),
        row(
            "streams_without_text",
            len(streamed["requests"]) - len(ms(streamed, "ttft_ms")),
            "requests",
            "== 0",
        ),
        row(
            "streamed_latency_p50",
            _percentile(ms(streamed), 50),
            "ms",
            None,
            "to the stream's end ([DONE])",
        ),
        row(
            f"concurrent{c}_latency_p50",
            _percentile(ms(conc), 50),
            "ms",
            None,
            f"{c} clients at once, each sending its next request when answered",
        ),
        row(f"concurrent{c}_latency_p95", _percentile(ms(conc), 95), "ms"),
        row("tokens_per_s_sequential", tokens_per_s(seq), "tokens/s"),
        row(
            f"tokens_per_s_concurrent{c}",
            tokens_per_s(conc),
            "tokens/s",
            None,
            f"serve.max_batch={max(c, 8)}: one decoding step for every waiting request",
        ),
        row(f"concurrent{c}_throughput_x", speedup, "x sequential", ">= 3"),
        row(
            "completion_tokens_mean",
            statistics.fmean(tokens),
            "tokens",
            None,
            f"end-of-turn off: every reply {max_tokens} tokens",
        ),
        row(
            "completion_errors",
            failures,
            "requests",
            "== 0",
            next((run["failures"][0] for run in runs.values() if run["failures"]), None),
        ),
        row(
            "feedback_writes_per_s",
            ok / fb["wall_s"],
            "writes/s",
            None,
            f"{args.feedback_clients} concurrent clients for {feedback_s:g} s, SQLite store, "
            "while nothing generates",
        ),
        row("feedback_sent", sent, "rows"),
        row("feedback_errors", sent - ok, "rows", "== 0"),
        row("feedback_lost", sent - stored, "rows", "== 0", f"{stored} stored of {sent} sent"),
    ]
    rows = [{**r, "metric": f"{label}_{r['metric']}"} for r in rows]
    earlier = args.out / f"{NAME}.json"
    if earlier.is_file() and not args.smoke:
        kept = [
            r
            for r in json.loads(earlier.read_text())["rows"]
            if not r["metric"].startswith(f"{label}_")
            and "_" in r["metric"]
            and r["metric"].split("_")[0] in ("default", "smollm2", "prod")
        ]
        rows = kept + rows
    write_result(NAME, command_line(NAME, argv), rows, args.out)
    return 0 if failures == 0 and sent == ok == stored else 1


if __name__ == "__main__":
    raise SystemExit(main())
