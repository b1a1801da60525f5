"""`retune serve` on loopback: the official OpenAI client gets completions of the registered
model, every completion and rating is stored (redacted, with the version), bad or unauthorised
writes store nothing, limits answer 4xx naming the setting, and a moved alias is picked up."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from retune.config import Params
from retune.online.feedback import FeedbackStore
from retune.online.serving import (
    ModelWatcher,
    ServedModel,
    create_app,
    load_served,
    serve_in_thread,
)
from retune.release.registry import Registry
from tests.servers import TOKEN, auth, register_versions, serving

# Every test here serves models registered in a temporary MLflow store (~15 s to set up).
pytestmark = pytest.mark.slow

EMAIL = "jane.doe@example.com"


def _chat(
    url: str, content: str = "Hi, my router broke.", model: str = "retune-test", **fields: Any
) -> Any:
    body = {"model": model, "messages": [{"role": "user", "content": content}], **fields}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=auth(), timeout=60)


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
        ({}, auth(), 422, "response_id"),
        ({"response_id": rid}, auth(), 422, "rating"),
        ({"response_id": rid, "rating": "meh"}, auth(), 422, "rating"),
        ({"response_id": rid, "score": 1.5}, auth(), 422, "score"),
        ({"response_id": rid, "score": "0.5"}, auth(), 422, "score"),
        ({"response_id": rid, "rating": "up", "ratng": "up"}, auth(), 422, "ratng"),
        ({"response_id": rid, "id": rid, "rating": "up"}, auth(), 422, "exactly once"),
        ({"response_id": rid, "rating": "up", "corrected_reply": " "}, auth(), 422, "blank"),
        ("not json", auth(), 422, "JSON object"),
        ("{not json", {**auth(), "Content-Type": "application/json"}, 422, "not valid JSON"),
        ({"response_id": "chatcmpl-unknown", "rating": "up"}, auth(), 404, "chatcmpl-unknown"),
        ({"response_id": rid, "rating": "up"}, {}, 401, "RETUNE_SERVE_TOKEN"),
        ({"response_id": rid, "rating": "up"}, auth("wrong"), 401, "bearer token"),
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
        headers=auth(),
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
        with httpx.Client(base_url=url, headers=auth(), timeout=60) as http:
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

    assert "serve.max_n" in _error(_chat(url, n=registered.serve.max_n + 1), 400, "n")
    assert _chat(url, n=0).status_code == 400
    assert "stream=true" in _error(
        _chat(url, stream_options={"include_usage": True}), 400, "stream_options"
    )
    assert store.count_interactions() == before

    # Without max_tokens the reply is register.max_new_tokens long at most, within the context.
    default = _chat(url, content="hello").json()
    assert default["usage"]["completion_tokens"] <= registered.register.max_new_tokens
    assert default["usage"]["total_tokens"] <= 64


def _error(answer: httpx.Response, status: int, param: str | None) -> str:
    """The message of an OpenAI-shaped error answer, after checking its status and param."""
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert list(body) == ["error"] and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["param"] == param, body
    message: str = body["error"]["message"]
    return message


def _post_raw(url: str, path: str, body: bytes) -> httpx.Response:
    headers = {**auth(), "Content-Type": "application/json"}
    return httpx.post(f"{url}{path}", content=body, headers=headers, timeout=60)


def _rows(store: FeedbackStore) -> tuple[int, int]:
    return store.count_interactions(), store.count_feedback()


def test_text_that_is_not_unicode_is_a_400_naming_the_field(
    server: tuple[str, FeedbackStore],
) -> None:
    url, store = server
    rid = _chat(url, max_tokens=2).json()["id"]
    before = _rows(store)
    chat = b'{"model":"retune-test","messages":[{"role":"user","content":"%s"}]}'
    cases = [
        # A JSON escape of half a UTF-16 pair, and the same as UTF-8 bytes Python would accept.
        ("/v1/chat/completions", chat % b"\\ud800", "messages.0.content"),
        ("/v1/chat/completions", chat % b"ok \xed\xa0\x80", "messages.0.content"),
        ("/v1/completions", b'{"model":"retune-test","prompt":"\\udfff"}', "prompt"),
        ("/v1/feedback", b'{"id":"%s","rating":"up","\\ud800":1}' % rid.encode(), "\\ud800"),
        (
            "/v1/feedback",
            b'{"id":"%s","rating":"up","corrected_reply":"a\\udc00"}' % rid.encode(),
            "corrected_reply",
        ),
    ]
    for path, body, param in cases:
        assert "lone surrogate" in _error(_post_raw(url, path, body), 400, param), body
    not_utf8 = _post_raw(url, "/v1/chat/completions", chat % b"\xff\xfe")
    assert "not UTF-8" in _error(not_utf8, 400, None)
    assert _rows(store) == before
    # A pair escaped as JSON allows is one character.
    emoji = _post_raw(url, "/v1/chat/completions", chat % b"\\ud83d\\ude00")
    assert emoji.status_code == 200, emoji.text


def test_sampling_parameters_out_of_range_are_400_and_tiny_temperatures_are_greedy(
    server: tuple[str, FeedbackStore],
) -> None:
    url, store = server
    greedy = _chat(url, max_tokens=8).json()["choices"][0]["message"]["content"]
    # Logits divided by these overflowed to NaN and the sampler failed: served greedy now.
    for temperature in (1e-30, 5e-324, 0.0099):
        answer = _chat(url, max_tokens=8, temperature=temperature)
        assert answer.status_code == 200, (temperature, answer.text)
        assert answer.json()["choices"][0]["message"]["content"] == greedy
    before = _rows(store)
    for seed in (2**64, 2**63, -1, -(2**63) - 1):
        message = _error(_chat(url, max_tokens=2, temperature=1.0, seed=seed), 400, "seed")
        assert str(2**63 - 1) in message
    chat = b'{"model":"retune-test","messages":[{"role":"user","content":"hi"}],%s}'
    for field in (b'"top_p":NaN', b'"top_p":Infinity', b'"temperature":-Infinity'):
        param = field.split(b'"')[1].decode()
        answer = _post_raw(url, "/v1/chat/completions", chat % field)
        assert "finite" in _error(answer, 422, param)
    assert _rows(store) == before
    assert _chat(url, max_tokens=2, temperature=1.0, seed=2**63 - 1).status_code == 200


def test_stop_strings_are_bounded_and_cut_the_reply_where_one_appears(
    server: tuple[str, FeedbackStore],
) -> None:
    url, store = server
    before = _rows(store)
    # One such stop string held the only generation thread for 151 s.
    message = _error(_chat(url, max_tokens=2, stop="x" * 60_000), 400, "stop")
    assert "60000 characters" in message and "at most 256" in message
    message = _error(_chat(url, max_tokens=2, stop=["a", "b", "c", "d", "e"]), 400, "stop")
    assert "at most 4" in message
    assert _rows(store) == before

    # A character that first appears after the reply's start; a tiny model's sampled reply
    # may hold none (empty, one repeated character): try the next seed.
    for seed in range(3, 23):
        sampled = {"max_tokens": 24, "temperature": 1.0, "seed": seed}
        full = _chat(url, **sampled).json()
        text = full["choices"][0]["message"]["content"]
        firsts = (c for i, c in enumerate(text) if i >= 1 and not c.isspace())
        stop = next((c for c in firsts if text.index(c) >= 1), None)
        if stop is not None:
            break
    assert stop is not None, "no seed gave a reply with a character to stop at"
    cut = _chat(url, **sampled, stop=["never-in-it", stop]).json()
    assert cut["choices"][0]["message"]["content"] == text[: text.index(stop)].strip()
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert cut["usage"]["completion_tokens"] < full["usage"]["completion_tokens"]


def test_fields_asking_for_what_the_server_cannot_do_are_a_400_naming_them(
    server: tuple[str, FeedbackStore],
) -> None:
    url, store = server
    before = _rows(store)
    for field, value in [
        ("logprobs", True),
        ("tools", [{"type": "function", "function": {"name": "f"}}]),
        ("response_format", {"type": "json_object"}),
        ("logit_bias", {"42": 5}),
        ("best_of", 2),
        ("max_token", 2),  # a misspelt key is refused, not answered as if it were not there
        ("audio", {"voice": "alloy", "format": "wav"}),
    ]:
        _error(_chat(url, max_tokens=2, **{field: value}), 400, field)
    assert "max_tokens" in _chat(url, max_token=2).json()["error"]["message"]  # the fix
    assert _rows(store) == before
    neutral = {
        "logprobs": False,
        "tools": [],
        "response_format": {"type": "text"},
        "user": "u1",
        "metadata": {"ticket": "42"},
        "store": False,
    }
    assert _chat(url, max_tokens=2, **neutral).status_code == 200


def test_a_chat_template_that_refuses_the_messages_is_the_clients_400() -> None:
    from jinja2 import TemplateError

    from retune.online.serving import ApiError, render_prompt

    class Strict:
        def apply_chat_template(self, *_args: Any, **_kwargs: Any) -> str:
            raise TemplateError("Conversation roles must alternate user/assistant")

    model = ServedModel("m", 1, None, Strict(), 64, datetime.now(UTC))
    with pytest.raises(ApiError) as exc:
        render_prompt(model, [{"role": "user", "content": "a"}] * 2, "messages")
    assert (exc.value.status, exc.value.param) == (400, "messages")
    assert "alternate" in exc.value.message


def test_a_fault_of_the_server_is_a_500_in_openai_shape_and_stores_nothing(
    registered: Params, tmp_path: Path
) -> None:
    import dataclasses

    def broken(name: str, version: int) -> ServedModel:
        return dataclasses.replace(load_served(name, version), model=object())

    registry = Registry.open(registered.tracking, "retune-test")
    watcher = ModelWatcher(registry, "production", 60, loader=broken)
    store = FeedbackStore.open(f"sqlite:///{tmp_path}/fb.db")
    with serve_in_thread(create_app(registered, store=store, watcher=watcher)) as url:
        answer = _chat(url, max_tokens=2)
    assert "server's log" in _error(answer, 500, None)
    assert answer.json()["error"]["code"] == "internal_error"
    assert store.count_interactions() == 0


def test_the_access_log_shows_no_query_string_and_no_key(
    registered: Params, capsys: pytest.CaptureFixture[str]
) -> None:
    key = "sk-proj-Zr8TqX2mVb7LpK4nWc9YhD3sFg6JuA1e"
    with serving(registered, log_level="info") as (url, _store):
        assert httpx.get(f"{url}/healthz?token={TOKEN}", timeout=30).status_code == 200
        assert httpx.get(f"{url}/v1/models/{key}", timeout=30).status_code == 404
        rejected = httpx.post(f"{url}/v1/feedback?api_key={TOKEN}", json={}, timeout=30)
        assert rejected.status_code == 401
        assert _chat(url, content=f"my key is {key}", max_tokens=2).status_code == 200
    out = capsys.readouterr()
    logged = out.out + out.err
    lines = [json.loads(line) for line in out.out.splitlines() if line.startswith('{"method"')]
    shown = [(line["method"], line["path"], line["status"]) for line in lines]
    assert shown == [
        ("GET", "/healthz?[REDACTED]", 200),
        ("GET", "/v1/models/[SECRET]", 404),
        ("POST", "/v1/feedback?[REDACTED]", 401),
        ("POST", "/v1/chat/completions", 200),
    ]
    assert lines[-1]["model_version"] == "1" and lines[-1]["ms"] > 0
    # Neither the prompt nor the token nor the key is logged.
    assert TOKEN not in logged and key not in logged and "my key is" not in logged


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
    v1, v2 = register_versions(params, tiny_model_dir, times=2)
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
