"""Which tokens of a record the loss trains on, read off the tokenizer's own chat template.

`train` packs records with these masks (retune.model.packing.pack) and holdout scoring scores
the same tokens (retune.model.scoring), so what is trained and what is measured cannot differ.
Any family's template works, retune's own included: nothing here knows a template's markers.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterator, Sequence
from typing import Any, cast

from retune.errors import BaseModelError
from retune.model.chat import is_document, render_many

# replies: each assistant message and the marker that closes its turn; all: every token.
LOSS_ON = ("replies", "all")
# Appended after a conversation's last message to see where the template closes that turn:
# what it writes after the final message alone (Phi-3's closing eos) is not part of the turn.
_NEXT_TURN = {"role": "user", "content": "?"}
_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")

Message = dict[str, Any]
# (first character, end character, index of the message) of one assistant turn in a rendering.
Span = tuple[int, int, int]


def _zero_weight(messages: Sequence[Message]) -> bool:
    return any(m.get("weight") == 0 for m in messages)


def encode(
    tokenizer: Any,
    conversations: Sequence[list[Message]],
    loss_on: str,
    names: Sequence[str] | None = None,
) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of each record rendered with the chat template, closed with eos (no other
    special tokens added: the template writes those), and its loss mask, 1 where the token is
    a target.

    "replies": the tokens of each assistant message and of the marker closing its turn
    (`<|im_end|>`, `<|eot_id|>`, `</s>`, retune's `<|end|>`), not what the template writes
    after it; "all": every token. Either way a message with `weight` 0 is no target, and a
    document is all target, its closing eos too (a conversation's only under "all").
    `names` (file:line of each record) go into errors."""
    records = list(conversations)
    texts = render_many(tokenizer, records)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    spanned = [not is_document(m) and (loss_on == "replies" or _zero_weight(m)) for m in records]
    if not any(spanned):
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [row + eos for row in ids], [[1] * (len(row) + len(eos)) for row in ids]
    try:
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as exc:  # a Python tokenizer has no character offsets
        raise BaseModelError(
            f"train.loss_on={loss_on}: finding the replies' tokens needs a fast tokenizer "
            f"(tokenizer.json), and this base has {type(tokenizer).__name__}; convert it, or set "
            "train.loss_on: all"
        ) from exc
    picked = [i for i, s in enumerate(spanned) if s]
    spans = iter(
        reply_spans(
            tokenizer,
            [records[i] for i in picked],
            [texts[i] for i in picked],
            [names[i] for i in picked] if names is not None else None,
        )
    )
    all_ids: list[list[int]] = []
    masks: list[list[int]] = []
    for k, messages in enumerate(records):
        ids = enc["input_ids"][k]
        whole = loss_on == "all" or is_document(messages)
        if spanned[k]:
            mask = _mask(tokenizer, ids, enc["offset_mapping"][k], next(spans), messages, loss_on)
        else:
            mask = [1] * len(ids)
        all_ids.append(ids + eos)
        masks.append(mask + [int(whole)] * len(eos))
    return all_ids, masks


def reply_spans(
    tokenizer: Any,
    conversations: Sequence[list[Message]],
    texts: Sequence[str],
    names: Sequence[str] | None = None,
) -> list[list[Span]]:
    """Where each assistant turn lies in each conversation's rendering `texts[k]`: from the end
    of the generation prompt (`render(messages[:i], add_generation_prompt=True)`, what the model
    is given) to the end of the turn (where `render(messages[:i + 1])` and the conversation
    going on part ways), i.e. the reply and its end-of-turn marker plus what follows on the
    line. A template that renders earlier turns differently later on (Qwen3 drops past
    reasoning) gives no such prefixes; its `{% generation %}` markers are used instead."""
    pre_jobs: list[list[Message]] = []
    upto_jobs: list[list[Message]] = []
    next_jobs: list[list[Message]] = []
    for messages in conversations:
        for i, m in enumerate(messages):
            if m["role"] == "assistant" and i > 0:
                pre_jobs.append(messages[:i])
                upto_jobs.append(messages[: i + 1])
        if messages[-1]["role"] == "assistant":
            next_jobs.append([*messages, _NEXT_TURN])
    pres = iter(render_many(tokenizer, pre_jobs, add_generation_prompt=True))
    uptos = iter(render_many(tokenizer, upto_jobs))
    nexts = iter(render_many(tokenizer, next_jobs))
    out = []
    for k, (messages, text) in enumerate(zip(conversations, texts, strict=True)):
        spans = list(_prefix_spans(messages, text, pres, uptos, nexts))
        if any(span is None for span in spans):
            found = _generation_spans(tokenizer, messages, text)
            if found is None:
                where = f" ({names[k]})" if names is not None else ""
                raise BaseModelError(
                    f"train.loss_on=replies: the chat template renders a conversation{where} "
                    "so that its replies cannot be told apart (an earlier turn reads "
                    "differently once the conversation goes on, and the template has no "
                    "{% generation %} markers); add those markers around each reply in the "
                    "template, or set train.loss_on: all"
                )
            out.append(found)
        else:
            out.append([span for span in spans if span is not None])
    return out


def _prefix_spans(
    messages: list[Message],
    text: str,
    pres: Iterator[str],
    uptos: Iterator[str],
    nexts: Iterator[str],
) -> Iterator[Span | None]:
    """Each assistant turn's span in `text` from the prefix renderings (consumed in the order
    `reply_spans` queued them); None for a turn the renderings do not locate."""
    last = len(messages) - 1
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if i == 0:  # nothing to prompt it with: no prefix rendering was queued
            yield None
            continue
        pre, upto = next(pres), next(uptos)
        going_on = next(nexts) if i == last else text
        start, end = len(pre), _common_prefix(upto, going_on)
        content = str(m.get("content") or "").strip()
        ok = text.startswith(pre) and end > start and content in text[start:end]
        yield (start, end, i) if ok else None


def _generation_spans(tokenizer: Any, messages: list[Message], text: str) -> list[Span] | None:
    """The assistant turns the template marks with `{% generation %}`, in message order; None
    if it marks none, or not one per assistant message."""
    template = tokenizer.get_chat_template()
    if not _GENERATION.search(template):
        return None
    from transformers.utils.chat_template_utils import render_jinja_template

    # As apply_chat_template does: a key set to None is left out.
    plain = [{k: v for k, v in m.items() if v is not None} for m in messages]
    # Typed as returning str; with return_assistant_tokens_mask it returns (texts, indices).
    rendered, indices = cast(Any, render_jinja_template)(
        conversations=[plain],
        chat_template=template,
        return_assistant_tokens_mask=True,
        **tokenizer.special_tokens_map,
    )
    replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    blocks = indices[0]
    if rendered[0] != text or len(blocks) != len(replies):
        return None
    return [(start, end, i) for (start, end), i in zip(blocks, replies, strict=True)]


def _common_prefix(a: str, b: str) -> int:
    """Length of the longest common prefix of `a` and `b` (slices compare in C)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _mask(
    tokenizer: Any,
    ids: list[int],
    offsets: list[tuple[int, int]],
    spans: list[Span],
    messages: list[Message],
    loss_on: str,
) -> list[int]:
    """Per token, 1 if it is a target. A turn's tokens are those whose last character lies in
    its span (so a token the span cuts at its end, such as an eos only half shared with the
    next turn's header, is out), less the trailing ones that decode to whitespace: the
    newline a template writes after the end-of-turn marker is never generated."""
    ends = [end for _, end in offsets]
    replies = loss_on == "replies"
    mask = [0 if replies else 1] * len(ids)
    for start, end, index in spans:
        value = int(messages[index].get("weight") != 0)
        if value != replies:  # all: only a weight-0 turn changes; replies: only a trained one
            continue
        # Tokens ending after `start` and at or before `end`.
        first, stop = bisect.bisect_right(ends, start), bisect.bisect_right(ends, end)
        while stop > first and not tokenizer.decode([ids[stop - 1]]).strip():
            stop -= 1
        mask[first:stop] = [value] * (stop - first)
    return mask
