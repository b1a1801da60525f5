"""Stage `promote`: the gate between the newly registered version and `production`.

Runs as `python -m tasks.promote` (the dvc.yaml stage), as `promote_task` in Prefect flows and
as `retune gate`; `retune promote <version>` calls `promote_version` for a person's decision.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retune.artifacts import (
    EVALUATE_REPORT,
    HOLDOUT_SCORES,
    HOLDOUT_SPLIT,
    PREFERENCE_SET,
    PROMOTE_REPORT,
    RATED_SCORES,
    REGISTER_REPORT,
    TRAIN_REPORT,
    pipeline_run_id,
)
from retune.config import Params, PromoteParams, ScoringParams
from retune.data.preference import set_rows
from retune.entry import stage_main, stage_task
from retune.errors import RetuneError
from retune.release.gate import (
    UNITS,
    Comparison,
    Decision,
    GateError,
    RatingsComparison,
    compare,
    compare_ratings,
    decide,
    diverged,
)
from retune.release.registry import GATE_ACTOR, Registry, RegistryError, load_version

if TYPE_CHECKING:
    import pyarrow as pa


@dataclass(frozen=True)
class PromoteResult:
    model_name: str
    version: int
    outcome: str  # promote | propose | reject
    reason: str
    metric: str  # promote.metric: what the candidate was compared with production in
    unit: str  # the unit of the comparison's improvement, its CI and promote.margin
    forced: bool
    alias: str | None  # the alias moved to `version`, None when rejected
    not_applicable: list[str]  # absolute gates this data cannot be judged by, and why
    compared_version: int | None  # production when the gate ran
    production: int | None  # production after the decision
    candidate_metrics: dict[str, float]
    champion_metrics: dict[str, float] | None
    comparison: dict[str, Any] | None
    decided_by: str
    # The ratings check (`retune.release.gate.RatingsComparison`), None when not run.
    ratings: dict[str, Any] | None = None

    @property
    def verdict(self) -> str:
        """One line for logs and the terminal."""
        name = f"{self.model_name} v{self.version}"
        if self.alias is None:
            return f"{name} REJECTED (stays registered, not production): {self.reason}"
        return f"{name} -> @{self.alias}: {self.reason}"  # a forced reason starts "forced:"

    def report(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def score_registered(
    model_name: str,
    version: int,
    holdout_file: Path,
    scoring: ScoringParams,
    loss_on: str,
    rated: Sequence[Mapping[str, Any]] = (),
) -> tuple[pa.Table, pa.Table | None]:
    """Per-example scores of a registered version on `holdout_file` (today's holdout), on the
    tokens `loss_on` (train.loss_on) trains: those the candidate's evaluation scored; and
    its scores of the `rated` replies (None when there are none)."""
    from retune.model.scoring import score_examples, score_rated

    model, tokenizer = load_version(model_name, version, log_prefix="promote")
    scores = score_examples(
        model,
        tokenizer,
        holdout_file,
        max_examples=scoring.max_examples,
        batch_size=scoring.batch_size,
        max_seq_len=scoring.max_seq_len,
        loss_on=loss_on,
        log_prefix=f"promote: v{version}",
    )
    if not rated:
        return scores, None
    rated_scores = score_rated(
        model,
        tokenizer,
        rated,
        scoring.batch_size,
        scoring.max_seq_len,
        log_prefix=f"promote: v{version}",
    )
    return scores, rated_scores


def rated_for_gate(
    rated: Sequence[Mapping[str, Any]], candidate: pa.Table | None, min_rated: int
) -> list[Mapping[str, Any]]:
    """The held-out rated replies the ratings check uses: those the candidate scored, when
    it scored at least `min_rated` of each label (else none: too few to tell)."""
    if candidate is None:
        return []
    ids, n_tokens = candidate.column("id").to_pylist(), candidate.column("n_tokens").to_pylist()
    scored = {rid for rid, n in zip(ids, n_tokens, strict=True) if n}
    kept = [r for r in rated if str(r["id"]) in scored]
    liked = sum(bool(r["label"]) for r in kept)
    if min(liked, len(kept) - liked) < min_rated:
        return []
    return kept


def _numbers(data: Mapping[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in data.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


def _same_examples(candidate: pa.Table, champion: pa.Table, source: str) -> None:
    """Both models must be scored on the same examples, or the comparison is not paired."""
    cand, champ = set(candidate.column("id").to_pylist()), set(champion.column("id").to_pylist())
    if cand != champ:
        raise GateError(
            f"{source} scores {len(cand)} holdout examples, production was scored on "
            f"{len(champ)} of today's holdout and they share {len(cand & champ)}: the "
            "candidate's scores are not from today's holdout or settings; re-run `evaluate`"
        )


def gate(
    registry: Registry,
    cfg: PromoteParams,
    version: int,
    candidate_metrics: Mapping[str, float],
    candidate_scores: pa.Table | None,
    holdout_file: Path,
    scoring: ScoringParams,
    seed: int,
    decided_by: str,
    forced: bool = False,
    reason: str | None = None,
    scores_source: str = "the candidate",
    loss_on: str = "all",
    rated: Sequence[Mapping[str, Any]] = (),
    candidate_rated: pa.Table | None = None,
) -> PromoteResult:
    """Judge `version` against the current production on `holdout_file`; record and apply.

    Scores production (loaded from the registry) on the holdout with `scoring`, on the tokens
    `loss_on` names (those `candidate_scores` hold), bootstraps
    the paired difference against `candidate_scores`, decides, tags the version with the
    decision and moves the alias the decision names (recorded in the promotion history).
    `candidate_scores` None (forced only) skips the comparison, and so does a candidate whose
    training diverged (`retune.release.gate.diverged`): it is rejected with that reason.
    With users' held-out `rated` replies and the candidate's scores of them (`candidate_rated`,
    from evaluate), production scores them too and the ratings check joins the decision
    (`retune.release.gate.compare_ratings`), given `cfg.min_rated` of each label.
    """
    from retune.model.scoring import aggregate

    production = registry.production()
    if production == version:
        raise RegistryError(f"{registry.model_name} v{version} is already production")
    champion_metrics: dict[str, float] | None = None
    comparison: Comparison | None = None
    ratings: RatingsComparison | None = None
    checked = rated_for_gate(rated, candidate_rated, cfg.min_rated)
    # A diverged candidate is rejected on its own figures: comparing infinities would say
    # nothing (and scoring production for it is wasted time).
    divergence = diverged(candidate_metrics)
    if production is not None and candidate_scores is not None and divergence is None:
        champion_scores, champion_rated = score_registered(
            registry.model_name, production, holdout_file, scoring, loss_on, checked
        )
        _same_examples(candidate_scores, champion_scores, scores_source)
        champion_metrics = _numbers(aggregate(champion_scores))
        comparison = compare(
            candidate_scores,
            champion_scores,
            cfg.confidence,
            cfg.bootstrap_samples,
            seed,
            metric=cfg.metric,
        )
        if champion_rated is not None and candidate_rated is not None:
            ratings = compare_ratings(
                candidate_rated, champion_rated, cfg.confidence, cfg.bootstrap_samples, seed
            )
    elif production is not None:
        # Production exists and was not scored (forced with no holdout, or a diverged candidate).
        champion_metrics = {}

    decision: Decision = decide(
        candidate_metrics,
        champion_metrics,
        comparison,
        cfg,
        forced=forced,
        reason=reason,
        compared_version=production,
        ratings=ratings,
    )
    registry.record_decision(
        version,
        decision,
        candidate_metrics,
        champion_metrics,
        production,
        decided_by,
        ratings=ratings.to_dict() if ratings is not None else None,
    )
    if decision.alias is not None:
        registry.move_alias(
            decision.alias,
            version,
            kind=decision.outcome,
            why=decision.reason,
            forced=decision.forced,
            actor=decided_by,
        )
    return PromoteResult(
        model_name=registry.model_name,
        version=version,
        outcome=decision.outcome,
        reason=decision.reason,
        metric=cfg.metric,
        unit=UNITS[cfg.metric],
        forced=decision.forced,
        alias=decision.alias,
        not_applicable=list(decision.not_applicable),
        compared_version=production,
        production=registry.production(),
        candidate_metrics=dict(candidate_metrics),
        champion_metrics=champion_metrics,
        comparison=comparison.to_dict() if comparison is not None else None,
        decided_by=decided_by,
        ratings=ratings.to_dict() if ratings is not None else None,
    )


def _log_to_pipeline_run(params: Params, result: PromoteResult) -> None:
    """Add the decision to the pipeline's MLflow run (the one `train` started), if known."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    run_id = pipeline_run_id(params)
    if not run_id:
        return
    client = MlflowClient()
    tags = {
        "gate.decision": result.outcome,
        "gate.reason": result.reason[:4_000],
        "gate.version": str(result.version),
        "gate.compared_version": str(result.compared_version or "none"),
        "gate.production": str(result.production or "none"),
    }
    logged = (
        "improvement",
        "ci_low",
        "ci_high",
        "relative_improvement",
        "champion_perplexity",
        "champion_bits_per_byte",
    )
    metrics = {
        f"gate.{k}": float(v)
        for k, v in (result.comparison or {}).items()
        if k in logged and v is not None
    }
    if result.ratings:
        metrics |= {
            f"gate.ratings_{k}": float(result.ratings[k]) for k in ("auc", "ci_low", "ci_high")
        }
    try:
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
        for key, number in metrics.items():
            client.log_metric(run_id, key, number)
    except MlflowException as exc:
        print(f"promote: could not add the decision to MLflow run {run_id}: {exc}", flush=True)


def run(params: Params) -> PromoteResult:
    """Edge: judge the version `register` just added (reports/register.json) with its
    evaluation (reports/evaluate.json, reports/holdout_scores.parquet) against production;
    write reports/promote.json. A rejection is a result, not an error."""
    import pyarrow.parquet as pq

    registered = REGISTER_REPORT.read(params)
    evaluation = EVALUATE_REPORT.read(params)
    scores_file = HOLDOUT_SCORES.require(params)
    train_run = pipeline_run_id(params)
    if train_run and registered.get("run_id") != train_run:
        raise RetuneError(
            f"{REGISTER_REPORT.path(params)} is from MLflow run {registered.get('run_id')}, but "
            f"{TRAIN_REPORT.path(params)} from {train_run}: re-run `register` for the current "
            "model"
        )
    registry = Registry.open(params.tracking, str(registered["model_name"]))
    result = gate(
        registry,
        params.promote,
        int(registered["version"]),
        _numbers(evaluation),
        pq.read_table(scores_file),
        HOLDOUT_SPLIT.path(params),
        params.scoring,
        params.seed,
        decided_by=GATE_ACTOR,
        scores_source=str(scores_file),
        loss_on=params.train.loss_on,
        rated=set_rows(PREFERENCE_SET.path(params), "kto", "holdout"),
        candidate_rated=(
            pq.read_table(RATED_SCORES.path(params))
            if RATED_SCORES.path(params).is_file()
            else None
        ),
    )
    PROMOTE_REPORT.write(params, result.report())
    _log_to_pipeline_run(params, result)
    print(f"promote: {result.verdict}", flush=True)
    return result


def _version_metrics(tags: Mapping[str, str]) -> dict[str, float]:
    """The metrics register tagged the version with (from its own evaluation)."""
    out: dict[str, float] = {}
    for key, value in tags.items():
        if "." in key or key in ("run_id", "git_commit", "data_version"):
            continue  # params.*, gate.* and provenance
        try:
            out[key] = float(value)
        except ValueError:
            continue
    return out


def promote_version(
    params: Params, version: int, actor: str, force: bool = False, reason: str | None = None
) -> PromoteResult:
    """A person's promotion of `version` (`retune promote`): the gate, with both models scored
    on today's holdout, and production moved only if it passes; `force` (with `reason`)
    overrides and is recorded as forced. `promote.mode` does not apply: a person asked for
    production.

    Perplexity and accuracy are measured afresh; metrics of generated replies (unsafe_share,
    ...) are the version's own, from the evaluation it was registered with.
    """
    from retune.model.scoring import aggregate

    if force and not (reason and reason.strip()):
        raise GateError('--force needs --reason "..." (it is recorded with the promotion)')
    registry = Registry.open(params.tracking, params.register.model_name)
    info = registry.version(version)
    holdout_file = HOLDOUT_SPLIT.path(params)
    scoring = params.scoring
    candidate_scores = candidate_rated = None
    rated = set_rows(PREFERENCE_SET.path(params), "kto", "holdout")
    metrics = _version_metrics(info.tags)
    if registry.production() == version:
        raise RegistryError(f"{registry.model_name} v{version} is already production")
    if holdout_file.exists():
        candidate_scores, candidate_rated = score_registered(
            registry.model_name, version, holdout_file, scoring, params.train.loss_on, rated
        )
        metrics.update(_numbers(aggregate(candidate_scores)))
    elif not force:
        raise RetuneError(
            f"{holdout_file}: missing, so there is no holdout of today to judge v{version} on; "
            "run the pipeline first (`retune run`), or override with --force --reason"
        )
    return gate(
        registry,
        dataclasses.replace(params.promote, mode="auto"),
        version,
        metrics,
        candidate_scores,
        holdout_file,
        scoring,
        params.seed,
        decided_by=actor,
        forced=force,
        reason=reason,
        loss_on=params.train.loss_on,
        rated=rated,
        candidate_rated=candidate_rated,
    )


promote_task = stage_task(run, name="promote")

if __name__ == "__main__":
    stage_main(run)
