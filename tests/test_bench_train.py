"""benchmarks/train.py at its smallest size: both sides train in turns; every figure comes out."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks.train import flops_per_token, main


def test_flops_count_matmul_weights_once() -> None:
    # GPT-2 small with its own vocabulary: the 124M it is named for, less position
    # embeddings, biases and layer norms (no matmuls), with the tied lm head counted once.
    n, per_token = flops_per_token(n_layer=12, n_embd=768, vocab=50257, seq_len=1024)
    assert 123e6 < n < 124e6
    assert per_token == 6 * n + 12 * 12 * 768 * 1024


@pytest.mark.slow
def test_smoke_run_writes_every_figure(tmp_path: Path) -> None:
    assert main(["--smoke", "--out", str(tmp_path)]) == 0

    result = json.loads((tmp_path / "train.json").read_text())
    assert result["name"] == "train" and result["command"].startswith("python -m benchmarks.train")
    rows = {r["metric"]: r for r in result["rows"]}
    assert {
        "retune_tokens_per_s",
        "baseline_tokens_per_s",
        "throughput_ratio",
        "matmul_peak",
        "retune_mfu",
        "baseline_mfu",
        "retune_holdout_perplexity",
        "baseline_holdout_perplexity",
    } <= rows.keys()
    assert all(math.isfinite(r["value"]) and r["value"] > 0 for r in rows.values())
    assert rows["throughput_ratio"]["target"] == ">= 1.0"
    # Both tiny models learnt something in 6 steps: below the uniform guess over 400+ tokens.
    assert rows["retune_holdout_perplexity"]["value"] < 400
    assert rows["baseline_holdout_perplexity"]["value"] < 400
    # Equal budgets: 6 steps x 4 blocks x 64 tokens, none of them padding, on each side.
    assert "both saw 1,536 / 1,536 tokens" in rows["retune_holdout_perplexity"]["note"]
