"""Bad input is quarantined, never fatal: `retune ingest` on a corpus of malformed files and rows
mixed with good ones. Per file: rows in, accepted, quarantined against what each kind should
give; the exit code; whether a traceback was printed; whether a good row was lost.

Run: `python -m benchmarks.malformed` (seconds; `--smoke` is the same corpus). Writes
benchmarks/results/malformed.json. `write_corpus` is also what tests/test_ingest_malformed.py
runs ingest on.
"""

from __future__ import annotations

import argparse
import codecs
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.common import (
    BIN,
    RESULTS,
    ROOT,
    bench_env,
    command_line,
    measure,
    row,
    write_result,
)
from benchmarks.report import meets

NAME = "malformed"
# What must never reach records, reports or quarantine: a key and an address in a rejected row,
# and the contents of files outside the incoming folder that links point to.
SECRET = "sk-proj-Zr8TqX2mVb7LpK4nWc9YhD3sFg6JuA1e"
EMAIL = "jane.doe@example.com"  # in a rejected row and in a file name
META_EMAIL = "jane.roe@example.org"  # a key of an accepted record's extra fields
OUTSIDE = "outside-marker-7f3a: this file lies outside the incoming folder"
# validate.min_chars, validate.max_chars: the defaults, which `retune ingest` passes on.
TEXT_CHARS = (1, 16_000)


@dataclass(frozen=True)
class Kind:
    """One kind of bad file or row, in the file `file` (relative to the incoming folder), with
    what ingest should make of it: rows in, accepted, quarantined and the quarantine reasons,
    or `skipped`, the reason the file is not read at all. `good`: markers of the good rows."""

    name: str
    file: str
    rows: int = 0
    accepted: int = 0
    quarantined: int = 0
    reasons: frozenset[str] = frozenset()
    good: tuple[str, ...] = ()
    skipped: str | None = None


def chat(marker: str, *, first: str = "user") -> dict[str, Any]:
    """A good conversation whose text holds `marker` (no two kinds share one)."""
    second = "assistant" if first == "user" else "user"
    return {
        "messages": [
            {"role": first, "content": f"Question {marker}: my router blinks orange."},
            {"role": second, "content": f"Answer {marker}: hold reset for ten seconds."},
        ]
    }


def _lines(path: Path, lines: list[Any], encoding: str = "utf-8") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines)
    path.write_bytes(text.encode(encoding))


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


def _good(kind: str, n: int) -> list[str]:
    return [f"{kind}-good-{i}" for i in range(n)]


def _jsonl_kinds(root: Path) -> list[Kind]:
    kinds = []

    def add(name: str, file: str, n_good: int, bad: list[Any], reasons: set[str]) -> None:
        good = _good(name, n_good)
        _lines(root / file, [chat(m) for m in good] + bad)
        kinds.append(
            Kind(name, file, n_good + len(bad), n_good, len(bad), frozenset(reasons), tuple(good))
        )

    # Nested past orjson's limit (1,024), and past Python's recursion limit but not orjson's.
    deep = json.dumps(chat("deep1000-bad"))[:-1] + f', "extra": {_deep(1000)}}}'
    add("deep_5000", "deep_5000.jsonl", 2, [_deep(5000)], {"too_deep"})
    add("deep_1000", "deep_1000.jsonl", 2, [deep], {"too_deep"})
    add("giant_line", "giant_line.jsonl", 2, [json.dumps(chat("x" * 3_000_000))], {"too_large"})
    secret_row = f'{{"messages": [{{"role": "user", "content": "mail {EMAIL} key {SECRET}"'
    add("secret_in_bad_row", "secrets.jsonl", 1, [secret_row], {"malformed_json"})
    add(
        "role_order",
        "role_order.jsonl",
        1,
        [
            chat("order-bad-0", first="assistant"),
            {"messages": [chat("order-bad-1")["messages"][0]] * 2},
        ],
        {"role_order"},
    )
    empty = chat("empty-bad")
    empty["messages"][1]["content"] = "\u200b \u2060"
    add("empty_after_cleaning", "empty_turn.jsonl", 1, [empty], {"empty_text"})
    long_chat = {
        "messages": [
            {"role": r, "content": f"long-bad {i} " + "word " * 700}
            for i, r in enumerate(["user", "assistant"] * 3)
        ]
    }
    add("text_over_validate_max_chars", "text_length.jsonl", 1, [long_chat], {"text_length"})
    add(
        "truncated_line",
        "truncated.jsonl",
        2,
        ['{"messages": [{"role": "user"'],
        {"malformed_json"},
    )
    meta = chat("metakey-good-0")
    meta[META_EMAIL] = "vip"
    _lines(root / "meta_key.jsonl", [meta])
    kinds.append(Kind("email_in_meta_key", "meta_key.jsonl", 1, 1, 0, good=("metakey-good-0",)))
    add("email_in_file_name", f"{EMAIL}.jsonl", 2, [], set())
    path = root / "latin1.jsonl"
    _lines(path, [chat(m) for m in _good("jsonl_latin1", 1)])
    with path.open("ab") as fh:
        fh.write(b'{"prompt": "caf\xe9 latin1-bad", "completion": "x"}\n')
    kinds.append(
        Kind(
            "jsonl_latin1",
            "latin1.jsonl",
            2,
            1,
            1,
            frozenset({"invalid_utf8"}),
            ("jsonl_latin1-good-0",),
        )
    )
    good = _good("utf8_bom", 1)
    (root / "bom.jsonl").write_bytes(codecs.BOM_UTF8 + (json.dumps(chat(good[0])) + "\n").encode())
    kinds.append(Kind("utf8_bom", "bom.jsonl", 1, 1, 0, good=tuple(good)))
    good = _good("utf16_jsonl", 2)
    _lines(root / "utf16.jsonl", [chat(m) for m in good], encoding="utf-16")
    kinds.append(Kind("utf16_jsonl_with_bom", "utf16.jsonl", 2, 2, 0, good=tuple(good)))
    return kinds


def _json_kinds(root: Path) -> list[Kind]:
    kinds = []
    good = _good("pretty_array", 3)
    (root / "pretty_array.json").write_text(json.dumps([chat(m) for m in good], indent=2))
    kinds.append(Kind("pretty_array", "pretty_array.json", 3, 3, 0, good=tuple(good)))
    good = _good("pretty_object", 1)
    (root / "pretty_object.json").write_text(json.dumps(chat(good[0]), indent=2))
    kinds.append(Kind("pretty_object", "pretty_object.json", 1, 1, 0, good=tuple(good)))
    good = _good("pretty_objects", 2)
    text = "\n".join(json.dumps(chat(m), indent=2) for m in good)
    (root / "pretty_objects.jsonl").write_text(text)
    kinds.append(Kind("pretty_objects_in_jsonl", "pretty_objects.jsonl", 2, 2, 0, good=tuple(good)))
    good = _good("truncated_array", 2)
    text = json.dumps([*(chat(m) for m in good), chat("truncated-bad")], indent=2)
    (root / "truncated_array.json").write_text(text[: text.rindex("Answer truncated-bad")])
    kinds.append(
        Kind(
            "truncated_array",
            "truncated_array.json",
            3,
            2,
            1,
            frozenset({"malformed_json"}),
            tuple(good),
        )
    )
    good = _good("lone_surrogate", 1)
    bad = json.dumps(chat("surrogate-bad")).replace("orange", "\\ud800")
    (root / "surrogate.json").write_text(f"[\n{bad},\n{json.dumps(chat(good[0]))}\n]\n")
    kinds.append(
        Kind(
            "lone_surrogate_escape",
            "surrogate.json",
            2,
            1,
            1,
            frozenset({"malformed_json"}),
            tuple(good),
        )
    )
    good = _good("scalars_in_array", 1)
    (root / "scalars.json").write_text(json.dumps([1, "two", chat(good[0])], indent=1))
    kinds.append(
        Kind("scalars_in_array", "scalars.json", 3, 1, 2, frozenset({"missing_field"}), tuple(good))
    )
    return kinds


def _csv(
    path: Path, header: str, rows: list[str], encoding: str = "utf-8", end: str = "\n"
) -> None:
    path.write_bytes((end.join([header, *rows]) + end).encode(encoding))


def _wide(markers: list[str]) -> list[str]:
    return [f"Question {m}: is it on?,Answer {m}: yes it is." for m in markers]


def _table_kinds(root: Path) -> list[Kind]:
    kinds = []
    good = _good("utf16_csv", 3)
    _csv(root / "utf16_bom.csv", "prompt,completion", _wide(good), encoding="utf-16")
    kinds.append(Kind("utf16_csv_with_bom", "utf16_bom.csv", 3, 3, 0, good=tuple(good)))
    _csv(root / "utf16_nobom.csv", "prompt,completion", _wide(["nobom-bad"]), encoding="utf-16-le")
    kinds.append(Kind("utf16_csv_without_bom", "utf16_nobom.csv", 1, 0, 1, frozenset({"encoding"})))
    _csv(root / "bad_quote.csv", '"prompt,completion', _wide(["badquote-bad-0", "badquote-bad-1"]))
    kinds.append(
        Kind("bad_quote_in_header", "bad_quote.csv", 1, 0, 1, frozenset({"malformed_csv"}))
    )
    good = _good("ragged_csv", 2)
    _csv(root / "ragged.csv", "prompt,completion", [*_wide(good), "ragged-bad,b,c"])
    kinds.append(
        Kind("ragged_row", "ragged.csv", 3, 2, 1, frozenset({"missing_field"}), tuple(good))
    )
    good = _good("giant_field", 2)
    _csv(root / "giant_field.csv", "prompt,completion", [*_wide(good), "giant," + "y" * 2_500_000])
    kinds.append(
        Kind("giant_csv_field", "giant_field.csv", 3, 2, 1, frozenset({"too_large"}), tuple(good))
    )
    good = _good("cr_only", 2)
    _csv(root / "cr_only.csv", "prompt,completion", _wide(good), end="\r")
    kinds.append(Kind("cr_line_endings", "cr_only.csv", 2, 2, 0, good=tuple(good)))
    good = _good("deep_cell", 2)
    cell = f'"{_deep(200)}"'
    _csv(root / "deep_cell.csv", "messages", [*(_chat_cell(m) for m in good), cell])
    kinds.append(
        Kind("deep_json_cell", "deep_cell.csv", 3, 2, 1, frozenset({"too_deep"}), tuple(good))
    )
    good = _good("long_csv", 1)
    _csv(
        root / "long.csv",
        "conversation_id,role,text",
        [
            f"a,user,Question {good[0]}",
            "b,user,Question longrole-bad",
            f"a,assistant,Answer {good[0]}",
            "b,wizard,Answer longrole-bad",
        ],
    )
    kinds.append(
        Kind(
            "long_table_unknown_role", "long.csv", 4, 2, 2, frozenset({"unknown_role"}), tuple(good)
        )
    )
    (root / "empty.csv").write_bytes(b"")
    kinds.append(Kind("zero_byte_csv", "empty.csv", skipped="empty"))
    return kinds


def _chat_cell(marker: str) -> str:
    return '"' + json.dumps(chat(marker)["messages"]).replace('"', '""') + '"'


def _not_utf8(values: list[bytes]) -> pa.Array:
    return pa.array(values, pa.binary()).view(pa.string())


def _parquet_kinds(root: Path) -> list[Kind]:
    kinds = []
    good = _good("parquet_utf8", 3)
    texts = [f"Document {m} about routers.".encode() for m in good] + [b"parquet-bad \xff\xfe"]
    pq.write_table(pa.table({"text": _not_utf8(texts)}), root / "bad_utf8.parquet")
    kinds.append(
        Kind(
            "parquet_invalid_utf8",
            "bad_utf8.parquet",
            4,
            3,
            1,
            frozenset({"invalid_utf8"}),
            tuple(good),
        )
    )
    whole = root / "whole.parquet"
    pq.write_table(pa.table({"text": [f"truncated-bad {i}" for i in range(50)]}), whole)
    data = whole.read_bytes()
    whole.unlink()
    (root / "truncated.parquet").write_bytes(data[: len(data) // 2])
    kinds.append(
        Kind("parquet_truncated", "truncated.parquet", 1, 0, 1, frozenset({"corrupt_file"}))
    )
    (root / "zero.parquet").write_bytes(b"")
    kinds.append(Kind("parquet_zero_bytes", "zero.parquet", 1, 0, 1, frozenset({"corrupt_file"})))
    (root / "not_parquet.parquet").write_text(json.dumps(chat("notparquet-bad")))
    kinds.append(
        Kind("parquet_not_parquet", "not_parquet.parquet", 1, 0, 1, frozenset({"corrupt_file"}))
    )
    path = root / "column_name.parquet"
    pq.write_table(pa.table({"text": ["colname-bad"], "badname": [1]}), path)
    path.write_bytes(path.read_bytes().replace(b"badname", b"bad\xd9ame"))  # not UTF-8
    kinds.append(
        Kind("parquet_column_name_not_utf8", path.name, 1, 0, 1, frozenset({"corrupt_file"}))
    )
    good = _good("row_group", 10)
    texts_ = [f"Document {m} about routers." for m in good[:5]]
    texts_ += [f"Document rowgroup-bad-{i}." for i in range(5)]
    texts_ += [f"Document {m} about routers." for m in good[5:]]
    path = root / "bad_row_group.parquet"
    pq.write_table(
        pa.table({"text": texts_}),
        path,
        row_group_size=5,
        compression="none",
        use_dictionary=False,
        write_statistics=False,
    )
    chunk = pq.ParquetFile(path).metadata.row_group(1).column(0)
    raw = bytearray(path.read_bytes())
    start = chunk.data_page_offset
    raw[start : start + chunk.total_compressed_size] = b"\xff" * chunk.total_compressed_size
    path.write_bytes(bytes(raw))
    kinds.append(
        Kind(
            "parquet_corrupt_row_group",
            "bad_row_group.parquet",
            15,
            10,
            5,
            frozenset({"corrupt_file"}),
            tuple(good),
        )
    )
    good = _good("long_parquet", 1)
    texts = [
        f"Question {good[0]}".encode(),
        b"Question longutf8-bad",
        f"Answer {good[0]}".encode(),
        b"Answer \xff",
    ]
    table = pa.table(
        {
            "conversation_id": ["a", "b", "a", "b"],
            "role": ["user", "user", "assistant", "assistant"],
            "text": _not_utf8(texts),
        }
    )
    pq.write_table(table, root / "long_bad_utf8.parquet")
    kinds.append(
        Kind(
            "long_parquet_invalid_utf8",
            "long_bad_utf8.parquet",
            4,
            2,
            2,
            frozenset({"invalid_utf8"}),
            tuple(good),
        )
    )
    return kinds


def _txt_kinds(root: Path) -> list[Kind]:
    kinds = []
    good = _good("txt_latin1", 2)
    text = "".join(f"Manual page {m}: keep the firmware current.\n\n" for m in good)
    (root / "latin1.txt").write_bytes(text.encode() + b"caf\xe9 txt-bad\n")
    kinds.append(
        Kind("txt_invalid_utf8", "latin1.txt", 3, 2, 1, frozenset({"invalid_utf8"}), tuple(good))
    )
    good = _good("utf16_broken", 3)
    text = "".join(f"Manual page {m}: " + "step " * 500 + "\n\n" for m in good)
    # A lone surrogate far past the good blocks: what decodes before it is read.
    data = text.encode("utf-16") + "\n".encode("utf-16-le") * 20_000 + b"\x00\xd8A\x00\n\x00"
    (root / "utf16_broken.txt").write_bytes(data)
    kinds.append(
        Kind(
            "utf16_invalid_midway",
            "utf16_broken.txt",
            4,
            3,
            1,
            frozenset({"encoding"}),
            tuple(good),
        )
    )
    return kinds


def _file_kinds(root: Path, outside: Path) -> list[Kind]:
    """Entries that are not plain files of the folder: links, a FIFO, hidden and unsupported
    files, a folder named like a file, and (when not root) a file nobody may read."""
    kinds = []
    outside.mkdir(parents=True, exist_ok=True)
    target = outside / "outside.jsonl"
    _lines(
        target,
        [
            {
                "messages": [
                    {"role": "user", "content": OUTSIDE},
                    {"role": "assistant", "content": "ok"},
                ]
            }
        ],
    )
    (outside / "outside.txt").write_text(OUTSIDE + "\n")
    links = {"link_outside.jsonl": target, "link_outside.txt": outside / "outside.txt"}
    links.update(
        {
            f"link_{Path(p).name}.txt": Path(p)
            for p in ("/etc/hostname", "/etc/passwd")
            if Path(p).exists()
        }
    )
    for name, to in links.items():
        (root / name).symlink_to(to)
        kinds.append(Kind(f"symlink_{name}", name, skipped="symlink"))
    (root / "dangling.jsonl").symlink_to(outside / "missing.jsonl")
    kinds.append(Kind("dangling_symlink", "dangling.jsonl", skipped="symlink"))
    (root / "linked_folder").symlink_to(outside, target_is_directory=True)
    kinds.append(Kind("symlink_to_folder", "linked_folder", skipped="symlink"))
    os.mkfifo(root / "fifo.jsonl")
    kinds.append(Kind("fifo", "fifo.jsonl", skipped="special"))
    _lines(root / ".hidden.jsonl", [chat("hidden-bad")])
    kinds.append(Kind("dotfile", ".hidden.jsonl", skipped="hidden"))
    (root / "notes.md").write_text(f"# {OUTSIDE}\n")
    kinds.append(Kind("unsupported_extension", "notes.md", skipped="unsupported"))
    good = _good("undecodable_name", 1)
    name = os.fsdecode(b"name-\xff.jsonl")  # not UTF-8: the OS hands it over escaped
    _lines(root / name, [chat(good[0])])
    kinds.append(Kind("file_name_not_utf8", name, 1, 1, 0, good=tuple(good)))
    good = _good("folder_named_jsonl", 1)
    _lines(root / "folder.jsonl" / "inner.jsonl", [chat(good[0])])
    kinds.append(
        Kind("folder_named_like_a_file", "folder.jsonl/inner.jsonl", 1, 1, 0, good=tuple(good))
    )
    if os.geteuid() != 0:  # root reads a file whatever its mode
        path = root / "unreadable.jsonl"
        _lines(path, [chat("unreadable-bad")])
        path.chmod(0)
        kinds.append(
            Kind("no_read_permission", "unreadable.jsonl", 1, 0, 1, frozenset({"unreadable"}))
        )
    return kinds


WRITERS: tuple[Callable[[Path], list[Kind]], ...] = (
    _jsonl_kinds,
    _json_kinds,
    _table_kinds,
    _parquet_kinds,
    _txt_kinds,
)


def write_corpus(root: Path, outside: Path) -> list[Kind]:
    """Write every kind into the incoming folder `root` (links point into `outside`, a folder
    beside it); return what ingest should make of each."""
    root.mkdir(parents=True, exist_ok=True)
    kinds = [k for write in WRITERS for k in write(root)]
    return kinds + _file_kinds(root, outside)


def _stored(kind: Kind) -> str:
    from retune.data.lineage import stored_name
    from retune.data.pii import KINDS, Redactor

    return stored_name(kind.file, Redactor(KINDS))


def mismatches(
    kinds: list[Kind], report: dict[str, Any], quarantine: list[dict[str, Any]], texts: list[str]
) -> list[str]:
    """Every way ingest's outputs differ from what the kinds should give (empty: all as
    expected): per-file counts and reasons, skipped files, good rows kept, bad rows not."""
    problems = []
    by_file, skipped = report["by_file"], {s["file"]: s["reason"] for s in report["skipped_files"]}
    reasons: dict[str, set[str]] = {}
    for q in quarantine:
        reasons.setdefault(q["source"], set()).add(q["reason"])
    joined = "\n".join(texts)
    for k in kinds:
        name = _stored(k)
        if k.skipped is not None:
            if skipped.get(name) != k.skipped:
                problems.append(f"{k.name}: skipped as {skipped.get(name)}, not {k.skipped}")
            continue
        got = by_file.get(name, {})
        counts = (got.get("rows"), got.get("accepted"), got.get("quarantined"))
        expected = (k.rows, k.accepted, k.quarantined)
        if counts != expected:
            problems.append(f"{k.name}: rows/accepted/quarantined {counts}, not {expected}")
        if reasons.get(name, set()) != set(k.reasons):
            problems.append(
                f"{k.name}: reasons {sorted(reasons.get(name, ()))}, not {sorted(k.reasons)}"
            )
        lost = [m for m in k.good if m not in joined]
        if lost:
            problems.append(f"{k.name}: good rows lost: {lost}")
    if "-bad" in joined:
        problems.append("a bad row became a record")
    for s in report["by_file"].values():
        if s["rows"] != s["accepted"] + s["quarantined"]:
            problems.append(f"by_file does not add up: {s}")
    return problems


def leaks(folders: list[Path]) -> list[str]:
    """Files under `folders` holding the secret, the address or a linked-to file's contents."""
    needles = [SECRET, EMAIL, META_EMAIL, OUTSIDE]
    passwd = Path("/etc/passwd")
    if passwd.exists():
        needles += [line for line in passwd.read_text().splitlines()[:1] if line]
    found = []
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                found += [f"{path.name}: {n[:12]}..." for n in needles if n.encode() in data]
    return found


def _outputs(workdir: Path) -> tuple[dict[str, Any], list[dict[str, Any]], list[str]]:
    report = json.loads((workdir / "reports" / "ingest.json").read_text(encoding="utf-8"))
    lines = (workdir / "quarantine" / "quarantine.jsonl").read_text(encoding="utf-8").splitlines()
    texts = pq.read_table(workdir / "prepared" / "records.parquet", columns=["text"]).column(0)
    return report, [json.loads(x) for x in lines], texts.to_pylist()


def bench(workdir: Path) -> list[dict[str, Any]]:
    """Write the corpus, run `retune ingest` on it in a subprocess; the figures."""
    kinds = write_corpus(workdir / "incoming", workdir / "outside")
    names = ("incoming", "prepared", "quarantine", "reports")
    cmd = [str(BIN / "retune"), "ingest", *(f"paths.{n}={workdir / n}" for n in names)]
    m = measure(cmd, cwd=ROOT, env=bench_env(), echo=False)
    traceback = "Traceback (most recent call last)" in m.output
    rows = [
        row("kinds", len(kinds), "kinds", target=">= 25"),
        row("exit_code", m.returncode, "", target="== 0"),
        row("tracebacks", int(traceback), "", target="== 0"),
        row("wall", m.wall_s, "s", note="process start and imports included"),
    ]
    if m.returncode != 0:
        print(m.output[-3000:])
        return rows
    report, quarantine, texts = _outputs(workdir)
    problems = mismatches(kinds, report, quarantine, texts)
    for p in problems:
        print(f"  MISMATCH {p}")
    leaked = leaks([workdir / n for n in names[1:]])
    read = [k for k in kinds if k.skipped is None]
    rows += [
        row(
            "files", len(kinds), "files", note=f"{len(read)} read, {len(kinds) - len(read)} skipped"
        ),
        row("rows_in", report["input_rows"], "rows"),
        row("accepted", report["accepted_rows"], "rows", note=f"{report['records']} records"),
        row(
            "quarantined",
            report["quarantined_rows"],
            "rows",
            note=f"{report['quarantine_entries']} entries",
        ),
        row("accounted", int(report["accounted"]), "", target="== 1"),
        row(
            "mismatches",
            len(problems),
            "kinds",
            target="== 0",
            note="; ".join(problems)[:300] or None,
        ),
        row("leaks", len(leaked), "files", target="== 0", note="; ".join(leaked)[:300] or None),
    ]
    by_file = report["by_file"]
    skipped = {s["file"]: s["reason"] for s in report["skipped_files"]}
    for k in kinds:
        name = _stored(k)
        if k.skipped is not None:
            rows.append(row(f"{k.name}: {name}", 0, "rows", note=f"skipped: {skipped.get(name)}"))
            continue
        got = by_file.get(name, {})
        note = f"accepted {got.get('accepted')}, quarantined {got.get('quarantined')}"
        if k.reasons:
            note += f" ({', '.join(sorted(k.reasons))})"
        rows.append(row(f"{k.name}: {name}", got.get("rows", -1), "rows", note=note))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="the same corpus (it is small)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="retune-bench-malformed-"))
    try:
        rows = bench(workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    write_result(NAME, command_line(NAME, argv), rows, args.out)
    missed = [r["metric"] for r in rows if meets(r["value"], r["target"]) == "**no**"]
    if missed:
        print(f"{NAME}: targets missed: {', '.join(missed)}")
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
