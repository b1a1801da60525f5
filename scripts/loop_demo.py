"""The whole loop on loopback, end to end: serve production, log feedback that turns negative,
find the drift, and watch the drift event start a retrain on a real Prefect server.

Run after `make run` (it needs a production model), from the repository root:

    .venv/bin/python scripts/loop_demo.py            # stops once the retrain has started
    .venv/bin/python scripts/loop_demo.py --wait     # ... and waits for the retrain's outcome

It starts its own Prefect server (state in a temporary PREFECT_HOME), `retune deploy`, and the
OpenAI-compatible server, all on 127.0.0.1, and stops them when it ends. Ratings go to a
temporary feedback store; the retrain it triggers is the real one (it exports the feedback
into paths.incoming, retrains, and the gate decides). Figures go to reports/loop_demo.json.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from retune.config import DEFAULT_PARAMS, Params, load_params, to_plain
from retune.env import configure_environment
from retune.reports import write_json

BIN = Path(sys.executable).parent
# Questions far from a support corpus: what "the users changed" looks like.
OFF_DOMAIN = [
    "What is a good recipe for sourdough bread with a stiff starter?",
    "Explain the difference between a Roth IRA and a traditional IRA.",
    "Who won the football world cup in 1998 and who scored in the final?",
    "Translate 'the weather is lovely today' into Japanese and Korean.",
    "Write a haiku about autumn leaves falling on a quiet pond.",
    "How do I compute the eigenvalues of a 3x3 symmetric matrix by hand?",
    "Which grape varieties are used in a classic Bordeaux blend?",
    "Summarise the plot of War and Peace in three sentences.",
]
CORRECTION = "I'm sorry, I can only help with your devices, orders and account."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for(what: str, check: Callable[[], Any], timeout_s: float, every_s: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every_s)
    raise SystemExit(f"timed out after {timeout_s:.0f}s waiting for {what}")


@contextlib.contextmanager
def process(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`args` in a session of its own, output to `log`; the whole group stops on exit."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            yield proc
        finally:
            for sig, grace_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 5)):
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
                        os.killpg(proc.pid, sig)
                        proc.wait(grace_s)


def demo_params(params_file: Path, work: Path) -> tuple[Params, Path]:
    """The user's params with a small drift window, a throwaway feedback store and no crons
    (only the drift trigger should start anything)."""
    params = load_params(
        params_file,
        [
            "drift.window=100",
            "drift.reference_ratings=100",
            f"feedback.store_url=sqlite:///{work}/feedback.db",
            "schedule.retrain_cron=null",
            "schedule.data_check_cron=null",
            "schedule.drift_check_cron=null",
        ],
    )
    path = work / "params.yaml"
    path.write_text(yaml.safe_dump(to_plain(params)))
    return params, path


def chat_and_rate(
    client: Any,
    model: str,
    prompts: list[str],
    negative_share: float,
    rng: random.Random,
    base_url: str,
) -> list[float]:
    """One chat completion per prompt, then a rating: down (with a correction) for about
    `negative_share` of them, up for the rest. Returns the latencies in ms."""
    import httpx

    latencies = []
    for prompt in prompts:
        started = time.perf_counter()
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=32
        )
        latencies.append((time.perf_counter() - started) * 1000)
        down = rng.random() < negative_share
        body: dict[str, Any] = {"response_id": reply.id, "rating": "down" if down else "up"}
        if down:
            body["corrected_reply"] = CORRECTION
        httpx.post(f"{base_url}/v1/feedback", json=body, timeout=60).raise_for_status()
    return latencies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS)
    parser.add_argument("--wait", action="store_true", help="wait for the retrain to finish")
    parser.add_argument("--reference", type=int, default=120, help="in-domain exchanges first")
    parser.add_argument("--window", type=int, default=100, help="then off-domain exchanges")
    args = parser.parse_args(argv)
    configure_environment()
    from openai import OpenAI
    from prefect import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from retune.registry import Registry
    from retune.serving import create_app, serve_in_thread

    from tasks.drift import holdout_user_turns

    work = Path(tempfile.mkdtemp(prefix="retune-loop-"))
    params, params_file = demo_params(args.params, work)
    name = params.register.model_name
    production = Registry.open(params.tracking, name).production()
    if production is None:
        raise SystemExit(f"no production version of {name}: run `make run` first")
    url = f"http://127.0.0.1:{free_port()}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(work / "prefect"),
        "PREFECT_API_URL": url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
    }
    host, port = url.removeprefix("http://").removesuffix("/api").split(":")
    figures: dict[str, Any] = {"production_before": production, "work_dir": str(work)}
    print(f"loop: production is {name} v{production}; work dir {work}", flush=True)
    server_cmd = [str(BIN / "prefect"), "server", "start", "--host", host, "--port", port]
    deploy_cmd = [str(BIN / "retune"), "deploy", "--params", str(params_file)]
    with (
        process(server_cmd, env, work / "prefect-server.log"),
        temporary_settings(updates={PREFECT_API_URL: url}),
    ):
        import httpx

        def healthy() -> bool:
            try:
                return httpx.get(f"{url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for("the Prefect server", healthy, 180)
        print(f"loop: Prefect server on {url.removesuffix('/api')}", flush=True)
        with process(deploy_cmd, env, work / "deploy.log"):

            def deployed() -> bool:
                with get_client(sync_client=True) as client:
                    return len(client.read_deployments()) >= 3

            wait_for("retune deploy's three deployments", deployed, 180)
            print("loop: deployments registered (retrain, data-check, drift-check)", flush=True)
            app = create_app(params)
            with serve_in_thread(app) as base:
                client = OpenAI(base_url=f"{base}/v1", api_key="not-needed")
                rng = random.Random(0)
                holdout = params.paths.split / "holdout.parquet"
                usual = holdout_user_turns(holdout, args.reference)
                print(f"loop: serving on {base}/v1; {len(usual)} usual exchanges", flush=True)
                before = chat_and_rate(client, name, usual, 0.05, rng, base)
                unusual = [OFF_DOMAIN[i % len(OFF_DOMAIN)] for i in range(args.window)]
                print(f"loop: {len(unusual)} off-domain exchanges, mostly rated down", flush=True)
                after = chat_and_rate(client, name, unusual, 0.6, rng, base)
            figures["completion_ms_p50"] = sorted(before + after)[len(before + after) // 2]
            t0 = time.time()
            check = run_deployment(name="drift-check/drift-check", timeout=900)
            figures["drift_check_run"] = str(check.id)  # type: ignore[union-attr]
            drift_report = yaml.safe_load((params.paths.reports / "drift.json").read_text())
            figures["drift"] = {
                name: {k: c.get(k) for k in ("status", "p_value", "effect")}
                for name, c in drift_report.get("checks", {}).items()
            }
            print(f"loop: drift check {check.id} -> {drift_report.get('status')}", flush=True)

            def triggered() -> Any:
                with get_client(sync_client=True) as client:
                    dep = client.read_deployment_by_name("retrain/retrain")
                    from prefect.client.schemas.filters import (
                        DeploymentFilter,
                        DeploymentFilterId,
                    )

                    runs = client.read_flow_runs(
                        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id]))
                    )
                return next(
                    (r for r in runs if r.created_by and r.created_by.type == "AUTOMATION"), None
                )

            run = wait_for("a retrain started by the drift trigger", triggered, 120)
            figures["retrain_run"] = str(run.id)
            figures["retrain_run_name"] = run.name
            figures["check_to_retrain_s"] = round(run.created.timestamp() - t0, 1)
            print(f"loop: drift event started retrain run {run.name} ({run.id})", flush=True)
            if args.wait:

                def finished() -> Any:
                    with get_client(sync_client=True) as client:
                        r = client.read_flow_run(run.id)
                    return r if r.state and r.state.is_final() else None

                done = wait_for("the retrain to finish", finished, 3600, every_s=5)
                figures["retrain_state"] = done.state.name
                figures["production_after"] = Registry.open(params.tracking, name).production()
                print(
                    f"loop: retrain {done.state.name}; production is now "
                    f"v{figures['production_after']}",
                    flush=True,
                )
    write_json(params.paths.reports / "loop_demo.json", figures)
    print(f"loop: figures in {params.paths.reports / 'loop_demo.json'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
