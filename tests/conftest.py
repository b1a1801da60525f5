"""Shared fixtures: the real params.yaml shrunk for CPU tests, a small corpus, a tiny model.

Everything lives in `tmp_path`: MLflow on SQLite, data, models and reports.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest

from retune.config import Params, load_params, parse_params
from retune.env import configure_environment
from retune.records import Record, write_records

ROOT = Path(__file__).resolve().parents[1]

configure_environment()

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
        "sample": {"conversations": 200},
        # The fixture corpus is templated: at the default 0.8 most of it would be near-duplicates.
        "hygiene": {"near_duplicate_threshold": 0.9},
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
        "evaluate": {"batch_size": 4, "max_examples": 16, "prompts": 2, "max_new_tokens": 8},
        "register": {"model_name": "retune-test"},
        # A few steps of a tiny model stay far above the production thresholds.
        "promote": {"max_perplexity": 1000.0, "max_perplexity_vs_baseline": None},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return parse_params(raw)


@pytest.fixture
def tiny_params(tmp_path: Path) -> Params:
    return tiny_params_for(tmp_path)


@pytest.fixture
def prepared(tiny_params: Params) -> Params:
    """`tiny_params` with 80 conversations already written as prepared records, and the same
    records as the clean ones (what `hygiene` keeps: validate and split read those)."""
    rows = [
        Record(messages=tuple(c), source="fixture.jsonl", line=i + 1, format="chat_jsonl").to_row()
        for i, c in enumerate(make_conversations(80))
    ]
    write_records(rows, tiny_params.paths.prepared / "records.parquet")
    write_records(rows, tiny_params.paths.clean / "records.parquet")
    return tiny_params


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide GPT-2 and its tokenizer, saved with `save_pretrained`: loaded by
    the same `from_pretrained(path)` code path as a user's base model."""
    from retune.chat import render
    from retune.config import ScratchModelParams
    from retune.modeling import scratch_model, train_tokenizer

    out = tmp_path_factory.mktemp("tiny-model")
    texts = [" ".join(c for _, c in conv) for conv in make_conversations(80)]
    tokenizer = train_tokenizer(texts, vocab_size=400)
    model = scratch_model(
        ScratchModelParams(vocab_size=400, n_layer=2, n_head=2, n_embd=32),
        tokenizer,
        max_seq_len=64,
    )
    assert render(tokenizer, [{"role": "user", "content": "hi"}])
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
