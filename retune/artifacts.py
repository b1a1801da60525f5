"""The stage graph, declared once: every file the stages hand each other, who writes it, and
per stage what it reads, what it writes and which params sections configure it.

Stages get their paths here (`CLEAN_RECORDS.path(params)`), so a file name is written once; a
missing input is one `MissingInputError` naming the stage to run first. `dvc.yaml`, the flow's
stage list and the CLI's stage commands are checked against `PIPELINE` by tests/test_contracts.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from retune.errors import MissingInputError, RetuneError
from retune.reports import read_json, write_json

if TYPE_CHECKING:
    from retune.config import Params, PathsParams

# How DVC tracks what a stage writes, all of it in the DVC cache (so `dvc metrics diff` and
# `dvc plots diff` compare runs): an output, or a plot. A report with `headline` keys is an
# output too, and those keys are also written to reports/metrics/<report>, a DVC metric: the
# few figures `dvc metrics show` lists, where the full reports' hundreds would bury them.
Tracking = Literal["out", "plot"]
HEADLINE_FOLDER = "metrics"


@dataclass(frozen=True)
class Artifact:
    """One hand-off: `file` inside the folder `params.paths.<folder>` (the folder itself when
    `file` is None), written by the stage `written_by` (None: the user's own input)."""

    folder: str
    file: str | None
    written_by: str | None
    tracking: Tracking = "out"
    headline: tuple[str, ...] = ()

    def path(self, params: Params | PathsParams) -> Path:
        paths = getattr(params, "paths", params)  # a whole Params or just its paths
        base = Path(getattr(paths, self.folder))
        return base / self.file if self.file else base

    def dvc_path(self) -> str:
        """How dvc.yaml names it: data is tracked by folder, reports one file at a time."""
        if self.folder == "reports" and self.file is not None:
            return f"${{paths.reports}}/{self.file}"
        return f"${{paths.{self.folder}}}"

    def headline_path(self, params: Params) -> Path:
        return self.path(params).parent / HEADLINE_FOLDER / str(self.file)

    def headline_dvc_path(self) -> str:
        return f"${{paths.reports}}/{HEADLINE_FOLDER}/{self.file}"

    def require(self, params: Params) -> Path:
        """Its path, or a MissingInputError saying which stage writes it."""
        path = self.path(params)
        if not path.exists():
            raise self.missing(path)
        return path

    def missing(self, path: Path) -> MissingInputError:
        """The error for this hand-off missing at `path` (for a core given paths, not params):
        it names the stage that writes it, and the setting of a folder."""
        setting = f"paths.{self.folder}" if self.file is None else None
        return MissingInputError(path, self.written_by, setting)

    def read(self, params: Params) -> dict[str, Any]:
        """The JSON report or manifest (a missing one names the stage to run first)."""
        return read_json(self.path(params), written_by=self.written_by)

    def read_if_present(self, params: Params) -> dict[str, Any] | None:
        """The JSON report, or None when its stage has not run (optional lineage facts)."""
        return self.read(params) if self.path(params).is_file() else None

    def write(self, params: Params, data: dict[str, Any]) -> Path:
        """Write the report (and its headline keys, where it has some, as the DVC metric)."""
        if self.headline:
            write_json(self.headline_path(params), {k: data.get(k) for k in self.headline})
        return write_json(self.path(params), data)


# The names of the files inside a data folder, shared by every folder that holds records.
RECORDS_FILE = "records.parquet"
MANIFEST_FILE = "manifest.json"
TRAIN_FILE = "train.parquet"
HOLDOUT_FILE = "holdout.parquet"
QUARANTINE_FILE = "quarantine.jsonl"
# The preference set: one row per example in each; `exchanges` accounts for every rating.
KTO_FILE = "kto.parquet"
DPO_FILE = "dpo.parquet"
EXCHANGES_FILE = "exchanges.parquet"

INCOMING = Artifact("incoming", None, None)
# ingest
PREPARED = Artifact("prepared", None, "ingest")
PREPARED_RECORDS = Artifact("prepared", RECORDS_FILE, "ingest")
PREPARED_MANIFEST = Artifact("prepared", MANIFEST_FILE, "ingest")
QUARANTINE = Artifact("quarantine", None, "ingest")
INGEST_REPORT = Artifact(
    "reports", "ingest.json", "ingest", headline=("input_rows", "records", "quarantined_rows")
)
# hygiene
CLEAN = Artifact("clean", None, "hygiene")
CLEAN_RECORDS = Artifact("clean", RECORDS_FILE, "hygiene")
CLEAN_MANIFEST = Artifact("clean", MANIFEST_FILE, "hygiene")
HYGIENE_CHART = Artifact("reports", "hygiene.png", "hygiene")
HYGIENE_REPORT = Artifact(
    "reports", "hygiene.json", "hygiene", headline=("input", "kept", "removed")
)
# validate
VALIDATE_DOCS = Artifact("reports", "validate_docs", "validate")
VALIDATE_REPORT = Artifact(
    "reports", "validate.json", "validate", headline=("n_records", "success")
)
# split
SPLIT = Artifact("split", None, "split")
TRAIN_SPLIT = Artifact("split", TRAIN_FILE, "split")
HOLDOUT_SPLIT = Artifact("split", HOLDOUT_FILE, "split")
SPLIT_REPORT = Artifact("reports", "split.json", "split", headline=("n_train", "n_holdout"))
# preference_data: off `dvc repro` (the feedback store is a live database), like INCOMING a
# folder DVC tracks with `dvc add`.
PREFERENCE_SET = Artifact("preference", None, "preference-data")
PREFERENCE_DATA_REPORT = Artifact("reports", "preference_data.json", "preference-data")
# train: the supervised fine-tune
SFT_MODEL = Artifact("sft", None, "train")
TRAIN_REPORT = Artifact(
    "reports",
    "train.json",
    "train",
    headline=("train_loss", "eval_loss", "steps", "tokens_per_s"),
)
TRAIN_LOSS = Artifact("reports", "train_loss.csv", "train", "plot")
# preference: the candidate every later stage reads (the sft model, preference-tuned or not)
MODEL = Artifact("model", None, "preference")
PREFERENCE_REPORT = Artifact(
    "reports", "preference.json", "preference", headline=("tuned", "steps", "train_loss")
)
# cv
CV_REPORT = Artifact(
    "reports", "cv.json", "cv", headline=("k", "perplexity_mean", "perplexity_std")
)
# Drawn only when cv is on, so not a DVC output (an output must exist after every run).
CV_CHART = Artifact("reports", "cv_folds.png", "cv")
# evaluate
HOLDOUT_SCORES = Artifact("reports", "holdout_scores.parquet", "evaluate")
GENERATIONS = Artifact("reports", "generations.csv", "evaluate")
# Users' held-out rated replies under the candidate, for the gate's ratings check.
RATED_SCORES = Artifact("reports", "rated_scores.parquet", "evaluate")
EVALUATE_REPORT = Artifact(
    "reports",
    "evaluate.json",
    "evaluate",
    headline=(
        "perplexity",
        "perplexity_vs_baseline",
        "bits_per_byte",
        "next_token_accuracy",
        "rouge_l",
        "chrf",
        "unsafe_share",
    ),
)
# register, promote
REGISTER_REPORT = Artifact("reports", "register.json", "register", headline=("version",))
MODEL_CARD = Artifact("reports", "MODEL_CARD.md", "register")
PROMOTE_REPORT = Artifact("reports", "promote.json", "promote", headline=("version", "outcome"))
# Off the pipeline: the flow's summary, `retune drift` and `retune export-feedback`.
FLOW_REPORT = Artifact("reports", "flow.json", "run")
DRIFT_REPORT = Artifact("reports", "drift.json", "drift")
DRIFT_CHART = Artifact("reports", "drift.png", "drift")
MONITOR_PAGE = Artifact("reports", "monitor.html", "monitor")
TUNE_REPORT = Artifact("reports", "tune.json", "tune")
TUNE_BEST = Artifact("reports", "tune_best.txt", "tune")  # the best trial as run overrides
EXPORT_FEEDBACK_REPORT = Artifact("reports", "export_feedback.json", "export-feedback")


@dataclass(frozen=True)
class Stage:
    """A pipeline stage: `tasks/<name>.py`'s `run(params)`, a dvc.yaml stage, a Prefect task."""

    name: str
    summary: str
    reads: tuple[Artifact, ...]
    writes: tuple[Artifact, ...]
    # Params sections (or single dotted keys) the stage reads: its own and the shared ones.
    params: tuple[str, ...]


# In the order the flow runs them (and `dvc repro` resolves them).
PIPELINE = (
    Stage(
        "ingest",
        "Read paths.incoming, normalise, quarantine bad rows, write the prepared snapshot.",
        reads=(INCOMING,),
        writes=(PREPARED_RECORDS, PREPARED_MANIFEST, QUARANTINE, INGEST_REPORT),
        # ingest quarantines a message the contract would reject, so the two limits agree.
        params=("ingest", "validate.min_chars", "validate.max_chars"),
    ),
    Stage(
        "hygiene",
        "Quarantine abusive text, drop near-duplicates, report what the data represents.",
        reads=(PREPARED_RECORDS, PREPARED_MANIFEST),
        writes=(CLEAN_RECORDS, CLEAN_MANIFEST, HYGIENE_CHART, HYGIENE_REPORT),
        params=("hygiene", "near_duplicates", "representation"),
    ),
    Stage(
        "validate",
        "Check the clean data against the data contract (Great Expectations).",
        reads=(CLEAN_RECORDS, CLEAN_MANIFEST, HYGIENE_REPORT),
        writes=(VALIDATE_DOCS, VALIDATE_REPORT),
        # The contract expects no personal data of the kinds ingest redacts, and (under
        # train.loss_on: replies) a reply to train on in every conversation.
        params=("validate", "representation", "ingest.redact", "train.loss_on"),
    ),
    Stage(
        "split",
        "Split clean records into train and holdout by conversation, with no leaks.",
        reads=(CLEAN_RECORDS, VALIDATE_REPORT),
        writes=(TRAIN_SPLIT, HOLDOUT_SPLIT, SPLIT_REPORT),
        params=("split", "near_duplicates"),
    ),
    Stage(
        "train",
        "Fine-tune the model on the train split; start the MLflow run.",
        reads=(TRAIN_SPLIT, HOLDOUT_SPLIT, CLEAN_MANIFEST),
        writes=(SFT_MODEL, TRAIN_REPORT, TRAIN_LOSS),
        params=("seed", "train"),
    ),
    Stage(
        "preference",
        "Tune the supervised model on users' ratings (preference.method), or hand it on.",
        reads=(SFT_MODEL, PREFERENCE_SET, TRAIN_REPORT),
        writes=(MODEL, PREFERENCE_REPORT),
        # train.*: the adapter and precision of the supervised run, the context length.
        params=(
            "seed",
            "preference",
            "train.adapter",
            "train.lora",
            "train.max_seq_len",
            "train.precision",
        ),
    ),
    Stage(
        "cv",
        "Cross-validate (cv.folds folds): mean and spread of holdout metrics.",
        reads=(TRAIN_SPLIT, TRAIN_REPORT),
        writes=(CV_REPORT,),
        params=("seed", "train", "cv", "scoring"),
    ),
    Stage(
        "evaluate",
        "Score the model on the holdout against a unigram baseline.",
        reads=(MODEL, TRAIN_SPLIT, HOLDOUT_SPLIT, TRAIN_REPORT, PREFERENCE_SET),
        writes=(HOLDOUT_SCORES, GENERATIONS, RATED_SCORES, EVALUATE_REPORT),
        # train.base_model: a pretrained base is scored too, to show what fine-tuning bought.
        params=("evaluate", "scoring", "train.base_model", "train.loss_on"),
    ),
    Stage(
        "register",
        "Log the model to MLflow and register a new version.",
        reads=(
            MODEL,
            TRAIN_REPORT,
            PREFERENCE_REPORT,
            EVALUATE_REPORT,
            CLEAN_MANIFEST,
            INGEST_REPORT,
            SPLIT_REPORT,
        ),
        writes=(REGISTER_REPORT, MODEL_CARD),
        params=("register",),
    ),
    Stage(
        "promote",
        "Gate the version register just added against production; move the alias.",
        reads=(
            HOLDOUT_SPLIT,
            TRAIN_REPORT,
            REGISTER_REPORT,
            EVALUATE_REPORT,
            HOLDOUT_SCORES,
            PREFERENCE_SET,
            RATED_SCORES,
        ),
        writes=(PROMOTE_REPORT,),
        # Production is rescored on the tokens the candidate's loss trained (and evaluate scored).
        params=("seed", "promote", "scoring", "register.model_name", "train.loss_on"),
    ),
)
STAGES = {stage.name: stage for stage in PIPELINE}


def pipeline_run_id(params: Params) -> str | None:
    """The pipeline's MLflow run (train started it; later stages log into it), or None when
    train has not run here."""
    report = TRAIN_REPORT.read_if_present(params)
    run_id = report.get("run_id") if report else None
    return str(run_id) if run_id else None


def require_pipeline_run_id(params: Params, needed_by: str) -> str:
    """The pipeline's MLflow run, or an error saying `needed_by` hangs under the train run."""
    run_id = pipeline_run_id(params)
    if run_id is None:
        path = TRAIN_REPORT.path(params)
        if not path.is_file():
            raise MissingInputError(path, "train")
        raise RetuneError(f"{path} names no MLflow run for {needed_by}; rerun `retune train`")
    return run_id


def manifest_version(path: Path) -> str | None:
    """The content hash the manifest at `path` records, or None when there is none yet."""
    if not path.is_file():
        return None
    value = read_json(path).get("data_version")
    return None if value is None else str(value)


def data_version(manifest: Artifact, params: Params) -> str | None:
    """The content hash a manifest records (`PREPARED_MANIFEST`: what ingest wrote,
    `CLEAN_MANIFEST`: what hygiene kept), or None when that stage has not run here."""
    return manifest_version(manifest.path(params))
