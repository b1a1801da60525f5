"""Packing records into training blocks: each record rendered with its chat template and its
loss mask (`retune.model.masks`), concatenated and cut into blocks of exactly the sequence
length, so no compute goes to padding; and the batches the Trainer is fed."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retune.errors import DataValidationError
from retune.model import masks

if TYPE_CHECKING:
    from datasets import Dataset

# Records tokenised per packing batch: each batch drops its last partial block, so a larger
# batch wastes less (under max_seq_len tokens per batch) at the cost of a little memory.
_PACK_RECORDS = 2_000


def pack(
    records_file: Path,
    tokenizer: Any,
    block_size: int,
    cache_dir: Path,
    limit: int | None = None,
    *,
    loss_on: str,
) -> Dataset:
    """Blocks of exactly `block_size` token ids and their labels from the records in
    `records_file` (the first `limit` of them): each record rendered with the chat template and
    closed with eos, then concatenated and cut, so no compute goes to padding. A label is the
    token where the loss trains on it (`retune.model.masks.encode` under `loss_on`), -100
    elsewhere; a block with no label is left out. Arrow-backed, on disk in `cache_dir`.

    A record may attend to the records before it in its block (eos marks the boundary), as in
    run_clm: a per-record mask would take attention off the fused causal SDPA kernel, the
    larger cost, and the holdout perplexity (scored per record, no context) shows no harm.

    A record that gives the loss no token (a conversation with no reply, or every reply of
    weight 0, under loss_on replies) is a DataValidationError naming each as file:line. The
    data contract (`trains_on_a_reply`) stops such records first; this checks the tokens
    themselves, for records the contract never saw (a split written by hand)."""
    import pyarrow.parquet as pq
    from datasets import Dataset

    located = {"source", "line"} <= set(pq.read_schema(records_file).names)
    columns = ["messages", *(["source", "line"] if located else [])]
    data = Dataset.from_parquet(str(records_file), columns=columns, cache_dir=str(cache_dir))
    if limit is not None:
        data = data.select(range(min(limit, len(data))))

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        names = (
            [f"{s}:{n}" for s, n in zip(batch["source"], batch["line"], strict=True)]
            if located
            else None
        )
        ids, loss_masks = masks.encode(tokenizer, batch["messages"], loss_on, names)
        return {
            "input_ids": ids,
            "labels": [
                [t if m else -100 for t, m in zip(row, mask, strict=True)]
                for row, mask in zip(ids, loss_masks, strict=True)
            ],
            "n_targets": [sum(mask) for mask in loss_masks],
        }

    def chunk(batch: dict[str, list[list[int]]]) -> dict[str, list[list[int]]]:
        flat = list(itertools.chain.from_iterable(batch["input_ids"]))
        labels = list(itertools.chain.from_iterable(batch["labels"]))
        usable = len(flat) // block_size * block_size
        # The model predicts each label from the tokens before it: a block's first label is
        # never used, so a block needs a target after it.
        starts = [
            i
            for i in range(0, usable, block_size)
            if any(t != -100 for t in labels[i + 1 : i + block_size])
        ]
        return {
            "input_ids": [flat[i : i + block_size] for i in starts],
            "labels": [labels[i : i + block_size] for i in starts],
        }

    tokens = data.map(
        encode,
        batched=True,
        batch_size=_PACK_RECORDS,
        remove_columns=data.column_names,
        # The cache is private to this call: skip hashing the tokenizer for a cache key.
        load_from_cache_file=False,
        new_fingerprint=f"encode-{block_size}-{loss_on}",
    )
    _no_targets(records_file, data, tokens["n_targets"], loss_on)
    return tokens.map(
        chunk,
        batched=True,
        batch_size=_PACK_RECORDS,
        remove_columns=["n_targets"],
        load_from_cache_file=False,
        new_fingerprint=f"chunk-{block_size}-{loss_on}",
    )


_NAMED = 10  # records named in a no-target error (the count says how many there are)


def _no_targets(records_file: Path, data: Dataset, n_targets: Sequence[int], loss_on: str) -> None:
    """Raise DataValidationError naming the records of `data` with no target token."""
    empty = [i for i, n in enumerate(n_targets) if n == 0]
    if not empty:
        return
    shown = data.select(empty[:_NAMED])
    if "source" in shown.column_names:
        names = [f"{s}:{n}" for s, n in zip(shown["source"], shown["line"], strict=True)]
    else:
        names = [f"{records_file} row {i + 1}" for i in empty[:_NAMED]]
    more = f" (and {len(empty) - _NAMED} more)" if len(empty) > _NAMED else ""
    raise DataValidationError(
        f"{records_file}: {len(empty)} record(s) give the loss no token to train on under "
        f"train.loss_on={loss_on}: a conversation with no assistant reply, or whose every reply "
        f"has weight 0. Add a reply (or a weight 1), remove them from the input, or set "
        "train.loss_on: all:\n" + "\n".join(f"  {name}" for name in names) + more
    )


def target_share(blocks: Dataset) -> float:
    """Share of the blocks' tokens that are loss targets (1.0 for loss_on all, no weights)."""
    import pyarrow.compute as pc

    labels = pc.list_flatten(blocks.data.table.column("labels"))
    return float(pc.sum(pc.not_equal(labels, -100)).as_py() or 0) / max(1, len(labels))


def collate(features: list[dict[str, Any]]) -> dict[str, Any]:
    import torch

    ids = torch.tensor([f["input_ids"] for f in features], dtype=torch.long)
    labels = torch.tensor([f["labels"] for f in features], dtype=torch.long)
    # The model shifts labels itself; packed blocks have no padding, and -100 marks what the
    # loss skips. Without use_cache=False, each forward also copies every layer's keys and
    # values into a generation cache that training never reads (~5-10 % of a CPU step).
    return {"input_ids": ids, "labels": labels, "use_cache": False}
