"""Data-parallel training on several processes of this machine (`train.processes`).

torch's elastic launcher (the engine behind `torchrun`) starts one process per rank and
watches them; the Trainer (through accelerate) wraps the model in DDP: gloo between CPU
processes, nccl between GPUs, one GPU per rank. Each rank trains on its shard of every batch
and the gradients are averaged, so all ranks hold the same weights after each step; rank 0
alone writes the model, checkpoints, prints progress and logs.

The launcher is called from a stage's `run` (tasks.train), so `dvc repro`, `retune train` and
the Prefect flow start the ranks the same way.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import sys
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from retune.errors import RetuneError

R = TypeVar("R")

AUTO = "auto"


def available_cores() -> int:
    """CPU cores this process may run on; a rank of a data-parallel run on the CPU gets its
    share of them (the cores split evenly between this machine's ranks)."""
    # torch sizes its thread pool from the machine's cores; in a container pinned to fewer
    # (cpuset), the extra threads fight over the allowed cores and a CPU run slows down badly.
    cores = max(1, len(os.sched_getaffinity(0)))
    return max(1, cores // local_world_size())


def rank() -> int:
    """This process's rank in a data-parallel run (0 outside one)."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """How many processes train together (1 outside a data-parallel run)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def is_main() -> bool:
    """Whether this process writes files and logs: rank 0, or a run of one process."""
    return rank() == 0


def resolve_processes(setting: int | str) -> int:
    """How many processes `train.processes` asks for: a number, or "auto" (one per GPU where
    CUDA is available, otherwise one process: a CPU run already uses every core)."""
    if setting != AUTO:
        return int(setting)
    import torch

    return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1


def backend() -> str:
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def main_first(step: Callable[[], R]) -> R:
    """`step()` on rank 0 first, then on the other ranks once rank 0 has done it: for work that
    writes shared files (clearing checkpoints, training the tokenizer) that the others then
    find done. Outside a data-parallel run, simply `step()`."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return step()
    if is_main():
        done = step()
        dist.barrier()
        return done
    dist.barrier()
    return step()


def broadcast(value: R) -> R:
    """Rank 0's `value` on every rank (picklable objects; `value` itself outside a run)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def weights_digest(model: Any) -> str:
    """SHA-256 of a model's weights (every tensor of its state dict, in name order): equal on
    every rank of a data-parallel run that kept them in step."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode("utf-8"))
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class RankError(RuntimeError):
    """What a rank's failure says, for the launcher to pass on (retune's message, or the
    unexpected error's type and text)."""


def launch(fn: Callable[..., R], args: Sequence[Any], processes: int, name: str) -> list[R]:
    """Call `fn(*args)` on `processes` ranks on this machine (spawned processes: `fn` and
    `args` must pickle) and return each rank's result, rank 0's first.

    A rank that fails stops the others (none is left waiting on a collective) and raises a
    RetuneError naming the rank and its error; RETUNE_DEBUG=1 adds its traceback. The
    rendezvous listens on 127.0.0.1 only.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=processes,
        run_id=f"retune-{name}-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",  # a free port, on loopback
        max_restarts=0,  # a failed rank fails the run: retrying would redo the same error
        monitor_interval=0.5,
        start_method="spawn",
    )
    print(f"{name}: data-parallel on {processes} processes ({backend()})", flush=True)
    with _launcher_logs_quiet():
        try:
            results = elastic_launch(config, _rank_main)(fn, tuple(args))
        except ChildFailedError as exc:
            raise RetuneError(failure_text(name, processes, exc.failures)) from None
    return [results[r] for r in range(processes)]


def failure_text(name: str, processes: int, failures: dict[int, Any]) -> str:
    """One message for the first failed rank: what it raised (its own words), or how it ended
    (a signal, an exit code) when it raised nothing."""
    from retune.entry import debug_requested

    first = min(failures)
    failure = failures[first]
    raw = failure.message
    if isinstance(raw, dict):
        said = re.sub(rf"^{RankError.__name__}: ", "", str(raw.get("message", "")))
        trace = str(raw.get("extraInfo", {}).get("py_callstack", ""))
    else:
        said = str(raw) or f"exit code {failure.exitcode}"
        trace = ""
    others = [r for r in sorted(failures) if r != first]
    stopped = f"; ranks {others} failed too" if others else "; the other ranks were stopped"
    text = f"{name}: rank {first} of {processes} failed: {said}{stopped}"
    if trace and debug_requested():
        text += f"\n{trace}"
    return text


def _rank_main(fn: Callable[..., R], args: tuple[Any, ...]) -> R:
    """A rank's entry point: quiet unless rank 0, one device (or a share of the cores), the
    process group up for `fn` and torn down after it."""
    import torch

    os.environ.setdefault("OMP_NUM_THREADS", str(available_cores()))
    if not is_main():
        _quiet_rank()
    torch.set_num_threads(available_cores())
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    import torch.distributed as dist

    dist.init_process_group(backend())
    try:
        return fn(*args)
    except Exception as exc:
        from retune.entry import error_message

        raise RankError(error_message(exc)) from exc
    finally:
        dist.destroy_process_group()


def _quiet_rank() -> None:
    """Rank 0 speaks for the run: the others print nothing and warn of nothing (errors still
    reach the launcher)."""
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    warnings.simplefilter("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    with contextlib.suppress(ImportError):
        import datasets

        datasets.disable_progress_bars()


@contextlib.contextmanager
def _launcher_logs_quiet() -> Iterator[None]:
    """The elastic agent logs each failed rank's traceback and each rank it stops: retune's
    one message says it (with the traceback under RETUNE_DEBUG=1)."""
    from retune.entry import debug_requested

    loggers = [logging.getLogger(n) for n in ("torch.distributed.elastic", "torch.multiprocessing")]
    levels = [logger.level for logger in loggers]
    if not debug_requested():
        for logger in loggers:
            logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
