"""The loss on the replies: masks read off each family's real chat template, token by token;
OpenAI's per-message `weight` carried from ingest to the mask; data that would train on
nothing stopped before any step, with the records named."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from retune.config import IngestParams, Params
from retune.data.records import read_records
from retune.errors import BaseModelError, DataValidationError
from retune.model import masks
from retune.model.chat import end_of_turn_ids, render
from retune.model.modeling import load_pretrained
from retune.model.packing import pack
from retune.model.training import train
from tasks.ingest import ingest
from tasks.register import bound_generation
from tests.bases import (
    CHATML,
    FAMILIES,
    chats,
    family_tokenizer,
    save_tiny_base,
    tiny_model,
    write_split,
)

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi, my router won't turn on."},
    {"role": "assistant", "content": "Hold the power button for ten seconds."},
    {"role": "user", "content": "Thank you, that helped."},
    {"role": "assistant", "content": "Glad to help!"},
]


def _turns(name: str) -> list[dict[str, Any]]:
    # Mistral's template refuses a system turn.
    return [dict(m) for m in (CONVERSATION[1:] if name == "mistral" else CONVERSATION)]


def expected_mask(
    tokenizer: Any, messages: list[dict[str, Any]], end_of_turn: str, trained: set[int]
) -> tuple[list[int], list[int]]:
    """(ids, mask) worked out from the family's own end-of-turn marker: 1 exactly on the tokens
    inside each trained reply and the marker after it, found in the rendering by their text."""
    text = render(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    regions, at = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = text.index(m["content"], at)
        end = start + len(m["content"])
        assert text[end : end + len(end_of_turn)] == end_of_turn, text
        at = end + len(end_of_turn)
        if i in trained:
            regions.append((start, at))
    mask = [int(any(a <= s < e <= b for a, b in regions)) for s, e in enc["offset_mapping"]]
    return enc["input_ids"], mask


def _targets(tokenizer: Any, ids: list[int], mask: list[int]) -> str:
    return str(tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m]))


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_reply_masks_are_the_replies_and_their_end_of_turn_token_by_token(name: str) -> None:
    family = FAMILIES[name]
    tokenizer = family_tokenizer(family)
    messages = _turns(name)
    replies = {i for i, m in enumerate(messages) if m["role"] == "assistant"}

    (ids,), (mask,) = masks.encode(tokenizer, [messages], "replies")

    want_ids, want = expected_mask(tokenizer, messages, family.end_of_turn, replies)
    assert ids == [*want_ids, tokenizer.eos_token_id]
    assert mask == [*want, 0]  # the eos closing a conversation is no reply
    assert _targets(tokenizer, ids, mask) == "".join(
        messages[i]["content"] + family.end_of_turn for i in sorted(replies)
    )
    # loss_on all: every token, the closing eos too (what training did before replies).
    (all_ids,), (all_mask,) = masks.encode(tokenizer, [messages], "all")
    assert all_ids == ids and all_mask == [1] * len(ids)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_a_reply_of_weight_zero_is_no_target(name: str) -> None:
    family = FAMILIES[name]
    tokenizer = family_tokenizer(family)
    messages = _turns(name)
    first, second = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    messages[first]["weight"] = 0
    messages[second]["weight"] = 1

    (ids,), (mask,) = masks.encode(tokenizer, [messages], "replies")
    _, want = expected_mask(tokenizer, messages, family.end_of_turn, {second})
    assert mask == [*want, 0]
    assert _targets(tokenizer, ids, mask) == messages[second]["content"] + family.end_of_turn

    # Under loss_on all the weight-0 reply (and its marker) is the only text left out.
    _, (all_mask,) = masks.encode(tokenizer, [messages], "all")
    _, left_out = expected_mask(tokenizer, messages, family.end_of_turn, {first})
    assert all_mask == [1 - m for m in left_out] + [1]


def test_documents_train_on_all_their_text_whatever_the_template() -> None:
    tokenizer = family_tokenizer(FAMILIES["smollm2"])
    doc = [{"role": "text", "content": "Resetting a router: hold the button for ten seconds."}]
    (ids,), (mask,) = masks.encode(tokenizer, [doc], "replies")
    # Bare: no system prompt or speaker header around it, closed with a target eos.
    assert tokenizer.decode(ids) == doc[0]["content"] + "<|im_end|>"
    assert mask == [1] * len(ids)


REWRITING = (
    # Past replies shortened to their first word, as Qwen3's template drops past reasoning:
    # rendering prefixes cannot locate the replies, the {% generation %} markers can.
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}"
    "{{ m['content'] if loop.last else m['content'].split(' ')[0] }}<|im_end|>"
    "{% endgeneration %}{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_template_that_rewrites_past_turns_uses_its_generation_markers() -> None:
    tokenizer = family_tokenizer(FAMILIES["smollm2"])
    tokenizer.chat_template = REWRITING
    messages = _turns("smollm2")[1:]
    (ids,), (mask,) = masks.encode(tokenizer, [messages], "replies")
    assert _targets(tokenizer, ids, mask) == "Hold<|im_end|>Glad to help!<|im_end|>"

    tokenizer.chat_template = REWRITING.replace("{% generation %}", "").replace(
        "{% endgeneration %}", ""
    )
    with pytest.raises(BaseModelError, match=r"(?s)train\.loss_on=replies.*fixture\.jsonl:7"):
        masks.encode(tokenizer, [messages], "replies", names=["fixture.jsonl:7"])
    _, (all_mask,) = masks.encode(tokenizer, [messages], "all")  # all needs no replies found
    assert set(all_mask) == {1}


def test_ingest_keeps_each_weight_and_quarantines_bad_ones(tmp_path: Path) -> None:
    lines = [
        {
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "A draft reply.", "weight": 0},
                {"role": "user", "content": "And?"},
                {"role": "assistant", "content": "The final reply.", "weight": 1, "x": 2},
            ]
        },
        {"messages": [{"role": "user", "content": "Hi", "weight": 1}]},
        {
            "messages": [
                {"role": "user", "content": "Hi again"},
                {"role": "assistant", "content": "Hello", "weight": 0.5},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "No weights"},
                {"role": "agent", "content": "Ok"},
            ]
        },
    ]
    incoming = tmp_path / "in"
    incoming.mkdir()
    (incoming / "chat.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    result = ingest(incoming, IngestParams(), tmp_path / "prep", tmp_path / "q")

    records = read_records(result.records_file).to_pylist()
    weights = {r["line"]: [m["weight"] for m in r["messages"]] for r in records}
    assert weights == {1: [None, 0, None, 1], 4: [None, None]}
    # The weight is taken out of the extra fields; the other extras stay.
    assert json.loads(records[0]["meta"]) == {"message_meta": [{}, {}, {}, {"x": 2}]}
    quarantined = [json.loads(x) for x in result.quarantine_file.read_text().splitlines()]
    assert [(q["line"], q["reason"]) for q in quarantined] == [
        (2, "missing_field"),
        (3, "missing_field"),
    ]
    assert "only assistant messages take one" in quarantined[0]["detail"]
    assert "weight 0.5" in quarantined[1]["detail"]

    # And the mask honours what ingest kept.
    tokenizer = family_tokenizer(FAMILIES["retune"])
    first = [{k: v for k, v in m.items()} for m in records[0]["messages"]]
    (ids,), (mask,) = masks.encode(tokenizer, [first], "replies")
    assert _targets(tokenizer, ids, mask) == "The final reply.<|end|>"


def test_records_written_before_the_weight_field_still_pack(tmp_path: Path) -> None:
    old_message = pa.struct([("role", pa.string()), ("content", pa.string())])
    conversations = chats(40)
    table = pa.table(
        {
            "messages": pa.array(conversations, type=pa.list_(old_message)),
            "source": ["old.jsonl"] * 40,
            "line": list(range(1, 41)),
        }
    )
    pq.write_table(table, tmp_path / "old.parquet")
    tokenizer = family_tokenizer(FAMILIES["retune"])

    blocks = pack(tmp_path / "old.parquet", tokenizer, 32, tmp_path / "cache", loss_on="replies")

    assert len(blocks) > 0
    labels = [t for block in blocks["labels"] for t in block]
    assert 0 < sum(t != -100 for t in labels) < len(labels)


def test_records_with_nothing_to_train_on_stop_train_before_any_step(
    tiny_params: Params,
) -> None:
    conversations = chats(40)
    conversations[3] = [{"role": "user", "content": "Is anyone there?"}]  # no reply
    conversations[10][1]["weight"] = 0  # its only reply left out
    write_split(tiny_params, conversations)
    paths = tiny_params.paths

    with pytest.raises(DataValidationError) as caught:
        train(
            tiny_params.train,
            tiny_params.seed,
            paths.split / "train.parquet",
            paths.split / "holdout.parquet",
            paths.model,
            paths.checkpoints,
        )
    message = str(caught.value)
    assert "2 record(s)" in message and "train.loss_on=replies" in message
    assert "support.jsonl:4" in message and "support.jsonl:11" in message
    assert not paths.model.exists()
    assert not list(paths.checkpoints.glob("checkpoint-*"))

    # Under loss_on all the user's words are targets: the same data trains.
    every_token = dataclasses.replace(tiny_params.train, loss_on="all", max_steps=1)
    result = train(
        every_token,
        tiny_params.seed,
        paths.split / "train.parquet",
        paths.split / "holdout.parquet",
        paths.model,
        paths.checkpoints,
    )
    assert result.steps == 1


@pytest.mark.parametrize("name", ["retune", "smollm2", "qwen2", "llama3"])
def test_pretrained_bases_of_each_family_train_on_their_replies(
    name: str, tiny_params: Params, tmp_path: Path
) -> None:
    """GPT-2, Llama and Qwen2 models, each with its family's template, through `train`: the
    labels it packs are the replies, and the saved model keeps the base's template."""
    base = save_tiny_base(name, tmp_path / f"base-{name}")
    conversations = chats(40)
    write_split(tiny_params, conversations)
    paths = tiny_params.paths
    _, tokenizer = load_pretrained(base)
    blocks = pack(paths.split / "train.parquet", tokenizer, 64, tmp_path / "c", loss_on="replies")
    targets = tokenizer.decode([t for block in blocks["labels"] for t in block if t != -100])
    end = FAMILIES[name].end_of_turn
    assert "Thanks for reaching out about your" in targets and end in targets
    assert "Hi, my" not in targets and "Order 10" not in targets  # the customer's words

    cfg = dataclasses.replace(tiny_params.train, base_model=str(base), max_steps=2)
    result = train(
        cfg,
        tiny_params.seed,
        paths.split / "train.parquet",
        paths.split / "holdout.parquet",
        paths.model,
        paths.checkpoints,
    )
    assert result.steps == 2
    _, saved = load_pretrained(paths.model)
    assert saved.chat_template == FAMILIES[name].template


def test_chatml_prefix_spans_cover_reply_and_marker() -> None:
    tokenizer = family_tokenizer(FAMILIES["smollm2"])
    assert tokenizer.chat_template == CHATML
    text = render(tokenizer, CONVERSATION)
    spans = masks.reply_spans(tokenizer, [CONVERSATION], [text])[0]
    assert [text[a:b] for a, b, _ in spans] == [
        "Hold the power button for ten seconds.<|im_end|>\n",
        "Glad to help!<|im_end|>\n",
    ]
    assert [i for _, _, i in spans] == [2, 4]


@pytest.mark.parametrize("name", ["retune", "smollm2"])
def test_holdout_scoring_scores_the_tokens_and_bytes_the_loss_trains_on(
    name: str, tiny_params: Params, tmp_path: Path
) -> None:
    from retune.model.scoring import score_examples

    conversations = chats(12)
    conversations[0][1]["weight"] = 0  # a left-out reply is not scored either
    write_split(tiny_params, conversations)
    holdout = tiny_params.paths.split / "holdout.parquet"
    model, tokenizer = load_pretrained(save_tiny_base(name, tmp_path / "base"))
    end = FAMILIES[name].end_of_turn

    replies = score_examples(model, tokenizer, holdout, 8, 4, 256, loss_on="replies")
    every = score_examples(model, tokenizer, holdout, 8, 4, 256, loss_on="all")

    by_id = {r["id"]: r for r in read_records(holdout).to_pylist()}
    for row, whole in zip(replies.to_pylist(), every.to_pylist(), strict=True):
        messages = by_id[row["id"]]["messages"]
        (ids,), (mask,) = masks.encode(tokenizer, [messages], "replies")
        assert row["n_tokens"] == sum(mask) and whole["n_tokens"] == len(ids) - 1
        trained = [m for m in messages if m["role"] == "assistant" and m["weight"] != 0]
        assert row["n_bytes"] == sum(len((m["content"] + end).encode()) for m in trained)
        assert 0 < row["nll_sum"] < whole["nll_sum"]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_generation_stops_at_the_templates_end_of_turn(name: str) -> None:
    # What evaluate's generations and the registered model stop at: the marker the loss
    # supervises as the end of a reply, and eos.
    family = FAMILIES[name]
    tokenizer = family_tokenizer(family)
    ids = end_of_turn_ids(tokenizer)
    assert tokenizer.convert_ids_to_tokens(ids)[0] == family.end_of_turn
    assert tokenizer.eos_token_id in ids


def test_llama3_0_stops_at_eot_not_only_at_its_eos() -> None:
    # Llama 3.0 Instruct: eos is <|end_of_text|>, every turn closes with <|eot_id|>. Stopping at
    # eos alone would run a reply on into a made-up next turn.
    llama3 = FAMILIES["llama3"]
    family = dataclasses.replace(
        llama3,
        eos="<|end_of_text|>",
        pad="<|end_of_text|>",
        specials=(*llama3.specials, "<|end_of_text|>"),
    )
    tokenizer = family_tokenizer(family)
    assert tokenizer.convert_ids_to_tokens(end_of_turn_ids(tokenizer)) == [
        "<|eot_id|>",
        "<|end_of_text|>",
    ]
    model = tiny_model(family.model_type, tokenizer)
    bound_generation(model, tokenizer, max_new_tokens=16)
    assert tokenizer.convert_tokens_to_ids("<|eot_id|>") in model.generation_config.eos_token_id
