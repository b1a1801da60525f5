"""Stage `hygiene`: quarantine abusive conversations, keep one of each group of near-duplicates,
and report what the clean data is made of (categories, languages, lengths).

Runs as `python -m tasks.hygiene` (the dvc.yaml stage) and as `hygiene_task` in Prefect flows.
Every prepared record is either in `paths.clean`/records.parquet or in its changes.jsonl.
"""

from __future__ import annotations

import os
import resource
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from retune.artifacts import (
    CLEAN,
    HYGIENE_CHART,
    HYGIENE_REPORT,
    MANIFEST_FILE,
    PREPARED,
    PREPARED_RECORDS,
    RECORDS_FILE,
    manifest_version,
)
from retune.config import HygieneParams, NearDuplicateParams, Params, RepresentationParams
from retune.data import dedup, representation
from retune.data.lineage import CHANGES_FILE, change, data_version, write_changes
from retune.data.records import SCHEMA
from retune.data.safety import Flag, Screen
from retune.entry import stage_main, stage_task
from retune.reports import write_json

# Why a record left the data here: a fixed vocabulary (reports, tests and `retune trace`).
REASONS: dict[str, str] = {
    "unsafe": "abusive or toxic: a sentence the classifier scores at or above "
    "hygiene.safety_threshold, or a hygiene.blocklist term",
    "near_duplicate": "a near-duplicate (MinHash Jaccard >= near_duplicates.threshold) of "
    "a record kept earlier in source/line order (`kept_id`, `kept_source`, `kept_line`)",
}
_BATCH_ROWS = 8_192
# The record columns needed to place and log a record; small, so read whole.
_INDEX_COLUMNS = ["id", "conversation_id", "source", "line", "n_chars", "n_messages"]


@dataclass(frozen=True)
class HygieneResult:
    records_file: Path
    manifest_file: Path
    changes_file: Path
    data_version: str
    n_input: int
    n_kept: int
    removed: dict[str, int]  # reason -> records
    report: dict[str, Any] = field(repr=False)


def _batches(path: Path, columns: list[str]) -> Any:
    return pq.ParquetFile(path).iter_batches(batch_size=_BATCH_ROWS, columns=columns)


def _screen(
    path: Path, cfg: HygieneParams, category_field: str
) -> tuple[dict[int, Flag], int, pa.ChunkedArray]:
    """One pass over messages and meta: row -> flag for every unsafe record, how many distinct
    sentences were scored, and every record's category."""
    screen = Screen(cfg.safety_threshold, cfg.blocklist)
    flags: dict[int, Flag] = {}
    categories = []
    offset = 0
    for batch in _batches(path, ["messages", "meta"]):
        _, found = screen.screen(batch.column(0))
        for f in found:
            flags[offset + f.index] = f
        categories.append(representation.category_values(batch.column(1), category_field))
        offset += batch.num_rows
    return flags, screen.sentences_scored, pa.chunked_array(categories, type=pa.string())


def _texts_of(path: Path, rows: np.ndarray) -> list[str]:
    """The texts of `rows` (sorted), picked from the record batches in one pass."""
    out: list[str] = []
    offset = 0
    for batch in _batches(path, ["text"]):
        lo, hi = np.searchsorted(rows, [offset, offset + batch.num_rows])
        if hi > lo:
            picked = batch.column(0).take(pa.array(rows[lo:hi] - offset, pa.int64()))
            out.extend(t or "" for t in picked.to_pylist())
        offset += batch.num_rows
    return out


def _log_unsafe(row: dict[str, Any], flag: Flag) -> dict[str, Any]:
    return change(
        "hygiene",
        "unsafe",
        row,
        f"{flag.reason} in a {flag.role} message: {flag.sentence!r}",
        score=flag.score,
        term=flag.term,
        role=flag.role,
        sentence=flag.sentence,
    )


def _log_duplicate(row: dict[str, Any], kept: dict[str, Any], similarity: float) -> dict[str, Any]:
    return change(
        "hygiene",
        "near_duplicate",
        row,
        f"near-duplicate (similarity {similarity:.2f}) of {kept['id']} at "
        f"{kept['source']}:{kept['line']}, which was kept",
        kept_id=kept["id"],
        kept_source=kept["source"],
        kept_line=kept["line"],
        similarity=round(similarity, 4),
    )


def _write_clean(prepared: Path, keep: np.ndarray, out: Path) -> int:
    """Copy the kept rows, batch by batch, into `out` (the records schema)."""
    tmp = out.with_suffix(".parquet.tmp")
    n, offset = 0, 0
    try:
        with pq.ParquetWriter(tmp, SCHEMA) as writer:
            for batch in _batches(prepared, SCHEMA.names):
                mask = keep[offset : offset + batch.num_rows]
                offset += batch.num_rows
                kept = pa.Table.from_batches([batch]).filter(pa.array(mask)).cast(SCHEMA)
                if kept.num_rows:
                    writer.write_table(kept)
                    n += kept.num_rows
            if n == 0:
                writer.write_table(SCHEMA.empty_table())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out)
    return n


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def hygiene(
    prepared_dir: Path,
    cfg: HygieneParams,
    clean_dir: Path,
    chart_file: Path | None = None,
    near: NearDuplicateParams | None = None,
    described: RepresentationParams | None = None,
) -> HygieneResult:
    """Read `prepared_dir`/records.parquet; write `clean_dir`/records.parquet (the records kept),
    manifest.json and changes.jsonl (one line per record removed, with the reason and where it
    came from); draw the representation chart to `chart_file` if given. `near` and `described`
    default to the `near_duplicates` and `representation` defaults."""
    near = near or NearDuplicateParams()
    described = described or RepresentationParams()
    started = time.perf_counter()
    prepared = prepared_dir / RECORDS_FILE
    if not prepared.exists():
        raise PREPARED_RECORDS.missing(prepared)
    index = pq.read_table(prepared, columns=_INDEX_COLUMNS)
    n = index.num_rows
    print(f"hygiene: screening {n:,} records for abusive text", flush=True)
    flags, sentences, categories = _screen(prepared, cfg, described.category_field)
    unsafe = np.zeros(n, dtype=bool)
    unsafe[list(flags)] = True
    t_safety = time.perf_counter() - started

    print(f"hygiene: {len(flags):,} unsafe; sketching for near-duplicates", flush=True)
    order = pc.sort_indices(index, [("source", "ascending"), ("line", "ascending")]).to_numpy()
    matches, near_report, t_sketch, t_dedup = _near_duplicates(prepared, order, unsafe, near)

    duplicate = np.zeros(n, dtype=bool)
    duplicate[[m.index for m in matches]] = True
    keep = ~unsafe & ~duplicate

    clean_dir.mkdir(parents=True, exist_ok=True)
    records_file = clean_dir / RECORDS_FILE
    n_kept = _write_clean(prepared, keep, records_file)

    n_logged = _log_changes(index, order, flags, matches, clean_dir / CHANGES_FILE)

    removed = {"unsafe": int(unsafe.sum()), "near_duplicate": int(duplicate.sum())}
    accounted = n == n_kept + sum(removed.values()) == n_kept + n_logged
    if not accounted:
        raise RuntimeError(
            f"hygiene lost records: {n} read, {n_kept} kept, {removed} removed, {n_logged} "
            "logged (a bug in retune: please report it)"
        )
    kept_ids = index.column("id").filter(pa.array(keep))
    version = data_version(kept_ids.to_pylist())
    manifest_file = clean_dir / MANIFEST_FILE
    write_json(
        manifest_file,
        {
            "data_version": version,
            "n_records": n_kept,
            "input_records": n,
            "removed": removed,
            "prepared_data_version": manifest_version(prepared_dir / MANIFEST_FILE),
        },
    )

    kept_rows = np.flatnonzero(keep)
    chars = index.column("n_chars").to_numpy()[keep]
    rep = representation.describe(
        kept_ids,
        chars,
        index.column("n_messages").to_numpy()[keep],
        categories.filter(pa.array(keep)),
        lambda rows: _texts_of(prepared, kept_rows[rows]),
        described.category_field,
        described.language_sample,
    )
    if chart_file is not None:
        representation.chart(rep, chars, chart_file)

    elapsed = time.perf_counter() - started
    by_term = Counter(f.term for f in flags.values() if f.term is not None)
    report: dict[str, Any] = {
        "data_version": version,
        "input": n,
        "kept": n_kept,
        "removed": removed,
        "accounted": accounted,
        "changes_logged": n_logged,
        "reasons": REASONS,
        "near_duplicates": near_report | {"removed": removed["near_duplicate"]},
        "safety": {
            "threshold": cfg.safety_threshold,
            "blocklist_terms": len(cfg.blocklist),
            "removed": removed["unsafe"],
            "by_classifier": sum(1 for f in flags.values() if f.term is None),
            "by_blocklist": sum(by_term.values()),
            "blocklist_hits": dict(by_term.most_common()),
            "sentences_scored": sentences,
        },
        "by_source": _by_source(index.column("source"), unsafe, duplicate),
        "representation": rep,
        "seconds": {
            "safety": round(t_safety, 2),
            "sketch": round(t_sketch, 2),
            "deduplicate": round(t_dedup, 2),
            "total": round(elapsed, 2),
        },
        "records_per_s": round(n / max(elapsed, 1e-9), 1),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
    }
    langs = ", ".join(f"{k} {v:.1%}" for k, v in list(rep["languages"]["shares"].items())[:4])
    print(
        f"hygiene: {n:,} records -> {n_kept:,} kept; {removed['unsafe']:,} unsafe, "
        f"{removed['near_duplicate']:,} near-duplicates -> {clean_dir / CHANGES_FILE}; "
        f"{len(rep['categories']['counts'])} categories, languages {langs or 'none'}; "
        f"{elapsed:.1f}s ({n / max(elapsed, 1e-9):,.0f} records/s); data_version {version[:12]}",
        flush=True,
    )
    return HygieneResult(
        records_file=records_file,
        manifest_file=manifest_file,
        changes_file=clean_dir / CHANGES_FILE,
        data_version=version,
        n_input=n,
        n_kept=n_kept,
        removed=removed,
        report=report,
    )


def _near_duplicates(
    prepared: Path, order: np.ndarray, unsafe: np.ndarray, near: NearDuplicateParams
) -> tuple[list[Any], dict[str, Any], float, float]:
    """Near-duplicates among the safe records, first in (source, line) order kept: the
    matches, the report's near_duplicates figures, and the sketch and dedup seconds."""
    started = time.perf_counter()
    with dedup.sketch_batches(
        (b.column(0) for b in _batches(prepared, ["text"])),
        near.threshold,
        near.num_perm,
        near.shingle_words,
    ) as sk:
        t_sketch = time.perf_counter() - started
        matches = dedup.deduplicate(sk, order[~unsafe[order]])
        pairs = dict(sk.stats)
        figures = {
            "threshold": near.threshold,
            "num_perm": near.num_perm,
            "shingle_words": near.shingle_words,
            "lsh_bands": sk.bands,
            "lsh_rows": sk.rows,
            "candidate_pairs": pairs["candidate_pairs"],
            "similar_pairs": pairs["similar_pairs"],
            "representatives": len({m.of for m in matches}),
        }
    return matches, figures, t_sketch, time.perf_counter() - started - t_sketch


def _log_changes(
    index: pa.Table,
    order: np.ndarray,
    flags: dict[int, Flag],
    matches: list[Any],
    path: Path,
) -> int:
    """One change-log line per record removed, in input (source, line) order."""
    rows = _rows(index, set(flags) | {m.index for m in matches} | {m.of for m in matches})
    changes = [(i, _log_unsafe(rows[i], flag)) for i, flag in flags.items()]
    changes += [(m.index, _log_duplicate(rows[m.index], rows[m.of], m.similarity)) for m in matches]
    rank = np.empty(index.num_rows, dtype=np.int64)
    rank[order] = np.arange(index.num_rows)
    changes.sort(key=lambda c: rank[c[0]])
    return write_changes(path, (c for _, c in changes))


def _rows(index: pa.Table, wanted: set[int]) -> dict[int, dict[str, Any]]:
    """Row number -> {id, conversation_id, source, line} for the rows a log line names."""
    at = sorted(wanted)
    picked = index.select(["id", "conversation_id", "source", "line"]).take(
        pa.array(at, pa.int64())
    )
    return dict(zip(at, picked.to_pylist(), strict=True))


def _by_source(sources: pa.ChunkedArray, unsafe: np.ndarray, duplicate: np.ndarray) -> dict:
    """Per input file: records in, kept, unsafe, near-duplicates."""
    status = np.where(unsafe, "unsafe", np.where(duplicate, "near_duplicate", "kept"))
    table = pa.table({"source": sources, "status": pa.array(status)})
    counts = table.group_by(["source", "status"]).aggregate([([], "count_all")])
    out: dict[str, dict[str, int]] = {}
    for src, st, k in zip(
        *(counts.column(c).to_pylist() for c in ("source", "status", "count_all")), strict=True
    ):
        entry = out.setdefault(src, {"input": 0, "kept": 0, "unsafe": 0, "near_duplicate": 0})
        entry[st] += k
        entry["input"] += k
    return dict(sorted(out.items()))


def run(params: Params) -> HygieneResult:
    """Edge: clean `paths.prepared` into `paths.clean`; write reports/hygiene.json and the
    representation chart reports/hygiene.png."""
    result = hygiene(
        PREPARED.path(params),
        params.hygiene,
        CLEAN.path(params),
        chart_file=HYGIENE_CHART.path(params),
        near=params.near_duplicates,
        described=params.representation,
    )
    HYGIENE_REPORT.write(params, result.report)
    return result


hygiene_task = stage_task(run, name="hygiene")

if __name__ == "__main__":
    stage_main(run)
