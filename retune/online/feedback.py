"""The interaction and feedback store: every served completion and every rating of one.

SQLAlchemy Core on any URL (`feedback.store_url`; SQLite under data/ by default). The server
writes through `FeedbackStore`; drift checks and the feedback export read its frames.
Prompts, replies and corrections are PII-redacted before they are written.
"""

from __future__ import annotations

import json
import math
import threading
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import sqlalchemy as sa

from retune.data import pii
from retune.data.text import normalize_text
from retune.errors import RetuneError

if TYPE_CHECKING:
    import pandas as pd

Kind = Literal["chat", "completion"]
Rating = Literal["up", "down"]
ID_PREFIX: dict[str, str] = {"chat": "chatcmpl-", "completion": "cmpl-"}
# A score below this counts as negative feedback, as a "down" rating does.
NEGATIVE_SCORE = 0.5
# Long enough for 20 writers queued behind one another on a slow disk; a writer waits instead
# of failing with "database is locked".
SQLITE_BUSY_TIMEOUT_MS = 30_000

INTERACTION_COLUMNS = (
    "id",
    "created_at",
    "model_name",
    "model_version",
    "kind",
    "messages",
    "prompt",
    "reply",
    "latency_ms",
    "prompt_tokens",
    "completion_tokens",
)
# Without text: what the monitoring view plots.
TRAFFIC_COLUMNS = ("created_at", "model_version", "latency_ms", "completion_tokens")
RATING_COLUMNS = ("created_at", "model_version", "rating", "score", "negative")
FEEDBACK_COLUMNS = (
    "feedback_id",
    "interaction_id",
    "created_at",
    "model_name",
    "model_version",
    "rating",
    "score",
    "negative",
    "corrected_reply",
    "messages",
    "prompt",
    "reply",
)

metadata = sa.MetaData()

interactions = sa.Table(
    "interactions",
    metadata,
    # Insertion order: ids are random, and timestamps of two requests can tie.
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(64), nullable=False, unique=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("model_name", sa.String(255), nullable=False, index=True),
    sa.Column("model_version", sa.String(64), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("messages", sa.JSON, nullable=False),
    sa.Column("prompt", sa.Text, nullable=False),
    sa.Column("reply", sa.Text, nullable=False),
    sa.Column("latency_ms", sa.Float, nullable=False),
    sa.Column("prompt_tokens", sa.Integer, nullable=False),
    sa.Column("completion_tokens", sa.Integer, nullable=False),
)

feedback = sa.Table(
    "feedback",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column(
        "interaction_id",
        sa.String(64),
        sa.ForeignKey("interactions.id"),
        nullable=False,
        index=True,
    ),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("rating", sa.String(8), nullable=True),
    sa.Column("score", sa.Float, nullable=True),
    sa.Column("corrected_reply", sa.Text, nullable=True),
)


class UnknownInteraction(RetuneError):
    """Feedback names a response id the store has never seen."""

    def __init__(self, interaction_id: str) -> None:
        super().__init__(
            f"no interaction with id {interaction_id!r} in the feedback store: send the `id` "
            "of a response this server returned"
        )
        self.interaction_id = interaction_id


def _redact(text: str) -> str:
    # Every kind retune.data.pii knows (e-mail, phone, card, IBAN, IP, SSN, secrets).
    return pii.redact(text, pii.KINDS)[0]


def new_interaction_id(kind: str) -> str:
    """A new response id: `chatcmpl-<hex>` for chat, `cmpl-<hex>` for text."""
    if kind not in ID_PREFIX:
        raise ValueError(f"kind must be 'chat' or 'completion', got {kind!r}")
    return ID_PREFIX[kind] + uuid.uuid4().hex


def _now() -> datetime:
    return datetime.now(UTC)


def _check_messages(messages: Sequence[Any]) -> list[dict[str, str]]:
    if not messages:
        raise ValueError("messages is empty: an interaction needs at least one message")
    out = []
    for i, m in enumerate(messages):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise ValueError(f"messages[{i}] must be {{'role': str, 'content': str}}, got {m!r}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def deciding_feedback(rows: pd.DataFrame) -> dict[str, Any]:
    """The feedback that decides an interaction, of its rows in `feedback_frame` (oldest
    first): its latest correction, else its latest rating (people change their minds; a
    correction says what the reply should have been)."""
    corrected = rows[rows["corrected_reply"].notna()]
    chosen = corrected if len(corrected) else rows
    row: dict[str, Any] = chosen.iloc[-1].to_dict()
    return row


def clean_messages(
    messages: Iterable[dict[str, str]], kinds: tuple[str, ...]
) -> list[tuple[str, str]]:
    """(role, content) as ingest stores them (cleaned, then redacted with `kinds`), so their
    record id is the one ingest gives them."""
    out = []
    for m in messages:
        text = normalize_text(m["content"])
        out.append((m["role"].strip().lower(), pii.redact(text, kinds)[0] if kinds else text))
    return out


def last_user_text(messages: Sequence[dict[str, str]]) -> str:
    """The text of the last user message (the last message's, if no user spoke)."""
    for m in reversed(messages):
        if m["role"] == "user":
            return m["content"]
    return messages[-1]["content"] if messages else ""


def _sqlite_url(url: sa.URL) -> tuple[sa.URL, bool]:
    """(url with an absolute database path whose folder exists, is it in memory)."""
    database = url.database
    if not database or database == ":memory:" or database.startswith("file::memory:"):
        return url, True
    path = Path(database).expanduser()
    path = path if path.is_absolute() else path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return url.set(database=str(path)), False


def _sqlite_engine(url: sa.URL) -> sa.Engine:
    from sqlalchemy.pool import StaticPool

    url, in_memory = _sqlite_url(url)
    kwargs: dict[str, Any] = {"connect_args": {"check_same_thread": False}}
    if in_memory:
        # One shared connection: a pool would give each connection its own empty database.
        kwargs["poolclass"] = StaticPool
    else:
        kwargs.update(pool_size=10, max_overflow=30)
    engine = sa.create_engine(url, **kwargs)

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # SQLAlchemy emits BEGIN itself (below), not the sqlite3 module.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        if not in_memory:
            # Readers do not block the writer nor it them; writers queue on the busy timeout.
            cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        # A write transaction takes the write lock at BEGIN, where SQLite honours the busy
        # timeout; a deferred one that reads first can fail at once when it upgrades.
        mode = "IMMEDIATE" if conn.get_execution_options().get("retune_write") else "DEFERRED"
        conn.exec_driver_sql(f"BEGIN {mode}")

    return engine


class FeedbackStore:
    """Interactions and feedback in one SQL database; safe to share between threads."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self._writer = engine.execution_options(retune_write=True)
        # SQLite allows one writer at a time anyway; queueing here first keeps the busy
        # timeout for other processes writing to the same file.
        self._sqlite_lock = threading.Lock() if engine.dialect.name == "sqlite" else None

    @classmethod
    def open(cls, url: str) -> FeedbackStore:
        """Connect to `url` (any SQLAlchemy URL) and create the tables if they are missing.

        A relative SQLite path is taken from the working directory and its folder is created.
        """
        from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError

        try:
            parsed = sa.make_url(url)
        except ArgumentError:
            # The message would repeat the URL, password and all.
            raise RetuneError(
                "feedback.store_url is not a SQLAlchemy URL (e.g. "
                "sqlite:///data/feedback/feedback.db or postgresql+psycopg://user@host/db)"
            ) from None
        shown = parsed.render_as_string(hide_password=True)
        try:
            if parsed.get_backend_name() == "sqlite":
                engine = _sqlite_engine(parsed)
            else:
                engine = sa.create_engine(parsed, pool_pre_ping=True)
            metadata.create_all(engine)
        except (ArgumentError, NoSuchModuleError, SQLAlchemyError, OSError) as exc:
            raise RetuneError(
                f"feedback.store_url={shown!r}: cannot open the feedback store: {exc}"
            ) from None
        return cls(engine)

    @property
    def url(self) -> str:
        """The store's URL with any password hidden (safe to print)."""
        return self.engine.url.render_as_string(hide_password=True)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _write(self) -> Iterator[sa.Connection]:
        if self._sqlite_lock is None:
            with self._writer.begin() as conn:
                yield conn
            return
        with self._sqlite_lock, self._writer.begin() as conn:
            yield conn

    def log_interaction(
        self,
        *,
        interaction_id: str | None = None,
        model_name: str,
        model_version: str,
        kind: Kind,
        messages: list[dict[str, str]],
        reply: str,
        latency_ms: float,
        prompt_tokens: int,
        completion_tokens: int,
    ) -> str:
        """Store one completion (messages and reply redacted); return its id, which is the
        response id clients see: `interaction_id` when given (a stream hands it out before the
        reply is done), else a new one (`new_interaction_id`)."""
        clean = [
            {"role": m["role"], "content": _redact(m["content"])} for m in _check_messages(messages)
        ]
        interaction_id = interaction_id or new_interaction_id(kind)
        row = {
            "id": interaction_id,
            "created_at": _now(),
            "model_name": model_name,
            "model_version": str(model_version),
            "kind": kind,
            "messages": clean,
            "prompt": last_user_text(clean),
            "reply": _redact(reply),
            "latency_ms": float(latency_ms),
            "prompt_tokens": int(prompt_tokens),
            "completion_tokens": int(completion_tokens),
        }
        with self._write() as conn:
            conn.execute(interactions.insert().values(**row))
        return interaction_id

    def add_feedback(
        self,
        *,
        interaction_id: str,
        rating: Rating | None = None,
        score: float | None = None,
        corrected_reply: str | None = None,
    ) -> int:
        """Store a rating and/or score (in [0, 1]) of an interaction, with an optional
        corrected reply (redacted); return the feedback id. Nothing is stored on an error:
        ValueError for bad values, UnknownInteraction for an id the store does not hold."""
        if rating is None and score is None:
            raise ValueError("feedback needs a rating ('up' or 'down') or a score in [0, 1]")
        if rating is not None and rating not in ("up", "down"):
            raise ValueError(f"rating must be 'up' or 'down', got {rating!r}")
        if score is not None:
            if isinstance(score, bool) or not isinstance(score, int | float):
                raise ValueError(f"score must be a number in [0, 1], got {score!r}")
            if not math.isfinite(score) or not 0.0 <= score <= 1.0:
                raise ValueError(f"score must be in [0, 1], got {score!r}")
        if corrected_reply is not None:
            if not isinstance(corrected_reply, str):
                raise ValueError(f"corrected_reply must be text, got {corrected_reply!r}")
            if not corrected_reply.strip():
                raise ValueError("corrected_reply is empty: leave it out or send the reply text")
        if not isinstance(interaction_id, str) or not interaction_id:
            raise ValueError("interaction_id must be the id of a response")
        with self._write() as conn:
            found = conn.execute(
                sa.select(interactions.c.seq).where(interactions.c.id == interaction_id)
            ).first()
            if found is None:
                raise UnknownInteraction(interaction_id)
            result = conn.execute(
                feedback.insert().values(
                    interaction_id=interaction_id,
                    created_at=_now(),
                    rating=rating,
                    score=None if score is None else float(score),
                    corrected_reply=None if corrected_reply is None else _redact(corrected_reply),
                )
            )
            key = result.inserted_primary_key
            assert key is not None
            return int(key[0])

    def _newest(self, query: Any, key: Any, limit: int | None) -> list[dict[str, Any]]:
        """The rows of `query` with the `limit` highest `key`s (all when None), oldest first."""
        query = query.order_by(key.desc())
        if limit is not None:
            query = query.limit(max(0, limit))
        return self._rows(query)[::-1]

    def _rows(self, query: Any) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    def count_interactions(self) -> int:
        with self.engine.connect() as conn:
            return int(
                conn.execute(sa.select(sa.func.count()).select_from(interactions)).scalar_one()
            )

    def count_feedback(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(feedback)).scalar_one())

    def interactions_frame(
        self, *, limit: int | None = None, model_name: str | None = None
    ) -> pd.DataFrame:
        """The newest `limit` interactions (all when None), oldest first; `INTERACTION_COLUMNS`
        with `messages` as lists of {"role", "content"} and `created_at` in UTC."""
        query = sa.select(*(interactions.c[c] for c in INTERACTION_COLUMNS))
        if model_name is not None:
            query = query.where(interactions.c.model_name == model_name)
        rows = self._newest(query, interactions.c.seq, limit)
        return _frame(rows, INTERACTION_COLUMNS)

    def feedback_frame(
        self, *, limit: int | None = None, model_name: str | None = None
    ) -> pd.DataFrame:
        """The newest `limit` feedback rows (all when None), oldest first, each with its
        interaction: `FEEDBACK_COLUMNS`; `negative` is a "down" rating or a score below 0.5."""
        i, f = interactions, feedback
        query = sa.select(
            f.c.id.label("feedback_id"),
            f.c.interaction_id,
            f.c.created_at,
            i.c.model_name,
            i.c.model_version,
            f.c.rating,
            f.c.score,
            f.c.corrected_reply,
            i.c.messages,
            i.c.prompt,
            i.c.reply,
        ).join_from(f, i, f.c.interaction_id == i.c.id)
        if model_name is not None:
            query = query.where(i.c.model_name == model_name)
        rows = self._newest(query, f.c.id, limit)
        return _frame(_with_negative(rows), FEEDBACK_COLUMNS)

    def traffic_frame(self, *, model_name: str, since: datetime) -> pd.DataFrame:
        """Interactions of `model_name` from `since` on, oldest first, without their text:
        `TRAFFIC_COLUMNS`."""
        i = interactions
        query = (
            sa.select(*(i.c[c] for c in TRAFFIC_COLUMNS))
            .where(i.c.model_name == model_name, i.c.created_at >= since)
            .order_by(i.c.seq)
        )
        return _frame(self._rows(query), TRAFFIC_COLUMNS)

    def ratings_frame(self, *, model_name: str, since: datetime) -> pd.DataFrame:
        """Feedback on `model_name`'s replies given from `since` on, oldest first, without
        text: `RATING_COLUMNS`, `negative` as in `feedback_frame`."""
        i, f = interactions, feedback
        query = (
            sa.select(f.c.created_at, i.c.model_version, f.c.rating, f.c.score)
            .join_from(f, i, f.c.interaction_id == i.c.id)
            .where(i.c.model_name == model_name, f.c.created_at >= since)
            .order_by(f.c.id)
        )
        return _frame(_with_negative(self._rows(query)), RATING_COLUMNS)


def _with_negative(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`rows` with `negative`: a "down" rating or a score below `NEGATIVE_SCORE`."""
    for row in rows:
        score = row["score"]
        row["negative"] = row["rating"] == "down" or (score is not None and score < NEGATIVE_SCORE)
    return rows


def _frame(rows: list[dict[str, Any]], columns: Sequence[str]) -> pd.DataFrame:
    import pandas as pd

    for row in rows:
        if isinstance(row.get("messages"), str):  # a backend that hands JSON back as text
            row["messages"] = json.loads(row["messages"])
    frame = pd.DataFrame(rows, columns=list(columns))
    # SQLite keeps no time zone; every timestamp was written in UTC.
    frame["created_at"] = pd.to_datetime(frame["created_at"], utc=True)
    if "negative" in frame:
        frame["negative"] = frame["negative"].astype(bool)
    if "score" in frame:
        frame["score"] = frame["score"].astype(float)
    return frame
