"""Batched generation: `Batcher` runs the replies of concurrent requests together, one decoding
step for all of their rows at a time, on one thread of its own.

A request (`Job`) asks for `n` rows (choices). The batcher takes waiting jobs, up to
`max_batch` rows that share one loaded model, prefills their prompts (left padded) and decodes
until every row is done; a row leaves the batch (and its cache) as soon as it is. Jobs that
arrive meanwhile join the running batch at the next step while it has room (in arrival
order), at most `max_queue` of them waiting (`QueueFull` beyond).

Each row has its own sampling state: greedy or temperature / top-p sampling from a generator
seeded by the request's `seed` (plus the choice's index), and OpenAI's presence and frequency
penalties on the tokens it generated so far. `ReplyText` turns a row's tokens into the text a
client may see so far (never a partial stop string, a split character or trailing space), so a
streamed reply concatenates to the one a non-streamed request gets.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from retune.online.serving.generation import ServedModel

# Below this a temperature is served greedy, as 0 is: sampling that cold picks the likeliest
# token anyway, and logits divided by a tinier one overflow to inf and NaN.
MIN_SAMPLING_TEMPERATURE = 0.01

FinishReason = Literal["stop", "length"]


class QueueFull(Exception):
    """More jobs wait than the batcher's `max_queue`."""


@dataclass(frozen=True)
class Sampling:
    """How a row picks its next token."""

    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature is None or self.temperature < MIN_SAMPLING_TEMPERATURE


class ReplyText:
    """What of a row's reply a client may see: cut before the first stop string, stripped of
    leading and trailing whitespace, holding back while more tokens may still change it (a
    character split over tokens, a tail that may start a stop string, trailing space)."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.keep = max(map(len, stops), default=1) - 1
        self.sent = ""  # what was handed out so far
        self.stopped = False

    def update(self, text: str, final: bool) -> str:
        """The next piece of the reply given the row's whole decoded `text` so far; sets
        `stopped` when a stop string appeared (the reply is then final)."""
        cuts = [text.index(s) for s in self.stops if s in text]
        if cuts:
            text, final, self.stopped = text[: min(cuts)], True, True
        if not final:
            # A character whose bytes are not all in yet decodes as one U+FFFD at the end.
            text = text.removesuffix("\ufffd")
            for k in range(min(self.keep, len(text)), 0, -1):
                if any(s.startswith(text[-k:]) for s in self.stops):
                    text = text[:-k]
                    break
        shown = text.strip()
        if not shown.startswith(self.sent):
            # Decoding more tokens rewrote earlier text (rare): hand out nothing until it
            # settles; the final text is what the store and a non-streamed reply hold.
            return ""
        piece, self.sent = shown[len(self.sent) :], shown
        return piece


@dataclass
class Row:
    """One choice of a job being generated."""

    job: Job
    index: int
    generator: Any  # torch.Generator, for sampling
    text: ReplyText
    tokens: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None


# What a job's `emit` gets: ("delta", choice index, text), ("done", choice index,
# (finish_reason, completion tokens, full text)), ("error", None, exception).
Event = tuple[str, int | None, Any]


@dataclass
class Job:
    """One request's generation: `n` choices continuing `prompt_ids` with `model`. `emit` is
    called from the batcher's thread with each `Event`; `cancelled` set stops its rows."""

    model: ServedModel
    prompt_ids: list[int]
    max_tokens: int
    stops: list[str]
    sampling: Sampling
    n: int
    emit: Callable[[Event], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    queued_at: float = field(default_factory=time.perf_counter)


class Batcher:
    """Runs `Job`s in batches of up to `max_batch` rows on a thread of its own (`start`)."""

    def __init__(self, max_batch: int, max_queue: int) -> None:
        self.max_batch, self.max_queue = max_batch, max_queue
        self._waiting: deque[Job] = deque()
        self._lock = threading.Condition()
        self._stopped = False
        self._thread: threading.Thread | None = None
        self.running_rows = 0
        self._members: list[Job] = []  # the jobs of the batch under way
        # Seconds one decoding step of a full batch takes, as last measured (Retry-After).
        self.step_s = 0.05

    @property
    def depth(self) -> int:
        """Jobs waiting for a batch."""
        return len(self._waiting)

    def submit(self, job: Job) -> None:
        if job.n > self.max_batch:
            raise ValueError(f"a job of {job.n} rows does not fit a batch of {self.max_batch}")
        with self._lock:
            if len(self._waiting) >= self.max_queue and (self.running_rows or self._waiting):
                raise QueueFull
            self._waiting.append(job)
            self._lock.notify()

    def retry_after_s(self, max_tokens: int) -> int:
        """A client's wait before retrying when the queue is full: about one batch's time."""
        return max(1, round(self.step_s * max_tokens))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="retune-generate", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def _take(self) -> list[Job] | None:
        """Block for waiting jobs; take those that fit one batch with the first one's model."""
        with self._lock:
            while not self._waiting and not self._stopped:
                self._lock.wait()
            if self._stopped:
                return None
            return self._fitting(self._waiting[0].model, 0)

    def _fitting(self, model: ServedModel, running: int) -> list[Job]:
        """Take waiting jobs of `model` in arrival order while they fit beside `running` rows
        (lock held). The first that does not fit (too many rows, or another model) stops the
        taking: later, smaller jobs never overtake it, so a request for many choices gets its
        rows as they free up instead of waiting for a lull."""
        taken, rows = [], running
        while self._waiting:
            job = self._waiting[0]
            if job.cancelled.is_set():
                self._waiting.popleft()
                continue
            if job.model is not model or rows + job.n > self.max_batch:
                break
            taken.append(self._waiting.popleft())
            rows += job.n
        self.running_rows = rows
        return taken

    def _joining(self, model: ServedModel, running: int) -> list[Job]:
        """Jobs that join the batch under way at its next step (none while full)."""
        if running >= self.max_batch or not self._waiting:
            return []
        with self._lock:
            return self._fitting(model, running)

    def _run(self) -> None:
        while (jobs := self._take()) is not None:
            self._members = [job for job in jobs if not job.cancelled.is_set()]
            try:
                if self._members:
                    self._generate(list(self._members))
            except Exception as exc:  # a fault of the model: every job of the batch hears it
                for job in self._members:
                    job.emit(("error", None, exc))
            finally:
                with self._lock:
                    self.running_rows = 0

    def _generate(self, jobs: list[Job]) -> None:
        """Decode `jobs` (one model's) together; jobs that arrive meanwhile join at a step
        boundary, prefilled on their own and merged into the batch's cache, while there is room
        and the model's cache allows it (`_mergeable`)."""
        import torch

        model = jobs[0].model
        eos = _stop_ids(model)
        vocab = _vocab_size(model)
        rows: list[Row] = []
        with torch.inference_mode():
            cache: Any = None
            logits: Any = None
            positions: Any = None
            mask: Any = None
            counts: Any = None
            while True:
                joining = jobs if cache is None else self._joining(model, len(rows))
                jobs = []
                if cache is not None and joining and not _mergeable(cache):
                    with self._lock:  # back to the queue's head: the next batch takes them
                        self._waiting.extendleft(reversed(joining))
                        self.running_rows = len(rows)
                    joining = []
                if joining:
                    # Members before the prefill: if it fails, they hear the error too.
                    self._members += [j for j in joining if j not in self._members]
                    new = [
                        Row(j, i, _generator(j.sampling.seed, i), ReplyText(j.stops))
                        for j in joining
                        for i in range(j.n)
                    ]
                    c, lg, pos, m = _prefill(model, [r.job.prompt_ids for r in new])
                    if cache is None:
                        cache, logits, positions, mask = c, lg, pos, m
                        counts = torch.zeros((len(new), vocab), dtype=torch.float32)
                    else:
                        mask = _merge(cache, mask, c, m)
                        logits = torch.cat([logits, lg])
                        positions = torch.cat([positions, pos])
                        counts = torch.cat([counts, torch.zeros((len(new), vocab))])
                    rows += new
                started = time.perf_counter()
                picked = _pick(logits, rows, counts)
                counts[torch.arange(len(rows)), torch.tensor(picked)] += 1
                keep = [
                    i
                    for i, (row, token) in enumerate(zip(rows, picked, strict=True))
                    if self._advance(model, row, token, eos)
                ]
                if len(keep) < len(rows):
                    if not keep:
                        break
                    index = torch.tensor(keep, dtype=torch.long)
                    cache.batch_select_indices(index)
                    rows = [rows[i] for i in keep]
                    picked = [picked[i] for i in keep]
                    counts, positions, mask = counts[index], positions[index], mask[index]
                    if _mergeable(cache):
                        mask = _crop_padding(cache, mask)
                    with self._lock:
                        self.running_rows = len(rows)
                positions = positions + 1
                mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=mask.dtype)], dim=1)
                out = model.model(
                    input_ids=torch.tensor(picked, dtype=torch.long).unsqueeze(1),
                    attention_mask=mask,
                    position_ids=positions.unsqueeze(1),
                    past_key_values=cache,
                    use_cache=True,
                )
                logits = out.logits[:, -1, :].float()
                self.step_s = 0.8 * self.step_s + 0.2 * (time.perf_counter() - started)

    @staticmethod
    def _advance(model: ServedModel, row: Row, token: int, eos: set[int]) -> bool:
        """Add `token` to `row` and hand out what it adds; True while the row goes on."""
        job = row.job
        if job.cancelled.is_set():
            return False
        row.tokens.append(token)
        ended = token in eos
        length = len(row.tokens) >= job.max_tokens
        text = model.decode(row.tokens)
        piece = row.text.update(text, final=ended or length)
        if piece:
            job.emit(("delta", row.index, piece))
        if ended or length or row.text.stopped:
            reason: FinishReason = (
                "length" if length and not (ended or row.text.stopped) else "stop"
            )
            row.finish_reason = reason
            job.emit(("done", row.index, (reason, len(row.tokens), row.text.sent)))
            return False
        return True


def _generator(seed: int | None, index: int) -> Any:
    import torch

    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed((seed + index) % 2**63)
    return generator


def _stop_ids(served: ServedModel) -> set[int]:
    eos = served.model.generation_config.eos_token_id
    ids = eos if isinstance(eos, list) else [eos]
    return {int(i) for i in ids if i is not None}


def _vocab_size(served: ServedModel) -> int:
    return int(served.model.get_output_embeddings().weight.shape[0])


def _mergeable(cache: Any) -> bool:
    """Whether rows can join `cache`, and its padding be cropped: plain growing layers that
    hold their own keys and values (not sliding windows, not layers sharing another's)."""
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer and layer.keys is not None for layer in cache.layers)


def _crop_padding(cache: Any, mask: Any) -> Any:
    """Drop the leading positions no remaining row attends to (left padding of rows that have
    left) from `cache` (in place) and `mask`; return the mask. Without this, a batch that
    rows keep joining would grow by one position per step for as long as traffic lasts."""
    unused = int((mask.sum(dim=0) == 0).long().cumprod(dim=0).sum())
    if unused == 0:
        return mask
    for layer in cache.layers:
        layer.keys = layer.keys[:, :, unused:, :]
        layer.values = layer.values[:, :, unused:, :]
    return mask[:, unused:]


def _merge(cache: Any, mask: Any, joining: Any, joining_mask: Any) -> Any:
    """Append `joining`'s rows to `cache` (in place), both left padded to the longer of the two;
    return the merged attention mask."""
    import torch
    import torch.nn.functional as F

    width = max(mask.shape[1], joining_mask.shape[1])

    def left(t: Any) -> Any:
        short = width - t.shape[-2]
        return t if short == 0 else F.pad(t, (0, 0, short, 0))

    for layer, new in zip(cache.layers, joining.layers, strict=True):
        layer.keys = torch.cat([left(layer.keys), left(new.keys)])
        layer.values = torch.cat([left(layer.values), left(new.values)])
    return torch.cat(
        [
            F.pad(mask, (width - mask.shape[1], 0)),
            F.pad(joining_mask, (width - joining_mask.shape[1], 0)),
        ]
    )


def _prefill(served: ServedModel, prompts: list[list[int]]) -> tuple[Any, Any, Any, Any]:
    """Run the (left padded) prompts: the cache, last logits, last positions and mask."""
    import torch
    from transformers import DynamicCache

    width = max(len(p) for p in prompts)
    pad = served.tokenizer.pad_token_id
    pad = served.tokenizer.eos_token_id if pad is None else pad
    input_ids = torch.full((len(prompts), width), int(pad or 0), dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        mask[row, width - len(ids) :] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    cache = DynamicCache()
    out = served.model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
    )
    return out.past_key_values, out.logits[:, -1, :].float(), positions[:, -1], mask


def _pick(logits: Any, rows: list[Row], counts: Any) -> list[int]:
    """Each row's next token from its logits (one row per `rows` entry)."""
    import torch

    if any(r.job.sampling.presence_penalty or r.job.sampling.frequency_penalty for r in rows):
        # OpenAI's: each token's logit less frequency x its count so far, less presence once
        # it has appeared at all.
        presence = torch.tensor([r.job.sampling.presence_penalty for r in rows]).unsqueeze(1)
        frequency = torch.tensor([r.job.sampling.frequency_penalty for r in rows]).unsqueeze(1)
        logits = logits - frequency * counts - presence * (counts > 0).float()
    greedy = logits.argmax(dim=-1).tolist()
    picked = []
    for i, row in enumerate(rows):
        sampling = row.job.sampling
        if sampling.greedy:
            picked.append(int(greedy[i]))
            continue
        assert sampling.temperature is not None
        probs = torch.softmax(logits[i] / sampling.temperature, dim=-1)
        if sampling.top_p is not None and sampling.top_p < 1.0:
            ordered, order = probs.sort(descending=True)
            # Keep the smallest set of likeliest tokens whose mass reaches top_p.
            outside = ordered.cumsum(dim=0) - ordered > sampling.top_p
            ordered[outside] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, ordered)
        picked.append(int(torch.multinomial(probs, 1, generator=row.generator)))
    return picked
