"""The feedback store on SQLite: redacted before storing, bad feedback refused with nothing
written, concurrent writers all kept, and the frames drift checks and exports read."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from retune.errors import RetuneError
from retune.online.feedback import (
    FEEDBACK_COLUMNS,
    INTERACTION_COLUMNS,
    FeedbackStore,
    UnknownInteraction,
)

EMAIL, PHONE = "jane.doe@example.com", "+1 415 555 2671"


def _log(store: FeedbackStore, prompt: str = "hi", version: str = "1", **changes: object) -> str:
    fields: dict = {
        "model_name": "m",
        "model_version": version,
        "kind": "chat",
        "messages": [{"role": "user", "content": prompt}],
        "reply": "hello",
        "latency_ms": 12.5,
        "prompt_tokens": 3,
        "completion_tokens": 2,
        **changes,
    }
    return store.log_interaction(**fields)


@pytest.fixture
def store(tmp_path: Path) -> FeedbackStore:
    return FeedbackStore.open(f"sqlite:///{tmp_path}/nested/feedback.db")


def _all_text(db: Path) -> str:
    """Every value of every table, read with plain sqlite3 (what is really on disk)."""
    with sqlite3.connect(db) as conn:
        rows = [
            row
            for (table,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
            for row in conn.execute(f"SELECT * FROM {table}")
        ]
    return repr(rows)


def test_interactions_and_corrections_are_redacted_before_they_are_stored(
    store: FeedbackStore, tmp_path: Path
) -> None:
    iid = _log(
        store,
        prompt=f"Write to {EMAIL} or call {PHONE}",
        reply=f"Sure, I mailed {EMAIL}",
        messages=[
            {"role": "system", "content": f"Agent line {PHONE}"},
            {"role": "user", "content": f"Write to {EMAIL} or call {PHONE}"},
        ],
    )
    store.add_feedback(interaction_id=iid, rating="down", corrected_reply=f"Mail {EMAIL} today")
    assert iid.startswith("chatcmpl-")
    on_disk = _all_text(tmp_path / "nested" / "feedback.db")
    assert EMAIL not in on_disk and PHONE not in on_disk
    row = store.interactions_frame().iloc[-1]
    assert row["prompt"] == "Write to [EMAIL] or call [PHONE]"
    assert row["messages"][0] == {"role": "system", "content": "Agent line [PHONE]"}
    assert row["reply"] == "Sure, I mailed [EMAIL]"
    assert store.feedback_frame().iloc[-1]["corrected_reply"] == "Mail [EMAIL] today"


def test_frames_have_the_agreed_columns_newest_window_oldest_first(store: FeedbackStore) -> None:
    ids = [_log(store, prompt=f"p{i}", version=str(1 + i % 2)) for i in range(5)]
    done = _log(store, prompt="a completion", kind="completion")
    assert done.startswith("cmpl-")
    frame = store.interactions_frame(limit=3)
    assert tuple(frame.columns) == INTERACTION_COLUMNS
    assert list(frame["id"]) == [ids[3], ids[4], done]
    assert str(frame["created_at"].dt.tz) == "UTC"
    assert frame["created_at"].is_monotonic_increasing
    assert frame.iloc[-1]["messages"] == [{"role": "user", "content": "a completion"}]
    assert len(store.interactions_frame(model_name="other")) == 0

    store.add_feedback(interaction_id=ids[0], rating="up")
    store.add_feedback(interaction_id=ids[1], score=0.2)
    store.add_feedback(interaction_id=ids[2], rating="up", score=0.9, corrected_reply="Better.")
    store.add_feedback(interaction_id=ids[3], rating="down")
    fb = store.feedback_frame(limit=3)
    assert tuple(fb.columns) == FEEDBACK_COLUMNS
    assert list(fb["interaction_id"]) == ids[1:4]
    assert list(fb["negative"]) == [True, False, True]
    assert list(fb["model_version"]) == ["2", "1", "2"]
    assert fb.iloc[1]["corrected_reply"] == "Better." and fb.iloc[1]["prompt"] == "p2"
    assert (store.count_interactions(), store.count_feedback()) == (6, 4)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({}, "rating"),
        ({"rating": "meh"}, "'up' or 'down'"),
        ({"score": 1.5}, r"\[0, 1\]"),
        ({"score": float("nan")}, r"\[0, 1\]"),
        ({"score": True}, "number"),
        ({"rating": "up", "corrected_reply": "  "}, "empty"),
    ],
)
def test_bad_feedback_is_refused_and_nothing_stored(
    store: FeedbackStore, changes: dict, message: str
) -> None:
    iid = _log(store)
    with pytest.raises(ValueError, match=message):
        store.add_feedback(interaction_id=iid, **changes)
    assert store.count_feedback() == 0


def test_feedback_on_an_unknown_id_names_it(store: FeedbackStore) -> None:
    with pytest.raises(UnknownInteraction, match="chatcmpl-nope"):
        store.add_feedback(interaction_id="chatcmpl-nope", rating="up")
    assert store.count_feedback() == 0


def test_twenty_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/feedback.db"
    iid = _log(FeedbackStore.open(url))
    errors: list[BaseException] = []

    def client(n: int) -> None:
        # A store per writer, as separate server processes would have: SQLite's own locking
        # (WAL, busy timeout, immediate transactions) must queue them.
        mine = FeedbackStore.open(url)
        for i in range(10):
            try:
                mine.add_feedback(interaction_id=iid, rating="up" if i % 2 else "down")
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert FeedbackStore.open(url).count_feedback() == 200


def test_a_relative_sqlite_path_is_under_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = FeedbackStore.open("sqlite:///data/feedback/feedback.db")
    _log(store)
    assert (tmp_path / "data" / "feedback" / "feedback.db").is_file()
    with sqlite3.connect(tmp_path / "data" / "feedback" / "feedback.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_bad_url_names_the_setting_and_hides_the_password() -> None:
    with pytest.raises(RetuneError, match=r"feedback\.store_url") as err:
        FeedbackStore.open("postgresql+nosuchdriver://u:s3cret-pw@localhost/db")
    assert "s3cret-pw" not in str(err.value)
    with pytest.raises(RetuneError, match="not a SQLAlchemy URL") as err:
        FeedbackStore.open("not a url s3cret-pw")
    assert "s3cret-pw" not in str(err.value)
