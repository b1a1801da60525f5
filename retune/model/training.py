"""Training core shared by the `train` and `cv` stages: pack records into blocks, fine-tune
with the Trainer, resume from checkpoints of the same inputs, save the model atomically.

Called by `tasks.train.run` and `tasks.cv`; nothing here touches MLflow or writes reports.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retune.config import TrainParams
from retune.data.records import iter_messages, read_records
from retune.errors import BaseModelError, RetuneError
from retune.model import adapters, checkpoints, distributed, masks, packing
from retune.model.checkpoints import (
    DATA_CACHE,
    TOKENIZER_DIR,
    file_sha256,
    prepare_checkpoints,
)
from retune.model.distributed import available_cores
from retune.model.modeling import load_pretrained, scratch_model, train_chat_tokenizer
from retune.model.packing import collate, pack, target_share

if TYPE_CHECKING:
    from transformers import TrainerCallback


# (step, train loss of the logging window ending there, eval loss at that step)
History = tuple[tuple[int, float | None, float | None], ...]


@dataclass(frozen=True)
class TrainResult:
    model_dir: Path
    # Mean loss over the last logging window: the run-long average HF reports is inflated by
    # the first steps and is not comparable with `eval_loss`.
    train_loss: float
    eval_loss: float | None  # on the holdout blocks at the last step; None without any
    steps: int
    tokens_seen: int  # over the whole schedule, steps before a resume included
    tokens_per_s: float  # training throughput of this call (0.0 if nothing was left to train)
    n_params: int
    runtime_s: float  # wall time of this call: data, tokenizer, training and saving
    resumed_from: Path | None
    history: History
    precision: str = "fp32"  # "bf16" when trained under bf16 autocast (`resolve_precision`)
    trainable: adapters.Trainable | None = None  # what trained: all weights or an adapter
    ending: Ending | None = None  # how the schedule ended: the planned steps, early stopping
    processes: int = 1  # data-parallel ranks that trained it (train.processes)
    # With several processes: this rank's weights at the end (`distributed.weights_digest`).
    weights_sha256: str | None = None


@dataclass(frozen=True)
class Ending:
    """How a run's schedule ended: the steps it planned (train.max_steps, or what
    train.num_train_epochs makes of the blocks), whether early stopping ended it sooner, and,
    with early stopping, the evaluation whose checkpoint is the saved model."""

    planned_steps: int
    stopped_early: bool = False
    best_step: int | None = None  # with train.early_stopping_patience: the model saved
    best_eval_loss: float | None = None

    @staticmethod
    def of(state: Mapping[str, Any], early_stopping: bool) -> Ending:
        """From a Trainer state (its fields, or a checkpoint's trainer_state.json)."""
        best = state.get("best_global_step") if early_stopping else None
        return Ending(
            planned_steps=int(state["max_steps"]),
            stopped_early=int(state["global_step"]) < int(state["max_steps"]),
            best_step=int(best) if best else None,
            best_eval_loss=float(state["best_metric"]) if best else None,
        )


def train(
    cfg: TrainParams,
    seed: int,
    train_file: Path,
    holdout_file: Path,
    model_dir: Path,
    checkpoint_dir: Path,
    callbacks: Sequence[TrainerCallback] = (),
    num_threads: int | None = None,
) -> TrainResult:
    """Train `cfg.base_model` on the records in `train_file`; evaluate on the first
    `cfg.eval_max_examples` records of `holdout_file`. The loss is on `cfg.loss_on`'s tokens
    (`pack`); every weight trains, or a LoRA adapter (`cfg.adapter`, retune.model.adapters);
    for `cfg.max_steps` or `cfg.num_train_epochs`, stopping early on eval_loss with
    `cfg.early_stopping_patience` (the best checkpoint is then the model).

    Writes checkpoints, `fingerprint.json` and the scratch tokenizer under `checkpoint_dir`
    (resuming from the last checkpoint when they belong to the same inputs and `cfg.resume`),
    and the final model + tokenizer (with its chat template) to `model_dir`. `num_threads`
    caps torch's CPU threads (default: every core this process may use).

    Inside a data-parallel run (`distributed.launch`) every rank calls this: the batch of a
    step is `per_device_train_batch_size` on each rank, and rank 0 alone clears or resumes
    checkpoints, trains the scratch tokenizer first and saves the model.
    """
    import torch
    from transformers import PrinterCallback, Trainer, TrainingArguments, set_seed

    started = time.perf_counter()
    torch.set_num_threads(num_threads or available_cores())
    for path in (train_file, holdout_file):
        if not path.exists():
            raise RetuneError(f"{path}: missing; run the split stage first (`retune split`)")
    # A user's base loads first: a bad train.base_model fails before any checkpoint is cleared.
    # Seeded: the rows it adds for retune's placeholder tokens start alike in every process, so
    # a resumed adapter (which trains those rows only) meets the base it was trained on.
    set_seed(seed)
    base = None if cfg.base_model == "scratch" else _pretrained_base(cfg)
    world = distributed.world_size()
    resume_from = distributed.broadcast(
        prepare_checkpoints(checkpoint_dir, training_fingerprint(cfg, seed, train_file), cfg.resume)
        if distributed.is_main()
        else None
    )
    tokens_per_step = (
        cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * cfg.max_seq_len * world
    )
    gpu = torch.cuda.is_available()
    precision = resolve_precision(cfg.precision, "cuda" if gpu else "cpu")
    if resume_from is not None and schedule_done(resume_from):
        # Trainer would take one step past max_steps here; the checkpoint is the model.
        return _finished(resume_from, cfg, base, model_dir, tokens_per_step, started, precision)
    interactive = sys.stdout.isatty()
    if not interactive:
        import datasets

        datasets.disable_progress_bars()

    set_seed(seed)  # the scratch model's initial weights come from this seed
    model, tokenizer = base or distributed.main_first(
        lambda: _scratch_base(cfg, train_file, checkpoint_dir)
    )
    n_params, architecture = sum(p.numel() for p in model.parameters()), type(model).__name__
    model, trainable = _trainable(model, tokenizer, cfg)
    rank_cache = f"{DATA_CACHE}-rank{distributed.rank()}"
    cache = checkpoint_dir / (DATA_CACHE if world == 1 else rank_cache)
    shutil.rmtree(cache, ignore_errors=True)
    try:
        train_blocks = pack(train_file, tokenizer, cfg.max_seq_len, cache, loss_on=cfg.loss_on)
        if len(train_blocks) == 0:
            raise RetuneError(
                f"{train_file}: too little text for one block of train.max_seq_len="
                f"{cfg.max_seq_len} tokens; add data or lower train.max_seq_len"
            )
        eval_blocks = pack(
            holdout_file,
            tokenizer,
            cfg.max_seq_len,
            cache,
            limit=cfg.eval_max_examples,
            loss_on=cfg.loss_on,
        )
        if len(eval_blocks) == 0 and cfg.early_stopping_patience is not None:
            raise RetuneError(
                f"train.early_stopping_patience={cfg.early_stopping_patience} stops on eval_loss, "
                f"but the first {cfg.eval_max_examples} holdout records make no block of "
                f"{cfg.max_seq_len} tokens to evaluate on; raise train.eval_max_examples"
            )
        if len(eval_blocks) == 0:
            print(
                f"train: the first {cfg.eval_max_examples} holdout records make no full block "
                f"of {cfg.max_seq_len} tokens; no eval_loss (raise train.eval_max_examples)",
                flush=True,
            )
        print(
            f"train: {architecture} with {n_params:,} parameters, "
            f"{len(train_blocks)} train / {len(eval_blocks)} eval blocks of {cfg.max_seq_len} "
            f"tokens, loss on {cfg.loss_on} ({target_share(train_blocks):.0%} of the tokens), "
            f"{_steps_text(cfg, len(train_blocks))} x {tokens_per_step} tokens, "
            f"{precision} on {'cuda' if gpu else f'{torch.get_num_threads()} CPU threads'}; "
            f"trains {trainable.describe()}",
            flush=True,
        )
        args = TrainingArguments(
            **_training_args(cfg, checkpoint_dir, seed, precision, gpu, bool(len(eval_blocks)))
        )
        progress = _progress_callback(tokens_per_step, print_lines=not interactive)
        trainer = Trainer(
            model=model,
            args=args,
            data_collator=collate,
            train_dataset=train_blocks,
            eval_dataset=eval_blocks if len(eval_blocks) else None,
            processing_class=tokenizer,
            callbacks=[progress, *_stopping(cfg), *callbacks],
        )
        if not interactive:
            trainer.remove_callback(PrinterCallback)  # raw log dicts; `progress` prints lines
        with adapters.quiet_checkpoints():
            output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        steps = trainer.state.global_step
        history = loss_history(trainer.state.log_history)
        # With early stopping the Trainer has loaded the best checkpoint back by now.
        ending = Ending.of(
            dataclasses.asdict(trainer.state), cfg.early_stopping_patience is not None
        )
        digest = distributed.weights_digest(trainer.model) if world > 1 else None
        if distributed.is_main():
            save_model(trainer.model, tokenizer, model_dir)
    finally:
        shutil.rmtree(cache, ignore_errors=True)

    trained_steps = steps - progress.start_step  # type: ignore[attr-defined]
    train_s = float(output.metrics.get("train_runtime", 0.0))
    return _result(
        model_dir,
        history,
        steps=steps,
        tokens_per_step=tokens_per_step,
        tokens_per_s=trained_steps * tokens_per_step / train_s if train_s else 0.0,
        n_params=n_params,
        started=started,
        resumed_from=resume_from,
        mean_loss=float(output.training_loss),
        precision=precision,
        trainable=trainable,
        ending=ending,
        weights_sha256=digest,
    )


def planned_steps(cfg: TrainParams, n_blocks: int) -> int:
    """The optimizer steps of the schedule: train.max_steps, or train.num_train_epochs passes
    over `n_blocks` train blocks (the Trainer's own arithmetic: a last partial batch and a
    last partial accumulation each still make a step)."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    batches = math.ceil(n_blocks / cfg.per_device_train_batch_size)
    per_epoch = max(1, math.ceil(batches / cfg.gradient_accumulation_steps))
    return math.ceil(float(cfg.num_train_epochs or 0) * per_epoch)


def _steps_text(cfg: TrainParams, n_blocks: int) -> str:
    steps = planned_steps(cfg, n_blocks)
    text = f"{steps} steps" if cfg.max_steps else f"{cfg.num_train_epochs:g} epochs ({steps} steps)"
    if cfg.early_stopping_patience is not None:
        text += f", early stopping (patience {cfg.early_stopping_patience} evaluations)"
    return text


def _training_args(
    cfg: TrainParams, checkpoint_dir: Path, seed: int, precision: str, gpu: bool, evaluate: bool
) -> dict[str, Any]:
    """TrainingArguments for `cfg`, evaluating when there are eval blocks (`evaluate`)."""
    early = cfg.early_stopping_patience is not None
    return dict(
        output_dir=str(checkpoint_dir),
        # -1: num_train_epochs decides.
        max_steps=cfg.max_steps if cfg.max_steps is not None else -1,
        num_train_epochs=cfg.num_train_epochs or 1.0,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        logging_strategy="steps",
        logging_steps=cfg.logging_steps,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=cfg.eval_steps,
        save_strategy="steps",
        # Early stopping restores the best evaluation's checkpoint, so each one is saved.
        save_steps=cfg.eval_steps if early else cfg.save_steps,
        save_total_limit=2,  # the best one is kept on top when it is older
        load_best_model_at_end=early,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        # A resumed run goes on counting evaluations without improvement where it stopped.
        restore_callback_states_from_checkpoint=early,
        seed=seed,
        report_to="none",
        use_cpu=not gpu,
        bf16=precision == "bf16",
        # No torch_compile: on 2 CPU cores it compiles for ~40 s to save ~4 % of a step,
        # which a few hundred steps never pay back.
        # Blocks are tokenised already: loader processes would only take cores from the model.
        dataloader_num_workers=0,
        dataloader_pin_memory=gpu,
        disable_tqdm=not sys.stdout.isatty(),
        # Several processes (`distributed.launch`): every parameter takes part in each step,
        # and ranks but 0 stay quiet (the Trainer sets their log level from this).
        **(
            {
                "ddp_backend": distributed.backend(),
                "ddp_find_unused_parameters": False,
                "log_level_replica": "error",
            }
            if distributed.world_size() > 1
            else {}
        ),
    )


def _stopping(cfg: TrainParams) -> list[TrainerCallback]:
    """transformers' EarlyStoppingCallback on eval_loss, if train.early_stopping_patience."""
    if cfg.early_stopping_patience is None:
        return []
    from transformers import EarlyStoppingCallback

    return [EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience)]


def schedule_done(checkpoint: Path) -> bool:
    """Whether a Trainer checkpoint ends its run: every planned step taken, or the run stopped
    there (early stopping), as its trainer_state.json records."""
    state = json.loads((checkpoint / "trainer_state.json").read_text("utf-8"))
    control = state.get("stateful_callbacks", {}).get("TrainerControl", {})
    stopped = bool(control.get("args", {}).get("should_training_stop"))
    return stopped or int(state["global_step"]) >= int(state["max_steps"])


def _trainable(model: Any, tokenizer: Any, cfg: TrainParams) -> tuple[Any, adapters.Trainable]:
    """The model as it trains under `cfg.adapter` (wrapped in a LoRA adapter, or as it is)."""
    if cfg.adapter == "lora":
        return adapters.add_lora(model, cfg.lora)
    return model, adapters.full(model)


def _finished(
    checkpoint: Path,
    cfg: TrainParams,
    base: tuple[Any, Any] | None,
    model_dir: Path,
    tokens_per_step: int,
    started: float,
    precision: str,
) -> TrainResult:
    """Save a checkpoint that ends its run as the model, with its loss history: with early
    stopping the best one it records. An adapter checkpoint holds the adapter alone: it goes
    back onto `base` to be merged."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"train: {checkpoint} ends the run; nothing left to train", flush=True)
    state = json.loads((checkpoint / "trainer_state.json").read_text("utf-8"))
    ending = Ending.of(state, cfg.early_stopping_patience is not None)
    if ending.best_step is not None:
        checkpoint = checkpoint.parent / f"checkpoint-{ending.best_step}"
    if cfg.adapter == "lora" and base is not None:
        model, tokenizer = base
        n_params = sum(p.numel() for p in model.parameters())
        model, trainable = _trainable(model, tokenizer, cfg)
        adapters.load_adapter(model, checkpoint)
    else:
        model = AutoModelForCausalLM.from_pretrained(checkpoint)
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)  # the Trainer saved it alongside
        n_params = sum(p.numel() for p in model.parameters())
        trainable = adapters.full(model)
    if distributed.is_main():
        save_model(model, tokenizer, model_dir)
    return _result(
        model_dir,
        loss_history(state["log_history"]),
        steps=int(state["global_step"]),
        tokens_per_step=tokens_per_step,
        tokens_per_s=0.0,
        n_params=n_params,
        started=started,
        resumed_from=checkpoint,
        mean_loss=float("nan"),
        precision=precision,
        trainable=trainable,
        ending=ending,
    )


def _result(
    model_dir: Path,
    history: History,
    *,
    steps: int,
    tokens_per_step: int,
    tokens_per_s: float,
    n_params: int,
    started: float,
    resumed_from: Path | None,
    mean_loss: float,
    precision: str = "fp32",
    trainable: adapters.Trainable | None = None,
    ending: Ending | None = None,
    weights_sha256: str | None = None,
) -> TrainResult:
    losses = [loss for _, loss, _ in history if loss is not None]
    evals = [ev for _, _, ev in history if ev is not None]
    result = TrainResult(
        model_dir=model_dir,
        train_loss=losses[-1] if losses else mean_loss,
        eval_loss=evals[-1] if evals else None,
        steps=steps,
        tokens_seen=steps * tokens_per_step,
        tokens_per_s=round(tokens_per_s, 1),
        n_params=n_params,
        runtime_s=round(time.perf_counter() - started, 2),
        resumed_from=resumed_from,
        history=history,
        precision=precision,
        trainable=trainable,
        ending=ending,
        processes=distributed.world_size(),
        weights_sha256=weights_sha256,
    )
    eval_text = f"{result.eval_loss:.4f}" if result.eval_loss is not None else "n/a"
    print(
        f"train: done, {steps} steps, train_loss {result.train_loss:.4f}, eval_loss {eval_text}, "
        f"{result.tokens_per_s:,.0f} tok/s, {result.runtime_s:.1f}s; model in {model_dir}",
        flush=True,
    )
    return result


def resolve_precision(precision: str, device: str) -> str:
    """ "bf16" or "fp32" for `train.precision` on `device` ("cpu" or "cuda").

    "auto" picks bf16 autocast only where matmuls run natively in bf16: on an AVX512-BF16
    CPU the default model then trains ~1.3x as fast with the same holdout perplexity
    (benchmarks/train.py, `--dtype fp32` for the comparison); elsewhere bf16 is emulated and
    slower than fp32.
    """
    import torch

    if precision != "auto":
        return precision
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    # Private helpers, so looked up defensively: a torch without them gets fp32.
    native = [
        getattr(torch.cpu, f"_is_{kind}_supported", None) for kind in ("avx512_bf16", "amx_tile")
    ]
    return "bf16" if any(check is not None and check() for check in native) else "fp32"


def training_fingerprint(cfg: TrainParams, seed: int, train_file: Path) -> str:
    """Hash of what decides the trained weights: train settings, seed, the train data, the
    code that renders and trains (so a fix to it retrains rather than reusing a checkpoint),
    the library versions, and the files of a local base model.

    `resume` is left out: it says whether to continue, not what is trained.
    """
    import torch
    import transformers

    from retune.data import records
    from retune.model import chat, modeling

    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "resume"}
    # The ranks that train it (a step's batch is each rank's): "auto" may mean different counts.
    settings["processes"] = distributed.world_size()
    this = sys.modules[__name__]
    # By file name: the hash follows the code, wherever the module is imported from.
    code = {
        Path(str(m.__file__)).name: file_sha256(Path(str(m.__file__)))
        for m in (adapters, chat, checkpoints, masks, modeling, packing, records, this)
    }
    payload = json.dumps(
        {
            "train": settings,
            "seed": seed,
            "train_file_sha256": file_sha256(train_file),
            "code": code,
            "versions": [torch.__version__, transformers.__version__],
            "base_files": _base_files(cfg.base_model),
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _base_files(base_model: str) -> list[tuple[str, int, int]]:
    """(name, size, mtime) of a local base model's files: a replaced base is a new input.
    Cheap on purpose; hashing the weights of a large base would cost more than it saves."""
    folder = Path(base_model).expanduser()
    if base_model == "scratch" or not folder.is_dir():
        return []
    return sorted(
        (str(f.relative_to(folder)), f.stat().st_size, f.stat().st_mtime_ns)
        for f in folder.rglob("*")
        if f.is_file()
    )


def _pretrained_base(cfg: TrainParams) -> tuple[Any, Any]:
    """(model, tokenizer) from `cfg.base_model`, checked against `cfg.max_seq_len`."""
    model, tokenizer = load_pretrained(cfg.base_model)
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and cfg.max_seq_len > positions:
        raise BaseModelError(
            f"train.max_seq_len={cfg.max_seq_len} is longer than the {positions} positions "
            f"train.base_model={cfg.base_model!r} supports; lower train.max_seq_len"
        )
    return model, tokenizer


def _scratch_base(cfg: TrainParams, train_file: Path, checkpoint_dir: Path) -> tuple[Any, Any]:
    """A fresh GPT-2 and a tokenizer trained on `train_file` (or the one its checkpoints use)."""
    from transformers import AutoTokenizer

    saved = checkpoint_dir / TOKENIZER_DIR
    if saved.is_dir():
        # Same fingerprint (else it was cleared): the checkpoints' ids mean these tokens.
        tokenizer = AutoTokenizer.from_pretrained(saved)
    else:
        print(
            f"train: training a {cfg.scratch.vocab_size}-token BPE tokenizer on {train_file}",
            flush=True,
        )
        conversations = iter_messages(read_records(train_file, columns=["messages"]))
        tokenizer = train_chat_tokenizer(conversations, cfg.scratch.vocab_size)
        _save_atomically(saved, tokenizer.save_pretrained)
    return scratch_model(cfg.scratch, tokenizer, cfg.max_seq_len), tokenizer


def _progress_callback(tokens_per_step: int, print_lines: bool) -> TrainerCallback:
    """Logs the last step too, and (for logs, CI) prints one plain line per logging step."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        start_step = 0
        started = 0.0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.start_step, self.started = state.global_step, time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step >= state.max_steps:
                control.should_log = True  # else the final window's loss is never logged

        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any
        ) -> None:
            logs, done = logs or {}, state.global_step - self.start_step
            if not print_lines or done <= 0:
                return
            where = f"train: step {state.global_step}/{state.max_steps}"
            if "loss" in logs:
                per_step = (time.perf_counter() - self.started) / done
                eta = (state.max_steps - state.global_step) * per_step
                print(
                    f"{where} loss {logs['loss']:.4f} lr {logs.get('learning_rate', 0.0):.2e} "
                    f"{tokens_per_step / per_step:,.0f} tok/s {per_step:.2f}s/step "
                    f"ETA {int(eta // 60)}m{int(eta % 60):02d}s",
                    flush=True,
                )
            if "eval_loss" in logs:
                print(f"{where} eval_loss {logs['eval_loss']:.4f}", flush=True)

    return Progress()


def loss_history(log_history: list[dict[str, Any]]) -> History:
    """Trainer log entries merged by step into (step, loss, eval_loss) rows."""
    rows: dict[int, list[float | None]] = {}
    for entry in log_history:
        if "step" not in entry:
            continue
        row = rows.setdefault(int(entry["step"]), [None, None])
        if "loss" in entry:
            row[0] = float(entry["loss"])
        if "eval_loss" in entry:
            row[1] = float(entry["eval_loss"])
    return tuple(
        (step, loss, ev) for step, (loss, ev) in sorted(rows.items()) if (loss, ev) != (None, None)
    )


def _save_atomically(target: Path, save: Any) -> None:
    """Call `save(folder)` on a fresh folder beside `target`, then swap it in: a crash never
    leaves a half-written model or tokenizer where later stages would load it."""
    tmp, old = target.with_name(target.name + ".tmp"), target.with_name(target.name + ".old")
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    save(tmp)
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def save_model(model: Any, tokenizer: Any, model_dir: Path) -> None:
    """Model and tokenizer (its chat template included) in `save_pretrained` format; a LoRA
    model merged into its base, the adapter itself in `adapter/` (retune.model.adapters)."""
    _save_atomically(model_dir, lambda folder: adapters.save_merged(model, tokenizer, folder))
