"""Test helpers: the real params.yaml shrunk for CPU tests, and a small learnable corpus.

Imported by the tests and their fixtures (tests/conftest.py), e.g.
`from tests.helpers import make_conversations, tiny_params_for`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

from retune.config import Params, load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]

PRODUCTS = ["router", "thermostat", "camera", "doorbell", "speaker"]
ISSUES = [
    ("won't turn on", "Hold the power button for ten seconds, then plug it back in."),
    ("keeps disconnecting", "Move it closer to the hub and update the firmware from the app."),
    ("was charged twice", "I have refunded the duplicate charge; it shows in three to five days."),
    ("arrived damaged", "I am sorry. A replacement ships today and the return label is free."),
]


def make_conversations(n: int, seed: int = 0) -> list[list[tuple[str, str]]]:
    """`n` distinct, learnable support conversations (the tests' stand-in for a corpus)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        product = rng.choice(PRODUCTS)
        issue, fix = rng.choice(ISSUES)
        turns = [
            ("user", f"Hi, my {product} {issue}. Order {1000 + i}."),
            ("assistant", f"Thanks for reaching out about your {product}. {fix}"),
        ]
        if i % 3 == 0:
            turns += [("user", "Thank you, that helped."), ("assistant", "Glad to help!")]
        out.append(turns)
    return out


# A model small enough for CPU tests, and the data limits that suit it: params.yaml's sections
# as tiny_params_for and copies of the project (tests/test_dvc.py) change them.
TINY: dict[str, dict[str, Any]] = {
    "sample": {"conversations": 200},
    # The fixture corpus is templated: at the default 0.8 most of it would be near-duplicates.
    "near_duplicates": {"threshold": 0.9},
    "validate": {"min_examples": 20},
    "split": {"holdout_fraction": 0.2},
    "train": {
        "scratch": {"vocab_size": 400, "n_layer": 2, "n_head": 2, "n_embd": 32},
        "max_seq_len": 64,
        "per_device_train_batch_size": 4,
        "max_steps": 6,
        "warmup_steps": 0,
        "logging_steps": 2,
        "eval_steps": 3,
        "save_steps": 3,
        "eval_max_examples": 8,
    },
    "scoring": {"batch_size": 4, "max_examples": 16, "max_seq_len": 64},
    "evaluate": {"prompts": 2, "max_new_tokens": 8},
    "register": {"model_name": "retune-test"},
    "preference_data": {"min_per_label": 2},
    "preference": {
        "min_examples": 4,
        "max_steps": 3,
        "per_device_train_batch_size": 4,
        "warmup_steps": 0,
        "logging_steps": 1,
    },
    # A few steps of a tiny model stay far above the production thresholds.
    "promote": {"max_perplexity": 1000.0, "max_perplexity_vs_baseline": None},
}


def _deep(sections: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {k: {**v} for k, v in sections.items()}


def tiny_params_for(tmp: Path, **sections: dict) -> Params:
    """params.yaml with every path under `tmp` and a model small enough for CPU tests."""
    base = load_params(ROOT / "params.yaml")
    raw = {
        "paths": {
            f.name: str(tmp / getattr(base.paths, f.name)) for f in dataclasses.fields(base.paths)
        },
        "tracking": {
            "uri": f"sqlite:///{tmp}/mlruns/mlflow.db",
            "artifacts": str(tmp / "mlruns" / "artifacts"),
            "experiment": "retune-test",
        },
        # Never the project's own store (a relative path would be under the cwd).
        "feedback": {"store_url": f"sqlite:///{tmp}/data/feedback/feedback.db"},
        **_deep(TINY),
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return parse_params(raw)


def run_in_fresh_process(code: str, tracking_uri: str) -> Any:
    """Run Python `code` in a new interpreter on the MLflow store `tracking_uri`, offline, as a
    user loading a registered model would; return the JSON its last output line prints."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
