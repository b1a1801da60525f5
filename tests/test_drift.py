"""Drift checks on constructed windows: unchanged data is no drift, a jump in negative ratings
is quality drift, off-domain prompts are input drift, too little data is never drift; and the
`drift_check` flow emits the event retraining waits for."""

from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from retune.config import DriftParams, Params
from retune.data.records import Record, write_records
from retune.online.drift import (
    DRIFT,
    NO_DRIFT,
    NOT_ENOUGH_DATA,
    Check,
    Evidence,
    distribution_drift,
    negative_share_drift,
    new_evidence,
    overall,
    rolling_share,
    split_window,
    waiting_for,
)
from tests.helpers import make_conversations, tiny_params_for

CFG = DriftParams(
    window=60, reference_ratings=60, reference_prompts=200, min_ratings=30, min_prompts=30
)
# Words of other fields: prompts a support model has never seen the like of.
OFF_DOMAIN = (
    "quantum chromodynamics describes gluons binding quarks inside every proton and neutron "
    "baroque fugue counterpoint modulates through distant keys before the final cadence "
    "glacial moraines deposit unsorted till across valleys carved during the pleistocene "
    "photosynthesis converts carbon dioxide into glucose within chloroplast thylakoids"
)


def flags(n: int, negative_share: float) -> list[bool]:
    """`n` ratings, the first round(n * share) of them negative, spread evenly."""
    k = round(n * negative_share)
    return [i * k // n != (i + 1) * k // n for i in range(n)]


def quality(current: list[bool], reference: list[bool], **kw: Any) -> Check:
    settings = {"alpha": 0.01, "min_ratings": 50, "min_increase": 0.05} | kw
    return negative_share_drift(current, reference, **settings)


def test_unchanged_ratings_and_distributions_are_no_drift() -> None:
    check = quality(flags(300, 0.10), flags(500, 0.10))
    assert check.status == NO_DRIFT and check.p_value is not None and check.p_value > 0.1
    assert check.figures["negative_share"] == pytest.approx(0.10)
    rng = np.random.default_rng(0)
    same = distribution_drift(
        "perplexity",
        rng.lognormal(2.0, 0.4, 400),
        rng.lognormal(2.0, 0.4, 600),
        alpha=0.01,
        min_current=50,
        min_reference=50,
        min_statistic=0.1,
    )
    assert same.status == NO_DRIFT and same.p_value is not None and same.p_value > 0.01


def test_a_jump_in_negative_ratings_is_quality_drift() -> None:
    check = quality(flags(200, 0.40), flags(400, 0.10))
    assert check.status == DRIFT and check.drift
    assert check.p_value is not None and check.p_value < 1e-6
    assert check.effect == pytest.approx(0.30)
    assert (check.n_current, check.n_reference) == (200, 400)
    assert "40.0% in the window vs 10.0% in the reference" in check.reason


def test_fewer_negatives_or_a_negligible_rise_is_not_drift() -> None:
    # One-sided: users liking production more is not a reason to retrain.
    assert quality(flags(200, 0.0), flags(400, 0.30)).status == NO_DRIFT
    # 10% -> 11% on 200k ratings is significant, and below the 5-point minimum effect.
    tiny = quality(flags(200_000, 0.11), flags(200_000, 0.10))
    assert tiny.p_value is not None and tiny.p_value < 1e-9
    assert tiny.status == NO_DRIFT


def test_too_little_data_is_not_enough_data_never_drift() -> None:
    # Every rating in the window is negative, none in the reference: still too few to say.
    few = quality([True] * 49, [False] * 500)
    assert few.status == NOT_ENOUGH_DATA and not few.drift and few.p_value is None
    assert "drift.min_ratings=50" in few.reason
    assert quality([True] * 200, [False] * 10).status == NOT_ENOUGH_DATA
    far_apart = distribution_drift(
        "perplexity",
        [1000.0] * 20,
        [2.0] * 500,
        alpha=0.01,
        min_current=50,
        min_reference=50,
        min_statistic=0.1,
    )
    assert far_apart.status == NOT_ENOUGH_DATA and far_apart.statistic is None
    assert overall([few, far_apart]) == NOT_ENOUGH_DATA
    assert overall([few, quality(flags(200, 0.1), flags(200, 0.1))]) == NO_DRIFT
    assert overall([few, quality(flags(200, 0.5), flags(200, 0.1))]) == DRIFT


def test_the_window_is_the_newest_and_the_reference_the_oldest_before_it() -> None:
    series = list(range(10))
    assert split_window(series, 3, 4) == ([7, 8, 9], [0, 1, 2, 3])
    assert split_window(series, 3, 100) == ([7, 8, 9], [0, 1, 2, 3, 4, 5, 6])
    assert split_window(series, 20, 5) == (series, [])  # no baseline yet
    assert rolling_share([True, False, True, True], 2).tolist() == [1.0, 0.5, 0.5, 1.0]


def test_a_drift_acted_on_waits_for_new_evidence_of_what_drifted() -> None:
    acted = Evidence(3, "50", "2026-12-01T10:00:00+00:00", "i-67", "2026-12-01T10:05:00+00:00")
    assert new_evidence(acted, acted, ["quality"]) == []
    newer_prompt = dataclasses.replace(acted, newest_prompt_id="i-68")
    # New prompts are no new evidence of worse ratings, but they are of changed prompts.
    assert new_evidence(newer_prompt, acted, ["quality"]) == []
    assert new_evidence(newer_prompt, acted, ["perplexity", "quality"]) == ["prompts"]
    newer_rating = dataclasses.replace(acted, newest_rating_id="51")
    assert new_evidence(newer_rating, acted, ["quality"]) == ["ratings"]
    assert new_evidence(dataclasses.replace(acted, production_version=4), acted, []) == [
        "production"
    ]
    assert Evidence.from_dict(acted.to_dict()) == acted
    assert waiting_for(["quality"]) == "new ratings"
    assert waiting_for(["prompt_length", "quality", "perplexity"]) == "new prompts/ratings"


def log_ratings(store: Any, version: str, prompts: list[str], negative: list[bool]) -> None:
    """One interaction per prompt, served by `version`, rated down where `negative`."""
    for prompt, bad in zip(prompts, negative, strict=True):
        rid = store.log_interaction(
            model_name="retune-test",
            model_version=version,
            kind="chat",
            messages=[{"role": "user", "content": prompt}],
            reply="Thanks for reaching out.",
            latency_ms=12.0,
            prompt_tokens=9,
            completion_tokens=5,
        )
        store.add_feedback(interaction_id=rid, rating="down" if bad else "up")


def test_quality_drift_reads_only_production_ratings_from_the_store(tmp_path: Path) -> None:
    from retune.online.feedback import FeedbackStore
    from tasks.drift import check_quality

    cfg = dataclasses.replace(CFG, window=30, reference_ratings=30, min_ratings=20)
    store = FeedbackStore.open(f"sqlite:///{tmp_path}/feedback.db")
    prompts = ["Hi, my router won't turn on."] * 30
    log_ratings(store, "1", prompts, flags(30, 0.1))  # at launch
    log_ratings(store, "2", prompts, [True] * 30)  # another version's bad ratings
    log_ratings(store, "1", prompts, flags(30, 0.5))  # the newest window
    feedback = store.feedback_frame(model_name="retune-test")

    check, negative = check_quality(cfg, feedback, 1)
    assert check.status == DRIFT and (check.n_current, check.n_reference) == (30, 30)
    assert check.figures["reference_negative_share"] == pytest.approx(0.1)
    assert len(negative) == 60
    # A new production version has no baseline yet: its ratings cannot be judged.
    fresh, _ = check_quality(cfg, feedback, 2)
    assert fresh.status == NOT_ENOUGH_DATA and fresh.n_reference == 0
    assert check_quality(cfg, feedback, None)[0].status == NOT_ENOUGH_DATA


def user_turns(conversations: list[list[tuple[str, str]]]) -> list[str]:
    return [text for conv in conversations for role, text in conv if role == "user"]


def off_domain(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = OFF_DOMAIN.split()
    return [" ".join(rng.sample(words, rng.randint(6, 10))).capitalize() for _ in range(n)]


def write_holdout(path: Path, conversations: list[list[tuple[str, str]]]) -> Path:
    rows = (
        Record(messages=tuple(c), source="holdout.jsonl", line=i + 1, format="chat_jsonl").to_row()
        for i, c in enumerate(conversations)
    )
    write_records(rows, path)
    return path


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """The tiny model after 30 steps on the support conversations: it knows the domain."""
    from tests.test_promote import trained_copy

    return trained_copy(tiny_model_dir, tmp_path_factory.mktemp("drift-model") / "m", steps=30)


@pytest.mark.slow
def test_off_domain_prompts_are_input_drift_and_same_domain_ones_are_not(
    tmp_path: Path, trained_model: Path
) -> None:
    from retune.model.modeling import load_pretrained
    from tasks.drift import check_inputs, holdout_user_turns, prompt_figures

    model, tokenizer = load_pretrained(trained_model)
    # One generator, two disjoint samples: the holdout and a window of the same kind of users.
    conversations = make_conversations(240, seed=5)
    holdout = write_holdout(tmp_path / "holdout.parquet", conversations[0::2])
    turns = holdout_user_turns(holdout, CFG.reference_prompts)
    assert 120 <= len(turns) <= 200 and "Thank you, that helped." in turns

    def figures(prompts: list[str]) -> Any:
        return prompt_figures(model, tokenizer, prompts, batch_size=16, max_seq_len=64)

    reference = figures(turns)
    same = check_inputs(CFG, figures(user_turns(conversations[1::2])), reference)
    assert [c.status for c in same] == [NO_DRIFT, NO_DRIFT], [c.reason for c in same]

    strange = figures(off_domain(80, seed=1))
    perplexity, _ = check_inputs(CFG, strange, reference)
    assert perplexity.status == DRIFT, perplexity.reason
    assert perplexity.figures["median"] > 3 * perplexity.figures["reference_median"]
    assert perplexity.p_value is not None and perplexity.p_value < 1e-6

    few = check_inputs(CFG, figures(off_domain(10, seed=2)), reference)
    assert [c.status for c in few] == [NOT_ENOUGH_DATA, NOT_ENOUGH_DATA]


def drift_params(tmp_path: Path) -> Params:
    return tiny_params_for(
        tmp_path,
        drift={
            "window": 60,
            "reference_ratings": 60,
            "reference_prompts": 200,
            "min_ratings": 30,
            "min_prompts": 30,
        },
        feedback={"store_url": f"sqlite:///{tmp_path}/feedback/feedback.db"},
    )


def read_drift_events(model_name: str, timeout_s: float = 30.0) -> list[Any]:
    """Drift events the test server has stored (it persists them in batches)."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    from flows.drift import DRIFT_EVENT

    query = EventFilter(
        event=EventNameFilter(name=[DRIFT_EVENT]),
        resource=EventResourceFilter(id=[f"retune.model.{model_name}"]),
    )
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            # The client's default page (100) is over what the server accepts (50).
            events = client.read_events(filter=query, limit=50).events
            if events or time.monotonic() > deadline:
                return events
            time.sleep(0.5)


@pytest.mark.slow
def test_drift_check_flow_finds_drift_in_production_and_emits_the_event(
    tmp_path: Path, trained_model: Path
) -> None:
    import yaml
    from mlflow import MlflowClient
    from prefect.testing.utilities import prefect_test_harness

    from flows.drift import drift_check
    from retune.config import to_plain
    from retune.online.feedback import FeedbackStore
    from retune.release.registry import PRODUCTION, Registry
    from retune.reports import read_json
    from tests.test_promote import register_candidate

    params = drift_params(tmp_path)
    conversations = make_conversations(240, seed=5)
    write_holdout(params.paths.split / "holdout.parquet", conversations[0::2])
    version = register_candidate(params, trained_model)
    registry = Registry.open(params.tracking, "retune-test")
    registry.move_alias(PRODUCTION, version, kind="promote", why="test", forced=False, actor="t")

    store = FeedbackStore.open(params.feedback.store_url)
    launch = user_turns(conversations[1::2])[:60]
    log_ratings(store, str(version), launch, flags(60, 0.05))
    # Then users start asking about something else, and dislike the replies.
    log_ratings(store, str(version), off_domain(60, seed=3), flags(60, 0.6))
    store.close()
    file = tmp_path / "params.yaml"
    file.write_text(yaml.safe_dump(to_plain(params)))

    with prefect_test_harness(server_startup_timeout=120):
        summary = drift_check(str(file))
        events = read_drift_events("retune-test")
        # The next scheduled check, with nothing new in the store: no second retrain.
        again = drift_check(str(file))
        time.sleep(2)  # the server stores events in batches: give a second one time to land
        assert len(read_drift_events("retune-test")) == 1
    assert again["status"] == DRIFT and not again["event_emitted"]
    assert again["note"].startswith("already acted on at ")
    assert f"(run {summary['mlflow_run_id']}); waiting for new " in again["note"]

    assert summary["status"] == DRIFT and summary["event_emitted"]
    assert set(summary["drifted"]) >= {"quality", "perplexity"}
    assert summary["production_version"] == version
    assert [str(e.id) for e in events] == [summary["event_id"]]
    event = events[0]
    assert event.resource.id == "retune.model.retune-test"
    assert event.payload["status"] == DRIFT and event.payload["production_version"] == version
    assert event.payload["checks"]["quality"]["status"] == DRIFT

    report = read_json(params.paths.reports / "drift.json")
    assert report["checks"]["quality"]["n_current"] == 60
    assert (params.paths.reports / "drift.png").stat().st_size > 10_000
    run = MlflowClient().get_run(summary["mlflow_run_id"])
    assert run.data.tags["drift.status"] == DRIFT and run.data.metrics["quality.drift"] == 1.0
    assert run.data.params["production_version"] == str(version)
    artifacts = {a.path for a in MlflowClient().list_artifacts(run.info.run_id)}
    assert artifacts == {"drift.json", "drift.png", "monitor.html"}
    # The monitoring page logged with each check lists that check, newest first.
    page = Path(MlflowClient().download_artifacts(run.info.run_id, "monitor.html", str(tmp_path)))
    rows = page.read_text().split('<table id="drift-checks">')[1].split("</table>")[0]
    assert rows.count("<tr>") == 1 + 1 and summary["mlflow_run_id"] in rows
    assert "<td>yes</td>" in rows  # logged again once the event went out: acted on
    assert not any("Order" in value or "quark" in value for value in run.data.params.values())


class Emitter:
    """Stands in for `prefect.events.emit_event`: keeps what it was asked to emit."""

    def __init__(self) -> None:
        self.events: list[Any] = []

    def __call__(self, **event: Any) -> Any:
        import uuid
        from types import SimpleNamespace

        self.events.append(SimpleNamespace(id=uuid.uuid4(), **event))
        return self.events[-1]


@pytest.mark.slow
def test_a_drift_already_acted_on_does_not_retrain_again_until_new_ratings_arrive(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The hourly check finds the same drift in the same window after a rejected retrain:
    it reports it, and emits nothing until new ratings of production come in."""
    from mlflow import MlflowClient

    from flows.drift import respond
    from retune.online.feedback import FeedbackStore
    from retune.release.registry import PRODUCTION, Registry
    from retune.reports import read_json
    from tasks.drift import run as check
    from tests.test_promote import register_candidate

    params = drift_params(tmp_path)
    # Quality alone: too few prompts for the input checks, so no model is scored.
    params = dataclasses.replace(params, drift=dataclasses.replace(params.drift, min_prompts=500))
    write_holdout(params.paths.split / "holdout.parquet", make_conversations(40, seed=5))
    version = register_candidate(params, tiny_model_dir)
    registry = Registry.open(params.tracking, "retune-test")
    registry.move_alias(PRODUCTION, version, kind="promote", why="test", forced=False, actor="t")
    store = FeedbackStore.open(params.feedback.store_url)
    prompts = ["Hi, my router won't turn on."] * 60
    log_ratings(store, str(version), prompts, flags(60, 0.05))
    log_ratings(store, str(version), prompts, flags(60, 0.6))
    emit = Emitter()

    first = check(params)
    assert first.drift and first.act and first.acted_on is None
    assert respond(params, first, emit)["event_emitted"] and len(emit.events) == 1
    acted_at = MlflowClient().get_run(str(first.run_id)).data.tags["drift.acted_at"]

    # An hour later: nothing new in the store. Still drift, and already answered.
    again = check(params)
    note = f"already acted on at {acted_at} (run {first.run_id}); waiting for new ratings"
    assert (again.status, again.act, again.note) == (DRIFT, False, note)
    report = read_json(params.paths.reports / "drift.json")
    assert (report["status"], report["note"]) == (DRIFT, note)
    assert report["acted_on"]["run_id"] == first.run_id
    assert report["acted_on"]["evidence"] == report["evidence"]
    capsys.readouterr()
    summary = respond(params, again, emit)
    assert not summary["event_emitted"] and summary["event_id"] is None
    assert len(emit.events) == 1
    assert note in capsys.readouterr().out
    # New prompts without ratings are no new evidence that the replies got worse.
    store.log_interaction(
        model_name="retune-test",
        model_version=str(version),
        kind="chat",
        messages=[{"role": "user", "content": "Is the camera waterproof?"}],
        reply="Yes.",
        latency_ms=10.0,
        prompt_tokens=6,
        completion_tokens=1,
    )
    assert check(params).note == note

    # New negative ratings: the drift is news again, and the event goes out.
    log_ratings(store, str(version), prompts[:10], [True] * 10)
    store.close()
    rearmed = check(params)
    assert rearmed.drift and rearmed.act and rearmed.acted_on is None
    assert respond(params, rearmed, emit)["event_emitted"] and len(emit.events) == 2
    assert check(params).acted_on.run_id == rearmed.run_id  # type: ignore[union-attr]
