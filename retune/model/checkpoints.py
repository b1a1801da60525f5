"""Checkpoints of a training run: which one to resume from (only one trained on the same
inputs, recorded by fingerprint), what a half-written one looks like, and what to clear."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from retune.reports import write_json

FINGERPRINT_FILE = "fingerprint.json"

TOKENIZER_DIR = "tokenizer"

DATA_CACHE = "data-cache"  # one per rank of a data-parallel run: data-cache-rank<r>


def checkpoint_step(checkpoint: Path) -> int:
    """The optimizer step a Trainer checkpoint folder (`checkpoint-<step>`) was saved at."""
    return int(checkpoint.name.rsplit("-", 1)[-1])


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def prepare_checkpoints(checkpoint_dir: Path, fingerprint: str, resume: bool) -> Path | None:
    """Return the checkpoint to resume from: the last complete one, if `resume` and it was
    trained on the same inputs (`fingerprint`). Otherwise clear retune's files from
    `checkpoint_dir` (checkpoints, tokenizer, fingerprint) and record `fingerprint`."""
    marker = checkpoint_dir / FINGERPRINT_FILE
    stored = json.loads(marker.read_text("utf-8")).get("fingerprint") if marker.exists() else None
    if resume and stored == fingerprint:
        last = last_complete_checkpoint(checkpoint_dir)
        if last:
            print(f"train: resuming from {last} (same settings and data)", flush=True)
        return last
    if stored is not None:
        why = "train.resume is false" if stored == fingerprint else "settings or data changed"
        print(f"train: starting afresh ({why}); clearing {checkpoint_dir}", flush=True)
    clear_checkpoints(checkpoint_dir)
    write_json(marker, {"fingerprint": fingerprint})
    return None


def last_complete_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The highest-step `checkpoint-<step>` folder the Trainer finished writing; folders a
    killed process left half-written are removed (the Trainer writes trainer_state.json last)."""
    found = [p for p in checkpoint_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    complete = []
    for folder in found:
        if (folder / "trainer_state.json").exists():
            complete.append(folder)
        else:
            shutil.rmtree(folder, ignore_errors=True)
    return max(complete, key=checkpoint_step, default=None)


def clear_checkpoints(checkpoint_dir: Path) -> None:
    # Only what retune writes there: the folder itself may be shared with other files.
    if not checkpoint_dir.is_dir():
        return
    for child in checkpoint_dir.iterdir():
        ours = child.name in (FINGERPRINT_FILE, TOKENIZER_DIR) or (
            child.is_dir() and child.name.startswith(("checkpoint-", "tmp-checkpoint-", DATA_CACHE))
        )
        if ours:
            shutil.rmtree(child) if child.is_dir() else child.unlink()
