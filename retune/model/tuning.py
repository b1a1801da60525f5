"""Hyperparameter search with Optuna: the searched space, a trial's settings, the pruning hook.

Pure pieces `tasks.tune` assembles: `distributions` turns `tune.space` into Optuna
distributions (ints stay ints, a setting that does not exist is an error naming it),
`trial_params` the params one trial trains with, `PruneOnEval` reports each evaluation's loss
to the study and stops a trial the pruner gives up on, and `override_line` writes the best
settings as the overrides `retune run` takes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retune.config import Params, SearchRange, TuneParams, apply_overrides, parse_params, to_plain
from retune.errors import RetuneError

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution

SQLITE = "sqlite:///"


def _setting(params: Params, key: str) -> Any:
    node: Any = params
    for part in key.split("."):
        if not hasattr(node, part):
            raise RetuneError(
                f"tune.space: {key!r} is not a setting of params.yaml; name one as a dotted "
                "key, e.g. train.learning_rate"
            )
        node = getattr(node, part)
    return node


def distributions(cfg: TuneParams, params: Params) -> dict[str, BaseDistribution]:
    """`cfg.space` as Optuna distributions, ints for int settings."""
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    if not cfg.space:
        raise RetuneError("tune.space is empty: name at least one setting to search")
    out: dict[str, BaseDistribution] = {}
    for key, spec in cfg.space.items():
        if not key.startswith("train."):
            raise RetuneError(f"tune.space: {key!r}: only train.* settings are searched")
        current = _setting(params, key)
        if spec.choices is not None:
            out[key] = CategoricalDistribution(list(spec.choices))
        elif isinstance(current, int) and not isinstance(current, bool):
            out[key] = IntDistribution(_whole(key, spec.low), _whole(key, spec.high), log=spec.log)
        else:
            assert spec.low is not None and spec.high is not None
            out[key] = FloatDistribution(float(spec.low), float(spec.high), log=spec.log)
    return out


def _whole(key: str, value: float | None) -> int:
    assert value is not None
    if value != int(value):
        raise RetuneError(f"tune.space: {key} is a whole number; its range must be too")
    return int(value)


def trial_params(params: Params, values: Mapping[str, Any]) -> Params:
    """`params` with `tune.overrides`, then one trial's `values`, applied (checked as
    params.yaml is: a bad combination is an error naming it)."""
    settings = {**params.tune.overrides, **values}
    raw = apply_overrides(to_plain(params), [f"{k}={json.dumps(v)}" for k, v in settings.items()])
    return parse_params(raw, "tune trial")


def baseline(params: Params, space: Mapping[str, SearchRange]) -> dict[str, Any]:
    """The current values of the searched settings (with `tune.overrides`): trial 0."""
    tuned = trial_params(params, {})
    return {key: _setting(tuned, key) for key in space}


def override_line(values: Mapping[str, Any]) -> str:
    """`values` as `retune run` overrides: `train.learning_rate=0.0012 train.warmup_steps=8`."""
    return " ".join(f"{key}={json.dumps(value)}" for key, value in values.items())


def storage_url(cfg: TuneParams, tracking_uri: str) -> str:
    """Where the study lives: `cfg.storage`, or an SQLite file beside the tracking store."""
    if cfg.storage:
        return cfg.storage
    if not tracking_uri.startswith(SQLITE):
        raise RetuneError(
            f"tune.storage is not set and the tracking store {tracking_uri} is not SQLite: set "
            "tune.storage to an Optuna storage URL (e.g. postgresql://...)"
        )
    db = Path(tracking_uri[len(SQLITE) :]).with_name("optuna.db")
    db.parent.mkdir(parents=True, exist_ok=True)
    return SQLITE + str(db)


def make_pruner(cfg: TuneParams) -> Any:
    """The study's pruner. A trial reporting from another process loads the study with this
    same pruner: Optuna's storage keeps trials, not the pruner."""
    import optuna

    if cfg.pruner == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(
        n_startup_trials=cfg.startup_trials, n_warmup_steps=cfg.warmup_steps
    )


def pruning_callback(report: Callable[[float, int], bool]) -> Any:
    """A Trainer callback: each evaluation's eval_loss goes to `report(loss, step)`; when that
    says prune, training stops at once (the callback's `pruned_at` says at which step)."""
    from transformers import TrainerCallback

    class PruneOnEval(TrainerCallback):
        def __init__(self) -> None:
            self.pruned_at: int | None = None

        def on_evaluate(
            self, args: Any, state: Any, control: Any, metrics: dict | None = None, **kw: Any
        ) -> None:
            loss = (metrics or {}).get("eval_loss")
            if loss is not None and report(float(loss), int(state.global_step)):
                self.pruned_at = int(state.global_step)
                control.should_training_stop = True

    return PruneOnEval()
