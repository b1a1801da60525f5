"""Training runs that take turns on one machine, so that their throughputs compare on a noisy one.

Each side trains in its own process (spawned: a fresh interpreter, as a user would run it) and
hands the machine back every `block_steps` optimizer steps and at the end of training, through
a Trainer callback (`baton`). The parent lets each side run one block per round, rotating the
order every round, so each round's blocks have seen the same load; the benchmarks take medians
over rounds. Tokens are the non-padding `input_ids` of training forwards, counted by a hook on
the model. Each side reports its own peak RSS (the process's, preparation and saving included).

A side is a module-level function `train(spec, baton) -> dict` that trains with `baton` among
its Trainer callbacks and returns at least {"model_dir", "steps", "precision"}.
"""

from __future__ import annotations

import os
import resource
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

TrainFn = Callable[[dict[str, Any], Any], dict[str, Any]]


@dataclass(frozen=True)
class Block:
    steps: int
    tokens: int  # non-padding input tokens of the training forwards in this block
    seconds: float
    final: bool  # ended at the end of training (after the last step's eval and checkpoint)

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds


def baton(conn: Connection, every: int) -> Any:
    """The callback that hands the machine back to the parent every `every` steps and at the
    end of training, reporting the block's steps, tokens and seconds."""
    import torch
    from transformers import TrainerCallback

    class Baton(TrainerCallback):
        def __init__(self) -> None:
            self.tokens: Any = 0
            self.started = 0.0
            self.step0 = 0
            self.hook: Any = None
            self.pad: int | None = None

        def count(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            if module.training and ids is not None:
                # Stays a tensor on the device: no host sync per step on a GPU.
                self.tokens = self.tokens + (ids != self.pad).sum()

        def handoff(self, message: tuple[Any, ...]) -> None:
            conn.send(message)
            if conn.recv() != "go":
                raise SystemExit(1)
            self.started = time.perf_counter()

        def end_block(self, step: int, final: bool = False) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            seconds = time.perf_counter() - self.started
            tokens, self.tokens = int(self.tokens), 0
            steps, self.step0 = step - self.step0, step
            self.handoff(("block", steps, tokens, seconds, final))

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            model = kwargs["model"]
            self.pad = model.config.pad_token_id
            self.hook = model.register_forward_pre_hook(self.count, with_kwargs=True)
            self.step0 = state.global_step
            self.handoff(("ready", time.perf_counter()))

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step % every == 0 and state.global_step < state.max_steps:
                self.end_block(state.global_step)

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            # After the final step's logging, evaluation and checkpoint: the last block has them.
            self.end_block(state.global_step, final=True)
            self.hook.remove()

    return Baton()


def _worker(train: TrainFn, spec: dict[str, Any], conn: Connection) -> None:
    """One side, in its own process; waits for "go" before any work."""
    # load_dataset caches under ~/.cache by default: a second run would skip a side's
    # tokenisation, and a benchmark should leave nothing behind.
    os.environ["HF_DATASETS_CACHE"] = str(Path(spec["work"]) / "datasets-cache")
    try:
        if conn.recv() != "go":
            return
        callback = baton(conn, spec["block_steps"])  # imports torch and transformers
        # The baton reports when training began; the parent subtracts this for prep time.
        conn.send(("started", time.perf_counter()))
        done = train(spec, callback)
        import torch

        done["threads"] = int(torch.get_num_threads())
        done["peak_rss_bytes"] = peak_rss_bytes()
        conn.send(("done", done))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        raise


def peak_rss_bytes() -> int:
    """This process's peak RSS, from its start to now.

    VmHWM, the high-water mark of this process's own memory map; not ru_maxrss, which Linux
    carries over from the parent across fork and exec, so that every spawned worker would
    report at least the parent's RSS at the time it started."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # no /proc: KiB (Linux)


class Side:
    """The parent's handle on one worker process."""

    def __init__(self, ctx: Any, role: str, train: TrainFn, spec: dict[str, Any]) -> None:
        self.role = role
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(train, spec, child), name=f"bench-{role}")
        self.proc.start()
        child.close()
        self.blocks: list[Block] = []
        self.prep_s = 0.0
        self.started = 0.0
        self.done: dict[str, Any] | None = None

    def turn(self) -> str:
        """Let the worker run to its next handoff; return what it reported."""
        self.conn.send("go")
        while True:
            while not self.conn.poll(1.0):
                if not self.proc.is_alive():
                    raise RuntimeError(f"{self.role}: worker died (exit {self.proc.exitcode})")
            kind, *rest = self.conn.recv()
            if kind == "error":
                raise RuntimeError(f"{self.role} failed:\n{rest[0]}")
            if kind == "started":
                self.started = rest[0]
                continue
            if kind == "ready":
                self.prep_s = rest[0] - self.started
            elif kind == "block":
                self.blocks.append(Block(*rest))
            elif kind == "done":
                self.done = rest[0]
            return str(kind)

    @property
    def finished(self) -> dict[str, Any]:
        if self.done is None:
            raise RuntimeError(f"{self.role} did not finish")
        return self.done

    def stop(self) -> None:
        if self.proc.is_alive():
            self.proc.terminate()
        self.proc.join(timeout=30)


def take_turns(
    sides: dict[str, TrainFn],
    spec: dict[str, Any],
    between_rounds: Callable[[], str] = lambda: "",
    print_every: int = 5,
) -> tuple[list[Side], str]:
    """Prepare the sides one at a time (in `sides`' order), then train them a block each per
    round, rotating who goes first, until all finish; let each save its model, one at a time.

    `between_rounds` runs before each round and once after the last (a peak measurement, say);
    what it returns is printed with the round's rates. Returns the sides, in `sides`' order,
    and the load average at the first and after the last round."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    handles = [Side(ctx, role, train, spec) for role, train in sides.items()]
    try:
        for side in handles:  # sequential: a side may read what an earlier one prepared
            print(f"bench: preparing {side.role}", flush=True)
            if side.turn() != "ready":
                raise RuntimeError(f"{side.role}: finished before training began")
        load_at_start = os.getloadavg()[0]
        rounds = 0
        while True:
            extra = between_rounds()
            first = rounds % len(handles)
            order = handles[first:] + handles[:first]
            kinds = {side.role: side.turn() for side in order}
            rounds += 1
            if set(kinds.values()) != {"block"}:
                raise RuntimeError(f"the sides went out of step: {kinds}")
            finals = {side.blocks[-1].final for side in handles}
            if len(finals) > 1:
                raise RuntimeError("one side finished training before another")
            last = finals == {True}
            if rounds % print_every == 0 or last:
                rates = ", ".join(f"{s.role} {s.blocks[-1].rate:,.0f} tok/s" for s in handles)
                print(f"bench: round {rounds}: {rates}{extra and ', ' + extra}", flush=True)
            if last:
                break
        between_rounds()
        load = f"{load_at_start:.1f} at the first round, {os.getloadavg()[0]:.1f} after the last"
        for side in handles:  # saving the models, one at a time
            while side.done is None:
                side.turn()
    finally:
        for side in handles:
            side.stop()
    return handles, load
