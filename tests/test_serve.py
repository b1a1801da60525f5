"""`retune serve` on loopback: the official OpenAI client gets completions of the registered
model, every completion and rating is stored (redacted, with the version), bad or unauthorised
writes store nothing, limits answer 4xx naming the setting, and a moved alias is picked up."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from retune.config import Params
from retune.feedback import FeedbackStore
from retune.registry import Registry
from retune.serving import ModelWatcher, ServedModel, create_app, load_served, serve_in_thread
from tests.conftest import tiny_params_for

# Every test here serves models registered in a temporary MLflow store (~15 s to set up).
pytestmark = pytest.mark.slow

TOKEN = "test-token-" + "x" * 20
EMAIL = "jane.doe@example.com"


def _register(params: Params, model_dir: Path, times: int) -> list[int]:
    """Register `model_dir` `times` times under `params.register.model_name` with the real
    register stage (a bare MLflow run stands in for train's); return the versions."""
    import mlflow

    from retune.gitinfo import GitState
    from retune.tracking import setup_tracking
    from tasks.register import ModelFacts, register

    setup_tracking(params.tracking)
    with mlflow.start_run() as run:
        pass
    facts = ModelFacts(
        model_name=params.register.model_name,
        run_id=run.info.run_id,
        params={},
        git=GitState(commit=None, dirty=None),
    )
    return [
        register(params.register, params.tracking, model_dir, facts).version for _ in range(times)
    ]


def _params(tmp: Path, **sections: dict) -> Params:
    return tiny_params_for(
        tmp,
        serve={"reload_interval_s": 0.2, **sections.pop("serve", {})},
        feedback={"store_url": f"sqlite:///{tmp}/feedback/feedback.db"},
        **sections,
    )


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Params:
    """Params of a store holding `retune-test` v1 (production) and v2 (no alias)."""
    params = _params(tmp_path_factory.mktemp("serve"))
    v1, v2 = _register(params, tiny_model_dir, times=2)
    assert (v1, v2) == (1, 2)
    Registry.open(params.tracking, "retune-test").move_alias(
        "production", v1, kind="promote", why="test", forced=False, actor="test"
    )
    return params


@pytest.fixture(scope="module")
def server(registered: Params) -> Iterator[tuple[str, FeedbackStore]]:
    store = FeedbackStore.open(registered.feedback.store_url)
    with serve_in_thread(create_app(registered, store=store, token=TOKEN)) as url:
        yield url, store


def _auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _chat(
    url: str, content: str = "Hi, my router broke.", model: str = "retune-test", **fields: Any
) -> Any:
    body = {"model": model, "messages": [{"role": "user", "content": content}], **fields}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=_auth(), timeout=60)


def test_the_openai_client_gets_chat_and_text_completions_and_lists_models(
    server: tuple[str, FeedbackStore],
) -> None:
    import openai

    url, store = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=TOKEN, max_retries=0)
    chat = client.chat.completions.create(
        model="retune-test",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": f"Mail {EMAIL}"},
        ],
        max_tokens=8,
    )
    assert chat.id.startswith("chatcmpl-") and chat.object == "chat.completion"
    assert chat.model == "retune-test" and chat.system_fingerprint == "v1"
    assert isinstance(chat.choices[0].message.content, str)
    assert chat.choices[0].finish_reason in {"stop", "length"}
    assert chat.usage is not None and 1 <= chat.usage.completion_tokens <= 8
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens

    text = client.completions.create(model="retune-test", prompt="Order 1042", max_tokens=4)
    assert text.id.startswith("cmpl-") and isinstance(text.choices[0].text, str)
    assert text.usage is not None and 1 <= text.usage.completion_tokens <= 4

    assert [m.id for m in client.models.list()] == ["retune-test"]

    # Both completions are in the store under their response ids, with the version served,
    # latency, token counts, and the e-mail address redacted.
    frame = store.interactions_frame().set_index("id")
    row = frame.loc[chat.id]
    assert (row["model_name"], row["model_version"], row["kind"]) == ("retune-test", "1", "chat")
    assert row["prompt"] == "Mail [EMAIL]"
    assert row["messages"][0] == {"role": "system", "content": "Be brief."}
    assert row["completion_tokens"] == chat.usage.completion_tokens and row["latency_ms"] > 0
    assert frame.loc[text.id, "messages"] == [{"role": "user", "content": "Order 1042"}]
    assert EMAIL not in repr(store.interactions_frame().to_dict())

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).completions.create(
            model="retune-test", prompt="hi", max_tokens=2
        )
    with pytest.raises(openai.NotFoundError, match="retune-test"):
        client.completions.create(model="gpt-4o", prompt="hi", max_tokens=2)


def test_feedback_is_stored_and_bad_or_unauthorised_feedback_stores_nothing(
    server: tuple[str, FeedbackStore],
) -> None:
    url, store = server
    rid = _chat(url, max_tokens=2).json()["id"]
    before = store.count_feedback()
    bad: list[tuple[Any, dict[str, str], int, str]] = [
        ({}, _auth(), 422, "response_id"),
        ({"response_id": rid}, _auth(), 422, "rating"),
        ({"response_id": rid, "rating": "meh"}, _auth(), 422, "rating"),
        ({"response_id": rid, "score": 1.5}, _auth(), 422, "score"),
        ({"response_id": rid, "score": "0.5"}, _auth(), 422, "score"),
        ({"response_id": rid, "rating": "up", "ratng": "up"}, _auth(), 422, "ratng"),
        ({"response_id": rid, "id": rid, "rating": "up"}, _auth(), 422, "exactly once"),
        ({"response_id": rid, "rating": "up", "corrected_reply": " "}, _auth(), 422, "blank"),
        ("not json", _auth(), 422, "JSON object"),
        ("{not json", {**_auth(), "Content-Type": "application/json"}, 422, "not valid JSON"),
        ({"response_id": "chatcmpl-unknown", "rating": "up"}, _auth(), 404, "chatcmpl-unknown"),
        ({"response_id": rid, "rating": "up"}, {}, 401, "RETUNE_SERVE_TOKEN"),
        ({"response_id": rid, "rating": "up"}, _auth("wrong"), 401, "bearer token"),
        ({"response_id": rid, "rating": "up"}, {"Authorization": TOKEN}, 401, "bearer token"),
    ]
    for payload, headers, status, words in bad:
        kwargs = {"content": payload} if isinstance(payload, str) else {"json": payload}
        answer = httpx.post(f"{url}/v1/feedback", headers=headers, timeout=30, **kwargs)
        assert answer.status_code == status, (payload, answer.text)
        assert words in answer.json()["error"]["message"], (payload, answer.text)
    assert store.count_feedback() == before

    good = httpx.post(
        f"{url}/v1/feedback",
        json={"id": rid, "rating": "down", "score": 0.1, "corrected_reply": f"Mail {EMAIL}."},
        headers=_auth(),
        timeout=30,
    )
    assert good.status_code == 201 and good.json()["response_id"] == rid
    row = store.feedback_frame().iloc[-1]
    assert (row["interaction_id"], row["rating"], row["score"]) == (rid, "down", 0.1)
    assert row["negative"] and row["corrected_reply"] == "Mail [EMAIL]."
    assert row["model_version"] == "1"

    # Completions log interactions, so they are writes too.
    before = store.count_interactions()
    body = {"model": "retune-test", "prompt": "hi", "max_tokens": 2}
    assert httpx.post(f"{url}/v1/completions", json=body, timeout=30).status_code == 401
    assert store.count_interactions() == before


def test_twenty_concurrent_feedback_clients_lose_nothing(
    server: tuple[str, FeedbackStore],
) -> None:
    url, store = server
    rid = _chat(url, max_tokens=2).json()["id"]
    before = store.count_feedback()
    statuses: list[int] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        with httpx.Client(base_url=url, headers=_auth(), timeout=60) as http:
            for i in range(10):
                answer = http.post("/v1/feedback", json={"response_id": rid, "score": i / 10})
                with lock:
                    statuses.append(answer.status_code)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [201] * 200
    assert store.count_feedback() - before == 200


def test_limits_answer_4xx_naming_the_setting(
    server: tuple[str, FeedbackStore], registered: Params
) -> None:
    url, store = server
    before = store.count_interactions()
    huge = _chat(url, content="x" * (registered.serve.max_body_bytes + 10))
    assert huge.status_code == 413
    assert "serve.max_body_bytes" in huge.json()["error"]["message"]

    over = _chat(url, max_tokens=registered.serve.max_tokens + 1)
    assert over.status_code == 400 and "serve.max_tokens" in over.json()["error"]["message"]
    assert _chat(url, max_tokens=0).status_code == 400

    long = _chat(url, content="my router keeps disconnecting " * 40)
    assert long.status_code == 400
    assert "context is 64 tokens" in long.json()["error"]["message"]
    room = _chat(url, content="hello", max_tokens=60)
    assert room.status_code == 400 and "lower max_tokens" in room.json()["error"]["message"]

    stream = _chat(url, stream=True)
    assert stream.status_code == 400 and "stream" in stream.json()["error"]["message"]
    assert store.count_interactions() == before

    # Without max_tokens the reply is register.max_new_tokens long at most, within the context.
    default = _chat(url, content="hello").json()
    assert default["usage"]["completion_tokens"] <= registered.register.max_new_tokens
    assert default["usage"]["total_tokens"] <= 64


def test_without_a_production_version_the_server_says_what_to_run(
    registered: Params, tmp_path: Path
) -> None:
    import dataclasses

    params = dataclasses.replace(
        registered,
        register=dataclasses.replace(registered.register, model_name="never-registered"),
    )
    store = FeedbackStore.open(f"sqlite:///{tmp_path}/fb.db")
    with serve_in_thread(create_app(params, store=store)) as url:
        health = httpx.get(f"{url}/healthz", timeout=30)
        assert health.status_code == 503 and health.json()["version"] is None
        answer = _chat(url)
        assert answer.status_code == 503
        message = answer.json()["error"]["message"]
        assert "retune run" in message and "retune promote" in message
        assert httpx.get(f"{url}/v1/models", timeout=30).status_code == 503
    assert store.count_interactions() == 0


def test_a_moved_alias_is_served_without_restart_and_never_half_loaded(
    registered: Params, tmp_path: Path, tiny_model_dir: Path
) -> None:
    import dataclasses

    params = dataclasses.replace(
        registered, register=dataclasses.replace(registered.register, model_name="retune-reload")
    )
    v1, v2 = _register(params, tiny_model_dir, times=2)
    registry = Registry.open(params.tracking, "retune-reload")
    registry.move_alias("production", v1, kind="promote", why="test", forced=False, actor="t")
    loading = threading.Event()

    def slow_loader(name: str, version: int) -> ServedModel:
        # Long enough that requests arrive while v2 is loading: they must get v1, whole.
        loading.set()
        time.sleep(1.0)
        return load_served(name, version)

    watcher = ModelWatcher(registry, "production", 0.2, loader=slow_loader)
    store = FeedbackStore.open(f"sqlite:///{tmp_path}/fb.db")
    with serve_in_thread(create_app(params, store=store, watcher=watcher)) as url:
        assert httpx.get(f"{url}/healthz", timeout=30).json()["version"] == v1
        loading.clear()
        registry.move_alias("production", v2, kind="promote", why="test", forced=False, actor="t")
        served: list[str] = []
        deadline = time.monotonic() + 120
        while not served or served[-1] != f"v{v2}":
            assert time.monotonic() < deadline, "the server never switched to v2"
            answer = _chat(url, model="retune-reload", max_tokens=2)
            assert answer.status_code == 200, answer.text
            served.append(answer.json()["system_fingerprint"])
        assert loading.is_set()
        # v1 answered until v2 was fully loaded, then v2 only: no gap, no going back.
        assert served == sorted(served) and set(served) <= {f"v{v1}", f"v{v2}"}
        health = httpx.get(f"{url}/healthz", timeout=30).json()
        assert (health["status"], health["version"]) == ("ok", v2)
        rid = _chat(url, model="retune-reload", max_tokens=2).json()["id"]
        assert store.interactions_frame().set_index("id").loc[rid, "model_version"] == str(v2)


def test_a_version_that_fails_to_load_leaves_the_old_one_serving(registered: Params) -> None:
    registry = Registry.open(registered.tracking, "retune-test")
    calls: list[int] = []

    def loader(name: str, version: int) -> ServedModel:
        calls.append(version)
        if version != 1:
            raise OSError("artifact missing")
        return load_served(name, version)

    watcher = ModelWatcher(registry, "canary", 0.2, loader=loader)
    registry.move_alias("canary", 1, kind="promote", why="test", forced=False, actor="t")
    watcher.poll()
    assert watcher.current is not None and watcher.current.version == 1
    registry.move_alias("canary", 2, kind="promote", why="test", forced=False, actor="t")
    watcher.poll()
    watcher.poll()  # a failed version is not reloaded every poll
    assert watcher.current.version == 1 and calls == [1, 2]
    assert watcher.last_error is not None and "artifact missing" in watcher.last_error
