"""The incoming folder's content fingerprint, and where the last retrain recorded it (MLflow)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from retune.config import Params
from retune.data.datastate import (
    FINGERPRINT_TAG,
    incoming_files,
    incoming_fingerprint,
    last_fingerprint,
    record_fingerprint,
)
from retune.errors import RetuneError
from retune.reports import write_json


def folder(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


FILES = {"chats.jsonl": b'{"messages": []}\n', "kb/faq.csv": b"prompt,completion\nhi,hello\n"}


def test_fingerprint_follows_content_not_creation_order_or_timestamps(tmp_path: Path) -> None:
    a = folder(tmp_path / "a", FILES)
    b = folder(tmp_path / "b", dict(reversed(FILES.items())))
    os.utime(b / "chats.jsonl", (0, 0))
    assert incoming_fingerprint(a) == incoming_fingerprint(b)
    assert [p.relative_to(a).as_posix() for p in incoming_files(a)] == ["chats.jsonl", "kb/faq.csv"]


def test_an_edit_that_keeps_size_and_mtime_changes_the_fingerprint(tmp_path: Path) -> None:
    incoming = folder(tmp_path / "in", FILES)
    before = incoming_fingerprint(incoming)
    path = incoming / "kb/faq.csv"
    stat = path.stat()
    path.write_bytes(b"prompt,completion\nhi,HELLO\n")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    assert incoming_fingerprint(incoming) != before


def test_renames_new_files_count_and_dotfiles_do_not(tmp_path: Path) -> None:
    incoming = folder(tmp_path / "in", FILES)
    base = incoming_fingerprint(incoming)
    folder(incoming, {".DS_Store": b"x", ".cache/tmp.jsonl": b"y"})
    assert incoming_fingerprint(incoming) == base  # ingest skips them too
    (incoming / "kb/faq.csv").rename(incoming / "kb/faq2.csv")
    renamed = incoming_fingerprint(incoming)
    assert renamed != base
    folder(incoming, {"new.txt": b""})
    assert incoming_fingerprint(incoming) != renamed
    shutil.rmtree(incoming)
    assert incoming_files(incoming) == []
    assert incoming_fingerprint(incoming) == incoming_fingerprint(folder(tmp_path / "e", {}))


def test_the_last_retrain_s_fingerprint_is_read_back_from_mlflow(tiny_params: Params) -> None:
    import mlflow

    from retune.release.tracking import setup_tracking

    assert last_fingerprint(tiny_params) is None
    with pytest.raises(RetuneError, match=r"train\.json"):
        record_fingerprint(tiny_params, "abc")

    setup_tracking(tiny_params.tracking)
    run_ids = []
    for fingerprint in ("first", "second"):
        with mlflow.start_run() as run:
            run_ids.append(run.info.run_id)
            write_json(tiny_params.paths.reports / "train.json", {"run_id": run.info.run_id})
        record_fingerprint(tiny_params, fingerprint)
        assert last_fingerprint(tiny_params) == fingerprint
    # On the training run itself, next to the model's lineage.
    assert mlflow.get_run(run_ids[0]).data.tags[FINGERPRINT_TAG] == "first"
    # A later training run that recorded nothing (it failed) does not hide the last record.
    with mlflow.start_run():
        pass
    assert last_fingerprint(tiny_params) == "second"
