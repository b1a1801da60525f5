"""Per-example holdout scoring and batched reply generation for any loaded causal LM.

Used by the `evaluate` stage and by anything that must judge another model on the very same
examples (a promotion gate scoring production from the MLflow registry), so it takes model
objects, not paths. Each example's NLL is kept with its tokens and its UTF-8 bytes: per token it
is a perplexity, per byte (bits per byte) it compares models whose tokenizers differ.
"""

from __future__ import annotations

import contextlib
import csv
import math
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from retune.errors import RetuneError
from retune.model import masks
from retune.model.chat import end_of_turn_ids, render
from retune.model.metrics import load_metric

SCORES_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("conversation_id", pa.string()),
        ("nll_sum", pa.float64()),  # summed token NLL in nats
        ("n_tokens", pa.int64()),  # predicted positions (the first token is never predicted)
        ("n_correct", pa.int64()),  # positions where the argmax was the actual next token
        ("n_bytes", pa.int64()),  # UTF-8 bytes of the text those positions' tokens cover
    ]
)
GENERATION_COLUMNS = ("id", "prompt", "reference", "generated")
# Reply metrics (modules in retune/model/metrics) and the figures `score_replies` keeps from them.
REPLY_METRICS = ("rouge_l", "chrf", "distinct_n", "reply_length", "unsafe_share")
_REPLY_FIGURES = (
    "rouge_l",
    "chrf",
    "distinct_1",
    "distinct_2",
    "mean_reply_words",
    "empty_reply_share",
    "unsafe_share",
)
_READ_CHUNK = 2_048  # holdout rows read at once while picking the selected examples


def max_positions(model: Any, max_seq_len: int) -> int:
    """The longest sequence scored or generated: `max_seq_len`, capped by the model's window."""
    limit = getattr(model.config, "max_position_embeddings", None) or max_seq_len
    return int(min(max_seq_len, limit))


def encode(
    tokenizer: Any, conversations: list[list[dict[str, str]]], max_len: int
) -> list[list[int]]:
    """Token ids of each conversation exactly as `train` sees it (chat template, no added
    special tokens, closed with eos), truncated to the first `max_len` positions."""
    if not conversations:
        return []
    texts = [render(tokenizer, messages) for messages in conversations]
    return _closed(tokenizer, tokenizer(texts, add_special_tokens=False)["input_ids"], max_len)


def encode_targets(
    tokenizer: Any, conversations: list[list[dict[str, Any]]], max_len: int, loss_on: str
) -> tuple[list[list[int]], list[list[int]]]:
    """`encode`'s token ids and, per token, 1 where train's loss trains on it under `loss_on`
    (retune.model.masks: the replies and the markers closing their turns, or every token; a
    weight-0 reply never), both cut to the first `max_len` positions."""
    if not conversations:
        return [], []
    ids, targets = masks.encode(tokenizer, conversations, loss_on)
    return [row[:max_len] for row in ids], [row[:max_len] for row in targets]


def _closed(tokenizer: Any, rows: list[list[int]], max_len: int) -> list[list[int]]:
    """Each row closed with eos (when the tokenizer has one), then cut to `max_len`."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return [(row + eos)[:max_len] for row in rows]


def encode_with_bytes(
    tokenizer: Any, conversations: list[list[dict[str, str]]], max_len: int
) -> tuple[list[list[int]], list[list[int]]]:
    """`encode`'s token ids, and per token the UTF-8 bytes of the rendered text it adds.

    A token's bytes are those from the end of the text the tokens before it cover to the end
    of its own (the tokenizer's character offsets), so a row's counts partition its text
    exactly: a space the tokenizer leaves out of a token's offsets goes to that token, a
    character split across byte-level tokens to the first of them (the rest get 0), chat
    markers count as the text they render to, and the eos retune appends, which is no text,
    gets 0. Truncated with the ids. A tokenizer without offsets (a Python one) is measured by
    decoding ever longer prefixes instead: the same counts for text that decodes back exactly.
    """
    if not conversations:
        return [], []
    texts = [render(tokenizer, messages) for messages in conversations]
    try:
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        rows = tokenizer(texts, add_special_tokens=False)["input_ids"]
        sizes = [_decoded_bytes(tokenizer, row[:max_len]) for row in rows]
    else:
        rows = enc["input_ids"]
        sizes = [
            _offset_bytes(text, ends)
            for text, ends in zip(texts, enc["offset_mapping"], strict=True)
        ]
    ids = _closed(tokenizer, rows, max_len)
    # The eos `_closed` appends is no text: 0 bytes.
    return ids, [[*size, 0][: len(row)] for size, row in zip(sizes, ids, strict=True)]


def _offset_bytes(text: str, offsets: Sequence[tuple[int, int]]) -> list[int]:
    """Per token, the UTF-8 bytes from the furthest character end before it to its own end."""
    if not offsets:
        return []
    if text.isascii():
        before = np.arange(len(text) + 1, dtype=np.int64)
    else:
        points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        widths = 1 + (points >= 0x80).astype(np.int64) + (points >= 0x800) + (points >= 0x10000)
        before = np.concatenate([[0], np.cumsum(widths)])  # bytes before each character
    ends = np.maximum.accumulate(np.asarray([end for _, end in offsets], dtype=np.int64))
    return np.diff(before[ends], prepend=0).tolist()


def _decoded_bytes(tokenizer: Any, ids: list[int]) -> list[int]:
    """Per token, the UTF-8 bytes it adds to the decoded text of the tokens before it (never
    fewer than 0: a prefix that ends inside a character decodes to a longer replacement)."""
    out, seen = [], 0
    for k in range(1, len(ids) + 1):
        size = len(tokenizer.decode(ids[:k]).encode("utf-8"))
        out.append(max(0, size - seen))
        seen = max(seen, size)
    return out


def target_bytes(
    token_bytes: Sequence[Sequence[int]], targets: Sequence[Sequence[int]] | None = None
) -> np.ndarray:
    """Per example, the bytes of the tokens scored as targets: every position but the first
    (which is never predicted), and of those only where `targets` is 1 when given (a
    supervision mask aligned with the tokens, as `score_sequences` takes it)."""
    out = np.zeros(len(token_bytes), dtype=np.int64)
    for k, sizes in enumerate(token_bytes):
        counted = np.asarray(sizes[1:], dtype=np.int64)
        if targets is not None:
            counted = counted * (np.asarray(targets[k][1 : len(sizes)], dtype=np.int64) != 0)
        out[k] = int(counted.sum())
    return out


def bits_per_byte(nll_sum: float, n_bytes: float) -> float:
    """Total NLL (nats) over total UTF-8 bytes, in bits: nll / (ln 2 * bytes); NaN for 0 bytes."""
    return nll_sum / (math.log(2) * n_bytes) if n_bytes > 0 else math.nan


def select_holdout(holdout_file: Path, max_examples: int, with_reply: bool = False) -> pa.Table:
    """The first `max_examples` holdout records by id (columns id, conversation_id, messages).

    Ordering by record id, unlike file order, favours no source file and keeps the same
    examples in when data is added. Only ids are read whole; messages are streamed and kept
    for the selected rows alone, so memory follows `max_examples`, not the holdout's size.
    `with_reply` keeps only records with an assistant turn (conversations, not documents).
    """
    if not holdout_file.exists():
        raise RetuneError(f"{holdout_file}: missing (paths.split); run the split stage first")
    keys = pq.read_table(holdout_file, columns=["id", "roles"] if with_reply else ["id"])
    if with_reply:
        keys = keys.filter(pc.match_substring(keys.column("roles"), "assistant"))
    wanted = keys.sort_by("id").column("id").slice(0, max_examples).combine_chunks()
    parts = []
    for batch in pq.ParquetFile(holdout_file).iter_batches(
        batch_size=_READ_CHUNK, columns=["id", "conversation_id", "messages"]
    ):
        chunk = pa.Table.from_batches([batch])
        parts.append(chunk.filter(pc.is_in(chunk.column("id"), value_set=wanted)))
    if not parts:
        return pa.table(
            {"id": [], "conversation_id": [], "messages": []},
            schema=pq.read_schema(holdout_file).select(["id", "conversation_id", "messages"]),
        )
    return pa.concat_tables(parts).sort_by("id").slice(0, max_examples)


def _device(model: Any) -> Any:
    return next(model.parameters()).device


def _score_batch(
    model: Any, batch: list[list[int]], pad_id: int, weights: list[list[int]] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per example: summed NLL, predicted positions, correct argmax predictions; with
    `weights` (per token, 1 if it is a target) only the target positions count."""
    import torch
    import torch.nn.functional as F

    width = max(len(s) for s in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    scored = torch.zeros((len(batch), width), dtype=torch.bool)
    for row, seq in enumerate(batch):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
        wanted = weights[row][: len(seq)] if weights is not None else [1] * len(seq)
        scored[row, : len(wanted)] = torch.tensor(wanted, dtype=torch.long) != 0
    device = _device(model)
    ids, mask = ids.to(device), mask.to(device)
    # Right padding plus causal attention: real positions never see the pads after them.
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    targets = ids[:, 1:]
    # The mask comes from lengths, not `ids == pad_id`: where pad is eos, eos targets still count.
    counted = mask[:, 1:].bool() & scored[:, 1:].to(device)
    nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none") * counted
    correct = (logits.argmax(dim=-1) == targets) & counted
    return (
        nll.sum(dim=1).double().cpu().numpy(),
        counted.sum(dim=1).cpu().numpy().astype(np.int64),
        correct.sum(dim=1).cpu().numpy().astype(np.int64),
    )


def score_examples(
    model: Any,
    tokenizer: Any,
    holdout_file: Path,
    max_examples: int,
    batch_size: int,
    max_seq_len: int,
    *,
    loss_on: str = "all",
    log_prefix: str = "scoring",
) -> pa.Table:
    """Score `model` on the first `max_examples` holdout records by id (`select_holdout`).

    Reads only `holdout_file`; returns one row per example (`SCORES_SCHEMA`) in id order. The
    values do not depend on `batch_size` (padding is masked out), so two models scored here are
    compared example by example. Sets the model to eval mode; runs on the model's device.

    The scored tokens are the example's tokens (`encode`: rendered, closed with eos, cut to the
    model's window) after the first, which is context and never predicted. `nll_sum` is their
    summed NLL in nats, `n_tokens` their count and `n_bytes` the UTF-8 bytes of exactly the
    text they cover (`encode_with_bytes`): from the end of the first token to the end of the
    last one kept, so neither the first token's text nor what truncation cut away counts, and
    the appended eos adds none. nll_sum / (ln 2 * n_bytes) is then the example's bits per byte,
    a figure that does not depend on how a tokenizer cuts the text.

    Of those, only the tokens train's loss trains on are scored (`loss_on`, train.loss_on:
    `encode_targets`), in the NLL and the bytes alike: under "replies" the model is judged on
    what it is taught to write, and an example whose reply the window cuts off scores nothing.
    """
    selected = select_holdout(holdout_file, max_examples)
    total = selected.num_rows
    max_len = max_positions(model, max_seq_len)
    conversations = selected.column("messages").to_pylist()
    encoded, token_bytes = encode_with_bytes(tokenizer, conversations, max_len)
    ids, targets = encode_targets(tokenizer, conversations, max_len, loss_on)
    if ids != encoded:  # two renderings of one text: a difference is a bug, never data
        raise RetuneError(f"{log_prefix}: the loss mask's tokens differ from the scored ones")
    if sum(sum(row[1:]) for row in targets) == 0:
        raise RetuneError(
            f"{holdout_file}: the {total} selected holdout examples give no token to predict "
            f"under train.loss_on={loss_on} (with loss_on replies, no reply starts within "
            f"max_seq_len={max_seq_len} tokens; see scoring.max_seq_len and the split stage)"
        )
    print(f"{log_prefix}: scoring {total} holdout examples", flush=True)
    nll_sum, n_tokens, n_correct = score_sequences(
        model, tokenizer, encoded, batch_size, targets=targets, log_prefix=log_prefix
    )
    return pa.table(
        {
            "id": selected.column("id"),
            "conversation_id": selected.column("conversation_id"),
            "nll_sum": nll_sum,
            "n_tokens": n_tokens,
            "n_correct": n_correct,
            "n_bytes": target_bytes(token_bytes, targets),
        },
        schema=SCORES_SCHEMA,
    )


def score_sequences(
    model: Any,
    tokenizer: Any,
    encoded: Sequence[list[int]],
    batch_size: int,
    *,
    targets: Sequence[list[int]] | None = None,
    log_prefix: str = "scoring",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Summed NLL (nats), predicted positions and correct argmax predictions of each token-id
    sequence (`encode`'s output), in order; padding is masked, so batch_size changes nothing.
    `targets` (per sequence, per token 1 if it is a target, e.g. replies only) restricts all
    three to those positions; the first token is never one. Sets the model to eval mode; runs
    on the model's device."""
    import torch

    total = len(encoded)
    if total == 0:
        empty = np.zeros(0, dtype=np.int64)
        return np.zeros(0, dtype=np.float64), empty, empty.copy()
    model.eval()
    every = max(1, total // 10)
    nll_parts, token_parts, correct_parts = [], [], []
    done = 0
    with torch.inference_mode():
        for start in range(0, total, batch_size):
            batch = list(encoded[start : start + batch_size])
            weights = list(targets[start : start + batch_size]) if targets is not None else None
            nll_sum, n_tokens, n_correct = _score_batch(
                model, batch, tokenizer.pad_token_id, weights
            )
            nll_parts.append(nll_sum)
            token_parts.append(n_tokens)
            correct_parts.append(n_correct)
            end = start + len(batch)
            if end // every > done // every or end == total:
                print(f"{log_prefix}: scored {end}/{total} examples", flush=True)
            done = end
    return np.concatenate(nll_parts), np.concatenate(token_parts), np.concatenate(correct_parts)


RATED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("label", pa.bool_()),  # desirable
        ("nll_sum", pa.float64()),  # summed NLL of the reply's tokens (and its end marker)
        ("n_tokens", pa.int64()),  # 0: the window cut the reply off, so it says nothing
    ]
)


def score_rated(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Mapping[str, Any]],
    batch_size: int,
    max_seq_len: int,
    *,
    log_prefix: str = "scoring",
) -> pa.Table:
    """How likely `model` finds each rated reply after its prompt (`RATED_SCHEMA`, in order):
    the summed NLL of the reply's tokens and the marker closing its turn, rendered with the
    model's own template; earlier assistant turns of the prompt are context only. `examples`
    are the preference set's KTO rows (`prompt`, `completion`, `label`, `id`). Two models'
    NLLs of one reply are of the same text, so their difference does not depend on either
    tokenizer."""
    conversations = [
        [{**m, "weight": 0} if m["role"] == "assistant" else dict(m) for m in e["prompt"]]
        + [{"role": "assistant", "content": e["completion"]}]
        for e in examples
    ]
    ids, targets = encode_targets(
        tokenizer, conversations, max_positions(model, max_seq_len), "replies"
    )
    print(f"{log_prefix}: scoring {len(ids)} rated replies", flush=True)
    nll_sum, n_tokens, _ = score_sequences(
        model, tokenizer, ids, batch_size, targets=targets, log_prefix=log_prefix
    )
    return pa.table(
        {
            "id": [str(e["id"]) for e in examples],
            "label": [bool(e["label"]) for e in examples],
            "nll_sum": nll_sum,
            "n_tokens": n_tokens,
        },
        schema=RATED_SCHEMA,
    )


def aggregate(scores: pa.Table, cache_dir: Path | None = None) -> dict[str, float | int]:
    """Corpus figures from per-example `scores` (`SCORES_SCHEMA`), through retune's metric
    modules: perplexity, mean_nll, next_token_accuracy, n_examples, n_tokens; and
    bits_per_byte (total NLL / (ln 2 * total bytes)) over n_bytes.

    Works on any subset of the rows too (a bootstrap resample, one fold's examples). Scores
    without `n_bytes` (written before retune counted bytes) raise an error saying so.
    """
    if "n_bytes" not in scores.column_names:
        raise RetuneError(
            "these per-example scores have no n_bytes column (an earlier retune wrote them), so "
            "bits per byte cannot be computed: re-run the stage that wrote them (`evaluate`)"
        )
    n_bytes = int(pc.sum(scores.column("n_bytes")).as_py() or 0)
    nll_sum = scores.column("nll_sum").to_pylist()
    n_tokens = scores.column("n_tokens").to_pylist()
    n_correct = scores.column("n_correct").to_pylist()
    with tempfile.TemporaryDirectory(prefix="retune-metrics-", dir=cache_dir) as cache:
        ppl = load_metric("perplexity", Path(cache)).compute(nll_sum=nll_sum, n_tokens=n_tokens)
        acc = load_metric("next_token_accuracy", Path(cache)).compute(
            n_correct=n_correct, n_tokens=n_tokens
        )
    return {
        "perplexity": float(ppl["perplexity"]),
        "mean_nll": float(ppl["mean_nll"]),
        "bits_per_byte": bits_per_byte(math.fsum(nll_sum), n_bytes),
        "next_token_accuracy": float(acc["next_token_accuracy"]),
        "n_examples": scores.num_rows,
        "n_tokens": int(ppl["n_tokens"]),
        "n_bytes": n_bytes,
    }


def prompt_and_reference(
    messages: list[dict[str, str]],
) -> tuple[list[dict[str, str]], str] | None:
    """The turns before the first assistant reply, and that reply; None if there is none."""
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            return (messages[:i], m["content"]) if i > 0 else None
    return None


def _stop_ids(tokenizer: Any) -> list[int]:
    return end_of_turn_ids(tokenizer)


def generate_tokens(
    model: Any,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    pad_id: int,
    *,
    eos_token_id: list[int] | None = None,
    **generate_kwargs: Any,
) -> list[list[int]]:
    """Continue each token-id prompt (left padded into one batch) with `model.generate`; return
    each row's new tokens. Rows that stopped early are padded with `pad_id` up to the longest.

    `eos_token_id` None keeps the model's generation config stops; `generate_kwargs` go to
    `generate` as they are (do_sample, temperature, stop_strings with tokenizer, ...).
    """
    import torch

    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        # Left padding: every prompt ends where generation starts.
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        mask[row, width - len(ids) :] = 1
    if eos_token_id is not None:
        generate_kwargs["eos_token_id"] = eos_token_id
    device = _device(model)
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_id,
            **generate_kwargs,
        )
    return [row.tolist() for row in out[:, width:]]


def generate_replies(
    model: Any,
    tokenizer: Any,
    holdout_file: Path,
    n: int,
    batch_size: int,
    max_new_tokens: int,
    max_seq_len: int,
) -> Iterator[list[dict[str, str]]]:
    """Greedy replies to the first `n` holdout conversations by id that have an assistant turn.

    The prompt is every turn before the first assistant reply; that reply is the reference.
    Yields one list of rows (`GENERATION_COLUMNS`) per batch of `batch_size` prompts, so the
    caller can write and score them as they come and nothing accumulates. Prompts are left
    padded in a batch; each keeps its end (it holds the question) and leaves room for
    `max_new_tokens` within the model's window.
    """
    selected = select_holdout(holdout_file, n, with_reply=True)
    max_len = max_positions(model, max_seq_len)
    new_tokens = max(1, min(max_new_tokens, max_len - 1))
    keep = max(1, max_len - new_tokens)
    stop = _stop_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[-1]
    model.eval()
    ids_col, messages_col = selected.column("id"), selected.column("messages")
    for start in range(0, selected.num_rows, batch_size):
        rows: list[dict[str, str]] = []
        prompts: list[list[int]] = []
        for rid, messages in zip(
            ids_col.slice(start, batch_size).to_pylist(),
            messages_col.slice(start, batch_size).to_pylist(),
            strict=True,
        ):
            found = prompt_and_reference(messages)
            if found is None:  # `roles` said there was a reply; the messages disagree
                continue
            prompt_messages, reference = found
            text = render(tokenizer, prompt_messages, add_generation_prompt=True)
            prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"][-keep:])
            users = [m["content"] for m in prompt_messages if m["role"] == "user"]
            prompt = users[-1] if users else prompt_messages[-1]["content"]
            rows.append({"id": rid, "prompt": prompt, "reference": reference, "generated": ""})
        if not rows:
            continue
        out = generate_tokens(
            model, prompts, new_tokens, pad_id, eos_token_id=stop or None, do_sample=False
        )
        for done, generated in zip(rows, out, strict=True):
            done["generated"] = tokenizer.decode(generated, skip_special_tokens=True).strip()
        yield rows


def score_replies(
    model: Any,
    tokenizer: Any,
    holdout_file: Path,
    n: int,
    batch_size: int,
    max_new_tokens: int,
    max_seq_len: int,
    blocklist: Sequence[str],
    generations_file: Path | None = None,
    *,
    log_prefix: str = "scoring",
) -> dict[str, float | int]:
    """Generate replies to up to `n` holdout prompts (`generate_replies`) and score them against
    the references with retune's reply metrics, batch by batch.

    Returns rouge_l, chrf, distinct_1, distinct_2, mean_reply_words, empty_reply_share,
    unsafe_share (replies matching `blocklist`) and n_generated; only n_generated (0) when the
    holdout has no conversation to reply to. Writes every row to `generations_file` (CSV,
    `GENERATION_COLUMNS`) as it is generated when given. Generations are never all held in
    memory: each batch goes to the CSV and to the metrics' on-disk caches, then is dropped.
    """
    n_generated = 0
    with contextlib.ExitStack() as stack:
        cache = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="retune-metrics-")))
        metrics = {name: load_metric(name, cache) for name in REPLY_METRICS}
        writer = None
        if generations_file is not None:
            generations_file.parent.mkdir(parents=True, exist_ok=True)
            fh = stack.enter_context(generations_file.open("w", newline="", encoding="utf-8"))
            writer = csv.DictWriter(fh, fieldnames=GENERATION_COLUMNS)
            writer.writeheader()
        for rows in generate_replies(
            model, tokenizer, holdout_file, n, batch_size, max_new_tokens, max_seq_len
        ):
            generated = [r["generated"] for r in rows]
            references = [r["reference"] for r in rows]
            for name, metric in metrics.items():
                if name in ("rouge_l", "chrf"):
                    metric.add_batch(predictions=generated, references=references)
                else:
                    metric.add_batch(predictions=generated)
            if writer is not None:
                writer.writerows(rows)
            n_generated += len(rows)
            print(f"{log_prefix}: generated {n_generated} replies (at most {n})", flush=True)
        if n_generated == 0:
            return {"n_generated": 0}
        out: dict[str, float | int] = {"n_generated": n_generated}
        for name, metric in metrics.items():
            kwargs: dict[str, Any] = (
                {"blocklist": list(blocklist)} if name == "unsafe_share" else {}
            )
            result = metric.compute(**kwargs)
            out.update({k: v for k, v in result.items() if k in _REPLY_FIGURES})
    return out
