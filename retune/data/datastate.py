"""Has the incoming data changed since the last retrain? A content fingerprint of
`paths.incoming`, recorded as a tag on the MLflow training run that learned from it.

Read by the `data-check` flow (flows/data_check.py); the `retrain` flow records it when it ends.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from retune.artifacts import require_pipeline_run_id
from retune.config import Params, to_plain
from retune.release.tracking import resolved_uri

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

# On the training run: it survives `make clean` (mlruns/ is kept) and sits next to the model's
# lineage (the registered version points at this run; its data_version tag is the prepared hash).
FINGERPRINT_TAG = "retune.incoming_fingerprint"
# Incoming data + the settings that shape a model + retune's own code: equal means a retrain
# would rebuild the model it already has, so the `retrain` flow skips it.
RUN_FINGERPRINT_TAG = "retune.run_fingerprint"
# Sections that configure serving and the loop around the model, not the model itself.
# Where work runs (runner) and what watches production change no model.
_NOT_MODEL_SECTIONS = ("serve", "feedback", "drift", "monitor", "runner", "tune", "schedule")
_CODE_ROOT = Path(__file__).resolve().parents[2]
_CODE_PACKAGES = ("retune", "tasks", "flows")

# Large reads keep the per-call overhead negligible; hashlib drops the GIL while it hashes, so a
# few threads overlap one file's disk reads with another's hashing.
_CHUNK_BYTES = 1 << 20
_THREADS = min(4, os.cpu_count() or 1)


def incoming_files(path: Path) -> list[Path]:
    """The files ingest reads under `path`: every file, dotfiles and dot-folders skipped,
    sorted by relative POSIX path (so the order does not depend on the filesystem)."""
    if not path.is_dir():
        return []
    files = []
    for p in path.rglob("*"):
        rel = p.relative_to(path)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts):
            files.append(p)
    return sorted(files, key=lambda p: p.relative_to(path).as_posix())


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        buf = bytearray(_CHUNK_BYTES)
        view = memoryview(buf)
        while n := fh.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def incoming_fingerprint(path: Path) -> str:
    """sha256 hex of the folder's content: each file's relative path, size and sha256, in
    path order. An empty or missing folder has a fingerprint too (of no files).

    Every byte is read: a (path, size, mtime) shortcut misses an edit that keeps both (a copy
    with `cp -p` or `rsync -t`, a restored backup, a coarse clock), and such a miss is a
    retrain that silently never happens. sha256 runs at disk speed on CPUs with SHA
    extensions, so even GBs cost seconds.
    """
    files = incoming_files(path)
    with ThreadPoolExecutor(max_workers=_THREADS) as pool:
        digests = list(pool.map(_file_sha256, files))
    outer = hashlib.sha256()
    for file, digest in zip(files, digests, strict=True):
        rel = file.relative_to(path).as_posix()
        # NUL and newline cannot be confused with a path's own characters on POSIX.
        outer.update(f"{rel}\0{file.stat().st_size}\0{digest}\n".encode())
    return outer.hexdigest()


def code_digest(root: Path = _CODE_ROOT) -> str:
    """sha256 over retune's Python sources (the packages the pipeline runs)."""
    outer = hashlib.sha256()
    for package in _CODE_PACKAGES:
        for file in sorted((root / package).rglob("*.py")):
            outer.update(f"{file.relative_to(root).as_posix()}\0".encode())
            outer.update(hashlib.sha256(file.read_bytes()).digest())
    return outer.hexdigest()


def run_fingerprint(params: Params, incoming: str, preference: str | None = None) -> str:
    """What a retrain's outcome depends on: the incoming data's fingerprint, the preference
    set's version (where it is tuned on), every setting that shapes the model (not serving,
    feedback, drift or schedules) and the code."""
    settings = {k: v for k, v in to_plain(params).items() if k not in _NOT_MODEL_SECTIONS}
    facts = {"incoming": incoming, "params": settings, "code": code_digest()}
    if preference is not None:
        facts["preference"] = preference
    blob = json.dumps(facts, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _client(params: Params) -> MlflowClient:
    from mlflow.tracking import MlflowClient

    uri = resolved_uri(params.tracking.uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def record_fingerprint(params: Params, fingerprint: str, run: str | None = None) -> None:
    """Tag the pipeline's training run (`run_id` in reports/train.json) with `fingerprint`:
    the incoming data that run trained on, and with `run` (`run_fingerprint`) if given."""
    run_id = require_pipeline_run_id(params, "the incoming fingerprint")
    client = _client(params)
    client.set_tag(run_id, FINGERPRINT_TAG, fingerprint)
    if run is not None:
        client.set_tag(run_id, RUN_FINGERPRINT_TAG, run)


def last_fingerprint(params: Params, tag: str = FINGERPRINT_TAG) -> str | None:
    """The fingerprint (`tag`) recorded by the most recently started training run that has
    one in `params.tracking.experiment`, or None when no retrain has recorded one yet."""
    client = _client(params)
    experiment = client.get_experiment_by_name(params.tracking.experiment)
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{tag}` IS NOT NULL",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        return None
    value: str = runs[0].data.tags[tag]
    return value
