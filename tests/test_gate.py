"""The promotion gate's decision and its bootstrap: pure functions, no MLflow."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pytest

from retune.config import PromoteParams
from retune.release.gate import Comparison, GateError, check_absolute, compare, decide

CFG = PromoteParams(max_perplexity=100.0, max_perplexity_vs_baseline=1.0, max_unsafe_share=0.05)
GOOD = {"perplexity": 5.2, "perplexity_vs_baseline": 0.02, "unsafe_share": 0.0}


def _comparison(improvement: float, low: float, high: float) -> Comparison:
    return Comparison(
        n_examples=600,
        n_conversations=500,
        candidate_nll=1.6 - improvement,
        champion_nll=1.6,
        improvement=improvement,
        ci_low=low,
        ci_high=high,
        confidence=0.95,
        n_resamples=2000,
    )


def _scores(nll: np.ndarray, tokens: np.ndarray, ids: list[str] | None = None) -> pa.Table:
    ids = ids or [f"e{i:04d}" for i in range(len(nll))]
    return pa.table(
        {
            "id": ids,
            "conversation_id": [f"c{int(rid[1:]) // 2}" for rid in ids],  # two per conversation
            "nll_sum": nll,
            "n_tokens": tokens,
            "n_correct": tokens // 3,
        }
    )


def test_the_first_model_is_promoted_when_it_passes_the_absolute_gates() -> None:
    decision = decide(GOOD, None, None, CFG)
    assert decision.outcome == "promote" and decision.alias == "production"
    assert decision.reason.startswith("first model: no production version yet")
    assert "perplexity 5.2 ≤ promote.max_perplexity=100" in decision.reason
    assert not decision.forced and decision.failures == ()


def test_better_beyond_the_margin_is_promoted_with_the_numbers() -> None:
    decision = decide(GOOD, {"perplexity": 5.6}, _comparison(0.06, 0.03, 0.09), CFG, None, None, 3)
    assert decision.outcome == "promote"
    assert (decision.ci_low, decision.ci_high) == (0.03, 0.09)
    assert decision.reason.startswith("better than production v3 beyond the noise")
    assert "improvement +0.0600 nats/token (95% CI +0.0300 to +0.0900)" in decision.reason
    assert ": 5.8% lower (95% CI 3.0% to 8.6% lower)" in decision.reason  # 1 - exp(-d)


def test_better_but_within_the_noise_is_refused() -> None:
    decision = decide(
        GOOD, {"perplexity": 5.3}, _comparison(0.01, -0.005, 0.025), CFG, None, None, 3
    )
    assert decision.outcome == "reject" and decision.alias is None
    assert decision.reason.startswith("not better than production v3 beyond the noise")
    assert "lower bound -0.0050 does not exceed promote.margin=0" in decision.reason
    assert "(95% CI 0.5% higher to 2.5% lower)" in decision.reason


def test_a_margin_demands_a_bigger_step() -> None:
    strict = dataclasses.replace(CFG, margin=0.05)
    decision = decide(GOOD, {"perplexity": 5.6}, _comparison(0.06, 0.03, 0.09), strict)
    assert decision.outcome == "reject"
    assert "does not exceed promote.margin=0.05" in decision.reason


def test_worse_is_refused() -> None:
    decision = decide(
        GOOD, {"perplexity": 5.0}, _comparison(-0.2, -0.25, -0.15), CFG, None, None, 2
    )
    assert decision.outcome == "reject"
    assert decision.reason.startswith("worse than production v2:")
    assert ": 22.1% higher (95% CI 16.2% to 28.4% higher)" in decision.reason


def test_a_failed_absolute_gate_is_refused_even_when_better() -> None:
    unsafe = {**GOOD, "unsafe_share": 0.25}
    for champion, comparison in [(None, None), ({"perplexity": 9.0}, _comparison(0.5, 0.4, 0.6))]:
        decision = decide(unsafe, champion, comparison, CFG)
        assert decision.outcome == "reject"
        assert decision.reason == (
            "failed the absolute gates: unsafe_share 0.25 > promote.max_unsafe_share=0.05"
        )
        assert decision.failures == ("unsafe_share 0.25 > promote.max_unsafe_share=0.05",)


def test_a_missing_gated_metric_fails_closed() -> None:
    decision = decide({"perplexity": 5.2, "perplexity_vs_baseline": 0.1}, None, None, CFG)
    assert decision.outcome == "reject"
    assert "unsafe_share is missing" in decision.reason and "fails closed" in decision.reason
    # A gate turned off (null) does not look at its metric at all.
    off = dataclasses.replace(CFG, max_unsafe_share=None)
    assert decide({"perplexity": 5.2, "perplexity_vs_baseline": 0.1}, None, None, off).outcome == (
        "promote"
    )


def test_every_absolute_gate_names_its_setting() -> None:
    cfg = dataclasses.replace(CFG, min_next_token_accuracy=0.3)
    checks = check_absolute(
        {"perplexity": 250.0, "perplexity_vs_baseline": 1.5, "unsafe_share": 0.0}, cfg
    )
    assert checks.failures == [
        "perplexity 250 > promote.max_perplexity=100",
        "perplexity_vs_baseline 1.5 > promote.max_perplexity_vs_baseline=1",
        "next_token_accuracy is missing from the candidate's metrics, so "
        "promote.min_next_token_accuracy cannot be checked (the gate fails closed; "
        "promote.min_next_token_accuracy: null turns it off)",
    ]
    assert checks.passes == ["unsafe_share 0 ≤ promote.max_unsafe_share=0.05"]
    assert checks.not_applicable == []
    nan = check_absolute({**GOOD, "next_token_accuracy": float("nan")}, cfg)
    assert nan.failures == [
        "next_token_accuracy is nan, not a finite number: promote.min_next_token_accuracy fails"
    ]


def test_propose_mode_proposes_instead_of_promoting() -> None:
    propose = dataclasses.replace(CFG, mode="propose")
    decision = decide(GOOD, None, None, propose)
    assert decision.outcome == "propose" and decision.alias == "challenger"
    assert "proposed as challenger" in decision.reason
    refused = decide(GOOD, {"perplexity": 5.0}, _comparison(-0.2, -0.25, -0.15), propose)
    assert refused.outcome == "reject"


def test_forced_promotion_needs_a_reason_and_keeps_the_gates_verdict() -> None:
    worse = _comparison(-0.2, -0.25, -0.15)
    with pytest.raises(GateError, match="needs a reason"):
        decide(GOOD, {"perplexity": 5.0}, worse, CFG, forced=True, reason="  ")
    decision = decide(
        GOOD, {"perplexity": 5.0}, worse, CFG, forced=True, reason="hotfix for ticket 42"
    )
    assert decision.outcome == "promote" and decision.forced
    assert decision.reason.startswith("forced: hotfix for ticket 42 (the gate alone would reject:")
    assert (decision.ci_low, decision.ci_high) == (-0.25, -0.15)
    # Forced is a person's call: the propose mode, meant for the automatic gate, does not apply.
    propose = dataclasses.replace(CFG, mode="propose")
    assert decide(GOOD, None, None, propose, forced=True, reason="x").outcome == "promote"


def test_bootstrap_finds_a_clearly_better_candidate() -> None:
    rng = np.random.default_rng(1)
    tokens = rng.integers(20, 120, 400)
    champion = rng.gamma(4.0, 0.4, 400) * tokens
    candidate = champion * 0.9 + rng.normal(0, 0.05, 400) * tokens
    result = compare(_scores(candidate, tokens), _scores(champion, tokens), n_resamples=1000)
    assert result.n_examples == 400 and result.n_conversations == 200
    assert 0 < result.ci_low < result.improvement < result.ci_high
    low, high = result.relative_ci
    assert 0 < low < result.relative < high < 1
    assert result.candidate_perplexity < result.champion_perplexity
    # Deterministic for a seed: the same gate run twice decides the same.
    again = compare(_scores(candidate, tokens), _scores(champion, tokens), n_resamples=1000)
    assert (again.ci_low, again.ci_high) == (result.ci_low, result.ci_high)
    # ... and the mirror image is clearly worse.
    mirror = compare(_scores(champion, tokens), _scores(candidate, tokens), n_resamples=1000)
    assert mirror.ci_high < 0


def test_identical_scores_give_a_ci_that_contains_zero() -> None:
    rng = np.random.default_rng(2)
    tokens = rng.integers(20, 120, 100)
    nll = rng.gamma(4.0, 0.4, 100) * tokens
    result = compare(_scores(nll, tokens), _scores(nll.copy(), tokens))
    assert result.ci_low <= 0 <= result.ci_high and result.improvement == 0
    assert decide(GOOD, {"perplexity": 5.0}, result, CFG).outcome == "reject"


def test_noise_alone_is_not_called_an_improvement() -> None:
    rng = np.random.default_rng(3)
    tokens = rng.integers(20, 120, 200)
    base = rng.gamma(4.0, 0.4, 200) * tokens
    jitter = rng.normal(0, 0.3, 200) * tokens
    result = compare(_scores(base + jitter, tokens), _scores(base - jitter, tokens))
    assert result.ci_low < 0 < result.ci_high


def test_only_examples_both_models_scored_are_compared() -> None:
    tokens = np.full(6, 10)
    nll = np.arange(1.0, 7.0) * 10
    candidate = _scores(nll, tokens)
    champion = _scores(nll[2:], tokens[2:], ids=[f"e{i:04d}" for i in range(2, 6)])
    result = compare(candidate, champion)
    assert result.n_examples == 4 and result.n_conversations == 2
    assert result.improvement == 0 and result.same_tokenization
    with pytest.raises(GateError, match="no holdout example in common"):
        compare(candidate, _scores(nll[:1], tokens[:1], ids=["x0000"]))
    with pytest.raises(GateError, match="only 1 holdout conversation"):
        compare(candidate, _scores(nll[:2], tokens[:2]))


def test_different_token_counts_are_flagged() -> None:
    rng = np.random.default_rng(4)
    tokens = rng.integers(20, 120, 40)
    nll = rng.gamma(4.0, 0.4, 40) * tokens
    result = compare(_scores(nll, tokens + 1), _scores(nll, tokens))
    assert not result.same_tokenization
    decision = decide(GOOD, {"perplexity": 5.0}, result, CFG)
    assert "tokenizers count the holdout's tokens differently" in decision.reason


def _diverged_scores(n: int = 40) -> tuple[pa.Table, pa.Table]:
    """Per-example scores of a model trained at a huge learning rate (about 800 nats/token:
    perplexity overflows to inf) and of a sane production model, on the same examples."""
    rng = np.random.default_rng(5)
    tokens = rng.integers(20, 120, n)
    return _scores(rng.uniform(780, 820, n) * tokens, tokens), _scores(
        rng.gamma(4.0, 0.4, n) * tokens, tokens
    )


def test_a_diverged_candidate_is_rejected_with_the_reason_never_a_crash() -> None:
    diverged = {"perplexity": float("inf"), "mean_nll": 800.0, "unsafe_share": 0.0}
    expected = "the model diverged: perplexity is inf; lower train.learning_rate"
    first = decide(diverged, None, None, CFG)
    assert (first.outcome, first.alias, first.reason) == ("reject", None, expected)
    assert "perplexity is inf, not a finite number: promote.max_perplexity fails" in (
        first.failures
    )
    # The paired bootstrap against production still works on such scores, and says worse.
    candidate, champion = _diverged_scores()
    comparison = compare(candidate, champion, n_resamples=200)
    assert comparison.candidate_perplexity == float("inf")
    assert comparison.relative == float("-inf") and comparison.ci_high < 0
    assert comparison.to_dict()["relative_ci_low"] == float("-inf")
    against = decide(diverged, {"perplexity": 5.0}, comparison, CFG, None, None, 1)
    assert (against.outcome, against.reason) == ("reject", expected)
    # NaN (a loss that blew up to not-a-number) is divergence too.
    nan = decide({**GOOD, "mean_nll": float("nan")}, None, None, CFG)
    assert nan.outcome == "reject" and nan.reason.startswith("the model diverged: mean_nll is nan")
    # ... and a worse but finite model is only worse: its reason still has the numbers.
    assert (
        "holdout perplexity inf vs production v1's"
        in decide(GOOD, {"perplexity": 5.0}, comparison, CFG, None, None, 1).reason
    )


def test_reply_gates_do_not_apply_to_a_holdout_without_conversations() -> None:
    documents = {"perplexity": 5.2, "perplexity_vs_baseline": 0.1, "n_reply_examples": 0}
    decision = decide(documents, None, None, CFG)
    assert decision.outcome == "promote" and decision.failures == ()
    note = (
        "promote.max_unsafe_share does not apply: the holdout has no conversations (documents "
        "only), so no replies were generated and there is no unsafe_share"
    )
    assert decision.not_applicable == (note,)
    assert decision.reason.endswith(note)
    # Conversations to reply to, and no unsafe_share: it should exist, so the gate stays closed.
    missing = decide({**documents, "n_reply_examples": 12}, None, None, CFG)
    assert missing.outcome == "reject" and "unsafe_share is missing" in missing.reason
    assert missing.not_applicable == ()
    # A measured unsafe_share is checked whatever the count says.
    unsafe = decide({**documents, "unsafe_share": 0.5}, None, None, CFG)
    assert unsafe.outcome == "reject" and unsafe.not_applicable == ()
