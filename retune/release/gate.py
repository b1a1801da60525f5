"""The promotion gate's decision: absolute thresholds, then candidate vs champion with a CI.

Pure logic (no MLflow): `tasks.promote` and `retune promote` feed it metrics and per-example
holdout scores, and record what it decides. The comparison is in bits per byte by default, so
a candidate whose tokenizer differs from production's is judged on the same text, not tokens.
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
# The unit of each `promote.metric`'s comparison (its improvement, CI and promote.margin).
UNITS: dict[str, str] = {"bits_per_byte": "bits/byte", "perplexity": "nats/token"}

# (setting in `promote`, metric in evaluate.json, which side of the threshold passes)
ABSOLUTE_GATES: tuple[tuple[str, str, Literal["max", "min"]], ...] = (
    ("max_perplexity", "perplexity", "max"),
    ("max_perplexity_vs_baseline", "perplexity_vs_baseline", "max"),
    ("max_bits_per_byte", "bits_per_byte", "max"),
    ("max_unsafe_share", "unsafe_share", "max"),
    ("min_next_token_accuracy", "next_token_accuracy", "min"),
)

# Metrics of generated replies: they exist only when the holdout has conversations to reply
# to. `evaluate` counts those as REPLY_EXAMPLES; when it counted none (a corpus of plain
# documents), a gate on such a metric does not apply, rather than failing closed.
REPLY_METRICS = frozenset({"unsafe_share"})
REPLY_EXAMPLES = "n_reply_examples"

# Metrics a diverged training leaves infinite or NaN; any one of them rejects the candidate.
# (bits_per_byte is NaN or inf exactly when mean_nll is: naming it too would add nothing.)
DIVERGENCE_METRICS = ("perplexity", "mean_nll", "loss", "train_loss", "eval_loss")


class GateError(RetuneError):
    """The gate cannot compare the two models (e.g. no holdout conversation in common)."""


@dataclass(frozen=True)
class Comparison:
    """Candidate vs champion on the holdout examples both scored.

    `improvement` and its CI are in the unit of `metric` (`unit`): bits per UTF-8 byte of the
    scored text (bits_per_byte), or mean NLL in nats per token (perplexity). Each model's own
    per-token figure is kept either way, and its bits per byte when the scores have bytes.
    """

    metric: str  # promote.metric: bits_per_byte or perplexity
    n_examples: int
    n_conversations: int
    candidate_nll: float  # nats per token, over the model's own tokens
    champion_nll: float
    candidate_bits_per_byte: float | None  # None: scores without byte counts (perplexity only)
    champion_bits_per_byte: float | None
    improvement: float  # champion - candidate in `unit`: above 0 the candidate is better
    ci_low: float
    ci_high: float
    confidence: float
    n_resamples: int
    # False when the two tokenizers cut the holdout into different token counts: per-token
    # figures then measure different things (say so rather than hide it).
    same_tokenization: bool = True
    # False when the two scored different text (their windows or chat templates differ).
    same_bytes: bool = True

    @property
    def unit(self) -> str:
        return UNITS[self.metric]

    @property
    def candidate_perplexity(self) -> float:
        return _exp(self.candidate_nll)

    @property
    def champion_perplexity(self) -> float:
        return _exp(self.champion_nll)

    @property
    def relative(self) -> float:
        """How much lower the candidate's perplexity (perplexity) or bits per byte
        (bits_per_byte) is, as a fraction of the champion's."""
        return self._relative(self.improvement)

    @property
    def relative_ci(self) -> tuple[float, float]:
        # A monotone map of the statistic, so the percentile interval maps over exactly.
        return self._relative(self.ci_low), self._relative(self.ci_high)

    def _relative(self, improvement: float) -> float:
        if self.metric == "perplexity":
            return _relative(improvement)
        champion = self.champion_bits_per_byte
        return improvement / champion if champion else math.nan

    def to_dict(self) -> dict[str, Any]:
        low, high = self.relative_ci
        return {
            **asdict(self),
            "unit": self.unit,
            "candidate_perplexity": self.candidate_perplexity,
            "champion_perplexity": self.champion_perplexity,
            "relative_improvement": self.relative,
            "relative_ci_low": low,
            "relative_ci_high": high,
        }


@dataclass(frozen=True)
class RatingsComparison:
    """How the candidate moved against production on users' held-out ratings.

    Per rated reply, the gain is how much likelier the candidate finds it than production does
    (production's NLL minus the candidate's, in nats, of the same text: tokenizer-free). `auc`
    is the share of (liked, disliked) reply pairs whose liked reply gained more (ties count
    half): 0.5 when the candidate moved no differently on the two, above it when it moved
    toward what users liked. The CI is a percentile bootstrap, each label resampled apart."""

    n_desirable: int
    n_undesirable: int
    auc: float
    ci_low: float
    ci_high: float
    confidence: float
    n_resamples: int
    mean_gain_desirable: float  # nats per reply
    mean_gain_undesirable: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _auc(liked: np.ndarray, disliked: np.ndarray) -> np.ndarray:
    """Share of pairs with the liked value above the disliked (ties half), along the last
    axis: rows of resamples at once."""
    from scipy.stats import rankdata

    both = np.concatenate([liked, disliked], axis=-1)
    ranks = rankdata(both, axis=-1)
    n_liked, n_disliked = liked.shape[-1], disliked.shape[-1]
    u = ranks[..., :n_liked].sum(axis=-1) - n_liked * (n_liked + 1) / 2
    result: np.ndarray = u / (n_liked * n_disliked)
    return result


def compare_ratings(
    candidate: pa.Table,
    champion: pa.Table,
    confidence: float = 0.95,
    n_resamples: int = 2_000,
    seed: int = 0,
) -> RatingsComparison | None:
    """Candidate vs champion on held-out rated replies (`retune.model.scoring.RATED_SCHEMA`,
    matched by id; a reply either window cut off is left out). None without a reply of each
    label in common."""
    champ = {
        rid: (nll, n)
        for rid, nll, n in zip(
            champion.column("id").to_pylist(),
            champion.column("nll_sum").to_pylist(),
            champion.column("n_tokens").to_pylist(),
            strict=True,
        )
    }
    gains: dict[bool, list[float]] = {True: [], False: []}
    for rid, label, nll, n in zip(
        candidate.column("id").to_pylist(),
        candidate.column("label").to_pylist(),
        candidate.column("nll_sum").to_pylist(),
        candidate.column("n_tokens").to_pylist(),
        strict=True,
    ):
        other = champ.get(rid)
        if other is None or not n or not other[1] or not math.isfinite(nll + other[0]):
            continue
        gains[bool(label)].append(other[0] - nll)
    liked, disliked = np.asarray(gains[True]), np.asarray(gains[False])
    if not len(liked) or not len(disliked):
        return None
    rng = np.random.default_rng(seed)
    resampled = _auc(
        liked[rng.integers(0, len(liked), (n_resamples, len(liked)))],
        disliked[rng.integers(0, len(disliked), (n_resamples, len(disliked)))],
    )
    tail = (1 - confidence) / 2
    low, high = np.quantile(resampled, [tail, 1 - tail])
    return RatingsComparison(
        n_desirable=len(liked),
        n_undesirable=len(disliked),
        auc=float(_auc(liked, disliked)),
        ci_low=float(low),
        ci_high=float(high),
        confidence=confidence,
        n_resamples=n_resamples,
        mean_gain_desirable=float(liked.mean()),
        mean_gain_undesirable=float(disliked.mean()),
    )


def _ratings_text(r: RatingsComparison, who: str) -> str:
    return (
        f"on {r.n_desirable} liked and {r.n_undesirable} disliked held-out replies users rated, "
        f"{r.auc:.3f} of pairs moved toward the liked one against {who} "
        f"({r.confidence:.0%} CI {r.ci_low:.3f} to {r.ci_high:.3f}; 0.5 is no change)"
    )


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    reason: str  # one or two sentences with the numbers, as shown to users and stored as a tag
    ci_low: float | None = None  # the improvement's CI (promote.metric's unit), if compared
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


class _Scores(NamedTuple):
    ids: list[str]
    conversation: np.ndarray
    nll: np.ndarray
    tokens: np.ndarray
    bytes: np.ndarray | None  # None: scores an earlier retune wrote, without n_bytes


def _columns(table: pa.Table, metric: str, who: str) -> _Scores:
    """The per-example columns the comparison reads; bits per byte needs `n_bytes`."""
    has_bytes = "n_bytes" in table.column_names
    if metric == "bits_per_byte" and not has_bytes:
        raise GateError(
            f"{who}'s holdout scores have no n_bytes column (an earlier retune wrote them), so "
            "they cannot be compared in bits per byte: re-run `evaluate` (or set "
            "promote.metric: perplexity to compare per token)"
        )
    names = ["id", "conversation_id", "nll_sum", "n_tokens"] + (["n_bytes"] if has_bytes else [])
    cols = table.select(names).to_pydict()
    return _Scores(
        cols["id"],
        np.asarray(cols["conversation_id"], dtype=object),
        np.asarray(cols["nll_sum"], dtype=np.float64),
        np.asarray(cols["n_tokens"], dtype=np.float64),
        np.asarray(cols["n_bytes"], dtype=np.float64) if has_bytes else None,
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
    metric: str = "bits_per_byte",
) -> Comparison:
    """Paired bootstrap of champion − candidate over holdout conversations, in `metric`'s unit.

    Both tables hold per-example scores (`id`, `conversation_id`, `nll_sum`, `n_tokens`,
    `n_bytes`: `retune.model.scoring.SCORES_SCHEMA`); only ids both scored count. Examples of
    one conversation are resampled together, and the statistic is a ratio of sums: each
    model's total NLL over its total bytes, in bits (bits_per_byte), or over its total tokens,
    in nats (perplexity), so long conversations weigh by their bytes or tokens. Bits per byte
    divides each model's NLL by the bytes of the text it scored, which do not depend on its
    tokenizer: per-token units of two models are never mixed. Scores without `n_bytes` can be
    compared per token only.
    """
    from scipy.stats import bootstrap

    if metric not in UNITS:
        raise GateError(f"promote.metric={metric!r} is unknown; use one of {', '.join(UNITS)}")
    cand = _columns(candidate, metric, "the candidate")
    champ = _columns(champion, metric, "production")
    champ_at = {rid: i for i, rid in enumerate(champ.ids)}
    both = [(i, champ_at[rid]) for i, rid in enumerate(cand.ids) if rid in champ_at]
    if not both:
        raise GateError(
            "the candidate and production scored no holdout example in common; both must be "
            "scored on the same holdout (paths.split/holdout.parquet) with the same settings"
        )
    ci_, hi_ = (np.asarray(idx, dtype=np.int64) for idx in zip(*both, strict=True))
    # An example with no predicted token adds nothing to either ratio; a NaN would poison it.
    keep = (cand.tokens[ci_] > 0) & (champ.tokens[hi_] > 0)
    keep &= np.isfinite(cand.nll[ci_]) & np.isfinite(champ.nll[hi_])
    ci_, hi_ = ci_[keep], hi_[keep]
    conv = cand.conversation[ci_]
    per_byte = metric == "bits_per_byte"
    # Per byte: NLL over bytes, in bits. Per token: over tokens, in nats.
    scale = 1.0 / math.log(2) if per_byte else 1.0
    cand_den = cand.bytes if per_byte and cand.bytes is not None else cand.tokens
    champ_den = champ.bytes if per_byte and champ.bytes is not None else champ.tokens
    data = (
        _group_sums(conv, cand.nll[ci_] * scale),
        _group_sums(conv, cand_den[ci_]),
        _group_sums(conv, champ.nll[hi_] * scale),
        _group_sums(conv, champ_den[hi_]),
    )
    n_conv = len(data[0])
    if n_conv < 2:
        raise GateError(
            f"only {n_conv} holdout conversation scored by both models: too few to tell "
            "noise from improvement; the holdout needs more conversations (split.holdout_fraction)"
        )

    def statistic(
        c_nll: np.ndarray, c_den: np.ndarray, p_nll: np.ndarray, p_den: np.ndarray, axis: int = -1
    ) -> np.ndarray:
        result: np.ndarray = p_nll.sum(axis=axis) / p_den.sum(axis=axis) - c_nll.sum(
            axis=axis
        ) / c_den.sum(axis=axis)
        return result

    point = float(statistic(*data))
    if np.all(data[0] * data[3] == data[2] * data[1]):
        # Identical per-conversation figures: every resample is 0; scipy would warn that
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
    with_bytes = cand.bytes is not None and champ.bytes is not None

    def per_byte_of(scores: _Scores, rows: np.ndarray) -> float | None:
        if not with_bytes or scores.bytes is None:
            return None
        return float(scores.nll[rows].sum() / (math.log(2) * scores.bytes[rows].sum()))

    return Comparison(
        metric=metric,
        n_examples=len(ci_),
        n_conversations=n_conv,
        candidate_nll=float(cand.nll[ci_].sum() / cand.tokens[ci_].sum()),
        champion_nll=float(champ.nll[hi_].sum() / champ.tokens[hi_].sum()),
        candidate_bits_per_byte=per_byte_of(cand, ci_),
        champion_bits_per_byte=per_byte_of(champ, hi_),
        improvement=point,
        ci_low=low,
        ci_high=high,
        confidence=confidence,
        n_resamples=n_resamples,
        same_tokenization=bool(np.array_equal(cand.tokens[ci_], champ.tokens[hi_])),
        same_bytes=bool(
            cand.bytes is None
            or champ.bytes is None
            or np.array_equal(cand.bytes[ci_], champ.bytes[hi_])
        ),
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
    c = comparison
    pct = round(c.confidence * 100)
    per_token = c.metric == "perplexity"
    if per_token:
        figures = f"perplexity {c.candidate_perplexity:.3f} vs {who}'s {c.champion_perplexity:.3f}"
    else:
        figures = (
            f"bits per byte {c.candidate_bits_per_byte:.4f} vs {who}'s "
            f"{c.champion_bits_per_byte:.4f}"
        )
    text = (
        f"holdout {figures} on the same {c.n_conversations} conversations: "
        f"{_lower(c.relative)} ({pct}% CI {_interval(*c.relative_ci)}); improvement "
        f"{c.improvement:+.4f} {c.unit} ({pct}% CI {c.ci_low:+.4f} to {c.ci_high:+.4f})"
    )
    if per_token and not c.same_tokenization:
        text += " [the two tokenizers count the holdout's tokens differently]"
    elif not c.same_tokenization:
        text += (
            " [different tokenizers: per-token perplexity "
            f"{c.candidate_perplexity:.3f} vs {c.champion_perplexity:.3f} does not compare]"
        )
    if not per_token and not c.same_bytes:
        text += " [the two scored different stretches of text: their windows or templates differ]"
    return text


def decide(
    candidate_metrics: Mapping[str, Any],
    champion_metrics: Mapping[str, Any] | None,
    comparison: Comparison | None,
    cfg: PromoteParams,
    forced: bool = False,
    reason: str | None = None,
    compared_version: int | str | None = None,
    ratings: RatingsComparison | None = None,
) -> Decision:
    """Decide what happens to a candidate.

    - A diverged training (inf or NaN loss or perplexity) rejects it, saying so.
    - A missed absolute gate rejects it, however it compares with production. A gate whose
      metric this data cannot have (`check_absolute`) does not apply, and the reason says so.
    - With no production yet (`champion_metrics` None), passing the gates is enough.
    - Otherwise it must beat production by more than the noise: the lower bound of the
      bootstrap CI of the improvement (in `cfg.metric`'s unit: bits/byte or nats/token) must
      exceed `cfg.margin`.
    - With users' held-out ratings (`ratings`), it must not be worse there either: a CI of
      the ratings AUC wholly below 0.5 rejects it. One better there beyond the noise (CI
      above 0.5) may instead lose up to `cfg.max_holdout_loss` on the holdout (its CI's lower
      bound above minus that): what preference tuning trades.
    - `cfg.mode` "propose" turns a promotion into a proposal (alias `challenger`).
    - `forced` (a person's override, `reason` required) promotes whatever the gate says.
    """
    if comparison is not None and comparison.metric != cfg.metric:
        raise GateError(
            f"the comparison is in {comparison.metric} but promote.metric={cfg.metric}: "
            "promote.margin would be read in the wrong unit"
        )
    unit = UNITS[cfg.metric]
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
    elif ratings is not None and ratings.ci_high < 0.5:
        verdict = "reject"
        text = (
            f"worse than {who} on users' ratings: {_ratings_text(ratings, who)}; holdout: "
            f"{_versus(comparison, who)}"
        )
    elif (
        ratings is not None
        and comparison.ci_low <= cfg.margin
        and ratings.ci_low > 0.5
        and comparison.ci_low > -cfg.max_holdout_loss
    ):
        verdict = "promote"
        text = (
            f"better than {who} on users' ratings beyond the noise: "
            f"{_ratings_text(ratings, who)}; holdout within promote.max_holdout_loss="
            f"{cfg.max_holdout_loss:g} {unit}: {_versus(comparison, who)}"
        )
    elif ratings is not None and ratings.ci_low > 0.5 and comparison.ci_low <= cfg.margin:
        verdict = "reject"
        text = (
            f"better than {who} on users' ratings ({_ratings_text(ratings, who)}) but it "
            f"loses more than promote.max_holdout_loss={cfg.max_holdout_loss:g} {unit} on "
            f"the holdout: {_versus(comparison, who)}"
        )
    elif comparison.ci_low > cfg.margin:
        verdict = "promote"
        text = (
            f"better than {who} beyond the noise: {_versus(comparison, who)}; the CI's lower "
            f"bound exceeds promote.margin={cfg.margin:g} {unit}"
        )
    elif comparison.ci_high < 0:
        verdict, text = "reject", f"worse than {who}: {_versus(comparison, who)}"
    else:
        verdict = "reject"
        text = (
            f"not better than {who} beyond the noise: {_versus(comparison, who)}; the CI's "
            f"lower bound {comparison.ci_low:+.4f} does not exceed promote.margin="
            f"{cfg.margin:g} {unit}"
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
