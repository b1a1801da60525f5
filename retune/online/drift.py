"""Drift statistics: is the current window of feedback or prompts unlike its reference?

Pure functions on plain numbers (no I/O, no model); `tasks.drift` gathers the windows and
`flows.drift` acts on the verdict. The tests are scipy's: Fisher's exact test on the 2x2 table of
negative/other ratings (the two-proportion test, one-sided) and the two-sample Kolmogorov-Smirnov
test on distributions. A check with too few observations says "not enough data", never drift.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

Status = Literal["drift", "no drift", "not enough data"]
DRIFT: Status = "drift"
NO_DRIFT: Status = "no drift"
NOT_ENOUGH_DATA: Status = "not enough data"

# The checks of a drift run, in order: production's ratings, then its users' prompts.
CHECKS = ("quality", "perplexity", "prompt_length")
# Drift checks are runs of the MLflow experiment `<tracking.experiment>-<this>`. Their tags say
# what each check saw, and on the run whose drift was acted on (the event emitted), when and
# with which event: the store outlives deployment runs.
EXPERIMENT_SUFFIX = "drift"
STATUS_TAG = "drift.status"
EVIDENCE_TAG = "drift.evidence"
ACTED_TAG = "drift.acted_on"
ACTED_AT_TAG = "drift.acted_at"
EVENT_TAG = "drift.event_id"


@dataclass(frozen=True)
class Check:
    """The verdict of one drift check, with the evidence it rests on."""

    name: str
    status: Status
    test: str
    n_current: int
    n_reference: int
    reason: str
    statistic: float | None = None
    p_value: float | None = None
    # Quality: the rise in negative share (points); distributions: the KS statistic D.
    effect: float | None = None
    figures: dict[str, float] = field(default_factory=dict)

    @property
    def drift(self) -> bool:
        return self.status == DRIFT

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _finite(value: float) -> float | None:
    """JSON and MLflow have no infinity (an odds ratio with a zero cell is one)."""
    value = float(value)
    return value if math.isfinite(value) else None


def split_window(values: Sequence[Any], window: int, reference: int) -> tuple[list[Any], list[Any]]:
    """(current, reference) of a chronological series: the newest `window` values, and the
    oldest `reference` values before them.

    The reference is the series' start (for ratings: how the production version was rated when
    it went live), not the stretch just before the window, so a slow decline cannot drag its
    own baseline down with it.
    """
    items = list(values)
    cut = max(0, len(items) - window)
    return items[cut:], items[:cut][:reference]


def negative_share_drift(
    current: Sequence[bool],
    reference: Sequence[bool],
    *,
    alpha: float,
    min_ratings: int,
    min_increase: float,
    name: str = "quality",
) -> Check:
    """Has the share of negative ratings risen from `reference` to `current`?

    Fisher's exact test (one-sided: only a rise is drift) on the 2x2 table of negative and other
    ratings in each window. Drift needs p < `alpha` and a rise of at least `min_increase` (share
    points), so a large window does not flag a rise too small to matter.
    """
    from scipy.stats import fisher_exact

    n_cur, n_ref = len(current), len(reference)
    test = "Fisher's exact test, one-sided (negative share rose)"
    if n_cur < min_ratings or n_ref < min_ratings:
        return Check(
            name,
            NOT_ENOUGH_DATA,
            test,
            n_cur,
            n_ref,
            f"{n_cur} ratings in the window and {n_ref} in the reference; each needs at least "
            f"drift.min_ratings={min_ratings}",
        )
    neg_cur, neg_ref = int(sum(map(bool, current))), int(sum(map(bool, reference)))
    share_cur, share_ref = neg_cur / n_cur, neg_ref / n_ref
    result = fisher_exact([[neg_cur, n_cur - neg_cur], [neg_ref, n_ref - neg_ref]], "greater")
    p_value, increase = float(result.pvalue), share_cur - share_ref
    drifted = p_value < alpha and increase >= min_increase
    reason = (
        f"negative share {share_cur:.1%} in the window vs {share_ref:.1%} in the reference "
        f"(+{increase * 100:.1f} points, p={p_value:.2g}; drift needs p < {alpha} and at least "
        f"+{min_increase * 100:.1f} points)"
    )
    return Check(
        name,
        DRIFT if drifted else NO_DRIFT,
        test,
        n_cur,
        n_ref,
        reason,
        statistic=_finite(result.statistic),  # the odds ratio
        p_value=p_value,
        effect=increase,
        figures={
            "negative_share": share_cur,
            "reference_negative_share": share_ref,
            "negative": float(neg_cur),
            "reference_negative": float(neg_ref),
        },
    )


def distribution_drift(
    name: str,
    current: Sequence[float] | np.ndarray,
    reference: Sequence[float] | np.ndarray,
    *,
    alpha: float,
    min_current: int,
    min_reference: int,
    min_statistic: float,
    unit: str = "",
) -> Check:
    """Do `current` and `reference` come from different distributions?

    The two-sample Kolmogorov-Smirnov test (two-sided: a shift either way is a change of input).
    Drift needs p < `alpha` and KS statistic D >= `min_statistic` (the largest gap between the
    two cumulative distributions, 0..1), the minimum effect worth acting on.
    """
    from scipy.stats import ks_2samp

    cur = np.asarray(current, dtype=float)
    ref = np.asarray(reference, dtype=float)
    test = "two-sample Kolmogorov-Smirnov test"
    if cur.size < min_current or ref.size < min_reference:
        return Check(
            name,
            NOT_ENOUGH_DATA,
            test,
            int(cur.size),
            int(ref.size),
            f"{cur.size} values in the window and {ref.size} in the reference; they need at "
            f"least {min_current} and {min_reference}",
        )
    result = ks_2samp(cur, ref)
    d, p_value = float(result.statistic), float(result.pvalue)
    med_cur, med_ref = float(np.median(cur)), float(np.median(ref))
    drifted = p_value < alpha and d >= min_statistic
    suffix = f" {unit}" if unit else ""
    reason = (
        f"median {med_cur:.3g}{suffix} in the window vs {med_ref:.3g}{suffix} in the "
        f"reference (KS D={d:.3f}, p={p_value:.2g}; drift needs p < {alpha} and D >= "
        f"{min_statistic})"
    )
    return Check(
        name,
        DRIFT if drifted else NO_DRIFT,
        test,
        int(cur.size),
        int(ref.size),
        reason,
        statistic=d,
        p_value=p_value,
        effect=d,
        figures={
            "median": med_cur,
            "reference_median": med_ref,
            "mean": float(cur.mean()),
            "reference_mean": float(ref.mean()),
        },
    )


def overall(checks: Iterable[Check]) -> Status:
    """The run's verdict: drift if any check found drift, no drift if at least one had the
    data to say so, otherwise not enough data."""
    statuses = {c.status for c in checks}
    if DRIFT in statuses:
        return DRIFT
    return NO_DRIFT if NO_DRIFT in statuses else NOT_ENOUGH_DATA


def rolling_share(flags: Sequence[bool], size: int) -> np.ndarray:
    """The share of true values in each run of `size` consecutive flags (a trailing mean; the
    first values average what there is so far), for plotting a rate over time."""
    x = np.asarray(flags, dtype=float)
    if x.size == 0:
        return x
    sums = np.cumsum(x)
    out = np.empty_like(x)
    head = min(size, x.size)
    out[:head] = sums[:head] / np.arange(1, head + 1)
    if x.size > size:
        out[size:] = (sums[size:] - sums[:-size]) / size
    return out


# What each check reads: a drift found again in data that has not changed since it was acted on
# is the same drift, and acting on it again (another retrain) would change nothing.
CHECK_SOURCES = {"quality": "ratings", "perplexity": "prompts", "prompt_length": "prompts"}


@dataclass(frozen=True)
class Evidence:
    """What a drift check saw: production's version, and the newest rating (of production)
    and newest prompt in its window, each by id and time (None when there was none)."""

    production_version: int | None
    newest_rating_id: str | None = None
    newest_rating_at: str | None = None
    newest_prompt_id: str | None = None
    newest_prompt_at: str | None = None

    def newest(self, source: str) -> tuple[str | None, str | None]:
        """(id, time) of the newest observation of `source` ("ratings" or "prompts")."""
        if source == "ratings":
            return self.newest_rating_id, self.newest_rating_at
        return self.newest_prompt_id, self.newest_prompt_at

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Evidence:
        return cls(**{f: data.get(f) for f in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Action:
    """A drift that was acted on: the drift event was emitted for `evidence`."""

    evidence: Evidence
    at: str  # when (ISO 8601, UTC)
    run_id: str  # the MLflow run of the check that emitted it
    event_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "evidence": self.evidence.to_dict()}


def new_evidence(current: Evidence, acted: Evidence, drifted: Iterable[str]) -> list[str]:
    """What is new since `acted` for the checks that found drift now: "production" (another
    version went live), "ratings" and/or "prompts" (newer ones than then). Empty: the drift
    was already acted on, and acting again would repeat the same response to the same data."""
    if current.production_version != acted.production_version:
        return ["production"]
    sources = dict.fromkeys(CHECK_SOURCES.get(name, "ratings") for name in drifted)
    return [s for s in sources if current.newest(s) != acted.newest(s)]


def waiting_for(drifted: Iterable[str]) -> str:
    """The data a drift already acted on waits for: "new ratings", "new prompts" or both."""
    sources = sorted(dict.fromkeys(CHECK_SOURCES.get(name, "ratings") for name in drifted))
    return "new " + "/".join(sources or ["ratings", "prompts"])
