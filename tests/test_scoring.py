"""Shared scoring: the reply metric modules on hand-made inputs, and per-example scoring and
batched generation on a tiny model (what a promotion gate reuses to judge production)."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from retune.data.records import Record, write_records
from retune.errors import RetuneError
from retune.model.chat import render
from retune.model.metrics import load_metric
from retune.model.scoring import (
    GENERATION_COLUMNS,
    REPLY_METRICS,
    SCORES_SCHEMA,
    aggregate,
    encode,
    encode_with_bytes,
    generate_replies,
    score_examples,
    score_replies,
    score_sequences,
    select_holdout,
    target_bytes,
)
from tests.helpers import make_conversations

REPLIES = [
    "Thanks for reaching out about your router.",
    "Hold the power button for ten seconds.",
    "",
    "I have refunded the duplicate charge; it shows in three days.",
    "Glad to help!",
    "Glad to help! Glad to help!",
    "Move it closer to the hub.",
]
REFERENCES = [
    "Thanks for reaching out about your camera.",
    "Hold the power button for ten seconds, then plug it back in.",
    "Glad to help!",
    "I have refunded the duplicate charge.",
    "Glad to help!",
    "You are welcome.",
    "Update the firmware from the app.",
]


def test_rouge_l_is_one_for_identical_and_zero_for_disjoint_replies(tmp_path: Path) -> None:
    rouge = load_metric("rouge_l", tmp_path)
    assert rouge.compute(predictions=["The cat sat."], references=["the cat  sat"])[
        "rouge_l"
    ] == pytest.approx(1.0)
    assert rouge.compute(predictions=["red green"], references=["blue yellow"])["rouge_l"] == 0.0
    # Mean over examples: one perfect, one disjoint.
    out = rouge.compute(predictions=["a b", "c d"], references=["a b", "e f"])
    assert out == {"rouge_l": pytest.approx(0.5), "n_examples": 2}
    # Words in any script count (rouge-score's default tokenizer would drop them).
    assert rouge.compute(predictions=["Ça va bien"], references=["ça va bien"])[
        "rouge_l"
    ] == pytest.approx(1.0)


def test_chrf_is_100_for_identical_and_0_for_disjoint_replies(tmp_path: Path) -> None:
    chrf = load_metric("chrf", tmp_path)
    assert chrf.compute(predictions=["the cat sat"], references=["the cat sat"])[
        "chrf"
    ] == pytest.approx(100.0)
    assert chrf.compute(predictions=["abc"], references=["xyz"])["chrf"] == 0.0
    near = chrf.compute(predictions=["refunded"], references=["refund"])["chrf"]
    assert 0.0 < near < 100.0  # a near miss earns partial credit


def test_distinct_n_counts_unique_ngrams_over_all_replies(tmp_path: Path) -> None:
    distinct = load_metric("distinct_n", tmp_path)
    # Words a b a | a b: 2 unique of 5; bigrams (a b) (b a) | (a b): 2 unique of 3.
    out = distinct.compute(predictions=["a b a", "A, b."])
    assert out == {"distinct_1": pytest.approx(2 / 5), "distinct_2": pytest.approx(2 / 3)}
    assert distinct.compute(predictions=["", "!"]) == {"distinct_1": 0.0, "distinct_2": 0.0}
    assert distinct.compute(predictions=["one two three"])["distinct_2"] == 1.0


def test_reply_length_is_in_whitespace_words(tmp_path: Path) -> None:
    out = load_metric("reply_length", tmp_path).compute(predictions=["one two", "", "three"])
    assert out == {
        "mean_reply_words": pytest.approx(1.0),
        "empty_reply_share": pytest.approx(1 / 3),
        "n_replies": 3,
    }


def test_unsafe_share_matches_whole_words_in_any_case(tmp_path: Path) -> None:
    unsafe = load_metric("unsafe_share", tmp_path)
    replies = [
        "A classic case.",  # "ass" inside a word: not flagged
        "Don't be an ASS.",  # flagged
        "Bass guitar",  # not flagged
        "Please shut\n  up now",  # a phrase across any whitespace: flagged
        "shutup",  # not the phrase
        "Nice f*** job",  # an entry ending in punctuation still matches whole
        "",
    ]
    out = unsafe.compute(predictions=replies, blocklist=["ass", "Shut up", "f***", "  "])
    assert out == {"unsafe_share": pytest.approx(3 / 7), "n_unsafe": 3}
    assert unsafe.compute(predictions=replies, blocklist=[])["unsafe_share"] == 0.0
    with pytest.raises(TypeError, match="list of words"):
        unsafe.compute(predictions=replies, blocklist="ass")


@pytest.mark.parametrize("name", REPLY_METRICS)
def test_reply_metrics_streamed_in_batches_equal_one_shot(tmp_path: Path, name: str) -> None:
    def inputs(lo: int, hi: int) -> dict[str, Any]:
        batch: dict[str, Any] = {"predictions": REPLIES[lo:hi]}
        if name in ("rouge_l", "chrf"):
            batch["references"] = REFERENCES[lo:hi]
        return batch

    extra: dict[str, Any] = {"blocklist": ["help"]} if name == "unsafe_share" else {}
    one_shot = load_metric(name, tmp_path / "a").compute(**inputs(0, len(REPLIES)), **extra)
    streamed = load_metric(name, tmp_path / "b")
    for lo, hi in [(0, 2), (2, 3), (3, 7)]:
        streamed.add_batch(**inputs(lo, hi))
    assert streamed.compute(**extra) == pytest.approx(one_shot)


def _holdout(path: Path, n_conversations: int = 30) -> Path:
    """A holdout of conversations plus documents (which have no reply), in small row groups
    so reading it takes several batches."""
    rows = [
        Record(messages=tuple(c), source="h.jsonl", line=i + 1, format="chat_jsonl").to_row()
        for i, c in enumerate(make_conversations(n_conversations, seed=3))
    ]
    rows += [
        Record(
            messages=(("text", f"Manual page {i}."),), source="m.txt", line=i, format="txt"
        ).to_row()
        for i in range(1, 6)
    ]
    write_records(rows, path, batch_size=7)
    return path


def test_select_holdout_takes_the_first_records_by_id(tmp_path: Path) -> None:
    holdout = _holdout(tmp_path / "holdout.parquet")
    assert pq.ParquetFile(holdout).metadata.num_row_groups > 1
    all_ids = sorted(pq.read_table(holdout, columns=["id"]).column("id").to_pylist())
    selected = select_holdout(holdout, 12)
    assert selected.column("id").to_pylist() == all_ids[:12]
    assert selected.column_names == ["id", "conversation_id", "messages"]
    with_reply = select_holdout(holdout, 100, with_reply=True)
    assert with_reply.num_rows == 30  # the five documents have nothing to reply to
    assert with_reply.column("id").to_pylist() == sorted(with_reply.column("id").to_pylist())


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> tuple[Any, Any]:
    from retune.model.modeling import load_pretrained

    return load_pretrained(tiny_model_dir)


def test_score_examples_matches_the_models_own_loss_per_example(
    tiny: tuple[Any, Any], tmp_path: Path
) -> None:
    import torch

    model, tokenizer = tiny
    holdout = _holdout(tmp_path / "holdout.parquet")
    scores = score_examples(model, tokenizer, holdout, 10, batch_size=4, max_seq_len=64)
    assert scores.schema.equals(SCORES_SCHEMA)
    selected = select_holdout(holdout, 10)
    assert scores.column("id").equals(selected.column("id"))
    sequences = encode(tokenizer, selected.column("messages").to_pylist(), 64)
    for seq, nll_sum, n_tokens, n_correct in zip(
        sequences,
        scores.column("nll_sum").to_pylist(),
        scores.column("n_tokens").to_pylist(),
        scores.column("n_correct").to_pylist(),
        strict=True,
    ):
        ids = torch.tensor([seq])
        with torch.inference_mode():
            out = model(input_ids=ids, labels=ids)  # transformers' own shifted mean loss
        assert n_tokens == len(seq) - 1
        assert nll_sum == pytest.approx(float(out.loss) * n_tokens, rel=1e-4)
        assert n_correct == int((out.logits[0, :-1].argmax(-1) == ids[0, 1:]).sum())

    figures = aggregate(scores)
    nll, tokens = scores.column("nll_sum").to_numpy(), scores.column("n_tokens").to_numpy()
    assert figures["n_examples"] == 10 and figures["n_tokens"] == tokens.sum()
    assert figures["perplexity"] == pytest.approx(math.exp(nll.sum() / tokens.sum()))
    assert figures["mean_nll"] == pytest.approx(nll.sum() / tokens.sum())
    # A subset (a bootstrap resample, a fold) aggregates the same way.
    assert aggregate(scores.slice(0, 3))["n_examples"] == 3


def test_generation_is_the_same_batched_with_left_padding_or_one_by_one(
    tiny: tuple[Any, Any], tmp_path: Path
) -> None:
    model, tokenizer = tiny
    holdout = _holdout(tmp_path / "holdout.parquet")

    def generate(batch_size: int) -> list[dict[str, str]]:
        batches = list(generate_replies(model, tokenizer, holdout, 9, batch_size, 6, 64))
        assert [len(b) for b in batches] == [batch_size] * (9 // batch_size) + (
            [9 % batch_size] if 9 % batch_size else []
        )
        return [row for batch in batches for row in batch]

    alone, batched = generate(1), generate(4)
    assert len(alone) == 9 and tuple(alone[0]) == GENERATION_COLUMNS
    assert [r["id"] for r in alone] == [r["id"] for r in batched]
    assert all(r["prompt"].startswith("Hi, my ") for r in alone)
    assert all(r["reference"].startswith("Thanks for reaching out") for r in alone)
    assert [r["generated"] for r in alone] == [r["generated"] for r in batched]


def test_score_replies_writes_every_row_and_scores_them_all(
    tiny: tuple[Any, Any], tmp_path: Path
) -> None:
    model, tokenizer = tiny
    holdout = _holdout(tmp_path / "holdout.parquet")
    generations = tmp_path / "reports" / "generations.csv"
    out = score_replies(model, tokenizer, holdout, 11, 4, 6, 64, ["glad"], generations)
    with generations.open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert out["n_generated"] == len(rows) == 11
    # The streamed figures equal the metrics computed once over the written rows.
    generated, references = [r["generated"] for r in rows], [r["reference"] for r in rows]
    rouge = load_metric("rouge_l", tmp_path / "m").compute(
        predictions=generated, references=references
    )
    assert out["rouge_l"] == pytest.approx(rouge["rouge_l"])
    words = np.mean([len(g.split()) for g in generated])
    assert out["mean_reply_words"] == pytest.approx(words)
    for key in ("distinct_1", "distinct_2", "unsafe_share", "empty_reply_share"):
        assert 0.0 <= out[key] <= 1.0
    assert 0.0 <= out["chrf"] <= 100.0

    none = score_replies(model, tokenizer, holdout, 0, 4, 6, 64, [], tmp_path / "empty.csv")
    assert none == {"n_generated": 0}
    assert (tmp_path / "empty.csv").read_text(encoding="utf-8").strip() == ",".join(
        GENERATION_COLUMNS
    )


def test_padding_and_batch_size_do_not_change_an_examples_score(
    tiny: tuple[Any, Any], tmp_path: Path
) -> None:
    model, tokenizer = tiny
    holdout = _holdout(tmp_path / "holdout.parquet")
    alone = score_examples(model, tokenizer, holdout, 10, batch_size=1, max_seq_len=64)
    padded = score_examples(model, tokenizer, holdout, 10, batch_size=8, max_seq_len=64)
    assert alone.num_rows == 10
    assert alone.column("id").equals(padded.column("id"))
    assert alone.column("n_tokens").equals(padded.column("n_tokens"))
    assert len(set(alone.column("n_tokens").to_pylist())) > 1  # the batch of 8 really was padded
    np.testing.assert_allclose(
        alone.column("nll_sum").to_numpy(), padded.column("nll_sum").to_numpy(), rtol=1e-4
    )
    assert alone.column("n_correct").equals(padded.column("n_correct"))


def test_bits_per_byte_is_total_nll_over_ln2_times_total_bytes() -> None:
    # By hand: 12 bits over 8 bytes and 6 bits over 4 bytes are 18 bits over 12 bytes = 1.5,
    # whatever the token counts (a tokenizer cutting the same text into more pieces).
    scores = pa.table(
        {
            "id": ["a", "b"],
            "conversation_id": ["a", "b"],
            "nll_sum": [12 * math.log(2), 6 * math.log(2)],
            "n_tokens": [3, 5],
            "n_correct": [1, 2],
            "n_bytes": [8, 4],
        },
        schema=SCORES_SCHEMA,
    )
    figures = aggregate(scores)
    assert figures["bits_per_byte"] == pytest.approx(1.5)
    assert figures["n_bytes"] == 12 and figures["n_tokens"] == 8
    assert figures["mean_nll"] == pytest.approx(18 * math.log(2) / 8)  # per token: unchanged
    # Scores an earlier retune wrote have no byte counts: an error that says so, not a KeyError.
    with pytest.raises(RetuneError, match=r"no n_bytes column.*re-run"):
        aggregate(scores.drop_columns(["n_bytes"]))


def test_token_bytes_partition_the_rendered_text(tiny: tuple[Any, Any]) -> None:
    _, tokenizer = tiny
    messages = [
        {"role": "user", "content": "Héllo wörld 😀, my  [EMAIL] router"},
        {"role": "assistant", "content": "Sure thing."},
    ]
    text = render(tokenizer, messages)
    (ids,), (sizes,) = encode_with_bytes(tokenizer, [messages], 1_000)
    assert ids == encode(tokenizer, [messages], 1_000)[0]
    assert len(sizes) == len(ids) and min(sizes) >= 0
    assert ids[-1] == tokenizer.eos_token_id and sizes[-1] == 0  # appended, no text
    # Every byte of the rendering belongs to exactly one token, multi-byte characters included.
    assert sum(sizes) == len(text.encode("utf-8"))
    assert sizes[0] == len("<|user|>")  # the first token: context, never a target
    (short,), (short_sizes,) = encode_with_bytes(tokenizer, [messages], 7)
    assert short == ids[:7] and short_sizes == sizes[:7]


def test_scored_bytes_are_those_of_the_predicted_tokens_only(
    tiny: tuple[Any, Any], tmp_path: Path
) -> None:
    model, tokenizer = tiny
    holdout = _holdout(tmp_path / "holdout.parquet")
    for max_seq_len in (64, 12):  # whole examples, and examples cut to 12 tokens
        scores = score_examples(model, tokenizer, holdout, 10, 4, max_seq_len)
        sequences = encode(
            tokenizer, select_holdout(holdout, 10).column("messages").to_pylist(), max_seq_len
        )
        assert any(len(seq) == max_seq_len for seq in sequences)
        for seq, n_bytes in zip(sequences, scores.column("n_bytes").to_pylist(), strict=True):
            # The ASCII holdout decodes back exactly: the bytes of tokens 2.. kept, eos none.
            targets = [t for t in seq[1:] if t != tokenizer.eos_token_id]
            assert n_bytes == len(tokenizer.decode(targets).encode("utf-8"))
        figures = aggregate(scores)
        total = scores.column("nll_sum").to_numpy().sum()
        expected = total / (math.log(2) * scores.column("n_bytes").to_numpy().sum())
        assert figures["bits_per_byte"] == pytest.approx(expected)


def test_a_target_mask_restricts_the_nll_and_the_bytes_alike(tiny: tuple[Any, Any]) -> None:
    import torch

    model, tokenizer = tiny
    conversations = [[{"role": r, "content": c} for r, c in conv] for conv in make_conversations(3)]
    ids, sizes = encode_with_bytes(tokenizer, conversations, 64)
    # Every other token a target (a stand-in for "replies only"); position 0 never is.
    masks = [[k % 2 for k in range(len(seq))] for seq in ids]
    nll, n_tokens, _ = score_sequences(model, tokenizer, ids, 2, targets=masks)
    full_nll, full_tokens, _ = score_sequences(model, tokenizer, ids, 2)
    for k, seq in enumerate(ids):
        x = torch.tensor([seq])
        with torch.inference_mode():
            logits = model(input_ids=x).logits[0, :-1]
        per_token = torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="none")
        picked = torch.tensor(masks[k][1:], dtype=torch.bool)
        assert n_tokens[k] == int(picked.sum()) < full_tokens[k]
        assert nll[k] == pytest.approx(float(per_token[picked].sum()), rel=1e-4)
        assert full_nll[k] == pytest.approx(float(per_token.sum()), rel=1e-4)
    expected = [
        sum(b for b, m in zip(s[1:], m[1:], strict=True) if m)
        for s, m in zip(sizes, masks, strict=True)
    ]
    assert target_bytes(sizes, masks).tolist() == expected
    assert target_bytes(sizes).tolist() == [sum(s[1:]) for s in sizes]


class _NoOffsets:
    """A tokenizer without character offsets, as Python (slow) tokenizers are."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("return_offsets_mapping"):
            raise NotImplementedError("return_offset_mapping is not available")
        return self._tokenizer(*args, **kwargs)


def test_a_tokenizer_without_offsets_counts_bytes_by_decoding(tiny: tuple[Any, Any]) -> None:
    _, tokenizer = tiny
    conversations = [[{"role": r, "content": c} for r, c in conv] for conv in make_conversations(4)]
    assert encode_with_bytes(_NoOffsets(tokenizer), conversations, 40) == encode_with_bytes(
        tokenizer, conversations, 40
    )
