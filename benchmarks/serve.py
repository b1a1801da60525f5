"""Serving: latency of 32-token completions and feedback writes per second with 20 clients.

Run: `python -m benchmarks.serve` after `make run` (serves the production model of params.yaml's
registry); `--smoke` registers a tiny untrained model in a throwaway registry instead (seconds).
Starts `retune serve`'s app on loopback with a bearer token and a throwaway feedback store (the
benchmark's rows never reach feedback.store_url), then writes benchmarks/results/serve.json.
"""

from __future__ import annotations

import argparse
import dataclasses
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

# Support questions of the kind the sample corpus holds; cycled through by the latency run.
PROMPTS = (
    "Hi, my router keeps disconnecting. What should I do?",
    "My thermostat won't turn on after the update.",
    "I was charged twice for order 4417, can you help?",
    "The camera I ordered arrived damaged.",
    "How do I reset my doorbell to factory settings?",
    "My speaker keeps disconnecting from the app.",
)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))])


def smoke_params(tmp: Path) -> Params:
    """Params of a throwaway registry holding one production version of a tiny untrained GPT-2
    (2 layers, 32 wide, 64-token context): exercises the whole path in seconds."""
    import mlflow

    from retune.config import ScratchModelParams, parse_params
    from retune.model.modeling import scratch_model, train_tokenizer
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
            "register": {"model_name": "bench-serve", "max_new_tokens": 32},
        }
    )
    tokenizer = train_tokenizer(list(PROMPTS) * 20, vocab_size=400)
    model = scratch_model(
        ScratchModelParams(vocab_size=400, n_layer=2, n_head=2, n_embd=32), tokenizer, 64
    )
    model_dir = tmp / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
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


def latency(url: str, token: str, model: str, n: int, max_tokens: int) -> dict[str, Any]:
    """`n` sequential chat completions of `max_tokens`, timed at the client (HTTP included)."""
    import httpx

    times, tokens, finish = [], [], []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}) as http:
        for i in range(n + 1):
            body = {
                "model": model,
                "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                "max_tokens": max_tokens,
            }
            started = time.perf_counter()
            answer = http.post("/v1/chat/completions", json=body, timeout=300)
            elapsed = time.perf_counter() - started
            answer.raise_for_status()
            if i == 0:  # warm-up: first-call allocations are not serving latency
                continue
            reply = answer.json()
            times.append(elapsed * 1000.0)
            tokens.append(reply["usage"]["completion_tokens"])
            finish.append(reply["choices"][0]["finish_reason"])
            print(f"  completion {i}/{n}: {elapsed * 1000:.0f} ms, {tokens[-1]} tokens", flush=True)
    return {"ms": times, "tokens": tokens, "length_share": finish.count("length") / len(finish)}


def feedback_writes(
    url: str, token: str, ids: list[str], clients: int, per_client: int
) -> dict[str, Any]:
    """`clients` threads, each with its own connection, post `per_client` ratings as fast as
    the server takes them; returns the wall time and the status of every post."""
    import httpx

    statuses: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)

    def client(n: int) -> None:
        mine: list[int] = []
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}) as http:
            start.wait()
            for i in range(per_client):
                body = {
                    "response_id": ids[(n * per_client + i) % len(ids)],
                    "rating": "up" if i % 3 else "down",
                    "score": round(i / max(1, per_client - 1), 3),
                }
                mine.append(http.post("/v1/feedback", json=body, timeout=300).status_code)
        with lock:
            statuses.extend(mine)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    began = time.perf_counter()
    for t in threads:
        t.join()
    return {"wall_s": time.perf_counter() - began, "statuses": statuses}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--smoke", action="store_true", help="tiny throwaway model, small N")
    parser.add_argument("--requests", type=int, help="timed completions (default 50; smoke 10)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--per-client", type=int, help="ratings per client (default 100; smoke 10)")
    parser.add_argument("--out-dir", type=Path, default=None, help="default benchmarks/results")
    args = parser.parse_args(argv)
    requests = args.requests or (10 if args.smoke else 50)
    per_client = args.per_client or (10 if args.smoke else 100)
    configure_environment()

    from retune.online.feedback import FeedbackStore
    from retune.online.serving import create_app, serve_in_thread
    from retune.release.registry import Registry

    with tempfile.TemporaryDirectory(prefix="retune-bench-serve-") as tmp_dir:
        tmp = Path(tmp_dir)
        params = smoke_params(tmp) if args.smoke else load_params(args.params)
        params = dataclasses.replace(
            params, serve=dataclasses.replace(params.serve, max_tokens=max(args.max_tokens, 1))
        )
        name = params.register.model_name
        production = Registry.open(params.tracking, name).aliases().get(params.serve.alias)
        if production is None:
            print(
                f"error: {name} has no version with alias {params.serve.alias} in "
                f"{params.tracking.uri}: run `make run` first (or pass --smoke)",
                file=sys.stderr,
            )
            return 1
        token = secrets.token_urlsafe(24)
        store = FeedbackStore.open(f"sqlite:///{tmp}/feedback.db")
        print(f"serving {name} v{production} on loopback; {requests} completions", flush=True)
        with serve_in_thread(create_app(params, store=store, token=token)) as url:
            lat = latency(url, token, name, requests, args.max_tokens)
            ids = store.interactions_frame()["id"].tolist()
            sent = args.clients * per_client
            print(f"feedback: {args.clients} clients x {per_client} ratings", flush=True)
            before = store.count_feedback()
            fb = feedback_writes(url, token, ids, args.clients, per_client)
            stored = store.count_feedback() - before
        ok = fb["statuses"].count(201)

    ms, tokens, max_tokens = lat["ms"], lat["tokens"], args.max_tokens
    size = "smoke: tiny untrained 2x32 model" if args.smoke else f"{name} v{production}"
    rows = [
        row("latency_p50", _percentile(ms, 50), "ms", None, f"{size}, max_tokens={max_tokens}"),
        row("latency_p95", _percentile(ms, 95), "ms", None, f"{requests} sequential requests"),
        row("latency_mean", statistics.fmean(ms), "ms"),
        row("completion_tokens_mean", statistics.fmean(tokens), "tokens",
            None, f"{lat['length_share']:.0%} of replies ran to max_tokens"),
        row("ms_per_generated_token", sum(ms) / max(1, sum(tokens)), "ms/token",
            None, "client latency over tokens generated"),
        row("feedback_writes_per_s", ok / fb["wall_s"], "writes/s", None,
            f"{args.clients} concurrent clients, SQLite store, bearer token"),
        row("feedback_sent", sent, "rows"),
        row("feedback_stored", stored, "rows", "== feedback_sent",
            "OK" if stored == sent == ok else "MISMATCH"),
    ]  # fmt: skip
    write_result(
        "serve",
        command_line("serve", argv),
        rows,
        **({"out_dir": args.out_dir} if args.out_dir else {}),
    )
    return 0 if stored == sent == ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
