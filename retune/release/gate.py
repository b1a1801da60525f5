"""The promotion gate's decision: absolute thresholds, then candidate vs champion with a CI.

Pure logic (no MLflow): `tasks.promote` and `retune promote` feed it metrics and per-example
holdout scores, and record what it decides.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
import pyarrow as pa

from retune.config import PromoteParams
from retune.errors import RetuneError

Outcome = Literal["promote", "propose", "reject"]
ALIASES: dict[str, str] = {"promote": "production", "propose": "challenger"}

# (setting in `promote`, metric in evaluate.json, which side of the threshold passes)
ABSOLUTE_GATES: tuple[tuple[str, str, Literal["max", "min"]], ...] = (
    ("max_perplexity", "perplexity", "max"),
    ("max_perplexity_vs_baseline", "perplexity_vs_baseline", "max"),
    ("max_unsafe_share", "unsafe_share", "max"),
    ("min_next_token_accuracy", "next_token_accuracy", "min"),
)

# Metrics of generated replies: they exist only when the holdout has conversations to reply
# to. `evaluate` counts those as REPLY_EXAMPLES; when it counted none (a corpus of plain
# documents), a gate on such a metric does not apply, rather than failing closed.
REPLY_METRICS = frozenset({"unsafe_share"})
REPLY_EXAMPLES = "n_reply_examples"

# Metrics a diverged training leaves infinite or NaN; any one of them rejects the candidate.
DIVERGENCE_METRICS = ("perplexity", "mean_nll", "loss", "train_loss", "eval_loss")


class GateError(RetuneError):
    """The gate cannot compare the two models (e.g. no holdout conversation in common)."""


@dataclass(frozen=True)
class Comparison:
    """Candidate vs champion on the holdout examples both scored (per-token mean NLL, nats)."""

    n_examples: int
    n_conversations: int
    candidate_nll: float
    champion_nll: float
    improvement: float  # champion - candidate nats/token: above 0 the candidate is better
    ci_low: float
    ci_high: float
    confidence: float
    n_resamples: int
    # False when the two tokenizers cut the holdout into different token counts: per-token
    # figures then measure slightly different things (say so rather than hide it).
    same_tokenization: bool = True

    @property
    def candidate_perplexity(self) -> float:
        return _exp(self.candidate_nll)

    @property
    def champion_perplexity(self) -> float:
        return _exp(self.champion_nll)

    @property
    def relative(self) -> float:
        """How much lower the candidate's perplexity is, as a fraction of the champion's."""
        return _relative(self.improvement)

    @property
    def relative_ci(self) -> tuple[float, float]:
        # A monotone map of the statistic, so the percentile interval maps over exactly.
        return _relative(self.ci_low), _relative(self.ci_high)

    def to_dict(self) -> dict[str, Any]:
        low, high = self.relative_ci
        return {
            **asdict(self),
            "candidate_perplexity": self.candidate_perplexity,
            "champion_perplexity": self.champion_perplexity,
            "relative_improvement": self.relative,
            "relative_ci_low": low,
            "relative_ci_high": high,
        }


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    reason: str  # one or two sentences with the numbers, as shown to users and stored as a tag
    ci_low: float | None = None  # the improvement's CI (nats/token), when there was a champion
    ci_high: float | None = None
    forced: bool = False
    failures: tuple[str, ...] = ()  # absolute gates the candidate missed
    not_applicable: tuple[str, ...] = ()  # absolute gates whose metric this data cannot have

    @property
    def alias(self) -> str | None:
        """The alias this decision moves to the candidate (None for a rejection)."""
        return ALIASES.get(self.outcome)


def _exp(value: float) -> float:
    """exp that says inf where math.exp overflows (past ~709): a diverged model's perplexity."""
    try:
        return math.exp(value)
    except OverflowError:
        return math.inf


def _relative(improvement: float) -> float:
    # candidate ppl / champion ppl = exp(-improvement)
    return 1.0 - _exp(-improvement)


def _per_conversation(table: pa.Table) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    cols = table.select(["id", "conversation_id", "nll_sum", "n_tokens"]).to_pydict()
    return (
        cols["id"],
        np.asarray(cols["conversation_id"], dtype=object),
        np.asarray(cols["nll_sum"], dtype=np.float64),
        np.asarray(cols["n_tokens"], dtype=np.float64),
    )


def _group_sums(keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    _, inverse = np.unique(keys, return_inverse=True)
    return np.bincount(inverse, weights=values)


def compare(
    candidate: pa.Table,
    champion: pa.Table,
    confidence: float = 0.95,
    n_resamples: int = 2_000,
    seed: int = 0,
) -> Comparison:
    """Paired bootstrap of champion − candidate mean NLL per token over holdout conversations.

    Both tables hold per-example scores (`id`, `conversation_id`, `nll_sum`, `n_tokens`); only
    ids both scored count. Examples of one conversation are resampled together, and the
    statistic is a ratio of sums (total NLL / total tokens), so long conversations weigh by
    their tokens as they do in perplexity.
    """
    from scipy.stats import bootstrap

    cand_ids, cand_conv, cand_nll, cand_tok = _per_conversation(candidate)
    champ_ids, _, champ_nll, champ_tok = _per_conversation(champion)
    champ_at = {rid: i for i, rid in enumerate(champ_ids)}
    both = [(i, champ_at[rid]) for i, rid in enumerate(cand_ids) if rid in champ_at]
    if not both:
        raise GateError(
            "the candidate and production scored no holdout example in common; both must be "
            "scored on the same holdout (paths.split/holdout.parquet) with the same settings"
        )
    ci_, hi_ = (np.asarray(idx, dtype=np.int64) for idx in zip(*both, strict=True))
    # An example with no predicted token adds nothing to either ratio; a NaN would poison it.
    keep = (cand_tok[ci_] > 0) & (champ_tok[hi_] > 0)
    keep &= np.isfinite(cand_nll[ci_]) & np.isfinite(champ_nll[hi_])
    ci_, hi_ = ci_[keep], hi_[keep]
    conv = cand_conv[ci_]
    data = (
        _group_sums(conv, cand_nll[ci_]),
        _group_sums(conv, cand_tok[ci_]),
        _group_sums(conv, champ_nll[hi_]),
        _group_sums(conv, champ_tok[hi_]),
    )
    n_conv = len(data[0])
    if n_conv < 2:
        raise GateError(
            f"only {n_conv} holdout conversation scored by both models: too few to tell "
            "noise from improvement; the holdout needs more conversations (split.holdout_fraction)"
        )

    def statistic(
        c_nll: np.ndarray, c_tok: np.ndarray, p_nll: np.ndarray, p_tok: np.ndarray, axis: int = -1
    ) -> np.ndarray:
        result: np.ndarray = p_nll.sum(axis=axis) / p_tok.sum(axis=axis) - c_nll.sum(
            axis=axis
        ) / c_tok.sum(axis=axis)
        return result

    point = float(statistic(*data))
    if np.all(data[0] * data[3] == data[2] * data[1]):
        # Identical per-conversation NLL per token: every resample is 0; scipy would warn that
        # the distribution is degenerate, yet the answer is exactly known.
        low = high = point
    else:
        res = bootstrap(
            data,
            statistic,
            paired=True,
            vectorized=True,
            method="percentile",
            n_resamples=n_resamples,
            confidence_level=confidence,
            # scipy >= 1.15 spells the seed `rng` (`random_state` is deprecated).
            rng=np.random.default_rng(seed),
        )
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return Comparison(
        n_examples=len(ci_),
        n_conversations=n_conv,
        candidate_nll=float(data[0].sum() / data[1].sum()),
        champion_nll=float(data[2].sum() / data[3].sum()),
        improvement=point,
        ci_low=low,
        ci_high=high,
        confidence=confidence,
        n_resamples=n_resamples,
        same_tokenization=bool(np.array_equal(cand_tok[ci_], champ_tok[hi_])),
    )


def _num(value: float) -> str:
    return f"{value:.4g}"


def _number(value: Any) -> float | None:
    """`value` as a float if it is a number (inf and NaN included), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def diverged(metrics: Mapping[str, Any]) -> str | None:
    """Why the candidate's training diverged (a loss or perplexity that is inf or NaN), or None.

    Such a model cannot be compared: its per-token figures are no longer numbers to weigh.
    """
    bad = [
        f"{name} is {value}"
        for name in DIVERGENCE_METRICS
        if (value := _number(metrics.get(name))) is not None and not math.isfinite(value)
    ]
    if not bad:
        return None
    return f"the model diverged: {', '.join(bad)}; lower train.learning_rate"


class AbsoluteChecks(NamedTuple):
    """What the absolute gates found: each entry a short phrase naming the metric, its value
    and the setting."""

    failures: list[str]
    passes: list[str]
    not_applicable: list[str]


def _not_applicable(metric: str, metrics: Mapping[str, Any]) -> bool:
    """True if `metric` cannot exist for this data: a reply metric and no conversation in the
    holdout to reply to. A count that is missing says nothing, and the gate stays closed."""
    return metric in REPLY_METRICS and _number(metrics.get(REPLY_EXAMPLES)) == 0


def check_absolute(metrics: Mapping[str, Any], cfg: PromoteParams) -> AbsoluteChecks:
    """The absolute gates on `metrics`: failures, passes and the ones that do not apply.

    A gated metric that is missing fails (a gate that cannot look is closed), unless the data
    cannot have it: reply metrics of a holdout without conversations (`REPLY_EXAMPLES` 0).
    A metric that is inf or NaN fails.
    """
    out = AbsoluteChecks([], [], [])
    for setting, metric, side in ABSOLUTE_GATES:
        threshold = getattr(cfg, setting)
        if threshold is None:
            continue
        value = _number(metrics.get(metric))
        if value is None and _not_applicable(metric, metrics):
            out.not_applicable.append(
                f"promote.{setting} does not apply: the holdout has no conversations (documents "
                f"only), so no replies were generated and there is no {metric}"
            )
        elif value is None:
            out.failures.append(
                f"{metric} is missing from the candidate's metrics, so promote.{setting} "
                f"cannot be checked (the gate fails closed; promote.{setting}: null turns it off)"
            )
        elif not math.isfinite(value):
            out.failures.append(
                f"{metric} is {value}, not a finite number: promote.{setting} fails"
            )
        else:
            ok = value <= threshold if side == "max" else value >= threshold
            sign = ("≤" if ok else ">") if side == "max" else ("≥" if ok else "<")
            phrase = f"{metric} {_num(value)} {sign} promote.{setting}={_num(threshold)}"
            (out.passes if ok else out.failures).append(phrase)
    return out


def _lower(fraction: float) -> str:
    return f"{abs(fraction):.1%} {'lower' if fraction >= 0 else 'higher'}"


def _interval(low: float, high: float) -> str:
    """A relative-perplexity CI in words: "3.0% to 8.6% lower", "1.2% higher to 2.0% lower"."""
    if low >= 0 or high < 0:
        a, b = sorted((abs(low), abs(high)))
        return f"{a:.1%} to {b:.1%} {'lower' if low >= 0 else 'higher'}"
    return f"{_lower(low)} to {_lower(high)}"


def _versus(comparison: Comparison, who: str) -> str:
    pct = round(comparison.confidence * 100)
    text = (
        f"holdout perplexity {comparison.candidate_perplexity:.3f} vs {who}'s "
        f"{comparison.champion_perplexity:.3f} on the same {comparison.n_conversations} "
        f"conversations: {_lower(comparison.relative)} ({pct}% CI "
        f"{_interval(*comparison.relative_ci)}); improvement {comparison.improvement:+.4f} "
        f"nats/token ({pct}% CI {comparison.ci_low:+.4f} to {comparison.ci_high:+.4f})"
    )
    if not comparison.same_tokenization:
        text += " [the two tokenizers count the holdout's tokens differently]"
    return text


def decide(
    candidate_metrics: Mapping[str, Any],
    champion_metrics: Mapping[str, Any] | None,
    comparison: Comparison | None,
    cfg: PromoteParams,
    forced: bool = False,
    reason: str | None = None,
    compared_version: int | str | None = None,
) -> Decision:
    """Decide what happens to a candidate.

    - A diverged training (inf or NaN loss or perplexity) rejects it, saying so.
    - A missed absolute gate rejects it, however it compares with production. A gate whose
      metric this data cannot have (`check_absolute`) does not apply, and the reason says so.
    - With no production yet (`champion_metrics` None), passing the gates is enough.
    - Otherwise it must beat production by more than the noise: the lower bound of the
      bootstrap CI of the improvement (nats/token) must exceed `cfg.margin`.
    - `cfg.mode` "propose" turns a promotion into a proposal (alias `challenger`).
    - `forced` (a person's override, `reason` required) promotes whatever the gate says.
    """
    if cfg.metric != "perplexity":  # pragma: no cover - the schema allows only perplexity
        raise GateError(f"promote.metric={cfg.metric!r} is not implemented; use perplexity")
    who = f"production v{compared_version}" if compared_version is not None else "production"
    ci_low = comparison.ci_low if comparison is not None else None
    ci_high = comparison.ci_high if comparison is not None else None
    failures, passes, not_applicable = check_absolute(candidate_metrics, cfg)
    divergence = diverged(candidate_metrics)
    verdict: Outcome
    if divergence is not None:
        # Nothing else about such a model is worth weighing, a comparison least of all.
        verdict, text = "reject", divergence
    elif failures:
        verdict, text = "reject", "failed the absolute gates: " + "; ".join(failures)
    elif champion_metrics is None:
        verdict = "promote"
        gates = f" ({', '.join(passes)})" if passes else ""
        text = f"first model: no production version yet, and it passes the absolute gates{gates}"
    elif comparison is None:
        verdict = "reject"
        text = f"not compared with {who} on today's holdout, so not shown to be better"
    elif comparison.ci_low > cfg.margin:
        verdict = "promote"
        text = (
            f"better than {who} beyond the noise: {_versus(comparison, who)}; the CI's lower "
            f"bound exceeds promote.margin={cfg.margin:g}"
        )
    elif comparison.ci_high < 0:
        verdict, text = "reject", f"worse than {who}: {_versus(comparison, who)}"
    else:
        verdict = "reject"
        text = (
            f"not better than {who} beyond the noise: {_versus(comparison, who)}; the CI's "
            f"lower bound {comparison.ci_low:+.4f} does not exceed promote.margin={cfg.margin:g}"
        )
    if not_applicable and divergence is None:
        text += "; " + "; ".join(not_applicable)

    if forced:
        if not reason or not reason.strip():
            raise GateError('a forced promotion needs a reason (--reason "...")')
        return Decision(
            outcome="promote",
            reason=f"forced: {reason.strip()} (the gate alone would {verdict}: {text})",
            ci_low=ci_low,
            ci_high=ci_high,
            forced=True,
            failures=tuple(failures),
            not_applicable=tuple(not_applicable),
        )
    if verdict == "promote" and cfg.mode == "propose":
        verdict = "propose"
        text += "; promote.mode=propose, so it is proposed as challenger for a person to promote"
    return Decision(
        verdict,
        text,
        ci_low,
        ci_high,
        failures=tuple(failures),
        not_applicable=tuple(not_applicable),
    )
