"""Stage `preference_data`: the feedback store's rated exchanges as a versioned preference set,
checked against its own data contract.

Runs as `python -m tasks.preference_data`, as `preference_data_task` in the retrain flow and as
`retune preference-data`. Writes `paths.preference` (`retune.data.preference.PREFERENCE_FILES`:
KTO examples, DPO pairs, every rated exchange with its outcome, a manifest with the content
hash) and reports/preference_data.json, then `dvc add`s the folder where DVC tracks it: the
store is a live database outside the pipeline, as `paths.incoming` is.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retune.artifacts import PREFERENCE_DATA_REPORT, PREFERENCE_SET
from retune.config import Params, PreferenceDataParams
from retune.data.gx_batches import (
    BATCH_ROWS,
    ExpectationOutcome,
    Records,
    gx_context,
    suite_outcomes,
    validate_in_batches,
)
from retune.data.pii import PLACEHOLDERS, WORDS
from retune.data.pii_expectation import pii_expectation, pii_in
from retune.data.preference import (
    DPO_FILE,
    EXCHANGES_FILE,
    KTO_FILE,
    MANIFEST_FILE,
    SKIP_REASONS,
    PreferenceSet,
    build,
    text_of,
)
from retune.data.versioning import dvc_add
from retune.entry import stage_main, stage_task
from retune.env import configure_environment
from retune.errors import DataValidationError

if TYPE_CHECKING:
    import pandas as pd
    from great_expectations.expectations import Expectation

# Contract failures that stop the flow: the set holds what it must never hold. Too few
# examples only leave preference tuning off (`ready` false), since ratings accrue over time.
_BLOCKING = ("prompt_fits",)


@dataclass(frozen=True)
class PreferenceDataResult:
    folder: Path
    data_version: str
    counts: dict[str, Any]
    contract: tuple[ExpectationOutcome, ...]
    ready: dict[str, bool]  # per method: the contract's counts for it are met
    dvc: str
    next_step: str | None = None


def contract_frame(rows: list[dict[str, Any]], kind: str) -> pd.DataFrame:
    """The examples (`kind` "kto") or pairs ("dpo") of the train split as the contract reads
    them: located as feedback:<feedback id>, their text joined, label columns for the counts."""
    import pandas as pd

    train = [r for r in rows if r["split"] == "train"]
    texts = [text_of(r) for r in train]
    columns: dict[str, pd.Series] = {
        "source": pd.Series(["feedback"] * len(train), dtype="object"),
        "line": pd.Series([int(r["feedback_id"]) for r in train], dtype="int64"),
        "id": pd.Series([str(r["id"]) for r in train], dtype="object"),
        "text": pd.Series(texts, dtype="object"),
        "n_chars": pd.Series([len(t) for t in texts], dtype="int64"),
    }
    if kind == "kto":
        desirable = [int(bool(r["label"])) for r in train]
        columns["desirable"] = pd.Series(desirable, dtype="int64")
        columns["undesirable"] = pd.Series([1 - d for d in desirable], dtype="int64")
    return pd.DataFrame(columns)


def build_suite(kind: str, cfg: PreferenceDataParams, redact: tuple[str, ...]) -> list[Expectation]:
    """The preference set's contract for the KTO examples or DPO pairs of the train split."""
    import great_expectations as gx

    ge = gx.expectations
    if kind == "kto":
        counts: list[Expectation] = [
            ge.ExpectColumnSumToBeBetween(
                column=label,
                min_value=cfg.min_per_label,
                meta={"name": f"min_{label}"},
                description=(
                    f"At least {cfg.min_per_label} {label} examples to tune on "
                    "(preference_data.min_per_label)."
                ),
            )
            for label in ("desirable", "undesirable")
        ]
    else:
        counts = [
            ge.ExpectTableRowCountToBeBetween(
                min_value=cfg.min_per_label,
                meta={"name": "min_pairs"},
                description=(
                    f"At least {cfg.min_per_label} pairs (a corrected and a served reply) to "
                    "tune on (preference_data.min_per_label)."
                ),
            )
        ]
    no_pii: Any = pii_expectation()
    return [
        *counts,
        ge.ExpectColumnValuesToBeBetween(
            column="n_chars",
            max_value=cfg.max_chars,
            meta={"name": "prompt_fits"},
            description=(
                f"Prompt and replies fit the tuning context: at most {cfg.max_chars} characters "
                "(preference_data.max_chars)."
            ),
        ),
        *(
            no_pii(
                column="text",
                kind=kind_,
                meta={"name": f"no_{kind_}"},
                description=f"No text still contains {WORDS.get(kind_, kind_)} (ingest.redact).",
            )
            for kind_ in redact
        ),
    ]


def _problem(
    name: str, count: int | None, observed: Any, cfg: PreferenceDataParams, error: str | None
) -> str:
    if error:
        return f"could not be checked: {error}"
    if name.startswith("min_"):
        what = {"min_pairs": "pairs"}.get(name, f"{name[4:]} examples")
        return (
            f"{observed} {what} to tune on, preference_data.min_per_label is "
            f"{cfg.min_per_label}: collect more ratings (or corrections), or lower it"
        )
    if name == "prompt_fits":
        return f"{count} over preference_data.max_chars={cfg.max_chars} characters"
    kind = name[3:]
    return (
        f"{count} still contain {WORDS.get(kind, kind)}: it should read "
        f"{PLACEHOLDERS.get(kind, kind)}; the feedback export redacts it, so report this"
    )


def check(
    pset: PreferenceSet, cfg: PreferenceDataParams, redact: tuple[str, ...], rows_shown: int
) -> dict[str, tuple[ExpectationOutcome, ...]]:
    """The contract's outcomes for the KTO examples and for the DPO pairs (train split)."""
    found = {}
    for kind, rows in (("kto", pset.kto), ("dpo", pset.dpo)):
        expectations = build_suite(kind, cfg, redact)
        suite_result, offending = validate_in_batches(
            gx_context(None),
            Records(contract_frame(rows, kind)),
            f"retune_preference_{kind}",
            expectations,
            rows_shown,
            f"preference {kind}",
            BATCH_ROWS,
            after_batch=pii_in.cache_clear,
        )
        found[kind] = suite_outcomes(
            expectations,
            suite_result,
            offending,
            lambda name, count, observed, error: _problem(name, count, observed, cfg, error),
        )
    return found


def raise_if_unsafe(outcomes: dict[str, tuple[ExpectationOutcome, ...]]) -> None:
    """DataValidationError naming each failed expectation that stops the set being written
    (personal data, over-long examples) and its rows; too few examples do not."""
    lines = []
    for kind, found in outcomes.items():
        for o in found:
            if not o.success and (o.name in _BLOCKING or o.name.startswith("no_")):
                lines.append(f"  {kind} {o.name}: {o.problem}")
                lines.extend(f"    {row.where()}: {row.snippet}" for row in o.rows)
    if lines:
        raise DataValidationError(
            "the preference set broke its contract; nothing was written:\n" + "\n".join(lines)
        )


def _table(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> Any:
    import pyarrow as pa

    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    types = {
        "id": pa.string(),
        "interaction_id": pa.string(),
        "feedback_id": pa.int64(),
        "model_version": pa.string(),
        "prompt": pa.list_(message),
        "completion": pa.string(),
        "chosen": pa.string(),
        "rejected": pa.string(),
        "label": pa.bool_(),
        "origin": pa.string(),
        "split": pa.string(),
        "outcome": pa.string(),
    }
    schema = pa.schema([(c, types[c]) for c in columns])
    return pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in rows], schema=schema)


_COMMON = ("id", "interaction_id", "feedback_id", "model_version", "prompt")
KTO_COLUMNS = (*_COMMON, "completion", "label", "origin", "split")
DPO_COLUMNS = (*_COMMON, "chosen", "rejected", "split")
EXCHANGE_COLUMNS = ("interaction_id", "feedback_id", "model_version", "outcome")


def data_version(pset: PreferenceSet) -> str:
    """Content hash of the examples and pairs: the same ratings give the same version."""
    digest = hashlib.sha256()
    for rows in (pset.kto, pset.dpo):
        for row in rows:
            digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()


def write(pset: PreferenceSet, folder: Path, manifest: dict[str, Any]) -> None:
    """Replace `folder` with the set's files, whole: a reader never sees half of one."""
    import pyarrow.parquet as pq

    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    pq.write_table(_table(pset.kto, KTO_COLUMNS), tmp / KTO_FILE)
    pq.write_table(_table(pset.dpo, DPO_COLUMNS), tmp / DPO_FILE)
    pq.write_table(_table(pset.exchanges, EXCHANGE_COLUMNS), tmp / EXCHANGES_FILE)
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    old = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def run(params: Params) -> PreferenceDataResult:
    """Edge: read every rating of `register.model_name` from the feedback store, build the
    preference set, check its contract, write `paths.preference` and
    reports/preference_data.json; raise DataValidationError (writing nothing) if the set holds
    what it must not (personal data, over-long examples)."""
    configure_environment()
    from retune.online.feedback import FeedbackStore

    cfg = params.preference_data
    store = FeedbackStore.open(params.feedback.store_url)
    try:
        feedback = store.feedback_frame(model_name=params.register.model_name)
    finally:
        store.close()
    redact = tuple(dict.fromkeys(params.ingest.redact))
    pset = build(feedback, cfg, redact, params.ingest.max_message_chars)
    counts = pset.counts()
    print(
        f"preference_data: {counts['exchanges']} rated exchanges of "
        f"{params.register.model_name}: "
        + ", ".join(f"{n} {outcome}" for outcome, n in counts["outcomes"].items()),
        flush=True,
    )
    outcomes = check(pset, cfg, redact, params.validate.failed_rows_shown)
    raise_if_unsafe(outcomes)
    ready = {kind: all(o.success for o in found) for kind, found in outcomes.items()}
    version = data_version(pset)
    folder = PREFERENCE_SET.path(params)
    write(pset, folder, {"data_version": version, "ready": ready, **counts})
    dvc, step = dvc_add(folder, "preference_data")
    result = PreferenceDataResult(
        folder, version, counts, outcomes["kto"] + outcomes["dpo"], ready, dvc, step
    )
    PREFERENCE_DATA_REPORT.write(params, report_dict(result, outcomes))
    for kind, found in outcomes.items():
        unmet = "; ".join(o.problem for o in found if not o.success)
        state = f"not ready: {unmet}" if unmet else f"ready ({_sizes(counts, kind)})"
        print(f"preference_data: {kind}: {state}", flush=True)
    print(f"preference_data: wrote {folder} (data version {version[:12]}); DVC: {dvc}", flush=True)
    if step:
        print(f"preference_data: next: {step}", flush=True)
    return result


def _sizes(counts: dict[str, Any], kind: str) -> str:
    if kind == "kto":
        train = counts["kto"]["train"]
        return f"{train['desirable']} desirable, {train['undesirable']} undesirable"
    return f"{counts['dpo']['train']} pairs"


def report_dict(
    result: PreferenceDataResult, outcomes: dict[str, tuple[ExpectationOutcome, ...]]
) -> dict[str, Any]:
    return {
        "folder": str(result.folder),
        "data_version": result.data_version,
        **result.counts,
        "skip_reasons": {k: v for k, v in SKIP_REASONS.items() if k in result.counts["outcomes"]},
        "ready": result.ready,
        "contract": {
            kind: [
                {
                    "name": o.name,
                    "success": o.success,
                    "problem": None if o.success else o.problem,
                    "observed_value": o.observed_value,
                    "unexpected_count": o.unexpected_count,
                }
                for o in found
            ]
            for kind, found in outcomes.items()
        },
        "dvc": result.dvc,
    }


preference_data_task = stage_task(run, name="preference_data")

if __name__ == "__main__":
    stage_main(run)
