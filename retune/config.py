"""The one configuration schema: `params.yaml` parsed into frozen, typed sections.

Used by every stage's `run(params)`, the Prefect flows and the CLI. Unknown keys and bad values
fail here, before any work, with the dotted key named.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass

DEFAULT_PARAMS = Path("params.yaml")

# Frozen and strict: a misspelt key is an error, not a silently ignored default.
_STRICT = ConfigDict(extra="forbid", frozen=True)


class ConfigError(ValueError):
    """`params.yaml` (or an override) has a key or value retune cannot use."""


@dataclass(config=_STRICT)
class PathsParams:
    incoming: Path = Path("data/incoming")
    prepared: Path = Path("data/prepared")
    quarantine: Path = Path("data/quarantine")
    clean: Path = Path("data/clean")
    split: Path = Path("data/split")
    preference: Path = Path("data/preference")
    sft: Path = Path("models/sft")
    model: Path = Path("models/candidate")
    checkpoints: Path = Path("models/checkpoints")
    reports: Path = Path("reports")
    base_models: Path = Path("models/base")


@dataclass(config=_STRICT)
class TrackingParams:
    uri: str = "sqlite:///mlruns/mlflow.db"
    artifacts: Path = Path("mlruns/artifacts")
    experiment: str = "retune"


@dataclass(config=_STRICT)
class SampleParams:
    """The synthetic customer-support corpus written when `paths.incoming` is empty."""

    conversations: Annotated[int, Field(ge=1)] = 12_000
    defect_rate: Annotated[float, Field(ge=0.0, le=0.5)] = 0.03


@dataclass(config=_STRICT)
class ColumnsParams:
    """Column names in CSV/TSV/Parquet files; which ones are present decides the layout."""

    conversation_id: str = "conversation_id"
    role: str = "role"
    text: str = "text"
    timestamp: str = "timestamp"
    prompt: str = "prompt"
    completion: str = "completion"
    messages: str = "messages"


@dataclass(config=_STRICT)
class IngestParams:
    columns: ColumnsParams = field(default_factory=ColumnsParams)
    # Speaker names seen in real exports, mapped onto the canonical roles.
    role_map: dict[str, str] = field(
        default_factory=lambda: {
            "human": "user",
            "customer": "user",
            "client": "user",
            "agent": "assistant",
            "support": "assistant",
            "bot": "assistant",
            "gpt": "assistant",
            "model": "assistant",
        }
    )
    max_message_chars: Annotated[int, Field(ge=1)] = 4_000
    # Kinds of personal data and secrets replaced by placeholders (retune.data.pii.KINDS).
    # Leaving out `secret` stores keys and passwords for training: ingest warns loudly then.
    redact: tuple[Literal["email", "phone", "card", "iban", "ip", "ssn", "secret"], ...] = (
        "email",
        "phone",
        "card",
        "iban",
        "ip",
        "ssn",
        "secret",
    )


@dataclass(config=_STRICT)
class NearDuplicateParams:
    """Near-duplicate texts (MinHash over word shingles, then LSH), one definition for the two
    stages that look for them: `hygiene` keeps one text of each group, `split` keeps a holdout
    text out of the holdout when train has a near-duplicate of it."""

    # Jaccard estimate at or above which two texts are near-duplicates.
    threshold: Annotated[float, Field(gt=0.0, le=1.0)] = 0.8
    num_perm: Annotated[int, Field(ge=16)] = 128
    shingle_words: Annotated[int, Field(ge=1)] = 3


@dataclass(config=_STRICT)
class HygieneParams:
    """Unsafe text (the `hygiene` stage); its near-duplicates are `near_duplicates`."""

    # A conversation whose most offensive sentence scores at least this (alt-profanity-check's
    # probability) is quarantined. Angry but civil customers score up to ~0.905 ("I hate this
    # thermostat", "This is ridiculous, I want a refund": 0.895); insults mostly 0.93-1.0.
    safety_threshold: Annotated[float, Field(gt=0.0, le=1.0)] = 0.93
    # Whole words or phrases (any case) that quarantine a conversation whatever the classifier
    # says: insults it scores too low. A placeholder: add the terms your domain must not learn.
    blocklist: tuple[str, ...] = (
        "idiot",
        "idiots",
        "moron",
        "morons",
        "moronic",
        "retard",
        "retards",
        "dumbass",
        "asshole",
        "assholes",
        "bitch",
        "fuck",
        "fucking",
        "fuck off",
        "shut up",
        "screw you",
        "screw yourself",
        "go to hell",
        "kill yourself",
    )


@dataclass(config=_STRICT)
class RepresentationParams:
    """What the data is made of: `hygiene` reports it (and charts it), `validate` expects it."""

    # The meta field (JSON key) holding a record's category or label.
    category_field: str = "category"
    # No category may hold less than this share of the records that have one (0: off).
    min_category_share: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.02
    # At least `min_language_share` of the sampled records must be in one of `languages`
    # (ISO 639-1, as py3langid names them); an empty list turns the check off.
    languages: tuple[str, ...] = ("en",)
    min_language_share: Annotated[float, Field(ge=0.0, le=1.0)] = 0.9
    # Records whose language is detected (the smallest ids: a sample fixed by content).
    language_sample: Annotated[int, Field(ge=1)] = 2_000


@dataclass(config=_STRICT)
class ValidateParams:
    min_examples: Annotated[int, Field(ge=1)] = 10_000
    min_chars: Annotated[int, Field(ge=0)] = 1
    max_chars: Annotated[int, Field(ge=1)] = 16_000
    failed_rows_shown: Annotated[int, Field(ge=0)] = 5


@dataclass(config=_STRICT)
class SplitParams:
    holdout_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.05


@dataclass(config=_STRICT)
class ScratchModelParams:
    """The offline default: a GPT-2 built from this config, tokenizer trained on the corpus."""

    vocab_size: Annotated[int, Field(ge=300)] = 4_096
    n_layer: Annotated[int, Field(ge=1)] = 4
    n_head: Annotated[int, Field(ge=1)] = 4
    n_embd: Annotated[int, Field(ge=8)] = 256
    # GPT2Config's 0.1 regularises many epochs; a few hundred steps see most tokens once, where
    # dropout only slows learning and (on CPU) forces attention off the fused SDPA kernel.
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0


@dataclass(config=_STRICT)
class LoraParams:
    """A LoRA adapter on a pretrained base (`train.adapter: lora`): what trains instead of it."""

    r: Annotated[int, Field(ge=1)] = 16
    alpha: Annotated[int, Field(ge=1)] = 32  # the update is scaled by alpha / r
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.05
    # Module names to adapt; null takes the base family's: q_proj/v_proj (Llama, Qwen2,
    # Mistral), c_attn (GPT-2), qkv_proj (Phi-3), ... (retune.model.adapters).
    target_modules: tuple[str, ...] | None = None


@dataclass(config=_STRICT)
class TrainParams:
    # "scratch", a local save_pretrained directory, or a hub id (online only).
    base_model: str = "scratch"
    scratch: ScratchModelParams = field(default_factory=ScratchModelParams)
    max_seq_len: Annotated[int, Field(ge=8)] = 256
    per_device_train_batch_size: Annotated[int, Field(ge=1)] = 8
    gradient_accumulation_steps: Annotated[int, Field(ge=1)] = 1
    # How long to train: max_steps optimizer steps, or num_train_epochs passes over the train
    # blocks; exactly one of the two is set (the other null). 300 steps: ~3 minutes on 2 CPU
    # cores for the default 4x256 model (0.6 s/step); with lr 2e-3 its holdout loss ends near
    # 1.6 nats against the unigram baseline's 5.5.
    max_steps: Annotated[int, Field(ge=1)] | None = 300
    num_train_epochs: Annotated[float, Field(gt=0.0)] | None = None
    # Stop once eval_loss has not improved for this many evaluations in a row and keep the
    # best checkpoint (every evaluation is then also a checkpoint); null trains to the end.
    early_stopping_patience: Annotated[int, Field(ge=1)] | None = None
    learning_rate: Annotated[float, Field(gt=0.0)] = 2.0e-3
    warmup_steps: Annotated[int, Field(ge=0)] = 20
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.01
    logging_steps: Annotated[int, Field(ge=1)] = 10
    eval_steps: Annotated[int, Field(ge=1)] = 100
    save_steps: Annotated[int, Field(ge=1)] = 100
    eval_max_examples: Annotated[int, Field(ge=1)] = 200
    # What the loss trains on: "replies", each assistant message and the marker closing its
    # turn, read off the base's own chat template (a message of weight 0 left out), or "all" the
    # rendered text. Documents (role "text") train on all their text either way.
    loss_on: Literal["replies", "all"] = "replies"
    # none: every weight of the model trains; lora: only a LoRA adapter (`lora`) on a pretrained
    # base, merged into it when saved, so every later stage loads a plain model.
    adapter: Literal["none", "lora"] = "none"
    lora: LoraParams = field(default_factory=LoraParams)
    resume: bool = True
    # bf16 autocast (weights and optimizer stay fp32): "auto" takes it where matmuls run natively
    # in bf16 (CUDA with bf16, CPUs with AVX512-BF16 or AMX) and fp32 elsewhere.
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    # Data-parallel processes for the train stage (retune.model.distributed): n, or "auto" (one
    # per GPU where CUDA is available, else 1). per_device_train_batch_size is per process, so
    # a step sees n times its blocks.
    processes: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"

    def __post_init__(self) -> None:
        if (self.max_steps is None) == (self.num_train_epochs is None):
            given = "both are set" if self.max_steps is not None else "neither is set"
            raise ValueError(
                f"train.max_steps and train.num_train_epochs: {given}; set exactly one, the "
                "other to null (e.g. train.max_steps=null train.num_train_epochs=3)"
            )
        if self.adapter == "lora" and self.base_model == "scratch":
            raise ValueError(
                "train.adapter=lora needs a pretrained train.base_model (a save_pretrained folder "
                "or a hub id): the scratch model starts from random weights, which must all "
                "train (train.adapter: none)"
            )


@dataclass(config=_STRICT)
class PreferenceDataParams:
    """`preference_data`: the feedback store's rated exchanges as a preference set."""

    # A score at or above this is desirable, below it undesirable ("up"/"down" say it outright).
    score_threshold: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5
    # all: ratings of every version of register.model_name (a rating judges the reply's text,
    # whichever version wrote it); newest: only those of the newest version that has ratings.
    versions: Literal["all", "newest"] = "all"
    # Rated exchanges kept out of tuning, by a hash of the prompt: the gate's feedback check.
    holdout_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.2
    # Prompt and reply together, in characters: longer ones are skipped, since the tuning
    # context is train.max_seq_len tokens (about 4 characters each in English).
    max_chars: Annotated[int, Field(ge=1)] = 1_000
    # The contract: tuning examples of each label (kto), and pairs (dpo), at least this many.
    min_per_label: Annotated[int, Field(ge=1)] = 20


@dataclass(config=_STRICT)
class PreferenceParams:
    """`preference`: tune the supervised model on the preference set, with it as reference."""

    # kto: unpaired up/down ratings; dpo: corrected replies (chosen) against the served ones
    # (rejected); none: always hand the supervised model on.
    method: Literal["none", "kto", "dpo"] = "kto"
    # Until there are this many tuning examples (kto) or pairs (dpo), the stage hands the
    # supervised model on unchanged, saying so: the loop starts tuning once ratings accrue.
    min_examples: Annotated[int, Field(ge=1)] = 200
    beta: Annotated[float, Field(gt=0.0)] = 0.1
    # KTO's weights on desirable and undesirable examples; null balances the labels (the
    # rarer label's weight raised so both weigh the same in all).
    desirable_weight: Annotated[float, Field(gt=0.0)] | None = None
    undesirable_weight: Annotated[float, Field(gt=0.0)] | None = None
    learning_rate: Annotated[float, Field(gt=0.0)] = 1.0e-5
    max_steps: Annotated[int, Field(ge=1)] = 100
    # At least 2 for KTO: its KL term pairs each prompt with another example's reply.
    per_device_train_batch_size: Annotated[int, Field(ge=2)] = 8
    warmup_steps: Annotated[int, Field(ge=0)] = 10
    logging_steps: Annotated[int, Field(ge=1)] = 10


@dataclass(config=_STRICT)
class ScoringParams:
    """How a model is scored on holdout examples, the same way wherever it is: `evaluate`, each
    `cv` fold, `promote` (the champion rescored on the candidate's holdout) and `drift`."""

    batch_size: Annotated[int, Field(ge=1)] = 8
    max_examples: Annotated[int, Field(ge=1)] = 1_000
    # Tokens of one scored example; longer conversations are cut (capped by the model's window).
    max_seq_len: Annotated[int, Field(ge=8)] = 256


@dataclass(config=_STRICT)
class CvParams:
    # k >= 2 trains k fold models grouped by conversation (k extra trainings); 0 or 1 is off.
    folds: Annotated[int, Field(ge=0)] = 0


@dataclass(config=_STRICT)
class EvaluateParams:
    # Rows of reports/generations.csv shown as the MLflow table (the CSV holds them all).
    prompts: Annotated[int, Field(ge=0)] = 8
    max_new_tokens: Annotated[int, Field(ge=1)] = 48
    # Holdout prompts replied to and scored (ROUGE-L, chrF, distinct-n, safety): a fixed
    # budget, so evaluation time and memory do not grow with the holdout. 0 turns it off.
    generation_examples: Annotated[int, Field(ge=0)] = 64
    generation_batch_size: Annotated[int, Field(ge=1)] = 16
    # Whole words or phrases, matched case-insensitively; a reply containing any is unsafe.
    # A placeholder: supply the terms your domain must never see.
    safety_blocklist: tuple[str, ...] = (
        "idiot",
        "stupid",
        "moron",
        "shut up",
        "damn",
        "hate you",
        "screw you",
    )


@dataclass(config=_STRICT)
class RegisterParams:
    model_name: str = "retune-support"
    # The served model's default reply length (callers may pass max_new_tokens per request).
    max_new_tokens: Annotated[int, Field(ge=1)] = 64


@dataclass(config=_STRICT)
class PromoteParams:
    """The promotion gate: absolute thresholds, then the candidate against `production`.

    The comparison is in `metric`'s unit. bits_per_byte is the holdout NLL in bits per UTF-8
    byte of the text scored: the text is the same whatever the tokenizer, so a candidate with
    another tokenizer than production's (a pretrained base against a scratch GPT-2) compares
    fairly. perplexity compares nats per token, meaningful only when both share a tokenizer.
    """

    # auto: the gate moves the `production` alias; propose: it sets `challenger` instead and a
    # person promotes with `retune promote <version>`.
    mode: Literal["auto", "propose"] = "auto"
    # The primary metric (lower is better): bits_per_byte (tokenizer-independent) or
    # perplexity (per token).
    metric: Literal["bits_per_byte", "perplexity"] = "bits_per_byte"
    # What the bootstrap CI's lower bound of the improvement must exceed, in the metric's
    # unit: bits per byte (bits_per_byte) or nats per token (perplexity). 0 means "better
    # beyond the noise", more demands a bigger step before production moves.
    margin: Annotated[float, Field(ge=0.0)] = 0.0
    # Users' held-out ratings (paths.preference, the holdout split): a candidate worse there
    # is rejected; one better there beyond the noise may lose this much on the holdout (the
    # metric's unit). The check needs `min_rated` held-out replies of each label.
    max_holdout_loss: Annotated[float, Field(ge=0.0)] = 0.01
    min_rated: Annotated[int, Field(ge=2)] = 10
    confidence: Annotated[float, Field(gt=0.5, lt=1.0)] = 0.95
    bootstrap_samples: Annotated[int, Field(ge=100)] = 2_000
    # Absolute gates (null turns one off). A gated metric missing from evaluate.json fails.
    max_perplexity: Annotated[float, Field(gt=1.0)] | None = 100.0
    # model / unigram-baseline perplexity: above 1 the model is worse than counting tokens.
    max_perplexity_vs_baseline: Annotated[float, Field(gt=0.0)] | None = 1.0
    max_unsafe_share: Annotated[float, Field(ge=0.0, le=1.0)] | None = 0.05
    min_next_token_accuracy: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    # Holdout bits per byte; unlike max_perplexity it means the same for any tokenizer.
    max_bits_per_byte: Annotated[float, Field(gt=0.0)] | None = None


@dataclass(config=_STRICT)
class ServeParams:
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 8000
    alias: str = "production"
    # How often the server asks the registry where the alias points (hot reload).
    reload_interval_s: Annotated[float, Field(gt=0.0)] = 10.0
    max_body_bytes: Annotated[int, Field(ge=256)] = 65_536
    max_tokens: Annotated[int, Field(ge=1)] = 256
    # Name of the environment variable holding the bearer token for writes; the token itself
    # never goes into params.yaml, logs or MLflow.
    token_env: str = "RETUNE_SERVE_TOKEN"
    # Generation runs as batches of up to `max_batch` rows (choices), one decoding step for all
    # of them at a time; requests arriving meanwhile wait, up to `max_queue` of them, and
    # more are answered 429 with a Retry-After.
    max_batch: Annotated[int, Field(ge=1)] = 8
    max_queue: Annotated[int, Field(ge=0)] = 32
    max_n: Annotated[int, Field(ge=1)] = 4  # choices per request (`n`)


@dataclass(config=_STRICT)
class FeedbackParams:
    # Any SQLAlchemy URL (e.g. postgresql+psycopg://...); a relative SQLite path is under cwd.
    store_url: str = "sqlite:///data/feedback/feedback.db"


@dataclass(config=_STRICT)
class DriftParams:
    """`drift_check`: the newest `window` ratings of production and prompts against references."""

    window: Annotated[int, Field(ge=1)] = 500
    # Quality reference: the production version's first ratings before the window (its
    # launch baseline, which a slow decline cannot drag down with it).
    reference_ratings: Annotated[int, Field(ge=1)] = 1_000
    # Input reference: holdout user turns scored under production (a fixed scoring budget).
    reference_prompts: Annotated[int, Field(ge=1)] = 1_000
    min_ratings: Annotated[int, Field(ge=1)] = 50
    min_prompts: Annotated[int, Field(ge=1)] = 50
    # Per check (three checks: a run on unchanged data flags one at most ~3% of the time).
    alpha: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.01
    # Minimum effects: a big window makes tiny, harmless shifts significant.
    min_negative_share_increase: Annotated[float, Field(ge=0.0, le=1.0)] = 0.05
    min_ks_statistic: Annotated[float, Field(ge=0.0, le=1.0)] = 0.1


@dataclass(config=_STRICT)
class SearchRange:
    """One searched setting: numbers from `low` to `high` (on a log scale with `log`), or one
    of `choices`. Whole numbers where the setting is an int."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: list[float | int | str | bool] | None = None

    def __post_init__(self) -> None:
        if (self.choices is None) == (self.low is None or self.high is None):
            raise ValueError("give `low` and `high`, or `choices`, not both and not neither")
        if self.low is not None and self.high is not None and not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low is not None and self.low <= 0:
            raise ValueError("a log range needs low > 0")


def _default_space() -> dict[str, SearchRange]:
    return {
        "train.learning_rate": SearchRange(low=3.0e-4, high=6.0e-3, log=True),
        "train.warmup_steps": SearchRange(low=0, high=60),
        "train.per_device_train_batch_size": SearchRange(choices=[4, 8, 16]),
    }


@dataclass(config=_STRICT)
class TuneParams:
    """`retune tune`: an Optuna search of `space`, each trial a training of the train split
    less one validation fold (never the holdout), pruned on its eval loss."""

    trials: Annotated[int, Field(ge=1)] = 8  # trials ended (complete or pruned) per study
    # Trials validate on one of `folds` conversation groups of the train split.
    folds: Annotated[int, Field(ge=2)] = 5
    pruner: Literal["median", "none"] = "median"
    startup_trials: Annotated[int, Field(ge=0)] = 2  # trials finished before any is pruned
    warmup_steps: Annotated[int, Field(ge=0)] = 0  # a trial's steps before it can be pruned
    # Optuna storage URL; None: sqlite beside the tracking store (optuna.db). A study with the
    # same name there resumes: its ended trials count.
    storage: str | None = None
    study: str | None = None  # None: "<tracking.experiment>-tune"
    # Settings of every trial, e.g. a shorter schedule: {"train.max_steps": 100}.
    overrides: dict[str, Any] = field(default_factory=dict)
    # Settings tried first, before the sampler's picks (the current values always go first).
    enqueue: list[dict[str, Any]] = field(default_factory=list)
    space: dict[str, SearchRange] = field(default_factory=_default_space)


RunnerKind = Literal["sequential", "process", "ray"]


@dataclass(config=_STRICT)
class RunnerParams:
    """Where the flow runs work that is independent (CV folds, tuning trials): one after
    another, side by side in a local process pool, or on a Ray cluster."""

    kind: RunnerKind = "sequential"
    # At most this many at once (process, ray); None: one per core this process may use.
    workers: Annotated[int, Field(ge=1)] | None = None
    # ray: a running cluster ("ray://head:10001", or "auto"); None starts a local one.
    ray_address: str | None = None


@dataclass(config=_STRICT)
class MonitorParams:
    """`retune monitor` and the page each drift check logs: how production is doing."""

    days: Annotated[float, Field(gt=0.0)] = 14.0  # traffic and ratings of the last `days`
    drift_checks: Annotated[int, Field(ge=1)] = 20  # the newest drift checks listed
    points: Annotated[int, Field(ge=4)] = 48  # most time buckets a plot draws


@dataclass(config=_STRICT)
class ScheduleParams:
    """Cron schedules of the Prefect deployments (`retune deploy`); null turns one off (its
    deployment still runs on demand, and retrain on its drift trigger)."""

    retrain_cron: str | None = "0 3 * * 0"
    data_check_cron: str | None = "*/15 * * * *"
    drift_check_cron: str | None = "0 * * * *"
    # IANA zone the crons are read in.
    timezone: str = "UTC"


@dataclass(config=_STRICT)
class Params:
    seed: int = 42
    paths: PathsParams = field(default_factory=PathsParams)
    tracking: TrackingParams = field(default_factory=TrackingParams)
    sample: SampleParams = field(default_factory=SampleParams)
    ingest: IngestParams = field(default_factory=IngestParams)
    near_duplicates: NearDuplicateParams = field(default_factory=NearDuplicateParams)
    hygiene: HygieneParams = field(default_factory=HygieneParams)
    representation: RepresentationParams = field(default_factory=RepresentationParams)
    validate: ValidateParams = field(default_factory=ValidateParams)
    split: SplitParams = field(default_factory=SplitParams)
    preference_data: PreferenceDataParams = field(default_factory=PreferenceDataParams)
    train: TrainParams = field(default_factory=TrainParams)
    preference: PreferenceParams = field(default_factory=PreferenceParams)
    scoring: ScoringParams = field(default_factory=ScoringParams)
    cv: CvParams = field(default_factory=CvParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    register: RegisterParams = field(default_factory=RegisterParams)
    promote: PromoteParams = field(default_factory=PromoteParams)
    serve: ServeParams = field(default_factory=ServeParams)
    feedback: FeedbackParams = field(default_factory=FeedbackParams)
    drift: DriftParams = field(default_factory=DriftParams)
    runner: RunnerParams = field(default_factory=RunnerParams)
    tune: TuneParams = field(default_factory=TuneParams)
    monitor: MonitorParams = field(default_factory=MonitorParams)
    schedule: ScheduleParams = field(default_factory=ScheduleParams)


def to_plain(params: Params) -> dict[str, Any]:
    """`params` as plain YAML/JSON-ready data (paths as strings), e.g. to write a params file."""

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        return str(value) if isinstance(value, Path) else value

    result: dict[str, Any] = plain(dataclasses.asdict(params))
    return result


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `raw` with dotted `key=value` overrides applied (values parsed as YAML).

    Same spelling as `dvc exp run -S train.max_steps=10`.
    """
    out: dict[str, Any] = _deep_copy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(value)
    return out


def _deep_copy(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in d.items()}


# Keys that moved to the section of the stage, or the shared section, that reads them.
MOVED = {
    "hygiene.near_duplicate_threshold": "near_duplicates.threshold",
    "hygiene.num_perm": "near_duplicates.num_perm",
    "hygiene.shingle_words": "near_duplicates.shingle_words",
    "hygiene.category_field": "representation.category_field",
    "hygiene.min_category_share": "representation.min_category_share",
    "hygiene.languages": "representation.languages",
    "hygiene.min_language_share": "representation.min_language_share",
    "hygiene.language_sample": "representation.language_sample",
    "evaluate.folds": "cv.folds",
    "evaluate.batch_size": "scoring.batch_size",
    "evaluate.max_examples": "scoring.max_examples",
}


def _moved_keys(raw: dict[str, Any]) -> list[str]:
    """One line per key of `raw` that has moved, naming where it went."""
    lines = []
    for old, new in MOVED.items():
        section, key = old.split(".")
        if isinstance(raw.get(section), dict) and key in raw[section]:
            lines.append(f"  {old}: moved to {new} (rename it there, same value)")
    return lines


def parse_params(raw: dict[str, Any], source: str = "params") -> Params:
    """Validate a raw mapping into `Params`; errors name every bad dotted key and the fix."""
    moved = _moved_keys(raw)
    if moved:
        raise ConfigError(f"{source} uses keys that have moved:\n" + "\n".join(moved))
    try:
        return Params(**raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            if err["type"] == "unexpected_keyword_argument":
                lines.append(f"  {key}: unknown key (remove it or fix its spelling)")
            elif err["type"] == "value_error" and isinstance(err.get("input"), dict):
                # A section's own check of settings that conflict: the message names them.
                lines.append(f"  {key}: {err['msg'].removeprefix('Value error, ')}")
            else:
                lines.append(f"  {key}: {err['msg']} (got {err.get('input')!r})")
        raise ConfigError(f"{source} has invalid settings:\n" + "\n".join(lines)) from None
    except TypeError as exc:  # a section given as a scalar, e.g. `train: 3`
        raise ConfigError(f"{source}: {exc}") from None


def load_params(path: Path = DEFAULT_PARAMS, overrides: list[str] | None = None) -> Params:
    """Read `path` (YAML), apply dotted overrides, and return the validated `Params`."""
    if not path.exists():
        raise ConfigError(f"{path}: not found (run from the repository root, or pass --params)")
    if not path.is_file():
        raise ConfigError(f"{path}: not a file; --params takes a YAML file such as params.yaml")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}:{line}: not UTF-8 text (byte {exc.object[exc.start]:#04x}); save it as UTF-8"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if raw is None:
        # Most likely a truncated or overwritten file: running on defaults would hide that.
        raise ConfigError(
            f"{path}: empty; restore it (`git checkout -- {path}`) or write at least the "
            "sections you change (keys left out take their defaults)"
        )
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return parse_params(apply_overrides(raw, overrides or []), source=str(path))
