"""Bad input never stops the line: a few hundred malformed, out-of-range, oversized or mis-sent
requests to every endpoint of `retune serve` each get a 4xx in OpenAI's error shape, naming
the field where there is one, and none of them stores anything."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from retune.online.feedback import FeedbackStore
from tests.servers import TOKEN, auth, registered_params, serving

# The server serves a model registered in a temporary MLflow store (~15 s to set up).
pytestmark = pytest.mark.slow

CHAT = {"model": "retune-test", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION = {"model": "retune-test", "prompt": "hi", "max_tokens": 2}
GENERATION = {"/v1/chat/completions": CHAT, "/v1/completions": COMPLETION}
JSON = {"Content-Type": "application/json"}


@dataclass(frozen=True)
class Bad:
    """One bad request, and the field its error should name (None: the body as a whole)."""

    method: str
    path: str
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    names: str | None = None
    chunked: bool = False


def _post(path: str, body: Any, names: str | None, **headers: str) -> Bad:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return Bad("POST", path, raw, {**auth(), **JSON, **headers}, names)


def _raw(path: str, base: dict[str, Any], name: str, literal: str) -> Bad:
    """`base` with `name` set to a JSON literal Python writes no other way (NaN, Infinity)."""
    body = json.dumps({k: v for k, v in base.items() if k != name})
    return _post(path, f'{body[:-1]}, "{name}": {literal}}}'.encode(), name)


# Values of generation fields that are out of range, of the wrong type, or unsupported.
MUTATIONS: list[tuple[str, Any]] = [
    *[("max_tokens", v) for v in (-1, 0, 10**6, 2**63, 1.5, "eight", [], {"n": 1})],
    *[("temperature", v) for v in (-0.1, 2.01, 1e308, "hot", [], {"t": 1})],
    *[("top_p", v) for v in (0, -1, 1.01, "x", [0.5])],
    *[("n", v) for v in (0, 5, -1, 10**30, 1.5, [])],
    *[("seed", v) for v in (2**64, 2**63, -1, -(2**63) - 1, 1.5, [], 10**30)],
    *[
        ("stop", v)
        for v in ("x" * 300, ["a"] * 5, [""] * 1000, [1], {"a": 1}, 5, ["ok", "y" * 999])
    ],
    *[("stream", v) for v in ("yes", [], 1)],
    *[("stream_options", v) for v in ({"include_usage": True}, {"x": 1}, "usage")],
    *[("model", v) for v in (5, None, [], "gpt-4o", "", "x" * 5000)],
    ("logprobs", True),
    ("top_logprobs", 3),
    ("tools", [{"type": "function", "function": {"name": "f"}}]),
    ("tool_choice", "required"),
    ("response_format", {"type": "json_object"}),
    ("best_of", 3),
    ("echo", True),
    ("logit_bias", {"50256": -100}),
    *[("frequency_penalty", v) for v in (2.5, -3, "much", [])],
    *[("presence_penalty", v) for v in (-2.01, 1e308, {})],
    ("suffix", "!"),
]
NOT_FINITE = ["NaN", "Infinity", "-Infinity", "1e999"]


def _generation_cases() -> Iterator[Bad]:
    for path, base in GENERATION.items():
        for name, value in MUTATIONS:
            yield _post(path, {**base, name: value}, name)
        for name in ("max_tokens", "temperature", "top_p", "seed"):
            for literal in NOT_FINITE:
                yield _raw(path, base, name, literal)
        # A seed is used only when sampling; out of range, torch failed on it.
        for seed in (2**64, -1, -(2**63) - 1):
            yield _post(path, {**base, "temperature": 1.0, "seed": seed}, "seed")
        yield _post(path, {k: v for k, v in base.items() if k != "model"}, "model")
    chat = "/v1/chat/completions"
    for messages in (
        [],
        "hi",
        [{}],
        [{"role": "tool", "content": "x"}],
        [{"role": 5, "content": "x"}],
        [{"role": "user", "content": 5}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
        [{"role": "user", "content": [{"type": "text"}]}],
        [{"role": "user", "content": "hi"}] * 1500,  # over the context, within the body limit
        [{"role": "user", "content": "my router keeps disconnecting " * 40}],
    ):
        yield _post(chat, {**CHAT, "messages": messages}, "messages")
    yield _post(chat, {k: v for k, v in CHAT.items() if k != "messages"}, "messages")
    for value in (-5, 10**9, "x"):
        yield _post(chat, {**CHAT, "max_completion_tokens": value}, "max_completion_tokens")
    for prompt in (5, [], ["a", "b"], [[1, 2]], None, "order " * 200):
        yield _post("/v1/completions", {**COMPLETION, "prompt": prompt}, "prompt")
    # A few mutations at once: the error names one of them.
    rng = random.Random(11)
    for _ in range(30):
        path, base = rng.choice(list(GENERATION.items()))
        picked = dict(rng.sample(MUTATIONS, k=rng.randint(2, 4)))
        yield _post(path, {**base, **picked}, None)


def _feedback_cases(rid: str) -> Iterator[Bad]:
    path = "/v1/feedback"
    good = {"response_id": rid, "rating": "up"}
    for body, names in [
        ({}, "response_id"),
        ({"response_id": rid}, "rating"),
        ({**good, "rating": "meh"}, "rating"),
        ({**good, "rating": 1}, "rating"),
        ({"response_id": rid, "score": 1.5}, "score"),
        ({"response_id": rid, "score": -0.1}, "score"),
        ({"response_id": rid, "score": "0.5"}, "score"),
        ({"response_id": rid, "score": True}, "score"),
        ({**good, "corrected_reply": ""}, "corrected_reply"),
        ({**good, "corrected_reply": "  "}, "corrected_reply"),
        ({**good, "corrected_reply": 5}, "corrected_reply"),
        ({**good, "ratng": "up"}, "ratng"),
        ({**good, "id": rid}, "exactly once"),
        ({**good, "response_id": ""}, "response_id"),
        ({**good, "response_id": "x" * 65}, "response_id"),
        ({**good, "response_id": 5}, "response_id"),
        ({**good, "response_id": "chatcmpl-unknown"}, "response_id"),
        ([good], None),
    ]:
        yield _post(path, body, names)
    for literal in NOT_FINITE:
        yield _raw(path, {"response_id": rid}, "score", literal)
    for headers in ({}, auth("wrong"), {"Authorization": TOKEN}, {"Authorization": "Basic eA=="}):
        yield Bad("POST", path, json.dumps(good).encode(), {**JSON, **headers})


def _body_cases(rid: str) -> Iterator[Bad]:
    """Bad encodings, shapes and sizes, sent to each endpoint that takes a body."""
    # Each endpoint's body with "@" where its text goes, and the field that is.
    texts = [
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "@"}]}),
        ("/v1/completions", {**COMPLETION, "prompt": "@"}),
        ("/v1/feedback", {"response_id": rid, "rating": "up", "corrected_reply": "@"}),
    ]
    names = ["messages.0.content", "prompt", "corrected_reply"]
    for (path, base), where in zip(texts, names, strict=True):
        good = json.dumps(base).encode()
        yield _post(path, good.replace(b"@", b"\xff\xfe"), None)  # not UTF-8
        yield _post(path, good.replace(b"@", b"\\ud800"), where)  # a lone surrogate escaped
        yield _post(path, good.replace(b"@", b"\xed\xb0\x80"), where)  # ... and as UTF-8 bytes
        yield _post(path, good.replace(b"@", b"\\udc00\\ud800"), where)  # a pair back to front
        yield _post(path, json.dumps({**base, "\udfff": 1}).encode("utf-8", "surrogatepass"), None)
        yield _post(path, b"\xef\xbb\xbf{", None)  # a BOM, then broken JSON
        yield _post(path, json.dumps({}).encode("utf-16"), None)
        yield _post(path, json.dumps(base).encode("utf-16")[:-1], None)  # half a UTF-16 unit
        yield _post(path, json.dumps([base]).encode("utf-32"), None)
        for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/x"):
            yield _post(path, json.dumps(base).encode(), None, **{"Content-Type": content_type})
        yield Bad("POST", path, json.dumps(base).encode(), auth())  # no Content-Type
        for body in (b"", b"null", b"[]", b"1", b'"str"', b"true", b"{", b"{]", b'{"model":}'):
            yield _post(path, body, None)
        yield _post(path, json.dumps(base).encode() + b" trailing", None)
        yield _post(path, b"[" * 5000 + b"]" * 5000, None)
        yield _post(path, b'{"a":' * 5000 + b"1" + b"}" * 5000, None)
        yield _post(path, b'{"x": ' + b"9" * 5000 + b"}", None)
        over = json.dumps({**base, "pad": "x" * 70_000}).encode()  # over serve.max_body_bytes
        yield _post(path, over, None)
        yield Bad("POST", path, over, {**auth(), **JSON}, chunked=True)  # no declared length


def _route_cases() -> Iterator[Bad]:
    """Wrong methods, unknown paths, models that are not served."""
    for method, path in [
        ("GET", "/v1/chat/completions"),
        ("PUT", "/v1/chat/completions"),
        ("GET", "/v1/completions"),
        ("DELETE", "/v1/completions"),
        ("GET", "/v1/feedback"),
        ("PATCH", "/v1/feedback"),
        ("POST", "/v1/models"),
        ("DELETE", "/v1/models"),
        ("POST", "/v1/models/retune-test"),
        ("PUT", "/v1/models/retune-test"),
        ("POST", "/healthz"),
        ("PUT", "/healthz"),
        ("DELETE", "/healthz"),
        ("GET", "/v1/chat"),
        ("POST", "/v1/embeddings"),
        ("GET", "/v2/models"),
        ("GET", "/"),
    ]:
        yield Bad(method, path, None, auth())
    for model_id in (
        "gpt-4o",
        "retune-test@staging",
        "models:/retune-test@canary",
        "..%2F..%2Fetc%2Fpasswd",
        "%00",
        "%ff%fe",
        "x" * 5000,
        "",
    ):
        yield Bad("GET", f"/v1/models/{model_id}", None, {}, "model")


def _is_error_shape(answer: httpx.Response) -> bool:
    try:
        body = answer.json()
    except ValueError:
        return False
    error = body.get("error") if isinstance(body, dict) else None
    return (
        isinstance(error, dict)
        and set(error) == {"message", "type", "param", "code"}
        and isinstance(error["message"], str)
        and bool(error["message"])
        and isinstance(error["type"], str)
        and all(error[k] is None or isinstance(error[k], str) for k in ("param", "code"))
    )


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Iterator[tuple[str, FeedbackStore]]:
    with serving(registered_params(tmp_path_factory.mktemp("fuzz"), tiny_model_dir)) as running:
        yield running


def test_bad_requests_to_every_endpoint_get_a_4xx_in_openai_shape_and_store_nothing(
    server: tuple[str, FeedbackStore],
) -> None:
    url, store = server
    with httpx.Client(base_url=url, timeout=60) as http:
        answer = http.post("/v1/chat/completions", json=CHAT, headers=auth())
        assert answer.status_code == 200, answer.text
        rid = answer.json()["id"]
        cases = [
            *_generation_cases(),
            *_feedback_cases(rid),
            *_body_cases(rid),
            *_route_cases(),
        ]
        assert len(cases) >= 150
        before = store.count_interactions(), store.count_feedback()
        wrong: list[str] = []
        for bad in cases:
            content: Any = bad.body
            if bad.chunked and bad.body is not None:
                data = bad.body
                content = iter([data[i : i + 8192] for i in range(0, len(data), 8192)])
            answer = http.request(bad.method, bad.path, content=content, headers=bad.headers)
            what = f"{bad.method} {bad.path} {(bad.body or b'')[:80]!r}: {answer.status_code}"
            if not 400 <= answer.status_code < 500:
                wrong.append(f"{what} {answer.text[:200]}")
            elif not _is_error_shape(answer):
                wrong.append(f"{what} not in OpenAI's error shape: {answer.text[:200]}")
            elif bad.names is not None:
                error = answer.json()["error"]
                if error["param"] != bad.names and bad.names not in error["message"]:
                    wrong.append(f"{what} does not name {bad.names}: {error}")
        assert wrong == [], f"{len(wrong)} of {len(cases)} bad requests:\n" + "\n".join(wrong)
        assert (store.count_interactions(), store.count_feedback()) == before
        # The server still answers well after all that.
        assert http.post("/v1/chat/completions", json=CHAT, headers=auth()).status_code == 200
        assert http.get("/healthz").status_code == 200
