"""Scaling out on one machine: data-parallel training, CV folds on each runner, and a
hyperparameter search.

Run: `python -m benchmarks.scaleout` (default model, sample corpus: `retune train` with
train.processes 1 and then 2 for `--ddp-steps` steps, tokens/s each; 3 CV folds of
`--fold-steps` steps on the sequential, process and, with the `ray` extra, ray runners, each
from scratch; then `retune tune`'s flow for `--trials` trials of `--trial-steps` steps);
`--smoke` (a tiny model: seconds); `--parts ddp` for one part. Prepares the data once
(sample ... split) in a scratch folder, starts a temporary Prefect server for the flows, and
writes benchmarks/results/scaleout.json.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, cast

from benchmarks.common import (
    BIN,
    TINY,
    bench_env,
    command_line,
    measure,
    read_report,
    row,
    untimed,
    write_params,
    write_result,
)
from retune.config import Params, RunnerKind, load_params
from retune.env import configure_environment

NAME = "scaleout"
RUNNERS: tuple[RunnerKind, ...] = ("sequential", "process", "ray")
PARTS = ("ddp", "cv", "tune")


def data_parallel(
    params_file: Path, work: Path, steps: int, processes: int
) -> tuple[float, dict[str, Any]]:
    """Wall seconds of `retune train` on `processes` processes (from no checkpoint), and its
    reports/train.json."""
    cmd = [str(BIN / "retune"), "train", "--params", str(params_file)]
    cmd += [f"train.processes={processes}", f"train.max_steps={steps}", "train.resume=false"]
    done = measure(cmd, cwd=work, env=bench_env())
    if done.returncode != 0:
        raise SystemExit(f"retune train on {processes} processes failed:\n{done.output[-3000:]}")
    return done.wall_s, read_report(work, "train")


def ddp_rows(params_file: Path, work: Path, steps: int, model: str) -> list[dict[str, Any]]:
    """tokens/s of one process against two on the same settings (each rank takes the same
    per-device batch, so two processes train twice the tokens per step)."""
    rows, rates = [], {}
    for n in (1, 2):
        print(f"scaleout: retune train on {n} process(es), {steps} steps", flush=True)
        wall, report = data_parallel(params_file, work, steps, n)
        rates[n] = report["tokens_per_s"]
        rows.append(
            row(
                f"ddp_{n}_tokens_per_s",
                rates[n],
                "tokens/s",
                None,
                f"{steps} steps, {model}; {report['tokens_seen']:,} tokens, eval_loss "
                f"{report['eval_loss']:.3f}, wall {wall:.1f}s with start-up",
            )
        )
    rows.append(row("ddp_2_speedup", rates[2] / rates[1], "x 1 process"))
    return rows


def folds_on(params: Params, kind: RunnerKind) -> tuple[float, list[float]]:
    """Wall seconds of the flow's CV step on runner `kind`, from no fold checkpoint, and the
    folds' perplexities."""
    from prefect import flow

    from flows.retrain import cross_validate
    from tasks.cv import CV_DIR

    shutil.rmtree(params.paths.checkpoints / CV_DIR, ignore_errors=True)
    on = dataclasses.replace(params, runner=dataclasses.replace(params.runner, kind=kind))

    @flow(name=f"bench-cv-{kind}")
    def folds() -> Any:
        return cross_validate(on)

    started = time.perf_counter()
    result = cast(Any, folds())
    return time.perf_counter() - started, [f.perplexity for f in result.folds]


def cv_rows(
    params: Params, args: argparse.Namespace, steps: int, model: str
) -> list[dict[str, Any]]:
    """Wall time of the CV folds on each runner, and how far their perplexities agree."""
    cores, rows = os.cpu_count() or 1, []
    walls: dict[str, float] = {}
    perplexities: dict[str, list[float]] = {}
    for kind in RUNNERS:
        if kind == "ray" and importlib.util.find_spec("prefect_ray") is None:
            print("scaleout: ray not measured: the ray extra is not installed", flush=True)
            continue
        print(f"scaleout: {args.folds} folds on the {kind} runner", flush=True)
        walls[kind], perplexities[kind] = folds_on(params, kind)
        rows.append(
            row(
                f"cv_{kind}_wall",
                walls[kind],
                "s",
                None,
                f"{args.folds} folds x {steps} steps, {model}; {cores} cores; "
                f"perplexities {', '.join(f'{p:.3f}' for p in perplexities[kind])}",
            )
        )
    for other in walls:
        if other != "sequential":
            rows.append(
                row(
                    f"cv_{other}_speedup",
                    walls["sequential"] / walls[other],
                    "x sequential",
                )
            )
            diff = max(
                abs(a - b) / b
                for a, b in zip(perplexities[other], perplexities["sequential"], strict=True)
            )
            rows.append(
                row(
                    f"cv_{other}_perplexity_diff",
                    diff * 100,
                    "% max",
                    None,
                    "same folds and seeds; one thread a fold instead of all",
                )
            )
    return rows


def tune_rows(params_file: Path, args: argparse.Namespace, model: str) -> list[dict[str, Any]]:
    """A search of `args.trials` trials: wall time, pruned trials, best against trial 0."""
    from flows.tune import tune as tune_flow

    trial_steps = 8 if args.smoke else args.trial_steps
    tune_overrides = [
        f"tune.trials={args.trials}",
        f"tune.overrides={{train.max_steps: {trial_steps}, "
        f"train.eval_steps: {max(1, trial_steps // 4)}}}",
    ]
    print(f"scaleout: tune, {args.trials} trials of {trial_steps} steps", flush=True)
    started = time.perf_counter()
    report = cast(dict[str, Any], tune_flow(str(params_file), tune_overrides))
    tune_wall = time.perf_counter() - started
    best, base = report["best"], report["baseline_eval_loss"]
    return [
        row(
            "tune_wall",
            tune_wall,
            "s",
            None,
            f"{len(report['trials'])} trials x {trial_steps} steps on the sequential runner, "
            f"{model}, the default search space, TPE + median pruner",
        ),
        row("tune_trials", len(report["trials"]), "trials", f">= {args.trials}"),
        row(
            "tune_pruned",
            report["n_pruned"],
            "trials",
            None,
            "stopped at an evaluation whose loss trailed the median",
        ),
        row(
            "tune_baseline_eval_loss",
            base,
            "nats/token",
            None,
            "trial 0: the current settings, on the validation fold",
        ),
        row(
            "tune_best_eval_loss",
            best["eval_loss"],
            "nats/token",
            None,
            f"trial {best['number']}: {report['best_overrides']}",
        ),
        row(
            "tune_best_vs_baseline",
            (base - best["eval_loss"]) / base * 100,
            "% lower",
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny model: seconds")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--fold-steps", type=int, default=60, help="train.max_steps of a fold")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--trial-steps", type=int, default=100, help="train.max_steps of a trial")
    parser.add_argument("--ddp-steps", type=int, default=60, help="train.max_steps, data-parallel")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"some of {','.join(PARTS)}")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    parts = set(args.parts.split(","))
    if not parts <= set(PARTS):
        parser.error(f"--parts: {sorted(parts - set(PARTS))} not among {', '.join(PARTS)}")

    configure_environment()
    work = Path(tempfile.mkdtemp(prefix="retune-bench-scaleout-"))
    overrides: dict[str, Any] = dict(TINY) if args.smoke else {}
    steps = overrides.get("train.max_steps", args.fold_steps) if args.smoke else args.fold_steps
    overrides |= {"train.max_steps": steps, "cv.folds": args.folds}
    params_file = write_params(work / "params.yaml", overrides)
    env = bench_env()
    for stage in ("sample", "ingest", "hygiene", "validate", "split"):
        print(f"scaleout: {stage}", flush=True)
        untimed([str(BIN / "retune"), stage, "--params", str(params_file)], work, env)
    # The params' relative paths (data/, mlruns/) are under the scratch folder; the caller's
    # working directory comes back however this ends.
    with contextlib.chdir(work):
        params = load_params(params_file)
        cores = os.cpu_count() or 1
        model = "tiny model" if args.smoke else "default model"
        load = os.getloadavg()[0]
        rows: list[dict[str, Any]] = []
        if "ddp" in parts:
            rows += ddp_rows(params_file, work, args.ddp_steps if not args.smoke else steps, model)
        if parts & {"cv", "tune"}:
            from flows.startup import prefect_api

            with prefect_api(params):
                if "cv" in parts:
                    rows += cv_rows(params, args, steps, model)
                if "tune" in parts:
                    rows += tune_rows(params_file, args, model)
        rows.append(
            row(
                "load_at_start",
                load,
                "load avg",
                None,
                f"{cores} cores; the ray extra "
                + (
                    "not installed"
                    if importlib.util.find_spec("prefect_ray") is None
                    else "installed"
                ),
            )
        )
    write_result(NAME, command_line(NAME, argv), rows, out)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
