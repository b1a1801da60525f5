"""Stage `drift`: are production's ratings getting worse, or its users' prompts unlike its data?

Runs as `python -m tasks.drift`, as `drift_task` in the `drift_check` flow (flows/drift.py, which
also emits the event that starts retraining) and via `retune drift`. Reads the feedback store
and the holdout, loads production from the registry; writes reports/drift.json, reports/drift.png
and the monitoring page reports/monitor.html and logs them to the MLflow experiment
`<tracking.experiment>-drift`, whose runs also record which drift was acted on
(`record_action`), so the same evidence is not acted on twice.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from retune.artifacts import DRIFT_CHART, DRIFT_REPORT, HOLDOUT_SPLIT, MONITOR_PAGE
from retune.config import DriftParams, Params, TrackingParams
from retune.entry import stage_main, stage_task
from retune.online.drift import (
    ACTED_AT_TAG,
    ACTED_TAG,
    CHECKS,
    DRIFT,
    EVENT_TAG,
    EVIDENCE_TAG,
    EXPERIMENT_SUFFIX,
    NOT_ENOUGH_DATA,
    STATUS_TAG,
    Action,
    Check,
    Evidence,
    Status,
    distribution_drift,
    negative_share_drift,
    new_evidence,
    overall,
    rolling_share,
    split_window,
    waiting_for,
)

if TYPE_CHECKING:
    import pandas as pd

    from retune.release.registry import Registry

_KS_TEST = "two-sample Kolmogorov-Smirnov test"


@dataclass(frozen=True)
class PromptFigures:
    """Per prompt: perplexity under the model (chat template, as it sees a user turn) and
    length in its tokens (the text alone)."""

    perplexity: np.ndarray
    tokens: np.ndarray

    @classmethod
    def empty(cls) -> PromptFigures:
        return cls(np.zeros(0), np.zeros(0))


@dataclass(frozen=True)
class DriftResult:
    status: Status
    model_name: str
    production_version: int | None
    checks: dict[str, Check]
    settings: dict[str, Any]
    evidence: Evidence
    # The earlier action this drift was already answered by (same production, no newer ratings
    # or prompts for the checks that drifted): report it, do not act again.
    acted_on: Action | None = None
    report_file: Path | None = None
    plot_file: Path | None = None
    run_id: str | None = None  # the MLflow run of this check

    @property
    def drift(self) -> bool:
        return self.status == "drift"

    @property
    def act(self) -> bool:
        """Drift that calls for a response (the retraining event): found, and not yet acted on."""
        return self.drift and self.acted_on is None

    @property
    def note(self) -> str | None:
        """Why a drift found is not acted on again, in words; None otherwise."""
        if not self.drift or self.acted_on is None:
            return None
        return (
            f"already acted on at {self.acted_on.at} (run {self.acted_on.run_id}); waiting "
            f"for {waiting_for(self.drifted)}"
        )

    @property
    def drifted(self) -> list[str]:
        return [name for name, check in self.checks.items() if check.drift]

    def summary(self) -> dict[str, Any]:
        """JSON-ready figures, statuses and counts (no prompt text): the report and the
        event payload."""
        return {
            "status": self.status,
            "model_name": self.model_name,
            "production_version": self.production_version,
            "drifted": self.drifted,
            "checks": {name: check.to_dict() for name, check in self.checks.items()},
            "settings": self.settings,
            "mlflow_run_id": self.run_id,
            "evidence": self.evidence.to_dict(),
            "acted_on": self.acted_on.to_dict() if self.acted_on is not None else None,
            "note": self.note,
        }


def check_quality(
    cfg: DriftParams, feedback: pd.DataFrame, version: int | None
) -> tuple[Check, list[bool]]:
    """The quality check on `feedback` (`FeedbackStore.feedback_frame`, oldest first): the
    negative share of production's newest `cfg.window` ratings against its first
    `cfg.reference_ratings` before them. Returns the check and production's negative flags,
    oldest first (for the plot). Ratings of other versions do not count: a new production
    version starts with no baseline, and so cannot be flagged for its predecessor's ratings.
    """
    if version is None:
        flags: list[bool] = []
    else:
        mine = feedback[feedback["model_version"].astype(str) == str(version)]
        flags = [bool(v) for v in mine["negative"]]
    current, reference = split_window(flags, cfg.window, cfg.reference_ratings)
    check = negative_share_drift(
        current,
        reference,
        alpha=cfg.alpha,
        min_ratings=cfg.min_ratings,
        min_increase=cfg.min_negative_share_increase,
    )
    if version is None:
        check = dataclasses.replace(check, reason="no production version: nothing to rate")
    return check, flags


def _newest(frame: pd.DataFrame, id_column: str) -> tuple[str | None, str | None]:
    if frame.empty:
        return None, None
    last = frame.iloc[-1]
    return str(last[id_column]), last["created_at"].isoformat()


def evidence_of(
    version: int | None, feedback: pd.DataFrame, interactions: pd.DataFrame
) -> Evidence:
    """What the checks read, by its newest rows: production's newest rating in `feedback`
    (`FeedbackStore.feedback_frame`, oldest first) and the newest of `interactions` (the
    prompt window)."""
    mine = feedback[feedback["model_version"].astype(str) == str(version)]
    rating_id, rating_at = _newest(mine, "feedback_id") if version is not None else (None, None)
    prompt_id, prompt_at = _newest(interactions, "id")
    return Evidence(version, rating_id, rating_at, prompt_id, prompt_at)


def last_action(experiment_id: str, model_name: str) -> Action | None:
    """The newest drift of `model_name` acted on, from the tags of the drift experiment's
    runs (`record_action`); None if none was. MLflow must already point at the store."""
    from mlflow import MlflowClient

    runs = MlflowClient().search_runs(
        [experiment_id],
        filter_string=(f"tags.`{ACTED_TAG}` = 'true' and params.model_name = '{model_name}'"),
        order_by=[f"tags.`{ACTED_AT_TAG}` DESC"],
        max_results=1,
    )
    if not runs:
        return None
    tags = runs[0].data.tags
    return Action(
        evidence=Evidence.from_dict(json.loads(tags.get(EVIDENCE_TAG, "{}"))),
        at=tags.get(ACTED_AT_TAG, "an unknown time"),
        run_id=runs[0].info.run_id,
        event_id=tags.get(EVENT_TAG),
    )


def record_action(cfg: TrackingParams, result: DriftResult, event_id: str | None) -> Action:
    """Mark `result`'s MLflow run as the drift acted on (its event emitted), so the next check
    that sees the same evidence reports it instead of acting again."""
    from mlflow import MlflowClient

    from retune.release.tracking import resolved_uri

    if result.run_id is None:
        raise ValueError("the drift check has no MLflow run to record the action on")
    action = Action(result.evidence, datetime.now(UTC).isoformat(), result.run_id, event_id)
    client = MlflowClient(tracking_uri=resolved_uri(cfg.uri))
    for key, value in ((ACTED_TAG, "true"), (ACTED_AT_TAG, action.at), (EVENT_TAG, event_id)):
        client.set_tag(result.run_id, key, value or "none")
    return action


def log_monitor_page(params: Params, run_id: str, registry: Registry | None = None) -> Path | None:
    """Write the monitoring page (reports/monitor.html) as of now and log it to the drift
    check's run `run_id`, replacing an earlier copy. A page that cannot be drawn is a warning:
    the check's verdict, and the retraining it may start, do not hang on it."""
    from mlflow import MlflowClient

    from retune.online import monitor
    from retune.release.tracking import resolved_uri

    try:
        path = monitor.write(params, MONITOR_PAGE.path(params), registry=registry)
        MlflowClient(tracking_uri=resolved_uri(params.tracking.uri)).log_artifact(run_id, str(path))
    except Exception as exc:  # reported; the check goes on
        print(f"drift: warning: the monitoring page was not written: {exc!r}", flush=True)
        return None
    return path


def holdout_user_turns(holdout_file: Path, n: int) -> list[str]:
    """Up to `n` user turns of the holdout (its first conversations by id): what users asked
    in the data production was trained and judged on."""
    from retune.model.scoring import select_holdout

    turns: list[str] = []
    for messages in select_holdout(holdout_file, n).column("messages").to_pylist():
        turns.extend(m["content"] for m in messages if m["role"] == "user")
    return turns[:n]


def prompt_figures(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    batch_size: int,
    max_seq_len: int,
    *,
    log_prefix: str = "drift",
) -> PromptFigures:
    """Perplexity of each prompt as a lone user turn under `model` (scored by retune.model.scoring,
    as evaluation scores the holdout), and its length in the model's tokens."""
    from retune.model.scoring import encode, max_positions, score_sequences

    if not prompts:
        return PromptFigures.empty()
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    encoded = encode(tokenizer, conversations, max_positions(model, max_seq_len))
    nll_sum, n_tokens, _ = score_sequences(
        model, tokenizer, encoded, batch_size, log_prefix=log_prefix
    )
    perplexity = np.exp(nll_sum / np.maximum(n_tokens, 1))
    # verbose=False: a prompt longer than the model window is counted, not warned about.
    lengths = tokenizer(prompts, add_special_tokens=False, verbose=False)["input_ids"]
    return PromptFigures(perplexity, np.array([len(ids) for ids in lengths], dtype=float))


def check_inputs(
    cfg: DriftParams, window: PromptFigures, reference: PromptFigures
) -> tuple[Check, Check]:
    """KS tests of the window's prompts against the reference's: perplexity under production
    (does the model find them unfamiliar?) and length in tokens."""

    def ks(name: str, current: np.ndarray, ref: np.ndarray, unit: str = "") -> Check:
        return distribution_drift(
            name,
            current,
            ref,
            alpha=cfg.alpha,
            min_current=cfg.min_prompts,
            min_reference=cfg.min_prompts,
            min_statistic=cfg.min_ks_statistic,
            unit=unit,
        )

    return (
        ks("perplexity", window.perplexity, reference.perplexity),
        ks("prompt_length", window.tokens, reference.tokens, unit="tokens"),
    )


def inputs_not_checked(n_prompts: int, reason: str) -> tuple[Check, Check]:
    """Both input checks when there is nothing to score with or against."""
    return (
        Check("perplexity", NOT_ENOUGH_DATA, _KS_TEST, n_prompts, 0, reason),
        Check("prompt_length", NOT_ENOUGH_DATA, _KS_TEST, n_prompts, 0, reason),
    )


def plot(
    path: Path,
    result: DriftResult,
    negative: list[bool],
    window: PromptFigures,
    reference: PromptFigures,
    smoothing: int,
) -> Path:
    """reports/drift.png: production's negative share over its ratings (reference and window
    marked), and the window's perplexity and prompt length against the holdout's."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.2), layout="constrained")
    share_ax, ppl_ax, len_ax = fig.subplots(1, 3)
    quality = result.checks["quality"]
    if negative:
        x = np.arange(1, len(negative) + 1)
        share_ax.plot(x, rolling_share(negative, smoothing), color="tab:red", lw=1.2)
        if quality.n_reference:
            share_ax.axvspan(0.5, quality.n_reference + 0.5, color="tab:blue", alpha=0.12)
        share_ax.axvspan(
            len(negative) - quality.n_current + 0.5, len(negative) + 0.5, color="tab:red", alpha=0.1
        )
        for key, colour, label in (
            ("reference_negative_share", "tab:blue", "reference"),
            ("negative_share", "red", "window"),
        ):
            if key in quality.figures:
                value = quality.figures[key]
                share_ax.axhline(value, color=colour, ls="--", lw=1, label=f"{label} {value:.0%}")
        if quality.figures:
            share_ax.legend(fontsize=8, loc="upper left")
        share_ax.set_ylim(-0.02, 1.02)
    else:
        share_ax.text(
            0.5, 0.5, "no ratings of production", ha="center", transform=share_ax.transAxes
        )
    share_ax.set_xlabel(f"rating of v{result.production_version or '-'} (oldest first)")
    share_ax.set_ylabel(f"negative share (last {smoothing} ratings)")
    share_ax.set_title(f"quality: {quality.status} (shaded: reference, window)")

    def hist(ax: Any, current: np.ndarray, ref: np.ndarray, name: str, log: bool) -> None:
        check = result.checks[name]
        both = np.concatenate([current, ref])
        if both.size == 0:
            ax.text(0.5, 0.5, "no prompts scored", ha="center", transform=ax.transAxes)
        else:
            lo, hi = float(both.min()), float(both.max())
            if log:
                bins = np.geomspace(max(lo, 1e-3), max(hi, lo * 1.01, 1e-3 * 1.01), 40)
                ax.set_xscale("log")
            else:
                bins = np.linspace(lo, hi + 1, min(40, int(hi - lo) + 2))
            for values, label, colour in (
                (ref, f"holdout user turns ({ref.size})", "tab:blue"),
                (current, f"window prompts ({current.size})", "tab:red"),
            ):
                if values.size:
                    # Shares, not densities: on log-spaced bins a density hides the wide ones.
                    share = np.full(values.size, 1.0 / values.size)
                    ax.hist(values, bins=bins, weights=share, alpha=0.5, color=colour, label=label)
            ax.legend(fontsize=8)
        d = "" if check.statistic is None else f", D={check.statistic:.2f}"
        ax.set_title(f"{name.replace('_', ' ')}: {check.status}{d}")
        ax.set_ylabel("share of prompts")

    hist(ppl_ax, window.perplexity, reference.perplexity, "perplexity", log=True)
    ppl_ax.set_xlabel(f"per-prompt perplexity under v{result.production_version or '-'}")
    hist(len_ax, window.tokens, reference.tokens, "prompt_length", log=False)
    len_ax.set_xlabel("prompt length (tokens)")
    fig.suptitle(f"{result.model_name} drift check: {result.status}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def _metrics(result: DriftResult) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, check in result.checks.items():
        out[f"{name}.n_current"] = float(check.n_current)
        out[f"{name}.n_reference"] = float(check.n_reference)
        if check.status != NOT_ENOUGH_DATA:
            out[f"{name}.drift"] = 1.0 if check.drift else 0.0
        for key in ("statistic", "p_value", "effect"):
            value = getattr(check, key)
            if value is not None and math.isfinite(value):
                out[f"{name}.{key}"] = float(value)
        out.update({f"{name}.{k}": float(v) for k, v in check.figures.items()})
    out["drift"] = 1.0 if result.drift else 0.0
    return out


def run(params: Params) -> DriftResult:
    """Edge: read the newest ratings and prompts of `register.model_name` from the feedback
    store, load production from the registry (only when there are prompts to score), run the
    checks; write reports/drift.json, reports/drift.png and reports/monitor.html and log them,
    with the figures as metrics, to a run of the MLflow experiment `<tracking.experiment>-drift`."""
    import mlflow

    from retune.online.feedback import FeedbackStore
    from retune.release.registry import Registry, load_version
    from retune.release.tracking import side_experiment

    cfg = params.drift
    name = params.register.model_name
    registry = Registry.open(params.tracking, name)
    version = registry.production()
    store = FeedbackStore.open(params.feedback.store_url)
    try:
        feedback = store.feedback_frame(model_name=name)
        interactions = store.interactions_frame(limit=cfg.window, model_name=name)
    finally:
        store.close()
    print(
        f"drift: {name}@production is {f'v{version}' if version else 'unset'}; "
        f"{len(feedback)} ratings and the newest {len(interactions)} prompts in {store.url}",
        flush=True,
    )
    quality, negative = check_quality(cfg, feedback, version)

    prompts = [p for p in interactions["prompt"] if isinstance(p, str) and p.strip()]
    holdout_file = HOLDOUT_SPLIT.path(params)
    window = reference = PromptFigures.empty()
    if version is None:
        inputs = inputs_not_checked(len(prompts), "no production version to score prompts with")
    elif len(prompts) < cfg.min_prompts:
        inputs = inputs_not_checked(
            len(prompts),
            f"{len(prompts)} prompts in the window; drift.min_prompts={cfg.min_prompts}",
        )
    elif not holdout_file.exists():
        inputs = inputs_not_checked(
            len(prompts), f"{holdout_file}: missing (the reference); run the pipeline first"
        )
    else:
        model, tokenizer = load_version(name, version, log_prefix="drift")
        batch, seq = params.scoring.batch_size, params.scoring.max_seq_len
        print(f"drift: scoring {len(prompts)} window prompts under v{version}", flush=True)
        window = prompt_figures(model, tokenizer, prompts, batch, seq)
        turns = holdout_user_turns(holdout_file, cfg.reference_prompts)
        print(f"drift: scoring {len(turns)} holdout user turns (the reference)", flush=True)
        reference = prompt_figures(model, tokenizer, turns, batch, seq)
        inputs = check_inputs(cfg, window, reference)

    checks = dict(zip(CHECKS, (quality, *inputs), strict=True))
    status = overall(checks.values())
    evidence = evidence_of(version, feedback, interactions)
    experiment = side_experiment(params.tracking, EXPERIMENT_SUFFIX)
    acted = last_action(experiment, name) if status == DRIFT else None
    drifted = [n for n, c in checks.items() if c.drift]
    if acted is not None and new_evidence(evidence, acted.evidence, drifted):
        acted = None  # new data since, or another production: this drift is news
    result = DriftResult(
        status=status,
        model_name=name,
        production_version=version,
        checks=checks,
        settings=dataclasses.asdict(cfg),
        evidence=evidence,
        acted_on=acted,
    )
    run_name = f"drift {name}@production v{version or '-'}: {result.status}"
    if result.acted_on is not None:
        run_name += " (already acted on)"
    with mlflow.start_run(experiment_id=experiment, run_name=run_name) as active:
        result = dataclasses.replace(
            result,
            report_file=DRIFT_REPORT.path(params),
            plot_file=DRIFT_CHART.path(params),
            run_id=active.info.run_id,
        )
        assert result.report_file is not None and result.plot_file is not None
        DRIFT_REPORT.write(params, result.summary())
        plot(result.plot_file, result, negative, window, reference, max(cfg.min_ratings, 1))
        mlflow.log_params(
            {
                "model_name": name,
                "production_version": str(version or "none"),
                **{f"drift.{k}": v for k, v in result.settings.items()},
            }
        )
        mlflow.log_metrics(_metrics(result))
        mlflow.set_tags(
            {
                STATUS_TAG: result.status,
                **{f"drift.{k}": c.status for k, c in checks.items()},
                EVIDENCE_TAG: json.dumps(evidence.to_dict(), sort_keys=True),
                **({"drift.already_acted_on_run": acted.run_id} if acted is not None else {}),
            }
        )
        mlflow.log_artifact(str(result.report_file))
        mlflow.log_artifact(str(result.plot_file))
        log_monitor_page(params, active.info.run_id, registry)
    for check in checks.values():
        print(f"drift: {check.name}: {check.status}: {check.reason}", flush=True)
    if result.note is not None:
        print(f"drift: {result.status}, {result.note}", flush=True)
    print(f"drift: {result.status} -> {result.report_file}, MLflow run {result.run_id}", flush=True)
    return result


drift_task = stage_task(run, name="drift")

if __name__ == "__main__":
    stage_main(run)
