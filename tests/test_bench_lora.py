"""benchmarks/lora.py: the FLOPs it divides by, and a smoke run on a tiny Llama-family base in
which all three sides train in turns and every figure comes out."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from transformers import AutoConfig

from benchmarks.lora import adapter_weights, flops_per_token, main, matmul_weights
from tests.bases import save_tiny_base


def test_flops_of_smollm2_shape() -> None:
    # SmolLM2-135M's shape: 30 layers of 576, 9 query and 3 key/value heads, MLP 1536, 49,152
    # tokens. Its 134.5M parameters less the norms: the tied embedding counted once, as the
    # lm head's matmul.
    config = AutoConfig.for_model(
        "llama",
        hidden_size=576,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        intermediate_size=1536,
        vocab_size=49152,
    )
    n = matmul_weights(config)
    assert n == 30 * (576 * 576 * 2 + 2 * 576 * 192 + 3 * 576 * 1536) + 49152 * 576
    assert 134.4e6 < n < 134.6e6
    # r 16 on q_proj and v_proj: 30 x 16 x ((576 + 576) + (576 + 192)), peft's own count.
    assert adapter_weights(config, 16, ["q_proj", "v_proj"]) == 921_600
    attention = 12 * 30 * 576 * 256
    assert flops_per_token(config, 256, None) == 6 * n + attention
    # Frozen weights: forward and input gradient, no weight gradient.
    assert flops_per_token(config, 256, (16, ["q_proj", "v_proj"])) == (
        4 * n + 6 * 921_600 + attention
    )


@pytest.mark.slow
def test_smoke_run_writes_every_figure(tmp_path: Path) -> None:
    base = save_tiny_base("smollm2", tmp_path / "base")
    assert main(["--smoke", "--base", str(base), "--out", str(tmp_path)]) == 0

    result = json.loads((tmp_path / "lora.json").read_text())
    rows = {r["metric"]: r for r in result["rows"]}
    assert {
        "retune_lora_tokens_per_s",
        "peft_lora_tokens_per_s",
        "lora_throughput_ratio",
        "retune_lora_peak_rss",
        "peft_lora_peak_rss",
        "retune_full_tokens_per_s",
        "lora_vs_full_ratio",
        "matmul_peak",
        "retune_lora_mfu",
        "peft_lora_mfu",
        "retune_full_mfu",
    } <= rows.keys()
    assert all(math.isfinite(r["value"]) and r["value"] > 0 for r in rows.values())
    assert rows["lora_throughput_ratio"]["target"] == ">= 1.0"
    # Each worker's own peak, not the parent's carried over: a process that imported torch and
    # transformers and trained holds well over 100 MB, and under the machine's memory.
    for side in ("retune_lora", "peft_lora", "retune_full"):
        assert 0.1 < rows[f"{side}_peak_rss"]["value"] < 64
    assert "q_proj, v_proj" in rows["retune_lora_tokens_per_s"]["note"]
