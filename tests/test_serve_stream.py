"""`retune serve` as chat clients and operators use it: streaming with the openai SDK and
LangChain, several choices, sampling parameters, a full queue, and `/metrics`."""

from __future__ import annotations

import dataclasses
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from retune.config import Params
from retune.online.feedback import FeedbackStore
from retune.online.serving import ServedModel
from retune.online.serving.batching import Batcher, Event, Job, Sampling
from tests.servers import TOKEN, auth, serving

pytestmark = pytest.mark.slow

QUESTION = "Where is my refund?"
# The tiny test model answers many prompts, greedy, with blanks: the first of these it answers
# with some text is the streaming tests' prompt.
ASKED = (QUESTION, "Can you help me?", "hello", "Order 1042 is late", "My router broke.", "hi")


def _client(url: str) -> Any:
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key=TOKEN, max_retries=0)


def _chat(url: str, content: str = QUESTION, **fields: Any) -> httpx.Response:
    body = {"model": "retune-test", "messages": [{"role": "user", "content": content}], **fields}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=auth(), timeout=120)


def _talkative(url: str) -> str:
    """The first prompt of `ASKED` the served model answers, greedy, with some text."""
    for asked in ASKED:
        reply = _chat(url, asked, max_tokens=24).json()["choices"][0]["message"]["content"]
        if len(reply) >= 4:
            return asked
    raise AssertionError(f"the test model answered none of {ASKED} with text")


def test_the_openai_sdk_streams_the_reply_it_would_get_whole_and_the_store_keeps_it(
    server: tuple[str, FeedbackStore],
) -> None:
    url, store = server
    client = _client(url)
    messages = [{"role": "user", "content": _talkative(url)}]
    whole = client.chat.completions.create(model="retune-test", messages=messages, max_tokens=24)
    chunks = list(
        client.chat.completions.create(
            model="retune-test",
            messages=messages,
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    streamed = "".join(pieces)
    assert streamed == whole.choices[0].message.content
    assert sum(1 for p in pieces if p) >= 2, "the reply came in one piece, not token by token"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finish[-1] == whole.choices[0].finish_reason and set(finish[:-1]) == {None}
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert usage.model_dump() == whole.usage.model_dump(include=set(usage.model_dump()))

    # Logged under the id the chunks carried, the reply as streamed; ratable at once.
    row = store.interactions_frame().set_index("id").loc[chunks[0].id]
    assert row["reply"] == streamed and row["completion_tokens"] == usage.completion_tokens
    rated = httpx.post(
        f"{url}/v1/feedback", json={"id": chunks[0].id, "rating": "up"}, headers=auth(), timeout=30
    )
    assert rated.status_code == 201, rated.text

    text = client.completions.create(model="retune-test", prompt=QUESTION, max_tokens=12)
    streamed_text = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model="retune-test", prompt=QUESTION, max_tokens=12, stream=True
        )
        if c.choices
    )
    assert streamed_text == text.choices[0].text


def test_langchain_chat_openai_invokes_and_streams(server: tuple[str, FeedbackStore]) -> None:
    from langchain_openai import ChatOpenAI

    url, store = server
    chat = ChatOpenAI(
        base_url=f"{url}/v1", api_key=TOKEN, model="retune-test", max_tokens=16, temperature=0
    )
    answer = chat.invoke(QUESTION)
    response_id = answer.response_metadata["id"]
    assert isinstance(answer.content, str) and response_id.startswith("chatcmpl-")
    assert answer.usage_metadata is not None and answer.usage_metadata["output_tokens"] >= 1
    streamed = "".join(str(chunk.content) for chunk in chat.stream(QUESTION))
    assert streamed == answer.content
    assert store.interactions_frame().set_index("id").loc[response_id, "reply"] == answer.content


def test_n_gives_that_many_choices_and_sampling_follows_seed_and_penalties(
    server: tuple[str, FeedbackStore],
) -> None:
    url, _ = server
    sampled = {"max_tokens": 16, "temperature": 1.0, "seed": 7}
    answer = _chat(url, n=2, **sampled)
    assert answer.status_code == 200, answer.text
    two = answer.json()
    assert [c["index"] for c in two["choices"]] == [0, 1]
    texts = [c["message"]["content"] for c in two["choices"]]
    assert texts[0] != texts[1], "two sampled choices of one request were the same"
    assert _chat(url, n=2, **sampled).json()["choices"] == two["choices"]  # same seed, same
    one = _chat(url, **sampled).json()
    assert one["choices"][0]["message"]["content"] == texts[0]
    assert two["usage"]["prompt_tokens"] == one["usage"]["prompt_tokens"]
    # Each choice's tokens count once; the prompt once.
    assert two["usage"]["completion_tokens"] <= 2 * 16
    assert two["usage"]["completion_tokens"] > one["usage"]["completion_tokens"] or (
        one["usage"]["completion_tokens"] == 16
    )

    # A repeated token costs under a frequency penalty: the greedy reply changes.
    asked = _talkative(url)
    greedy = _chat(url, asked, max_tokens=24).json()["choices"][0]["message"]["content"]
    penalised = _chat(url, asked, max_tokens=24, frequency_penalty=2.0).json()
    assert penalised["choices"][0]["message"]["content"] != greedy
    assert _chat(url, max_tokens=2, presence_penalty=-2.0).status_code == 200
    too_big = _chat(url, max_tokens=2, presence_penalty=2.5)
    assert too_big.status_code == 422 and too_big.json()["error"]["param"] == "presence_penalty"


def test_a_stream_cut_at_a_stop_string_matches_the_whole_reply_cut_there(
    server: tuple[str, FeedbackStore],
) -> None:
    url, _ = server
    sampled = {"max_tokens": 28, "temperature": 1.0, "seed": 11}
    text = _chat(url, **sampled).json()["choices"][0]["message"]["content"]
    # Three characters from the middle that first appear there: a stop spanning tokens.
    stop = next(
        text[i : i + 3]
        for i in range(len(text) // 2, len(text) - 3)
        if "\ufffd" not in text[i : i + 3] and text.index(text[i : i + 3]) == i
    )
    cut = _chat(url, **sampled, stop=stop).json()["choices"][0]
    assert (
        cut["finish_reason"] == "stop"
        and cut["message"]["content"] == text[: text.index(stop)].strip()
    )
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in _client(url).chat.completions.create(
            model="retune-test",
            messages=[{"role": "user", "content": QUESTION}],
            stream=True,
            stop=stop,
            **sampled,
        )
        if c.choices
    )
    assert streamed == cut["message"]["content"]


def test_a_full_queue_answers_429_with_retry_after_and_stores_only_what_was_served(
    registered: Params,
) -> None:
    params = dataclasses.replace(
        registered,
        serve=dataclasses.replace(registered.serve, max_batch=1, max_queue=1),
        feedback=dataclasses.replace(
            registered.feedback,
            store_url=registered.feedback.store_url.replace("feedback.db", "queue.db"),
        ),
    )
    with serving(params) as (url, store):
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda _: _chat(url, max_tokens=28), range(16)))
        statuses = sorted(a.status_code for a in answers)
        assert set(statuses) == {200, 429}, statuses
        busy = next(a for a in answers if a.status_code == 429)
        assert busy.json()["error"]["code"] == "queue_full"
        assert "serve.max_queue" in busy.json()["error"]["message"]
        assert int(busy.headers["Retry-After"]) >= 1
        assert store.count_interactions() == statuses.count(200)
        metrics = _metrics(url)
        assert metrics["retune_queue_rejections_total"][()] == statuses.count(429)


def _metrics(url: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    answer = httpx.get(f"{url}/metrics", timeout=30)
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
    found: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            found.setdefault(sample.name, {})[labels] = sample.value
    return found


def test_metrics_count_requests_tokens_ratings_and_the_version_served(
    server: tuple[str, FeedbackStore],
) -> None:
    url, _ = server
    chat_ok = (("route", "/v1/chat/completions"), ("status", "200"))
    before = _metrics(url)
    answer = _chat(url, max_tokens=8).json()
    rated = httpx.post(
        f"{url}/v1/feedback", json={"id": answer["id"], "rating": "down"}, headers=auth()
    )
    assert rated.status_code == 201
    after = _metrics(url)
    assert (
        after["retune_requests_total"][chat_ok]
        == before["retune_requests_total"].get(chat_ok, 0) + 1
    )
    tokens = (
        after["retune_generated_tokens_total"][()] - before["retune_generated_tokens_total"][()]
    )
    assert tokens == answer["usage"]["completion_tokens"]
    assert after["retune_ratings_total"][(("rating", "down"),)] >= 1
    assert after["retune_model_version"][(("model", "retune-test"),)] == 1
    assert after["retune_queue_depth"][()] == 0
    count = (("route", "/v1/chat/completions"),)
    assert after["retune_request_duration_seconds_count"][count] > before[
        "retune_request_duration_seconds_count"
    ].get(count, 0)
    assert after["retune_time_to_first_token_seconds_count"][()] >= 1


def _served(model_dir: Path) -> ServedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return ServedModel("m", 1, model, tokenizer, 64, datetime.now(UTC))


def test_batched_and_joining_rows_decode_as_they_would_alone_and_a_cancelled_row_stops(
    tiny_model_dir: Path,
) -> None:
    from retune.model.scoring import generate_tokens

    served = _served(tiny_model_dir)
    prompts = [served.encode(t) for t in ("hello there", "my router broke again today", "a")]
    batcher = Batcher(max_batch=8, max_queue=8)
    batcher.start()
    try:
        finished: list[list[Event]] = [[] for _ in prompts]
        done = threading.Semaphore(0)

        def collect(i: int) -> Any:
            def emit(event: Event) -> None:
                finished[i].append(event)
                if event[0] != "delta":
                    done.release()

            return emit

        jobs = [Job(served, p, 12, [], Sampling(), 1, collect(i)) for i, p in enumerate(prompts)]
        # The first starts a batch; the others join it at a later step, or the next batch.
        for job in jobs:
            batcher.submit(job)
            time.sleep(0.002)
        for _ in jobs:
            assert done.acquire(timeout=120)
        pad = served.tokenizer.eos_token_id
        for i, prompt in enumerate(prompts):
            [alone] = generate_tokens(served.model, [prompt], 12, pad, do_sample=False)
            last = finished[i][-1]
            assert last[0] == "done", finished[i]
            _, tokens, text = last[2]
            assert tokens == len(alone) and text == served.decode(alone).strip()
            assert "".join(e[2] for e in finished[i] if e[0] == "delta") == text

        # A client that goes away: its row leaves the batch at the next step.
        seen: list[Event] = []
        job = Job(served, prompts[0], 40, [], Sampling(temperature=1.0, seed=1), 1, seen.append)
        job.emit = lambda event: (seen.append(event), job.cancelled.set())  # type: ignore[assignment]
        batcher.submit(job)
        deadline = time.monotonic() + 60
        while not seen or batcher.running_rows or batcher.depth:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert [e[0] for e in seen] == ["delta"]
    finally:
        batcher.stop()


def test_rows_leaving_take_their_padding_with_them_so_a_busy_batch_stays_narrow() -> None:
    import torch
    from transformers.cache_utils import DynamicCache

    from retune.online.serving.batching import _crop_padding, _mergeable

    cache = DynamicCache()
    keys = torch.arange(2 * 1 * 5 * 2, dtype=torch.float32).reshape(2, 1, 5, 2)
    cache.update(keys, keys + 100, 0)
    assert _mergeable(cache)
    # Row 0 joined late (left padded to the batch's width); the rows that needed the first two
    # positions have left.
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 1, 1]])
    cropped = _crop_padding(cache, mask)
    assert cropped.tolist() == [[1, 1, 1], [0, 1, 1]]
    assert torch.equal(cache.layers[0].keys, keys[:, :, 2:, :])
    assert torch.equal(cache.layers[0].values, keys[:, :, 2:, :] + 100)
    assert cache.get_seq_length() == 3
    assert _crop_padding(cache, cropped) is cropped  # nothing unused: unchanged


def test_a_request_for_many_choices_is_not_overtaken_by_smaller_ones(tiny_model_dir: Path) -> None:
    served = _served(tiny_model_dir)
    batcher = Batcher(max_batch=4, max_queue=8)  # not started: the queue alone

    def job(n: int) -> Job:
        return Job(served, [1, 2], 4, [], Sampling(), n, lambda _event: None)

    wide, small, cancelled = job(3), job(1), job(1)
    cancelled.cancelled.set()
    for j in (cancelled, wide, small):
        batcher.submit(j)
    # Two rows run: the 3-choice request does not fit yet, and the 1-choice one behind it
    # waits its turn instead of taking the free row. The cancelled one is dropped.
    assert batcher._fitting(served, 2) == [] and list(batcher._waiting) == [wide, small]
    assert batcher._fitting(served, 0) == [wide, small] and batcher.running_rows == 4


def test_retune_serve_takes_host_and_port_and_stops_cleanly_on_sigterm(
    registered: Params, tmp_path: Path
) -> None:
    import os
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    overrides = [
        f"tracking.uri={registered.tracking.uri}",
        f"tracking.artifacts={registered.tracking.artifacts}",
        f"tracking.experiment={registered.tracking.experiment}",
        f"register.model_name={registered.register.model_name}",
        f"feedback.store_url=sqlite:///{tmp_path}/cli.db",
    ]
    retune = Path(sys.executable).with_name("retune")
    env = {**os.environ, "RETUNE_SERVE_TOKEN": ""}
    process = subprocess.Popen(
        [str(retune), "serve", *overrides, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 300
        while True:
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            assert time.monotonic() < deadline, "retune serve did not come up"
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
                if health.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        assert health.json()["version"] == 1
        assert "retune_model_version" in httpx.get(f"http://127.0.0.1:{port}/metrics").text
    finally:
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=60)
    assert process.returncode in (0, 128 + signal.SIGTERM), out
    assert "Traceback" not in out
    assert '"path": "/healthz"' in out  # the JSON access log
