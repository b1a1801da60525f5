"""Stage `ingest`: every file under `paths.incoming` into canonical records, or into quarantine.

Runs as `python -m tasks.ingest` (the dvc.yaml stage) and as `ingest_task` in Prefect flows.
Every input row ends up in a record or in quarantine.jsonl (with file, line and reason); bad
input never stops the stage (too little left is for `validate` to say). The format readers are
in retune.data.readers, retune.data.tables and retune.data.long_tables; what they send goes
to retune.data.sink.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retune.artifacts import (
    INCOMING,
    INGEST_REPORT,
    MANIFEST_FILE,
    PREPARED,
    QUARANTINE,
    QUARANTINE_FILE,
    RECORDS_FILE,
)
from retune.config import ColumnsParams, IngestParams, Params
from retune.data.lineage import data_version, stored_name, text_name
from retune.data.long_tables import read_long
from retune.data.pii import Redactor
from retune.data.readers import (
    FileStats,
    Plan,
    ReadFailure,
    line_limit,
    read_jsonl,
    read_txt,
)
from retune.data.records import write_records
from retune.data.sink import ALL_REASONS, Sink
from retune.data.sink import CONTRACT_REASONS as CONTRACT_REASONS  # the vocabularies, from here too
from retune.data.sink import READ_REASONS as READ_REASONS
from retune.data.sink import REASONS as REASONS
from retune.data.snapshot import INCOMING_DVC_TAG, keep
from retune.data.tables import csv_header, layout, parquet_columns, read_table
from retune.data.text import normalize_text as normalize_text  # what tests and callers import
from retune.entry import stage_main, stage_task
from retune.errors import IngestError
from retune.reports import write_json

# Why an entry under `paths.incoming` was not read at all (reports/ingest.json: skipped_files).
SKIPPED: dict[str, str] = {
    "hidden": "its name (or a folder's) starts with `.`; rename it to ingest it",
    "symlink": "a symbolic link: retune reads only files inside paths.incoming and follows no "
    "link; copy the file in instead",
    "special": "not a regular file (a FIFO, socket or device); it is never opened",
    "unlisted": "a folder that cannot be listed (permissions); make it readable",
    "unsupported": "an extension retune does not read",
    "empty": "a table without a header row (an empty file?)",
}

# Record.format values, one per input layout.
FORMATS = (
    "chat_jsonl",
    "completion_jsonl",
    "table_chat",
    "table_wide",
    "table_long",
    "table_text",
    "text",
)

SUPPORTED = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".txt": "txt",
}


@dataclass(frozen=True)
class IngestResult:
    records_file: Path
    manifest_file: Path
    quarantine_file: Path
    data_version: str
    n_records: int
    input_rows: int
    accepted_rows: int
    quarantined_rows: int
    report: dict[str, Any] = field(repr=False)


def _walk(incoming: Path) -> tuple[list[tuple[Path, str]], list[tuple[str, str]]]:
    """Regular files under `incoming` as (path, name relative to it), and the entries not read
    as (name, a key of SKIPPED): no link is followed, no hidden folder entered."""
    files: list[tuple[Path, str]] = []
    skipped: list[tuple[str, str]] = []
    folders = [incoming]
    while folders:
        folder = folders.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError:
            skipped.append((folder.relative_to(incoming).as_posix(), "unlisted"))
            continue
        for entry in entries:
            path = Path(entry.path)
            rel = path.relative_to(incoming).as_posix()
            try:
                if entry.name.startswith("."):
                    skipped.append((rel, "hidden"))
                elif entry.is_symlink():
                    skipped.append((rel, "symlink"))
                elif entry.is_dir(follow_symlinks=False):
                    folders.append(path)
                elif entry.is_file(follow_symlinks=False):
                    files.append((path, rel))
                else:
                    skipped.append((rel, "special"))
            except OSError:
                skipped.append((rel, "unlisted"))
    return sorted(files, key=lambda f: f[1]), sorted(skipped)


def _plan(
    incoming: Path, cols: ColumnsParams, redactor: Redactor, limit: int
) -> tuple[list[Plan], list[dict[str, str]]]:
    """Every file under `incoming` (sorted) with its reader and layout, and the files skipped
    ({file, reason, detail}). Names are stored redacted (retune.data.lineage.stored_name).

    Table layouts are decided here, so a table whose columns retune cannot map stops the stage
    before any output is written; a file that cannot be read is planned to be quarantined."""
    files, skipped = _walk(incoming) if incoming.is_dir() else ([], [])
    root = Path(os.path.realpath(incoming))
    plans: list[Plan] = []
    for path, rel in files:
        source = stored_name(rel, redactor)
        kind = SUPPORTED.get(path.suffix.lower())
        if kind is None:
            skipped.append((rel, "unsupported"))
            continue
        plan = Plan(path, source, kind, root)
        if kind in ("csv", "tsv", "parquet"):
            try:
                columns = parquet_columns(plan) if kind == "parquet" else csv_header(plan, limit)
            except ReadFailure as exc:
                plans.append(Plan(path, source, kind, root, failure=exc))
                continue
            except Exception as exc:  # one file retune fails on must not stop the others
                plans.append(Plan(path, source, kind, root, failure=_bug(exc)))
                continue
            if not columns:
                skipped.append((rel, "empty"))
                continue
            shape = layout(columns, cols, text_name(str(path)))
            plan = Plan(path, source, kind, root, shape, columns)
        plans.append(plan)
    out = [
        {"file": stored_name(rel, redactor), "reason": reason, "detail": SKIPPED[reason]}
        for rel, reason in sorted(skipped)
    ]
    if not plans:
        found = f" It holds only: {', '.join(s['file'] for s in out[:10])}." if out else ""
        raise IngestError(
            f"{incoming}: no input files retune can read"
            f"{' (the folder does not exist)' if not incoming.is_dir() else ''}.{found} "
            f"Supported extensions: {', '.join(sorted(SUPPORTED))}. Put your data there, or run "
            "`make data` (or `retune sample`) to write the sample corpus."
        )
    return plans, out


def _bug(exc: Exception) -> ReadFailure:
    detail = (
        f"retune failed reading it ({type(exc).__name__}: {exc}); please report this bug (the "
        "rest of the data was ingested)"
    )
    return ReadFailure(0, "read_error", detail)


def _quarantine_rest(sink: Sink, st: FileStats, exc: ReadFailure) -> None:
    """Quarantine what a reader could not read: the rows it counted but did not settle, and the
    rest of the file (one unit) when there were none."""
    if st.rows == st.accepted + st.quarantined:
        st.rows += 1
    where = f"from line {exc.line} on: " if exc.line > 1 else ""
    count = st.rows - st.accepted - st.quarantined
    sink.reject(st, exc.reason, where + exc.detail, exc.line, None, count=count)


def _rows(
    plans: list[Plan], sink: Sink, cols: ColumnsParams, stats: list[FileStats]
) -> Iterator[dict]:
    for plan in plans:
        st = sink.start(plan.source)
        stats.append(st)
        try:
            if plan.failure is not None:
                raise plan.failure
            if plan.kind == "jsonl":
                yield from read_jsonl(plan, st, sink, cols)
            elif plan.kind == "txt":
                yield from read_txt(plan, st, sink)
            elif plan.layout == "table_long":
                yield from read_long(plan, st, sink, cols)
            else:
                yield from read_table(plan, st, sink, cols)
        except ReadFailure as exc:
            _quarantine_rest(sink, st, exc)
        except Exception as exc:  # one file retune fails on must not stop the others
            _quarantine_rest(sink, st, _bug(exc))
        formats = ", ".join(sorted(st.formats)) or plan.layout or plan.kind
        print(
            f"ingest: {plan.source} ({formats}): {st.rows} rows, {st.accepted} accepted, "
            f"{st.quarantined} quarantined"
            + (f", {st.skipped_blank} blank skipped" if st.skipped_blank else ""),
            flush=True,
        )
        if st.rows != st.accepted + st.quarantined:
            raise RuntimeError(
                f"ingest lost rows in {plan.source}: {st.rows} read, {st.accepted} accepted, "
                f"{st.quarantined} quarantined (a bug in retune: please report it)"
            )


def ingest(
    incoming: Path,
    cfg: IngestParams,
    prepared_dir: Path,
    quarantine_dir: Path,
    text_chars: tuple[int, int] | None = None,
) -> IngestResult:
    """Read every file under `incoming`; write `prepared_dir`/records.parquet + manifest.json and
    `quarantine_dir`/quarantine.jsonl. Outputs are replaced only when the whole run succeeds.

    `text_chars`: (validate.min_chars, validate.max_chars); a record outside them is quarantined
    here rather than failing validation."""
    started = time.perf_counter()
    redactor = Redactor(tuple(dict.fromkeys(cfg.redact)))
    plans, skipped = _plan(incoming, cfg.columns, redactor, line_limit(cfg.max_message_chars))
    if "secret" not in cfg.redact:
        print(
            "ingest: WARNING: ingest.redact does not list `secret`: API keys, tokens, passwords "
            "and private keys in your data will be stored for training, and a model can repeat "
            "them. Add `secret` back to ingest.redact unless you are sure the data holds none.",
            flush=True,
        )
    for s in skipped:
        why = s["detail"]
        if s["reason"] == "unsupported":
            why = f"unsupported; retune reads {', '.join(sorted(SUPPORTED))}"
        print(f"ingest: warning: skipping {s['file']} ({why})", flush=True)
    prepared_dir.mkdir(parents=True, exist_ok=True)
    quarantine_dir.mkdir(parents=True, exist_ok=True)
    records_file = prepared_dir / RECORDS_FILE
    quarantine_file = quarantine_dir / QUARANTINE_FILE
    manifest_file = prepared_dir / MANIFEST_FILE
    records_tmp = prepared_dir / f"{RECORDS_FILE}.tmp"
    quarantine_tmp = quarantine_dir / f"{QUARANTINE_FILE}.tmp"
    stats: list[FileStats] = []
    try:
        with quarantine_tmp.open("w", encoding="utf-8") as qfh:
            sink = Sink(cfg, qfh, redactor, text_chars)
            n_records = write_records(_rows(plans, sink, cfg.columns, stats), records_tmp)
    except BaseException:
        records_tmp.unlink(missing_ok=True)
        quarantine_tmp.unlink(missing_ok=True)
        raise
    input_rows = sum(s.rows for s in stats)
    accepted = sum(s.accepted for s in stats)
    quarantined = sum(s.quarantined for s in stats)
    accounted = input_rows == accepted + quarantined and n_records == len(sink.seen)
    if not accounted:
        raise RuntimeError(
            f"ingest lost rows: {input_rows} read, {accepted} accepted, {quarantined} quarantined, "
            f"{n_records} records written for {len(sink.seen)} ids (a bug in retune: please "
            "report it)"
        )
    version = data_version(sink.seen)
    os.replace(records_tmp, records_file)
    os.replace(quarantine_tmp, quarantine_file)
    sources = {
        s.source: {"rows": s.rows, "accepted": s.accepted, "quarantined": s.quarantined}
        for s in stats
    }
    write_json(manifest_file, {"data_version": version, "n_records": n_records, "sources": sources})
    report: dict[str, Any] = {
        "data_version": version,
        "input_rows": input_rows,
        "accepted_rows": accepted,
        "quarantined_rows": quarantined,
        "accounted": accounted,
        "records": n_records,
        "skipped_blank": sum(s.skipped_blank for s in stats),
        "quarantine_entries": sink.entries,
        "by_reason": {r: sink.by_reason.get(r, 0) for r in ALL_REASONS},
        "by_file": {
            s.source: {
                "rows": s.rows,
                "accepted": s.accepted,
                "quarantined": s.quarantined,
                "skipped_blank": s.skipped_blank,
                "records": s.records,
                "formats": dict(sorted(s.formats.items())),
            }
            for s in stats
        },
        "by_format": dict(sorted(sink.by_format.items())),
        "redact": list(sink.kinds),
        "redactions": {k: sink.redactions.get(k, 0) for k in sink.kinds},
        "quarantine_redactions": {k: sink.quarantine_redactions.get(k, 0) for k in sink.kinds},
        "line_limit_bytes": sink.line_limit,
        "skipped_files": skipped,
        "unsupported_files": [s["file"] for s in skipped if s["reason"] == "unsupported"],
    }
    elapsed = time.perf_counter() - started
    reasons = ", ".join(f"{r} {n}" for r, n in sink.by_reason.most_common()) or "none"
    skips = Counter(s["reason"] for s in skipped)
    not_read = ", ".join(f"{r} {n}" for r, n in skips.most_common())
    print(
        f"ingest: {input_rows} rows from {len(stats)} files -> {n_records} records; "
        f"{accepted} rows accepted, {quarantined} quarantined ({reasons}) -> {quarantine_file}; "
        f"{len(skipped)} files skipped{f' ({not_read})' if skipped else ''}; "
        f"redacted {sum(sink.redactions.values())}; {elapsed:.1f}s "
        f"({input_rows / max(elapsed, 1e-9):,.0f} rows/s); data_version {version[:12]}",
        flush=True,
    )
    if n_records == 0:
        print("ingest: warning: no records were accepted; see the quarantine file", flush=True)
    return IngestResult(
        records_file=records_file,
        manifest_file=manifest_file,
        quarantine_file=quarantine_file,
        data_version=version,
        n_records=n_records,
        input_rows=input_rows,
        accepted_rows=accepted,
        quarantined_rows=quarantined,
        report=report,
    )


def run(params: Params) -> IngestResult:
    """Edge: ingest `paths.incoming` into `paths.prepared`/`paths.quarantine`; write
    reports/ingest.json."""
    contract = (params.validate.min_chars, params.validate.max_chars)
    result = ingest(
        INCOMING.path(params),
        params.ingest,
        PREPARED.path(params),
        QUARANTINE.path(params),
        contract,
    )
    INGEST_REPORT.write(params, {**result.report, INCOMING_DVC_TAG: snapshot_incoming(params)})
    return result


def snapshot_incoming(params: Params) -> dict[str, Any]:
    """The inputs' data version as DVC names it, their files kept in the DVC cache, so the
    run can be reproduced later (`retune reproduce`); `register` pushes it to the remote."""
    return keep(INCOMING.path(params), "ingest", "the inputs")


ingest_task = stage_task(run, name="ingest")

if __name__ == "__main__":
    stage_main(run)
