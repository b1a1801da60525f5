"""Where every input conversation went: the change logs stages write, and `retune trace`,
which reads them (with ingest's quarantine and the record files) for one input file.

Logs: `paths.quarantine`/quarantine.jsonl (ingest), `paths.clean`/changes.jsonl (hygiene),
`paths.split`/changes.jsonl (split). Each change line names the stage, the reason and the
original location (`source`, `line`) of the conversation it removed, moved or changed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

if TYPE_CHECKING:
    from pathlib import Path

    from retune.config import PathsParams
    from retune.data.pii import Redactor

CHANGES_FILE = "changes.jsonl"


def pseudonym(original: str, redacted: str) -> str:
    """A redacted name that stays one distinct name per original (two addresses redacted to
    `[EMAIL]` remain two ids, keys, files): the redacted text and a digest of the original."""
    return f"{redacted}-{hashlib.sha256(original.encode('utf-8')).hexdigest()[:16]}"


def text_name(name: str) -> str:
    """A file name as text that can be stored: bytes that are not UTF-8 (which the OS hands
    over as lone surrogates) written as `\\xff` escapes."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raw = name.encode("utf-8", "surrogateescape" if _os_escaped(name) else "backslashreplace")
        return raw.decode("utf-8", "backslashreplace")
    return name


def _os_escaped(name: str) -> bool:
    return all(not 0xD800 <= ord(c) <= 0xDFFF or 0xDC80 <= ord(c) <= 0xDCFF for c in name)


def stored_name(source: str, redactor: Redactor) -> str:
    """How ingest stores an input file's name (relative to incoming, posix) in records, reports
    and quarantine: as text (`text_name`), each folder and file name with its personal data
    redacted (a pseudonym), the extension kept. A name without either is stored as it is."""
    source = text_name(source)
    parts = list(PurePosixPath(source).parts)
    redacted, counts = redactor.redact_many(parts)
    if not counts:
        return source
    out = [p if r == p else pseudonym(p, r) for p, r in zip(parts, redacted, strict=True)]
    name, last = parts[-1], redacted[-1]
    if last != name:
        # The extension stays last; `a@b.example.jsonl` is one address to the detector.
        suffix = PurePosixPath(name).suffix
        out[-1] = pseudonym(name, last.removesuffix(suffix)) + suffix
    return "/".join(out)


def data_version(ids: Iterable[str]) -> str:
    """sha256 over the sorted record ids: ingest's recipe, so equal records give equal
    versions in every stage."""
    h = hashlib.sha256()
    for rid in sorted(ids):
        h.update(rid.encode("ascii"))
        h.update(b"\n")
    return h.hexdigest()


def change(
    stage: str, reason: str, row: dict[str, Any], detail: str, **extra: Any
) -> dict[str, Any]:
    """One change-log entry for the record `row` (needs id, conversation_id, source, line)."""
    return {
        "stage": stage,
        "reason": reason,
        "source": row["source"],
        "line": row["line"],
        "id": row["id"],
        "conversation_id": row["conversation_id"],
        "detail": detail,
        **extra,
    }


def write_changes(path: Path, entries: Iterable[dict[str, Any]]) -> int:
    """Write entries as JSON lines (replacing the file); return how many."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    n = 0
    with tmp.open("w", encoding="utf-8") as fh:
        for entry in entries:
            fh.write(json.dumps(entry, ensure_ascii=False, default=str) + "\n")
            n += 1
    tmp.replace(path)
    return n


def read_changes(path: Path, source: str | None = None) -> Iterator[dict[str, Any]]:
    """Entries of a change log (or quarantine.jsonl), optionally only those of `source`."""
    if not path.exists():
        return
    needle = json.dumps(source, ensure_ascii=False) if source is not None else None
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            # Cheap test before parsing: most lines of a big log are about other files.
            if needle is not None and needle not in line:
                continue
            entry: dict[str, Any] = json.loads(line)
            if source is None or entry.get("source") == source:
                yield entry


@dataclass(frozen=True)
class Step:
    """What happened to one input unit (a line, or a table's conversation) of a file."""

    line: int
    outcome: str  # train | holdout | clean | prepared | quarantined | removed
    stage: str  # the last stage that decided it
    record_id: str | None
    detail: str
    source: str = ""  # the input file's name as records store it


def _ids(path: Path, source: str) -> dict[str, int]:
    """id -> line of the records of `source` in a records Parquet file."""
    if not path.exists():
        return {}
    table = pq.read_table(path, columns=["id", "source", "line"], filters=[("source", "=", source)])
    return dict(zip(table.column("id").to_pylist(), table.column("line").to_pylist(), strict=True))


def _members(path: Path, ids: Iterable[str]) -> set[str]:
    if not path.exists():
        return set()
    wanted = list(ids)
    table = pq.read_table(path, columns=["id"])
    mask = pc.is_in(table.column("id"), value_set=pa.array(wanted, type=pa.string()))
    return set(table.column("id").filter(mask).to_pylist())


def trace(paths: PathsParams, source: str) -> list[Step]:
    """Every unit of input file `source` (relative to paths.incoming), in line order, with
    where it ended up: quarantined by ingest, removed by hygiene, moved by split, or kept as
    a record in clean / train / holdout.

    `source` is the real file name or the name ingest stored; a real name holding personal
    data is looked up as stored (redacted with every kind, which is ingest's default)."""
    from retune.data.pii import Redactor  # only `retune trace` needs the detectors here

    for name in dict.fromkeys([text_name(source), stored_name(source, Redactor())]):
        steps = _trace(paths, name)
        if steps:
            return [replace(s, source=name) for s in steps]
    return []


def _trace(paths: PathsParams, source: str) -> list[Step]:
    steps: list[Step] = []
    from retune.artifacts import (
        CLEAN_RECORDS,
        HOLDOUT_SPLIT,
        PREPARED_RECORDS,
        QUARANTINE,
        QUARANTINE_FILE,
        TRAIN_SPLIT,
    )

    for q in read_changes(QUARANTINE.path(paths) / QUARANTINE_FILE, source):
        rows = q.get("rows")
        where = f" (rows {rows[0]}-{rows[-1]})" if rows and len(rows) > 1 else ""
        steps.append(
            Step(
                int(q["line"]),
                "quarantined",
                "ingest",
                None,
                f"{q['reason']}{where}: {q['detail']}",
            )
        )
    prepared = _ids(PREPARED_RECORDS.path(paths), source)
    hygiene = {c["id"]: c for c in read_changes(paths.clean / CHANGES_FILE, source)}
    moved = {c["id"]: c for c in read_changes(paths.split / CHANGES_FILE, source)}
    clean_file, train_file = CLEAN_RECORDS.path(paths), TRAIN_SPLIT.path(paths)
    clean_exists, split_exists = clean_file.exists(), train_file.exists()
    remaining = [rid for rid in prepared if rid not in hygiene]
    train = _members(train_file, remaining) if split_exists else set()
    holdout = _members(HOLDOUT_SPLIT.path(paths), remaining) if split_exists else set()
    clean = _members(clean_file, remaining) if clean_exists else set()
    for rid, line in prepared.items():
        if rid in hygiene:
            c = hygiene[rid]
            steps.append(Step(line, "removed", "hygiene", rid, f"{c['reason']}: {c['detail']}"))
        elif rid in train or rid in holdout:
            side = "train" if rid in train else "holdout"
            detail = f"record {rid} in the {side} split"
            if rid in moved:
                detail += f" ({moved[rid]['reason']}: {moved[rid]['detail']})"
            steps.append(Step(line, side, "split", rid, detail))
        elif rid in clean:
            steps.append(Step(line, "clean", "hygiene", rid, f"record {rid} (not split yet)"))
        elif not clean_exists:
            steps.append(Step(line, "prepared", "ingest", rid, f"record {rid} (hygiene not run)"))
        else:
            # Written by ingest, absent from clean, in no log: the logs are out of date.
            steps.append(
                Step(line, "missing", "hygiene", rid, f"record {rid}: in no later file or log")
            )
    return sorted(steps, key=lambda s: s.line)


def summary(steps: list[Step]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for s in steps:
        counts[s.outcome] = counts.get(s.outcome, 0) + 1
    return counts


# What a registered version trained on, an artifact of its MLflow run: the train split's record
# id, input file and line of each row. `retune trace` matches a line's record id against it.
TRAIN_ROWS_ARTIFACT = "lineage/train_rows.parquet"
ROWS_PER_FILE_ARTIFACT = "lineage/rows_per_file.json"


def train_rows(train_file: Path) -> pa.Table:
    """The rows `train_file` (a records Parquet file) trains on: id, source, line."""
    return pq.read_table(train_file, columns=["id", "source", "line"])


def rows_per_file(rows: pa.Table) -> dict[str, int]:
    """Input file -> how many of `rows` (id, source, line) came from it, by file name."""
    counts = rows.group_by("source").aggregate([("id", "count")])
    pairs = zip(
        counts.column("source").to_pylist(), counts.column("id_count").to_pylist(), strict=True
    )
    return dict(sorted((str(s), int(n)) for s, n in pairs))


def trained_by(
    steps: list[Step], versions: dict[int, set[str] | None]
) -> tuple[list[list[int]], list[int]]:
    """For each of `steps`, the versions (newest first) whose train rows hold its record;
    and the versions whose rows are unknown (None in `versions`: registered without them)."""
    known = sorted((v for v, ids in versions.items() if ids is not None), reverse=True)
    per_step = [
        [v for v in known if s.record_id is not None and s.record_id in (versions[v] or set())]
        for s in steps
    ]
    return per_step, sorted((v for v, ids in versions.items() if ids is None), reverse=True)
