"""Shared fixtures: the real params.yaml shrunk for CPU tests, a small corpus, a tiny model.

Everything lives in `tmp_path`: MLflow on SQLite, data, models and reports. The helpers they
are built from (`tiny_params_for`, `make_conversations`) are in tests/helpers.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from retune.config import Params
from retune.data.records import Record, write_records
from retune.env import configure_environment
from tests.helpers import make_conversations, tiny_params_for

if TYPE_CHECKING:
    from retune.online.feedback import FeedbackStore

configure_environment()


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
    from retune.config import ScratchModelParams
    from retune.model.chat import render
    from retune.model.modeling import scratch_model, train_tokenizer

    out = tmp_path_factory.mktemp("tiny-model")
    texts = [" ".join(c for _, c in conv) for conv in make_conversations(80)]
    tokenizer = train_tokenizer(texts, vocab_size=400)
    import torch

    torch.manual_seed(0)  # the same tiny model in every run: what it says is reproducible
    model = scratch_model(
        ScratchModelParams(vocab_size=400, n_layer=2, n_head=2, n_embd=32),
        tokenizer,
        max_seq_len=64,
    )
    assert render(tokenizer, [{"role": "user", "content": "hi"}])
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Params:
    """Params of a store holding `retune-test` v1 (production) and v2 (no alias): the served
    store of a server test module (~15 s to set up, once per module)."""
    from tests.servers import registered_params

    return registered_params(tmp_path_factory.mktemp("serve"), tiny_model_dir)


@pytest.fixture(scope="module")
def server(registered: Params) -> Iterator[tuple[str, FeedbackStore]]:
    """`registered` served on loopback: the base URL and the feedback store."""
    from tests.servers import serving

    with serving(registered) as running:
        yield running
