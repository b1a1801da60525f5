"""Stage `sample`: write a synthetic support corpus (the fictional smart-home maker Northwind
Home) into `paths.incoming` when it holds no data, in every input format, with planted defects.

Runs as `python -m tasks.sample` (`retune sample`, `make data`) and as `sample_task` in flows.
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from retune.config import Params, SampleParams
from retune.data import sample_text
from retune.entry import stage_main, stage_task
from retune.reports import write_json

DEFECT_KINDS = (
    "duplicate",  # exact copy of an earlier conversation's content, possibly in another file
    "empty_turn",  # a message whose content is "" or only whitespace
    "email",  # one e-mail address in a customer message
    "phone",  # one phone number in a customer message
    "sensitive",  # a card number, IBAN, IP address, US SSN or API key in a customer message
    "overlong",  # one message (or article) longer than ingest.max_message_chars' default
    "unknown_role",  # an extra message from a speaker no role map knows ("moderator", ...)
    "missing_field",  # a message without role/content, a row without role, a pair half
    "truncated_json",  # chat JSONL only: the line is cut off mid-object
    "invalid_utf8",  # chat JSONL only: the line is encoded as cp1252, not UTF-8
    "near_duplicate",  # an earlier conversation with small edits (word, punctuation, casing...)
    "abusive",  # a customer insults the agent, or the agent the customer
    "other_language",  # a conversation in Spanish, German, French, Italian or Portuguese
)

# Share of defects per kind; e-mail and phone are half of them so redaction has plenty to do
# while the corpus stays ~98% clean at the default defect_rate.
_DEFECT_WEIGHTS = {
    "duplicate": 15,
    "empty_turn": 10,
    "email": 25,
    "phone": 25,
    "sensitive": 10,
    "overlong": 6,
    "unknown_role": 6,
    "missing_field": 6,
    "truncated_json": 5,
    "invalid_utf8": 2,
    "near_duplicate": 20,
    "abusive": 8,
    "other_language": 8,
}

_LINE_DEFECTS = ("truncated_json", "invalid_utf8")  # need a line format to break
_TABLE_DEFECTS = tuple(k for k in DEFECT_KINDS if k not in _LINE_DEFECTS)
# Conversation-only kinds: pairs have no roles to misname, and the hygiene kinds are planted
# where the conversation generator builds them.
_CONVERSATION_ONLY = ("unknown_role", "near_duplicate", "abusive", "other_language")
_PAIR_DEFECTS = tuple(k for k in _TABLE_DEFECTS if k not in _CONVERSATION_ONLY)


@dataclass(frozen=True)
class _Sink:
    key: str
    share: float
    unit: str  # "conversation" | "pair" | "article"
    defects: tuple[str, ...]


# Files and their share of `sample.conversations`; conversation-kind sinks share one pool of
# originals, so a planted duplicate can land in a different file than its original.
_SINKS = (
    _Sink("chat", 0.66, "conversation", DEFECT_KINDS),
    _Sink("csv", 0.12, "conversation", _TABLE_DEFECTS),
    _Sink("tsv", 0.06, "conversation", _TABLE_DEFECTS),
    _Sink("parquet", 0.04, "conversation", _TABLE_DEFECTS),
    _Sink("faq", 0.07, "pair", _PAIR_DEFECTS),
    _Sink("kb", 0.05, "article", ("duplicate", "overlong")),
)

CHAT_FILE = "support_chats.jsonl"
CSV_FILE = "helpdesk_export.csv"
TSV_FILE = "agent_transcripts.tsv"
PARQUET_FILE = "chat_archive.parquet"
FAQ_FILE = "faq_pairs.jsonl"
KB_DIR = "kb"

_POOL_SIZE = 256
_PROGRESS_EVERY = 100_000
_PARQUET_BATCH_ROWS = 50_000
_EPOCH_2024 = 1_704_067_200  # 2024-01-01T00:00:00Z: timestamps are synthetic, never the clock


@dataclass(frozen=True)
class SampleResult:
    out_dir: Path
    files: tuple[Path, ...]
    conversations: int
    conversations_per_file: dict[str, int]  # relative posix path -> units written
    defects: dict[str, int]  # every kind in DEFECT_KINDS -> planted count
    defects_per_file: dict[str, dict[str, int]]
    categories: dict[str, int]  # category -> units (conversations, pairs, articles)
    lookalikes: int  # customer messages given order/date/serial strings that are not PII
    complaints: int  # clean conversations with an angry but not abusive customer


# Tests and benchmarks import the corpus text from this stage under these names.
_ABUSE_USER, _ABUSE_AGENT = sample_text.ABUSE_USER, sample_text.ABUSE_AGENT
_FOREIGN, _COMPLAINTS = sample_text.FOREIGN, sample_text.COMPLAINTS
_CATEGORY_KEYS, _slots = sample_text.CATEGORY_KEYS, sample_text.slots
_conversation, paraphrase = sample_text.conversation, sample_text.paraphrase


class _ChatJsonl:
    """support_chats.jsonl: one conversation object per line; binary, for the cp1252 line."""

    def __init__(self, out_dir: Path) -> None:
        self.rel = CHAT_FILE
        self._f: IO[bytes] = open(out_dir / CHAT_FILE, "wb")  # noqa: SIM115 (closed in close())

    def write(
        self,
        rng: random.Random,
        index: int,
        msgs: list[list[Any]],
        category: str,
        product: str,
        kind: str | None,
        drop_messages: bool,
    ) -> None:
        obj: dict[str, Any] = {}
        if not drop_messages:
            obj["messages"] = [
                {k: v for k, v in (("role", r), ("content", c)) if v is not None} for r, c in msgs
            ]
        obj["category"] = category
        obj["product"] = product
        obj["conversation_id"] = f"chat-{index + 1:07d}"
        line = json.dumps(obj, ensure_ascii=False)
        if kind == "truncated_json":
            # An export that died mid-write: a strict prefix of an object is never valid JSON.
            cut = rng.randrange(len(line) // 4, len(line) * 3 // 4)
            self._f.write(line[:cut].encode("utf-8") + b"\n")
        elif kind == "invalid_utf8":
            self._f.write(line.encode("cp1252", errors="replace") + b"\n")
        else:
            self._f.write(line.encode("utf-8") + b"\n")

    def close(self) -> None:
        self._f.close()


def _iso_z(t: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _iso_eastern(t: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S-05:00", time.gmtime(t - 5 * 3600))


class _LongTable:
    """CSV/TSV, one row per message: conversation_id, role, text, timestamp."""

    def __init__(
        self,
        path: Path,
        rel: str,
        delimiter: str,
        lineterminator: str,
        roles: dict[str, str],
        stamp: Callable[[int], str],
        id_format: str,
    ) -> None:
        self.rel = rel
        self._f = open(path, "w", encoding="utf-8", newline="")  # noqa: SIM115
        self._w = csv.writer(self._f, delimiter=delimiter, lineterminator=lineterminator)
        self._w.writerow(["conversation_id", "role", "text", "timestamp", "category"])
        self._roles, self._stamp, self._id = roles, stamp, id_format

    def write(self, rng: random.Random, index: int, msgs: list[list[Any]], category: str) -> None:
        cid = self._id.format(index + 1)
        t = _EPOCH_2024 + rng.randrange(365 * 86_400)
        for role, content in msgs:
            t += rng.randrange(15, 400)
            name = "" if role is None else self._roles.get(role, role)
            text = "" if content is None else content
            self._w.writerow([cid, name, text, self._stamp(t), category])

    def close(self) -> None:
        self._f.close()


class _ParquetLong:
    """chat_archive.parquet: the long layout as string columns, written in row groups."""

    _SCHEMA = pa.schema(
        [
            ("conversation_id", pa.string()),
            ("role", pa.string()),
            ("text", pa.string()),
            ("timestamp", pa.string()),
            ("category", pa.string()),
        ]
    )

    def __init__(self, out_dir: Path) -> None:
        self.rel = PARQUET_FILE
        self._writer = pq.ParquetWriter(out_dir / PARQUET_FILE, self._SCHEMA)
        self._cols: dict[str, list[str | None]] = {n: [] for n in self._SCHEMA.names}

    def write(self, rng: random.Random, index: int, msgs: list[list[Any]], category: str) -> None:
        cid = f"arch-{index + 1:06d}"
        t = _EPOCH_2024 + rng.randrange(365 * 86_400)
        for role, content in msgs:
            t += rng.randrange(15, 400)
            self._cols["conversation_id"].append(cid)
            self._cols["role"].append(role)
            self._cols["text"].append(content)
            self._cols["timestamp"].append(_iso_z(t))
            self._cols["category"].append(category)
        if len(self._cols["role"]) >= _PARQUET_BATCH_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self._cols["role"]:
            self._writer.write_table(pa.table(self._cols, schema=self._SCHEMA))
            self._cols = {n: [] for n in self._SCHEMA.names}

    def close(self) -> None:
        self._flush()
        self._writer.close()


class _FaqJsonl:
    def __init__(self, out_dir: Path) -> None:
        self.rel = FAQ_FILE
        self._f = open(out_dir / FAQ_FILE, "w", encoding="utf-8", newline="\n")  # noqa: SIM115

    def write(self, pair: dict[str, str]) -> None:
        self._f.write(json.dumps(pair, ensure_ascii=False) + "\n")

    def close(self) -> None:
        self._f.close()


class _KnowledgeBase:
    """kb/<category>.txt: articles separated by one blank line; files opened on first use."""

    def __init__(self, out_dir: Path) -> None:
        self._dir = out_dir / KB_DIR
        self._files: dict[str, IO[str]] = {}

    def rel(self, category: str) -> str:
        return f"{KB_DIR}/{category}.txt"

    def write(self, category: str, text: str) -> None:
        f = self._files.get(category)
        if f is None:
            self._dir.mkdir(parents=True, exist_ok=True)
            f = open(self._dir / f"{category}.txt", "w", encoding="utf-8", newline="\n")  # noqa: SIM115
            self._files[category] = f
        else:
            f.write("\n")
        f.write(text + "\n")

    def close(self) -> None:
        for f in self._files.values():
            f.close()


def _allocate(total: int, weights: Sequence[float]) -> list[int]:
    """Split `total` in proportion to `weights` (largest remainder: exact, deterministic)."""
    wsum = sum(weights)
    if total <= 0 or wsum <= 0:
        return [0] * len(weights)
    raw = [total * w / wsum for w in weights]
    out = [int(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - out[i]), i))
    for i in order[: total - sum(out)]:
        out[i] += 1
    return out


def _plan_kinds(n_defects: int, kinds: Sequence[str]) -> dict[str, int]:
    """How many of each defect kind a file gets; every kind at least once when there is room."""
    counts = dict(
        zip(kinds, _allocate(n_defects, [_DEFECT_WEIGHTS[k] for k in kinds]), strict=True)
    )
    if n_defects >= len(kinds):
        for k in kinds:
            while counts[k] == 0:
                donor = max(kinds, key=lambda d: (counts[d], -kinds.index(d)))
                counts[donor] -= 1
                counts[k] += 1
    return counts


def _draw(rng: random.Random, left: dict[str, int]) -> str:
    pick = rng.randrange(sum(left.values()))
    for kind, n in left.items():
        if pick < n:
            left[kind] -= 1
            return kind
        pick -= n
    raise AssertionError("unreachable: pick < total")


class _Pool:
    """A bounded reservoir of clean units: planted duplicates copy one of them."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self.seen = 0

    def offer(self, rng: random.Random, item: Any) -> None:
        self.seen += 1
        if len(self.items) < _POOL_SIZE:
            self.items.append(item)
        else:
            j = rng.randrange(self.seen)
            if j < _POOL_SIZE:
                self.items[j] = item


def generate(cfg: SampleParams, seed: int, out_dir: Path) -> SampleResult:
    """Write `cfg.conversations` units (conversations, FAQ pairs, articles) into `out_dir`:
    chat JSONL, CSV, TSV, Parquet, prompt/completion JSONL and kb/*.txt. Streams; the same
    (cfg, seed) always gives the same bytes."""
    rng = random.Random(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_units = _allocate(cfg.conversations, [s.share for s in _SINKS])
    n_defects = _allocate(round(cfg.defect_rate * cfg.conversations), n_units)
    # The first unit of each file stays clean (it seeds the duplicate pool), so at most n - 1.
    n_defects = [min(d, max(n - 1, 0)) for d, n in zip(n_defects, n_units, strict=True)]

    per_file: Counter[str] = Counter()
    defects_per_file: dict[str, Counter[str]] = {}
    categories: Counter[str] = Counter()
    lookalikes = complaints = 0
    conv_pool, pair_pool, article_pool = _Pool(), _Pool(), _Pool()
    done, started = 0, time.perf_counter()

    for sink, n, d in zip(_SINKS, n_units, n_defects, strict=True):
        if n == 0:
            continue
        writer = _open_writer(sink.key, out_dir)
        left = _plan_kinds(d, sink.defects)
        remaining = d
        try:
            for k in range(n):
                kind = None
                # Selection sampling: exactly `d` defective units, spread evenly at random.
                if k > 0 and remaining and rng.random() * (n - k) < remaining:
                    kind = _draw(rng, left)
                    remaining -= 1
                if sink.unit == "conversation":
                    category, rel, clean, angry = _write_conversation(
                        rng, sink.key, writer, k, kind, conv_pool
                    )
                    lookalikes += clean
                    complaints += angry
                elif sink.unit == "pair":
                    category, rel = _write_pair(rng, writer, kind, pair_pool)
                else:
                    category, rel = _write_article(rng, writer, k, kind, article_pool)
                per_file[rel] += 1
                categories[category] += 1
                if kind is not None:
                    defects_per_file.setdefault(rel, Counter())[kind] += 1
                done += 1
                if done % _PROGRESS_EVERY == 0:
                    print(
                        f"sample: {done:,} / {cfg.conversations:,} conversations "
                        f"({time.perf_counter() - started:.0f} s)",
                        flush=True,
                    )
        finally:
            writer.close()

    files = tuple(out_dir / rel for rel in sorted(per_file))
    totals: Counter[str] = Counter()
    for c in defects_per_file.values():
        totals.update(c)
    return SampleResult(
        out_dir=out_dir,
        files=files,
        conversations=sum(per_file.values()),
        conversations_per_file={rel: per_file[rel] for rel in sorted(per_file)},
        defects={k: totals[k] for k in DEFECT_KINDS},
        defects_per_file={
            rel: {k: c[k] for k in DEFECT_KINDS if c[k]}
            for rel, c in sorted(defects_per_file.items())
        },
        categories={c: categories[c] for c in _CATEGORY_KEYS if categories[c]},
        lookalikes=lookalikes,
        complaints=complaints,
    )


def _open_writer(key: str, out_dir: Path) -> Any:
    if key == "chat":
        return _ChatJsonl(out_dir)
    if key == "csv":
        return _LongTable(out_dir / CSV_FILE, CSV_FILE, ",", "\r\n", {}, _iso_z, "HD-{:06d}")
    if key == "tsv":
        # Agent-desk exports name the speakers; ingest.role_map maps them back.
        return _LongTable(
            out_dir / TSV_FILE,
            TSV_FILE,
            "\t",
            "\n",
            {"user": "customer", "assistant": "agent"},
            _iso_eastern,
            "T{:06d}",
        )
    if key == "parquet":
        return _ParquetLong(out_dir)
    if key == "faq":
        return _FaqJsonl(out_dir)
    return _KnowledgeBase(out_dir)


def _write_conversation(
    rng: random.Random, key: str, writer: Any, index: int, kind: str | None, pool: _Pool
) -> tuple[str, str, int, int]:
    """Build (or copy) one conversation, plant `kind`, write it; returns category, file,
    1 if a non-PII look-alike was planted, and 1 if an angry-but-polite complaint was."""
    drop_messages = False
    lookalike = complaint = 0
    if kind == "duplicate":
        category, product, frozen = rng.choice(pool.items)
        msgs = [list(m) for m in frozen]
    elif kind == "near_duplicate":
        # Taken out of the pool (all but the last): two edits of one original could come out
        # identical, and ingest would count the second as an exact duplicate.
        j = rng.randrange(len(pool.items))
        category, product, frozen = pool.items.pop(j) if len(pool.items) > 1 else pool.items[j]
        msgs = paraphrase(rng, frozen)
    elif kind == "other_language":
        product, s = _slots(rng)
        category, msgs = sample_text.foreign(rng, s)
    else:
        category = rng.choice(_CATEGORY_KEYS)
        product, s = _slots(rng)
        msgs = _conversation(rng, category, s)
        if kind is None:
            complaint, lookalike = sample_text.clean_extras(rng, msgs, s)
            pool.offer(rng, (category, product, tuple(tuple(m) for m in msgs)))
        elif kind == "abusive":
            sample_text.abuse(rng, msgs)
        elif kind not in _LINE_DEFECTS:
            drop_messages = sample_text.plant(rng, kind, msgs, s, chat=key == "chat")
        elif kind == "invalid_utf8":
            i = sample_text.user_indices(msgs)[-1]
            msgs[i][1] = sample_text.join(
                msgs[i][1], f"— {rng.choice(('René', 'Zoë', 'Sébastien'))}"
            )
    if key == "chat":
        writer.write(rng, index, msgs, category, product, kind, drop_messages)
    else:
        writer.write(rng, index, msgs, category)
    return category, writer.rel, lookalike, complaint


def _write_pair(
    rng: random.Random, writer: _FaqJsonl, kind: str | None, pool: _Pool
) -> tuple[str, str]:
    if kind == "duplicate":
        category, items = rng.choice(pool.items)
        writer.write(dict(items))
        return category, writer.rel
    category = rng.choice(_CATEGORY_KEYS)
    _, s = _slots(rng)
    prompt, completion = sample_text.faq_pair(rng, category, s)
    pair: dict[str, str] = {"prompt": prompt, "completion": completion, "category": category}
    if kind is None:
        pool.offer(rng, (category, tuple(pair.items())))
    elif kind in ("email", "phone", "sensitive", "overlong"):
        msgs = [["user", prompt], ["assistant", completion]]
        sample_text.plant(rng, kind, msgs, s, chat=False)
        pair["prompt"] = msgs[0][1]
    elif kind == "empty_turn":
        pair[rng.choice(("prompt", "completion"))] = rng.choice(sample_text.BLANKS)
    elif kind == "missing_field":
        del pair[rng.choice(("prompt", "completion"))]
    writer.write(pair)
    return category, writer.rel


def _write_article(
    rng: random.Random, writer: _KnowledgeBase, index: int, kind: str | None, pool: _Pool
) -> tuple[str, str]:
    if kind == "duplicate":
        category, text = rng.choice(pool.items)
    else:
        category = rng.choice(_CATEGORY_KEYS)
        _, s = _slots(rng)
        if kind == "overlong":
            text = sample_text.long_article(rng, s, index)
        else:
            text = sample_text.article(rng, category, s, index)
            pool.offer(rng, (category, text))
    writer.write(category, text)
    return category, writer.rel(category)


def existing_data(folder: Path) -> list[Path]:
    """Files under `folder` (recursively), ignoring dotfiles and dot-folders such as .gitkeep."""
    if not folder.exists():
        return []
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def run(params: Params) -> SampleResult | None:
    """Edge: write the sample corpus into `paths.incoming` unless it already holds data (then
    print why and return None: a user's files are never overwritten); writes reports/sample.json."""
    incoming = params.paths.incoming
    found = existing_data(incoming)
    if found:
        print(
            f"sample: skipped, {incoming} already holds data ({len(found)} file(s), e.g. "
            f"{found[0].relative_to(incoming)}); empty it to get the sample corpus",
            flush=True,
        )
        return None
    # Write beside the folder and move in at the end: an interrupted run leaves no half corpus
    # in `incoming` that a later run would mistake for the user's data.
    partial = incoming.parent / f".{incoming.name}.sample-partial"
    shutil.rmtree(partial, ignore_errors=True)
    started = time.perf_counter()
    result = generate(params.sample, params.seed, partial)
    incoming.mkdir(parents=True, exist_ok=True)
    for entry in sorted(partial.iterdir()):
        os.replace(entry, incoming / entry.name)
    partial.rmdir()
    result = replace(
        result,
        out_dir=incoming,
        files=tuple(incoming / p.relative_to(partial) for p in result.files),
    )
    seconds = time.perf_counter() - started
    size = sum(p.stat().st_size for p in result.files)
    write_json(
        params.paths.reports / "sample.json",
        {
            "conversations": result.conversations,
            "files": result.conversations_per_file,
            "defects": result.defects,
            "categories": result.categories,
            "lookalikes": result.lookalikes,
            "complaints": result.complaints,
            "bytes": size,
        },
    )
    planted = ", ".join(f"{k} {v}" for k, v in result.defects.items() if v)
    print(
        f"sample: wrote {result.conversations:,} conversations to {incoming} in "
        f"{len(result.files)} files ({size / 1e6:.1f} MB, {seconds:.1f} s)",
        flush=True,
    )
    grouped: Counter[str] = Counter()
    for rel, n in result.conversations_per_file.items():
        folder, _, name = rel.rpartition("/")
        grouped[f"{folder}/*{Path(name).suffix}" if folder else rel] += n
    for rel, n in grouped.items():
        print(f"sample:   {rel}: {n:,}", flush=True)
    print(f"sample: planted defects: {planted or 'none'}", flush=True)
    return result


sample_task = stage_task(run, name="sample")

if __name__ == "__main__":
    stage_main(run)
