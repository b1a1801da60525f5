"""The sample corpus: deterministic bytes, every format readable, planted defects as counted."""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from retune.config import Params, SampleParams
from retune.data.pii import KINDS, redact
from tasks.sample import (
    CHAT_FILE,
    CSV_FILE,
    DEFECT_KINDS,
    FAQ_FILE,
    PARQUET_FILE,
    TSV_FILE,
    SampleResult,
    existing_data,
    generate,
    run,
)

KNOWN_ROLES = {"system", "user", "assistant", "customer", "agent"}
SYNONYMS = {"customer": "user", "agent": "assistant"}
MAX_CHARS = 4_000  # ingest.max_message_chars' default: "overlong" means longer than this


@dataclass
class Corpus:
    """Every unit read back with plain json/csv/pyarrow, as (role, content) message lists."""

    conversations: list[tuple[str, list[tuple[Any, Any]]]] = field(default_factory=list)
    pairs: list[dict[str, Any]] = field(default_factory=list)
    articles: list[tuple[str, str]] = field(default_factory=list)
    chat_objects: list[dict[str, Any]] = field(default_factory=list)
    not_utf8: list[int] = field(default_factory=list)
    not_json: list[int] = field(default_factory=list)
    units_per_file: Counter[str] = field(default_factory=Counter)

    def texts(self) -> list[str]:
        out = [c for _, msgs in self.conversations for _, c in msgs if isinstance(c, str)]
        out += [v for p in self.pairs for k, v in p.items() if k != "category"]
        return out + [a for _, a in self.articles]


def read_corpus(out: Path) -> Corpus:
    corpus = Corpus()
    for n, raw in enumerate((out / CHAT_FILE).read_bytes().splitlines(), start=1):
        corpus.units_per_file[CHAT_FILE] += 1
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            corpus.not_utf8.append(n)
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            corpus.not_json.append(n)
            continue
        corpus.chat_objects.append(obj)
        if "messages" in obj:
            msgs = [(m.get("role"), m.get("content")) for m in obj["messages"]]
            corpus.conversations.append((CHAT_FILE, msgs))
    for name, delimiter in ((CSV_FILE, ","), (TSV_FILE, "\t")):
        with open(out / name, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f, delimiter=delimiter))
        assert rows[0] == ["conversation_id", "role", "text", "timestamp", "category"]
        _add_long(corpus, name, [dict(zip(rows[0], r, strict=True)) for r in rows[1:]])
    _add_long(corpus, PARQUET_FILE, pq.read_table(out / PARQUET_FILE).to_pylist())
    for line in (out / FAQ_FILE).read_text(encoding="utf-8").splitlines():
        corpus.pairs.append(json.loads(line))
        corpus.units_per_file[FAQ_FILE] += 1
    for path in sorted((out / "kb").glob("*.txt")):
        rel = f"kb/{path.name}"
        for block in path.read_text(encoding="utf-8").split("\n\n"):
            corpus.articles.append((rel, block.strip("\n")))
            corpus.units_per_file[rel] += 1
    return corpus


def _add_long(corpus: Corpus, name: str, rows: list[dict[str, Any]]) -> None:
    by_id: dict[str, list[tuple[Any, Any]]] = {}
    for row in rows:
        role = SYNONYMS.get(row["role"], row["role"]) or None  # "" and None: no role given
        by_id.setdefault(row["conversation_id"], []).append((role, row["text"]))
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(Z|[+-]\d\d:\d\d)", row["timestamp"])
    for msgs in by_id.values():
        corpus.conversations.append((name, msgs))
    corpus.units_per_file[name] += len(by_id)


@pytest.fixture(scope="module")
def defective(tmp_path_factory: pytest.TempPathFactory) -> tuple[SampleResult, Corpus]:
    """300 units with a high defect rate, so every kind is planted at least once."""
    out = tmp_path_factory.mktemp("sample")
    result = generate(SampleParams(conversations=300, defect_rate=0.2), 7, out)
    return result, read_corpus(out)


def test_same_seed_gives_identical_bytes_in_every_file(tmp_path: Path) -> None:
    cfg = SampleParams(conversations=300, defect_rate=0.2)
    a = generate(cfg, 7, tmp_path / "a")
    b = generate(cfg, 7, tmp_path / "b")
    c = generate(cfg, 8, tmp_path / "c")
    rel_a = [p.relative_to(a.out_dir) for p in a.files]
    assert rel_a == [p.relative_to(b.out_dir) for p in b.files]
    assert PARQUET_FILE in {str(r) for r in rel_a}
    for rel in rel_a:
        assert (a.out_dir / rel).read_bytes() == (b.out_dir / rel).read_bytes(), rel
    assert a.defects == b.defects and a.categories == b.categories
    assert (a.out_dir / CHAT_FILE).read_bytes() != (c.out_dir / CHAT_FILE).read_bytes()


def test_every_unit_is_accounted_for(defective: tuple[SampleResult, Corpus]) -> None:
    result, corpus = defective
    assert result.conversations == 300
    assert sum(result.conversations_per_file.values()) == 300
    assert dict(corpus.units_per_file) == result.conversations_per_file
    assert sum(result.categories.values()) == 300
    assert [p.relative_to(result.out_dir).as_posix() for p in result.files] == sorted(
        result.conversations_per_file
    )


def test_planted_defects_match_the_requested_rate(defective: tuple[SampleResult, Corpus]) -> None:
    result, _ = defective
    assert set(result.defects) == set(DEFECT_KINDS)
    assert sum(result.defects.values()) == round(0.2 * 300)
    assert all(n >= 1 for n in result.defects.values()), result.defects
    # Spread over files, not piled into one; the malformed lines only in the chat JSONL.
    assert len(result.defects_per_file) >= 5
    for rel, kinds in result.defects_per_file.items():
        if rel != CHAT_FILE:
            assert not {"truncated_json", "invalid_utf8"} & set(kinds), rel


def test_every_format_parses_except_the_planted_malformed_lines(
    defective: tuple[SampleResult, Corpus],
) -> None:
    result, corpus = defective
    assert len(corpus.not_utf8) == result.defects["invalid_utf8"]
    assert len(corpus.not_json) == result.defects["truncated_json"]
    for n in corpus.not_utf8:  # the cp1252 line is otherwise valid JSON
        raw = (result.out_dir / CHAT_FILE).read_bytes().splitlines()[n - 1]
        assert "messages" in json.loads(raw.decode("cp1252"))
    products = {o["product"] for o in corpus.chat_objects}
    categories = {o["category"] for o in corpus.chat_objects}
    assert len(products) >= 5 and len(categories) >= 8
    assert len({o["conversation_id"] for o in corpus.chat_objects}) == len(corpus.chat_objects)
    roles = Counter(r for _, msgs in corpus.conversations for r, _ in msgs)
    assert roles["user"] and roles["assistant"] and roles["system"]


def test_clean_conversations_alternate_with_two_to_eight_turns(tmp_path: Path) -> None:
    generate(SampleParams(conversations=400, defect_rate=0.0), 3, tmp_path)
    corpus = read_corpus(tmp_path)
    assert not corpus.not_utf8 and not corpus.not_json
    lengths: Counter[int] = Counter()
    for _, msgs in corpus.conversations:
        roles = [r for r, _ in msgs]
        if roles[0] == "system":
            roles = roles[1:]
        assert roles == ["user", "assistant"] * (len(roles) // 2), roles
        assert all(c and c.strip() for _, c in msgs)
        lengths[len(roles)] += 1
    assert set(lengths) == {2, 4, 6, 8}
    assert all(p["prompt"].strip() and p["completion"].strip() for p in corpus.pairs)
    assert all(a.strip() and "\n\n" not in a for _, a in corpus.articles)


def test_each_defect_kind_is_visible_in_the_files(defective: tuple[SampleResult, Corpus]) -> None:
    result, corpus = defective

    def count(pred: Any) -> int:
        return sum(1 for _, msgs in corpus.conversations if pred(msgs))

    empty = count(lambda ms: any(isinstance(c, str) and not c.strip() for _, c in ms))
    empty += sum(1 for p in corpus.pairs if any(not v.strip() for v in p.values()))
    assert empty == result.defects["empty_turn"]

    unknown = count(lambda ms: any(r is not None and r not in KNOWN_ROLES for r, _ in ms))
    assert unknown == result.defects["unknown_role"]

    missing = count(lambda ms: any(r is None or c is None for r, c in ms))
    missing += sum(1 for o in corpus.chat_objects if "messages" not in o)
    missing += sum(1 for p in corpus.pairs if {"prompt", "completion"} - set(p))
    assert missing == result.defects["missing_field"]

    overlong = count(lambda ms: any(isinstance(c, str) and len(c) > MAX_CHARS for _, c in ms))
    overlong += sum(1 for p in corpus.pairs if len(p.get("prompt", "")) > MAX_CHARS)
    overlong += sum(1 for _, a in corpus.articles if len(a) > MAX_CHARS)
    assert overlong == result.defects["overlong"]

    emails = sum(t.count("@") for t in corpus.texts())
    assert emails == result.defects["email"]


def test_planted_duplicates_repeat_earlier_content_exactly(
    defective: tuple[SampleResult, Corpus],
) -> None:
    result, corpus = defective
    convs = Counter(tuple(msgs) for _, msgs in corpus.conversations)
    pairs = Counter(tuple(sorted(p.items())) for p in corpus.pairs)
    articles = Counter(a for _, a in corpus.articles)
    repeats = sum(n - 1 for c in (convs, pairs, articles) for n in c.values())
    assert repeats == result.defects["duplicate"]


def test_clean_text_and_lookalikes_are_never_taken_for_personal_data(tmp_path: Path) -> None:
    result = generate(SampleParams(conversations=2_000, defect_rate=0.0), 11, tmp_path)
    texts = read_corpus(tmp_path).texts()
    assert result.lookalikes > 0
    assert any("serial NWS-" in t for t in texts) and any("NW-T200" in t for t in texts)
    for t in texts:
        assert not redact(t, KINDS)[1], t


def test_overlong_messages_carry_no_personal_data(defective: tuple[SampleResult, Corpus]) -> None:
    _, corpus = defective
    long_texts = [t for t in corpus.texts() if len(t) > MAX_CHARS]
    assert long_texts
    for t in long_texts:
        assert not redact(t, KINDS)[1]


def test_redaction_finds_exactly_the_planted_personal_data(
    defective: tuple[SampleResult, Corpus],
) -> None:
    result, corpus = defective
    found: Counter[str] = Counter()
    for t in corpus.texts():
        found.update(redact(t, KINDS)[1])
    assert found["email"] == result.defects["email"]
    assert found["phone"] == result.defects["phone"]
    others = {k: n for k, n in found.items() if k not in ("email", "phone")}
    assert sum(others.values()) == result.defects["sensitive"] > 0, others


def test_default_size_covers_every_category_evenly(tmp_path: Path) -> None:
    result = generate(SampleParams(), 42, tmp_path)
    assert result.conversations == 12_000
    assert len(result.categories) >= 8
    assert min(result.categories.values()) >= 0.05 * result.conversations, result.categories
    # The same balance is visible in the file: one cheap pass over the chat JSONL's field.
    seen: Counter[str] = Counter()
    for raw in (tmp_path / CHAT_FILE).read_bytes().splitlines():
        m = re.search(rb'"category": "(\w+)"', raw)
        if m:
            seen[m.group(1).decode()] += 1
    assert min(seen.values()) >= 0.05 * sum(seen.values())
    assert 0.01 <= (result.defects["email"] + result.defects["phone"]) / 12_000 <= 0.02


def test_run_never_touches_a_folder_that_holds_data(
    tiny_params: Params, capsys: pytest.CaptureFixture[str]
) -> None:
    incoming = tiny_params.paths.incoming
    (incoming / "exports").mkdir(parents=True)
    mine = incoming / "exports" / "mine.csv"
    mine.write_text("conversation_id,role,text\n1,user,hello\n", encoding="utf-8")
    assert run(tiny_params) is None
    assert "skipped" in capsys.readouterr().out
    assert existing_data(incoming) == [mine]
    assert mine.read_text(encoding="utf-8") == "conversation_id,role,text\n1,user,hello\n"
    assert not (tiny_params.paths.reports / "sample.json").exists()


def test_run_fills_an_empty_folder_once(tiny_params: Params) -> None:
    incoming = tiny_params.paths.incoming
    incoming.mkdir(parents=True)
    (incoming / ".gitkeep").write_text("", encoding="utf-8")  # dotfiles are not data
    result = run(tiny_params)
    assert result is not None and result.out_dir == incoming
    assert result.conversations == tiny_params.sample.conversations
    assert all(p.is_file() and p.is_relative_to(incoming) for p in result.files)
    assert (incoming / ".gitkeep").exists()
    assert [p.name for p in incoming.parent.iterdir() if "partial" in p.name] == []
    report = json.loads((tiny_params.paths.reports / "sample.json").read_text(encoding="utf-8"))
    assert report["conversations"] == tiny_params.sample.conversations
    before = {p: p.read_bytes() for p in result.files}
    assert run(tiny_params) is None  # now it holds data: a second run leaves it alone
    assert {p: p.read_bytes() for p in result.files} == before


def test_a_fresh_clone_rebuilds_exactly_the_dvc_tracked_sample(tmp_path: Path) -> None:
    """data/incoming.dvc pins the sample's bytes; regenerating must reproduce them, or a fresh
    clone's `make data` would silently train on different data than the committed version."""
    import subprocess
    import sys

    import yaml

    from retune.config import load_params

    root = Path(__file__).resolve().parents[1]
    params = load_params(root / "params.yaml")
    generate(params.sample, params.seed, tmp_path / "incoming")
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*dvc, "add", "-q", "incoming"], cwd=tmp_path, check=True)
    rebuilt = yaml.safe_load((tmp_path / "incoming.dvc").read_text())["outs"][0]
    tracked = yaml.safe_load((root / "data" / "incoming.dvc").read_text())["outs"][0]
    assert (rebuilt["md5"], rebuilt["nfiles"]) == (tracked["md5"], tracked["nfiles"])


def _texts(msgs: Sequence[Sequence[Any]]) -> str:
    return "\n".join(c for _, c in msgs if isinstance(c, str))


def test_hygiene_defects_are_planted_as_counted(defective: tuple[SampleResult, Corpus]) -> None:
    """Abusive and other-language conversations, as many as reported; angry-but-civil
    customers in clean conversations, as many as reported."""
    from tasks.sample import _ABUSE_AGENT, _ABUSE_USER, _COMPLAINTS, _FOREIGN

    result, corpus = defective
    texts = [_texts(msgs) for _, msgs in corpus.conversations]
    abusive = sum(1 for t in texts if any(a in t for a in (*_ABUSE_USER, *_ABUSE_AGENT)))
    foreign = {turns[0][:25] for _, turns in _FOREIGN.values()}
    other = sum(1 for t in texts if any(t.startswith(f.split("{")[0]) for f in foreign))
    assert abusive == result.defects["abusive"] >= 1
    assert other == result.defects["other_language"] >= 1
    complaints = sum(1 for t in texts if any(c in t for c in _COMPLAINTS))
    assert complaints == result.complaints


def test_every_conversation_and_pair_names_its_category(tmp_path: Path) -> None:
    from tasks.sample import _CATEGORY_KEYS

    generate(SampleParams(conversations=300, defect_rate=0.0), 5, tmp_path)
    corpus = read_corpus(tmp_path)
    assert all(o["category"] in _CATEGORY_KEYS for o in corpus.chat_objects)
    assert all(p["category"] in _CATEGORY_KEYS for p in corpus.pairs)
    for name, delimiter in ((CSV_FILE, ","), (TSV_FILE, "\t")):
        with open(tmp_path / name, encoding="utf-8", newline="") as f:
            assert {r["category"] for r in csv.DictReader(f, delimiter=delimiter)} <= set(
                _CATEGORY_KEYS
            )
    assert set(pq.read_table(tmp_path / PARQUET_FILE).column("category").to_pylist()) <= set(
        _CATEGORY_KEYS
    )


def test_paraphrases_are_near_but_never_exact_duplicates() -> None:
    import random

    import pyarrow as pa

    from retune.data import dedup
    from tasks.sample import _conversation, _slots, paraphrase

    rng = random.Random(3)
    originals, copies = [], []
    for _ in range(200):
        _, s = _slots(rng)
        msgs = _conversation(rng, "billing", s)
        edited = paraphrase(rng, msgs)
        assert edited != msgs and [r for r, _ in edited] == [r for r, _ in msgs]
        originals.append(_texts(msgs))
        copies.append(_texts(edited))
    with dedup.sketch_batches([pa.array(originals + copies)], 0.8, 128, 3) as sk:
        found = {m.index: m.of for m in dedup.deduplicate(sk)}
    caught = sum(1 for i in range(200) if found.get(200 + i) == i)
    assert caught >= 190, caught  # paraphrase-level edits stay above Jaccard 0.8
