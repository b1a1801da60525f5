"""The promotion gate's decision and its bootstrap: pure functions and tiny models, no MLflow."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from retune.config import PromoteParams
from retune.release.gate import Comparison, GateError, check_absolute, compare, decide

# The per-token gate: what most of these tests pin (its wording in nats/token). The default
# metric, bits per byte, has tests of its own below.
CFG = PromoteParams(
    metric="perplexity",
    max_perplexity=100.0,
    max_perplexity_vs_baseline=1.0,
    max_unsafe_share=0.05,
)
PER_BYTE = dataclasses.replace(CFG, metric="bits_per_byte")
GOOD = {"perplexity": 5.2, "perplexity_vs_baseline": 0.02, "unsafe_share": 0.0}


def _comparison(improvement: float, low: float, high: float) -> Comparison:
    return Comparison(
        metric="perplexity",
        n_examples=600,
        n_conversations=500,
        candidate_nll=1.6 - improvement,
        champion_nll=1.6,
        candidate_bits_per_byte=None,
        champion_bits_per_byte=None,
        improvement=improvement,
        ci_low=low,
        ci_high=high,
        confidence=0.95,
        n_resamples=2000,
    )


def _scores(
    nll: np.ndarray,
    tokens: np.ndarray,
    ids: list[str] | None = None,
    n_bytes: np.ndarray | None = None,
) -> pa.Table:
    """Per-example scores; without `n_bytes` they are what an earlier retune wrote."""
    ids = ids or [f"e{i:04d}" for i in range(len(nll))]
    columns = {
        "id": ids,
        "conversation_id": [f"c{int(rid[1:]) // 2}" for rid in ids],  # two per conversation
        "nll_sum": nll,
        "n_tokens": tokens,
        "n_correct": tokens // 3,
    }
    return pa.table({**columns, **({"n_bytes": n_bytes} if n_bytes is not None else {})})


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
    result = compare(
        _scores(candidate, tokens), _scores(champion, tokens), n_resamples=1000, metric="perplexity"
    )
    assert result.n_examples == 400 and result.n_conversations == 200
    assert 0 < result.ci_low < result.improvement < result.ci_high
    low, high = result.relative_ci
    assert 0 < low < result.relative < high < 1
    assert result.candidate_perplexity < result.champion_perplexity
    # Deterministic for a seed: the same gate run twice decides the same.
    again = compare(
        _scores(candidate, tokens), _scores(champion, tokens), n_resamples=1000, metric="perplexity"
    )
    assert (again.ci_low, again.ci_high) == (result.ci_low, result.ci_high)
    # ... and the mirror image is clearly worse.
    mirror = compare(
        _scores(champion, tokens), _scores(candidate, tokens), n_resamples=1000, metric="perplexity"
    )
    assert mirror.ci_high < 0


def test_identical_scores_give_a_ci_that_contains_zero() -> None:
    rng = np.random.default_rng(2)
    tokens = rng.integers(20, 120, 100)
    nll = rng.gamma(4.0, 0.4, 100) * tokens
    result = compare(_scores(nll, tokens), _scores(nll.copy(), tokens), metric="perplexity")
    assert result.ci_low <= 0 <= result.ci_high and result.improvement == 0
    assert decide(GOOD, {"perplexity": 5.0}, result, CFG).outcome == "reject"


def test_noise_alone_is_not_called_an_improvement() -> None:
    rng = np.random.default_rng(3)
    tokens = rng.integers(20, 120, 200)
    base = rng.gamma(4.0, 0.4, 200) * tokens
    jitter = rng.normal(0, 0.3, 200) * tokens
    result = compare(
        _scores(base + jitter, tokens), _scores(base - jitter, tokens), metric="perplexity"
    )
    assert result.ci_low < 0 < result.ci_high


def test_only_examples_both_models_scored_are_compared() -> None:
    tokens = np.full(6, 10)
    nll = np.arange(1.0, 7.0) * 10
    candidate = _scores(nll, tokens)
    champion = _scores(nll[2:], tokens[2:], ids=[f"e{i:04d}" for i in range(2, 6)])
    result = compare(candidate, champion, metric="perplexity")
    assert result.n_examples == 4 and result.n_conversations == 2
    assert result.improvement == 0 and result.same_tokenization
    with pytest.raises(GateError, match="no holdout example in common"):
        compare(candidate, _scores(nll[:1], tokens[:1], ids=["x0000"]), metric="perplexity")
    with pytest.raises(GateError, match="only 1 holdout conversation"):
        compare(candidate, _scores(nll[:2], tokens[:2]), metric="perplexity")


def test_different_token_counts_are_flagged() -> None:
    rng = np.random.default_rng(4)
    tokens = rng.integers(20, 120, 40)
    nll = rng.gamma(4.0, 0.4, 40) * tokens
    result = compare(_scores(nll, tokens + 1), _scores(nll, tokens), metric="perplexity")
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
    comparison = compare(candidate, champion, n_resamples=200, metric="perplexity")
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


def _two_tokenizers(n: int = 60, seed: int = 6) -> tuple[pa.Table, pa.Table]:
    """Production (a scratch GPT-2 with a small byte-level vocabulary: about 2 bytes a token,
    1.2 bits a byte) and a candidate whose larger vocabulary cuts the same text into 4-byte
    tokens and predicts it better, 1.0 bits a byte. Per token the candidate looks far worse
    (perplexity about 16 against 5.3): each of its tokens carries twice the text."""
    rng = np.random.default_rng(seed)
    n_bytes = rng.integers(100, 400, n)
    ln2 = math.log(2)
    champion = _scores(
        rng.normal(1.2, 0.05, n) * ln2 * n_bytes, n_bytes // 2, n_bytes=n_bytes.copy()
    )
    candidate = _scores(
        rng.normal(1.0, 0.05, n) * ln2 * n_bytes, n_bytes // 4, n_bytes=n_bytes.copy()
    )
    return candidate, champion


def test_across_tokenizers_the_gate_follows_bits_per_byte_not_per_token_perplexity() -> None:
    candidate, champion = _two_tokenizers()
    per_byte = compare(candidate, champion, n_resamples=500)  # the default metric
    assert per_byte.metric == "bits_per_byte" and per_byte.unit == "bits/byte"
    assert per_byte.candidate_bits_per_byte == pytest.approx(1.0, abs=0.02)
    assert per_byte.champion_bits_per_byte == pytest.approx(1.2, abs=0.02)
    # The figures per token disagree: the candidate's perplexity is about three times higher.
    assert per_byte.candidate_perplexity > 2.5 * per_byte.champion_perplexity
    assert 0 < per_byte.ci_low < per_byte.improvement < per_byte.ci_high
    assert not per_byte.same_tokenization and per_byte.same_bytes
    promoted = decide(GOOD, {"perplexity": 5.3}, per_byte, PER_BYTE, None, None, 1)
    assert promoted.outcome == "promote"
    assert promoted.reason.startswith("better than production v1 beyond the noise: holdout bits ")
    assert "bits/byte (95% CI +0.1" in promoted.reason
    assert "per-token perplexity" in promoted.reason and "does not compare" in promoted.reason
    assert promoted.reason.endswith("exceeds promote.margin=0 bits/byte")
    assert per_byte.to_dict()["unit"] == "bits/byte"
    # The same models judged per token: the better model would have been refused.
    per_token = compare(candidate, champion, n_resamples=500, metric="perplexity")
    assert per_token.ci_high < 0
    assert decide(GOOD, {"perplexity": 5.3}, per_token, CFG).outcome == "reject"


def test_bits_per_byte_improvement_is_the_difference_of_ratios_of_sums() -> None:
    # By hand: production 30 bits over 20 bytes (1.5), the candidate 20 bits over 20 (1.0).
    ln2 = math.log(2)
    bytes_ = np.array([8, 12, 5, 15])
    champion = _scores(np.array([12, 18, 7.5, 22.5]) * ln2, np.array([4, 6, 3, 7]), None, bytes_)
    candidate = _scores(np.array([8, 12, 5, 15]) * ln2, np.array([2, 3, 1, 4]), None, bytes_)
    result = compare(candidate, champion)
    assert result.candidate_bits_per_byte == pytest.approx(1.0)
    assert result.champion_bits_per_byte == pytest.approx(1.5)
    assert result.improvement == pytest.approx(0.5)
    assert result.relative == pytest.approx(0.5 / 1.5)
    # Every conversation is 1.5 against 1.0 bits a byte: no noise, the interval is the point.
    assert result.ci_low == pytest.approx(0.5) and result.ci_high == pytest.approx(0.5)


def test_the_margin_is_in_bits_per_byte_for_the_per_byte_gate() -> None:
    comparison = compare(*_two_tokenizers(), n_resamples=500)
    strict = dataclasses.replace(PER_BYTE, margin=0.25)  # more than the 0.2 bits/byte gained
    decision = decide(GOOD, {"perplexity": 5.3}, comparison, strict)
    assert decision.outcome == "reject"
    assert "does not exceed promote.margin=0.25 bits/byte" in decision.reason
    # A comparison in one unit is never judged by a margin in the other.
    with pytest.raises(GateError, match="would be read in the wrong unit"):
        decide(GOOD, {"perplexity": 5.3}, comparison, CFG)


def test_scores_without_byte_counts_say_so_and_still_compare_per_token() -> None:
    candidate, champion = _two_tokenizers()
    old = candidate.drop_columns(["n_bytes"])  # reports/holdout_scores.parquet of an earlier run
    with pytest.raises(GateError, match=r"no n_bytes column .* re-run `evaluate`"):
        compare(old, champion)
    per_token = compare(old, champion, n_resamples=200, metric="perplexity")
    assert per_token.candidate_bits_per_byte is None and per_token.ci_high < 0


def _tiny_model(out: Path, vocab_size: int) -> Path:
    """An untrained 2-layer GPT-2 and a byte-level BPE tokenizer of `vocab_size` pieces trained
    on the test corpus, saved with `save_pretrained`: a scratch-like model."""
    from retune.config import ScratchModelParams
    from retune.model.modeling import scratch_model, train_tokenizer
    from tests.helpers import make_conversations

    texts = [" ".join(c for _, c in conv) for conv in make_conversations(80)]
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    sizes = ScratchModelParams(vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=32)
    scratch_model(sizes, tokenizer, max_seq_len=256).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_two_models_with_different_vocabularies_are_judged_per_byte(tmp_path: Path) -> None:
    """Untrained models predict about uniformly over their vocabulary: ln V nats a token. The
    larger vocabulary costs more per token, yet each of its tokens holds more text, so per
    byte it is the better model; the gate, in bits per byte by default, says so."""
    import torch

    from retune.data.records import Record, write_records
    from retune.model.modeling import load_pretrained
    from retune.model.scoring import aggregate, score_examples
    from tests.helpers import make_conversations

    torch.manual_seed(0)
    holdout = tmp_path / "holdout.parquet"
    write_records(
        (
            Record(messages=tuple(c), source="h.jsonl", line=i + 1, format="chat_jsonl").to_row()
            for i, c in enumerate(make_conversations(40, seed=3))
        ),
        holdout,
    )

    def scored(vocab_size: int) -> tuple[pa.Table, dict[str, Any]]:
        model, tokenizer = load_pretrained(_tiny_model(tmp_path / str(vocab_size), vocab_size))
        scores = score_examples(model, tokenizer, holdout, 40, 8, max_seq_len=256)
        return scores, aggregate(scores)

    (champion, production), (candidate, new) = scored(300), scored(600)
    assert new["perplexity"] > production["perplexity"]  # per token the candidate is worse
    assert new["bits_per_byte"] < production["bits_per_byte"]  # per byte it is better
    assert new["n_tokens"] < production["n_tokens"] and new["n_bytes"] == production["n_bytes"]
    cfg = PromoteParams(max_perplexity=None, max_perplexity_vs_baseline=None, max_unsafe_share=None)
    comparison = compare(candidate, champion, n_resamples=500)
    assert comparison.same_bytes and not comparison.same_tokenization
    assert decide(new, production, comparison, cfg).outcome == "promote"
    per_token = dataclasses.replace(cfg, metric="perplexity")
    by_token = compare(candidate, champion, n_resamples=500, metric="perplexity")
    assert decide(new, production, by_token, per_token).outcome == "reject"


def _rated(nll: list[float], labels: list[bool], ids: list[str] | None = None) -> pa.Table:
    """Per-reply NLLs of held-out rated replies (`retune.model.scoring.RATED_SCHEMA`)."""
    from retune.model.scoring import RATED_SCHEMA

    ids = ids or [f"r{i}" for i in range(len(nll))]
    return pa.table(
        {"id": ids, "label": labels, "nll_sum": nll, "n_tokens": [5] * len(nll)},
        schema=RATED_SCHEMA,
    )


def test_the_ratings_auc_is_the_share_of_liked_disliked_pairs_that_moved_right() -> None:
    from retune.release.gate import compare_ratings

    # Gains (production NLL - candidate NLL): liked 2, 0, -1; disliked 1, -3.
    # Pairs liked > disliked: 2>1, 2>-3, 0>-3, -1>-3: 4 of 6; no ties.
    champion = _rated([10.0, 10.0, 10.0, 10.0, 10.0], [True, True, True, False, False])
    candidate = _rated([8.0, 10.0, 11.0, 9.0, 13.0], [True, True, True, False, False])

    r = compare_ratings(candidate, champion, n_resamples=500, seed=1)

    assert r is not None
    assert (r.n_desirable, r.n_undesirable) == (3, 2)
    assert r.auc == pytest.approx(4 / 6)
    assert r.mean_gain_desirable == pytest.approx(1 / 3)
    assert r.mean_gain_undesirable == pytest.approx(-1.0)
    assert 0.0 <= r.ci_low <= r.auc <= r.ci_high <= 1.0
    # Production against itself: every gain 0, every pair a tie, exactly 0.5.
    same = compare_ratings(champion, champion, n_resamples=200)
    assert same is not None and same.auc == same.ci_low == same.ci_high == 0.5
    # No disliked reply in common: nothing to rank.
    assert compare_ratings(candidate, _rated([1.0], [True], ["r0"])) is None


def _ratings(auc: float, low: float, high: float) -> Any:
    from retune.release.gate import RatingsComparison

    return RatingsComparison(40, 20, auc, low, high, 0.95, 2000, 0.5, -0.5)


def test_a_candidate_worse_on_users_ratings_is_rejected_even_when_the_holdout_is_better() -> None:
    decision = decide(
        GOOD,
        {"perplexity": 5.6},
        _comparison(0.06, 0.03, 0.09),  # better on the holdout beyond the noise
        CFG,
        compared_version=3,
        ratings=_ratings(0.31, 0.22, 0.41),
    )
    assert decision.outcome == "reject"
    assert decision.reason.startswith("worse than production v3 on users' ratings")
    assert "0.310 of pairs" in decision.reason


def test_better_ratings_may_cost_holdout_bits_only_up_to_max_holdout_loss() -> None:
    cfg = dataclasses.replace(CFG, max_holdout_loss=0.02)
    ratings = _ratings(0.74, 0.66, 0.81)  # clearly better on users' ratings
    within = decide(
        GOOD, {"perplexity": 5.6}, _comparison(-0.005, -0.015, 0.004), cfg, ratings=ratings
    )
    assert within.outcome == "promote"
    assert "better than production on users' ratings beyond the noise" in within.reason
    assert "promote.max_holdout_loss=0.02" in within.reason

    beyond = decide(
        GOOD, {"perplexity": 5.6}, _comparison(-0.05, -0.07, -0.03), cfg, ratings=ratings
    )
    assert beyond.outcome == "reject"
    assert "loses more than promote.max_holdout_loss=0.02" in beyond.reason

    # Ratings within the noise give no licence to lose on the holdout.
    unsure = decide(
        GOOD,
        {"perplexity": 5.6},
        _comparison(-0.005, -0.015, 0.004),
        cfg,
        ratings=_ratings(0.55, 0.45, 0.64),
    )
    assert unsure.outcome == "reject"
    assert unsure.reason.startswith("not better than production beyond the noise")
