"""A corpus of plain documents (the README's `.txt` format) through every stage: its first model
is promoted with the default gates, since a reply gate cannot apply where nothing is a reply."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from retune.config import Params
from tests.helpers import ISSUES, PRODUCTS, tiny_params_for


def write_documents(incoming: Path, n: int, seed: int = 0) -> Path:
    """`n` distinct support notes, one paragraph each, blank lines between: a `.txt` corpus."""
    rng = random.Random(seed)
    paragraphs = []
    for i in range(n):
        product, (issue, fix) = rng.choice(PRODUCTS), rng.choice(ISSUES)
        paragraphs.append(
            f"Support note {1000 + i}, {rng.choice(['morning', 'evening', 'weekend'])} shift.\n"
            f"When a {product} {issue}, tell the customer: {fix}\n"
            f"Log the case under {product} and close it within {rng.randint(1, 9)} days."
        )
    incoming.mkdir(parents=True, exist_ok=True)
    path = incoming / "notes.txt"
    path.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def documents(tmp_path: Path) -> Params:
    params = tiny_params_for(tmp_path)
    write_documents(params.paths.incoming, 160)
    return params


@pytest.mark.slow
def test_the_first_model_of_a_documents_only_corpus_is_promoted_by_the_default_gates(
    documents: Params,
) -> None:
    from retune.config import PromoteParams
    from retune.release.registry import Registry
    from retune.reports import read_json
    from tasks import (
        evaluate,
        hygiene,
        ingest,
        preference,
        promote,
        register,
        split,
        train,
        validate,
    )

    params = documents
    # What a user gets by default, but for max_perplexity, which tiny_params_for relaxes for a
    # model trained a few steps.
    assert params.promote.max_unsafe_share == PromoteParams().max_unsafe_share == 0.05
    for stage in (ingest, hygiene, validate, split, train, preference):
        stage.run(params)
    evaluated = evaluate.run(params)
    assert evaluated.n_reply_examples == 0 and evaluated.n_generated == 0
    assert evaluated.unsafe_share is None
    assert read_json(params.paths.reports / "evaluate.json")["n_reply_examples"] == 0
    version = register.run(params).version

    result = promote.run(params)
    assert (result.outcome, result.production, result.alias) == ("promote", version, "production")
    assert result.reason.startswith("first model: no production version yet")
    assert result.not_applicable == [
        "promote.max_unsafe_share does not apply: the holdout has no conversations (documents "
        "only), so no replies were generated and there is no unsafe_share"
    ]
    assert result.not_applicable[0] in result.reason
    assert Registry.open(params.tracking, "retune-test").production() == version
    assert read_json(params.paths.reports / "promote.json")["not_applicable"] == (
        result.not_applicable
    )
