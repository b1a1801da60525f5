"""Data versions a run can be rebuilt from: an input folder's DVC object in the project's DVC
cache, pushed to the DVC remote when one is configured, and restored from either.

The hash is the one `dvc add` writes into a `.dvc` file (`<md5>.dir`), so a run's recorded data
version and the project's pointer files speak of the same thing. Nothing here takes DVC's repo
lock or edits a pointer file: `ingest` snapshots inside `dvc repro` too, and `retune reproduce`
restores into a separate work tree.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retune.errors import RetuneError

# The pipeline run's tag (and the registry version's) with the inputs' DVC data version.
INCOMING_DVC_TAG = "incoming_dvc"
# The run's tag with the DVC data version of the preference data it was tuned on, if it was.
PREFERENCE_DVC_TAG = "preference_dvc"


@dataclass(frozen=True)
class Snapshot:
    """An input folder's data version: the DVC object `md5` of `nfiles` files, `size` bytes."""

    md5: str
    nfiles: int
    size: int

    def as_dict(self) -> dict[str, Any]:
        return {"md5": self.md5, "nfiles": self.nfiles, "size": self.size}


def recorded(report: dict[str, Any], key: str = INCOMING_DVC_TAG) -> str | None:
    """The DVC data version a stage recorded in its report under `key` (ingest: the inputs;
    preference: PREFERENCE_DVC_TAG, its tuning set), if it kept one."""
    md5 = (report.get(key) or {}).get("md5")
    return str(md5) if md5 else None


def dvc_root(path: Path) -> Path | None:
    """The DVC repository (the folder holding `.dvc/`) that `path` is in, or None."""
    for folder in [path, *path.parents]:
        if (folder / ".dvc").is_dir():
            return folder
    return None


def _open(root: Path) -> Any:
    from dvc.repo import Repo

    return Repo(str(root))


def snapshot(folder: Path) -> Snapshot | str:
    """Hash `folder` as `dvc add` would and store its files in the DVC cache. Returns the
    snapshot, or why there is none (not in a DVC repository)."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.transfer import transfer

    resolved = folder.resolve()
    root = dvc_root(resolved)
    if root is None:
        return f"{folder} is not in a DVC repository (`dvc init` where the project is)"
    with _open(root) as repo:
        odb = repo.cache.repo
        staging, meta, obj = build(odb, str(resolved), repo.fs, "md5", ignore=repo.dvcignore)
        transfer(staging, odb, {obj.hash_info}, shallow=False, hardlink=False)
        return Snapshot(md5=str(obj.hash_info.value), nfiles=meta.nfiles or 0, size=meta.size or 0)


def keep(folder: Path, stage: str, what: str) -> dict[str, Any]:
    """`snapshot(folder)` for a stage's report, saying so in the stage's log: the snapshot's
    fields, or {"skipped": why} (with a warning) when there is none."""
    taken = snapshot(folder)
    if isinstance(taken, str):
        print(f"{stage}: warning: no data version of {what} is kept: {taken}", flush=True)
        return {"skipped": taken}
    print(
        f"{stage}: {folder} is DVC data version {taken.md5} ({taken.nfiles} files), in the DVC "
        "cache",
        flush=True,
    )
    return taken.as_dict()


def _ids(odb: Any, md5: str) -> tuple[Any, set[Any]]:
    """The tree object `md5` and the ids of it and its files (loaded from `odb`)."""
    from dvc_data.hashfile import load
    from dvc_data.hashfile.hash_info import HashInfo

    tree = load(odb, HashInfo("md5", md5))
    return tree, {tree.hash_info} | {hi for _, _, hi in tree}  # type: ignore[attr-defined]  # a Tree: `md5` is a folder


def remote_name(root: Path) -> str | None:
    """The project's default DVC remote (`dvc remote add -d NAME URL`), or None."""
    with _open(root) as repo:
        name = repo.config["core"].get("remote")
        return str(name) if name else None


def push(folder: Path, md5: str) -> str:
    """Send data version `md5` (already cached) of `folder`'s project to its default DVC
    remote. Returns what happened, as a phrase."""
    root = dvc_root(folder.resolve())
    if root is None:
        return "not pushed: not in a DVC repository"
    with _open(root) as repo:
        name = repo.config["core"].get("remote")
        if not name:
            return "not pushed: no default DVC remote (`dvc remote add -d NAME URL`)"
        _, ids = _ids(repo.cache.repo, md5)
        result = repo.cloud.push(ids, remote=name)
        if result.failed:
            raise RetuneError(
                f"dvc remote {name!r}: {len(result.failed)} of {len(ids)} objects of data version "
                f"{md5} were not pushed; check the remote's URL and credentials (`dvc remote "
                "list`), then run `dvc push`"
            )
        sent = len(result.transferred)
        return f"pushed to DVC remote {name!r}" + (
            f" ({sent} new objects)" if sent else " (it had every object already)"
        )


@contextmanager
def _quiet_dvc() -> Iterator[None]:
    """DVC's own warning about missing objects: retune says it once, with the fix."""
    log = logging.getLogger("dvc")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def restore(root: Path, md5: str, dest: Path, what: str) -> str:
    """Write data version `md5` of project `root` into the new folder `dest`: from the DVC
    cache, fetching what it lacks from the default remote. Returns where it came from; raises
    with the fix when neither has it. `what` names the data in messages."""
    from dvc_data.hashfile.checkout import checkout
    from dvc_data.hashfile.hash_info import HashInfo

    with _open(root) as repo:
        odb = repo.cache.repo
        name = repo.config["core"].get("remote")
        source = "the DVC cache"
        missing = _missing(odb, md5)
        if missing and name:
            with _quiet_dvc():
                repo.cloud.pull({HashInfo("md5", md5)}, remote=name)  # the listing first
                if odb.exists(md5):
                    repo.cloud.pull(_ids(odb, md5)[1], remote=name)
            missing = _missing(odb, md5)
            source = f"DVC remote {name!r}"
        if missing:
            where = (
                f"neither in the DVC cache ({odb.path}) nor on DVC remote {name!r}"
                if name
                else f"not in the DVC cache ({odb.path}), and no DVC remote is configured"
            )
            raise RetuneError(
                f"{what}: data version {md5} is {where}. Point DVC at the remote it was pushed "
                "to (`dvc remote add -d NAME URL`) and retry, or reproduce on the machine that "
                "made the run"
            )
        tree, _ = _ids(odb, md5)
        dest.parent.mkdir(parents=True, exist_ok=True)
        checkout(str(dest), repo.fs, tree, odb)
        return source


def _missing(odb: Any, md5: str) -> int:
    """How many objects of data version `md5` (its listing and its files) `odb` lacks."""
    from dvc_objects.errors import ObjectFormatError

    if not odb.exists(md5):
        return 1
    try:
        _, ids = _ids(odb, md5)
    except (FileNotFoundError, ObjectFormatError):
        return 1
    return sum(not odb.exists(hi.value) for hi in ids)
