"""The `retune` command: the flow, each stage on its own, and the resolved params.

The outermost edge: it imports `flows` and `tasks` lazily inside commands (the one place
that looks "up" the layers), so `retune --help` stays fast and nothing heavy loads early.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from retune.config import DEFAULT_PARAMS, ConfigError, Params, load_params, to_plain
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

# Stage name -> what its command does (the stage module is tasks.<name>, its edge `run`).
STAGE_HELP = {
    "sample": "Write the synthetic sample corpus into paths.incoming (only if it is empty).",
    "ingest": "Read paths.incoming, normalise, quarantine bad rows, write the prepared snapshot.",
    "validate": "Check the prepared data against the data contract (Great Expectations).",
    "split": "Split prepared records into train and holdout, by conversation.",
    "train": "Fine-tune the model on the train split; start the MLflow run.",
    "evaluate": "Score the model on the holdout against a unigram baseline.",
    "register": "Log the model to MLflow and register a new version.",
}


def _params(path: Path, overrides: list[str] | None) -> Params:
    configure_environment()
    return load_params(path, overrides or [])


def _guarded(fn: Any, *args: Any) -> Any:
    """Run `fn`; a user-fixable error prints its message and exits 1 without a traceback."""
    try:
        return fn(*args)
    except (ConfigError, RetuneError) as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None


@app.command()
def run(overrides: Overrides = None, params: ParamsOpt = DEFAULT_PARAMS) -> None:
    """Run the retraining flow: ingest, validate, split, train, evaluate, register."""
    _guarded(_params, params, overrides)  # fail on a bad key before Prefect starts anything
    from flows.retrain import retrain

    _guarded(retrain, str(params), list(overrides or []))


def _stage_command(name: str) -> None:
    def command(overrides: Overrides = None, params: ParamsOpt = DEFAULT_PARAMS) -> None:
        resolved = _guarded(_params, params, overrides)
        module = importlib.import_module(f"tasks.{name}")
        _guarded(module.run, resolved)

    command.__doc__ = STAGE_HELP[name]
    app.command(name=name)(command)


for _name in STAGE_HELP:
    _stage_command(_name)


@app.command("params")
def show_params(overrides: Overrides = None, params: ParamsOpt = DEFAULT_PARAMS) -> None:
    """Print the resolved params (params.yaml + overrides + defaults) as YAML."""
    resolved = _guarded(_params, params, overrides)
    typer.echo(yaml.safe_dump(to_plain(resolved), sort_keys=False))


def main() -> None:
    app()
