"""Rebuilding a run (`retune reproduce`): which run a reference names, what it was made from,
the overrides that give its settings, and how its metrics compare with the rebuilt ones.

Pure logic (no MLflow, no git): `flows.reproduce` feeds it the run's tags, params and metrics.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from retune.data.snapshot import INCOMING_DVC_TAG
from retune.errors import RetuneError
from retune.masking import MASK
from retune.release.gate import ABSOLUTE_GATES

# The reproduction's own MLflow run links back to the run it rebuilt with this tag.
REPRODUCTION_OF = "retune.reproduction_of"
DEFAULT_TOLERANCE = 0.01  # relative difference allowed on each gated metric
# Settings never replayed: where files go is the work tree's, where runs go is this store's.
_LOCAL_SECTIONS = ("paths.", "tracking.")
# Shown beside the gated metrics, for information: they do not decide the exit code.
INFORMATIONAL = ("train_loss", "eval_loss", "baseline_perplexity", "mean_nll")

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
_VERSION = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+)$")
_ALIAS = re.compile(r"^(?:models:/)?(?P<name>[^/@]+)@(?P<alias>[\w-]+)$")


@dataclass(frozen=True)
class Ref:
    """What a user named: a run id, a registered version, or a version by alias."""

    kind: Literal["run", "version", "alias"]
    run_id: str = ""
    model_name: str = ""
    version: int = 0
    alias: str = ""

    def __str__(self) -> str:
        if self.kind == "run":
            return f"run {self.run_id}"
        if self.kind == "version":
            return f"models:/{self.model_name}/{self.version}"
        return f"models:/{self.model_name}@{self.alias}"


def parse_ref(text: str) -> Ref:
    """`<run id>`, `models:/<name>/<version>`, `<name>@<alias>` or `models:/<name>@<alias>`."""
    text = text.strip()
    if _RUN_ID.match(text):
        return Ref("run", run_id=text)
    if m := _VERSION.match(text):
        return Ref("version", model_name=m["name"], version=int(m["version"]))
    if m := _ALIAS.match(text):
        return Ref("alias", model_name=m["name"], alias=m["alias"])
    raise RetuneError(
        f"{text!r} names no run: give an MLflow run id (32 hex digits), models:/NAME/VERSION, "
        "or NAME@ALIAS (`retune models` lists versions and aliases)"
    )


@dataclass(frozen=True)
class Provenance:
    """What the run was made from: a commit, whether the tree had changes, the inputs."""

    commit: str
    dirty: bool
    incoming_md5: str


def provenance(run_id: str, tags: Mapping[str, str], allow_dirty: bool) -> Provenance:
    """The run's recorded commit and data version, or the reason it cannot be rebuilt."""
    commit = tags.get("git_commit", "unknown")
    if commit in ("", "unknown"):
        raise RetuneError(
            f"run {run_id} records no git commit (it ran outside a git repository, or before "
            "retune recorded one): its code cannot be checked out"
        )
    dirty = tags.get("git_dirty") == "true"
    if dirty and not allow_dirty:
        raise RetuneError(
            f"run {run_id} was made from a work tree with uncommitted changes on {commit[:12]}: "
            "those changes are not in the commit, so a rebuild may differ. Pass --allow-dirty "
            "to rebuild from the commit anyway"
        )
    md5 = tags.get(INCOMING_DVC_TAG, "")
    if not md5 or md5 == "unknown":
        raise RetuneError(
            f"run {run_id} records no data version of its inputs (tag {INCOMING_DVC_TAG}): "
            "ingest keeps one only inside a DVC repository (`dvc init` in the project), so "
            "runs made before that cannot be rebuilt with their data"
        )
    return Provenance(commit=commit, dirty=dirty, incoming_md5=md5)


def _yaml_value(text: str) -> str:
    """A logged param (str() of the value) as an override's value: None is YAML's null."""
    return "null" if text == "None" else text


def replay_overrides(
    recorded: Mapping[str, str], committed: Mapping[str, str]
) -> tuple[list[str], list[str]]:
    """Dotted overrides that turn the commit's params.yaml (`committed`, flattened as the run
    logged its params) into the run's settings (`recorded`): only keys that differ, never
    paths or tracking, never a masked secret. Also the recorded keys the commit's settings
    do not have, which cannot be replayed."""
    out, unknown = [], []
    # Params that are not settings (MLflow logs a model's inference config into its run too).
    sections = {key.split(".", 1)[0] for key in committed}
    for key, value in sorted(recorded.items()):
        if key.startswith(_LOCAL_SECTIONS) or value == MASK or key.split(".", 1)[0] not in sections:
            continue
        if key not in committed:
            unknown.append(key)
        elif committed[key] != value:
            out.append(f"{key}={_yaml_value(value)}")
    return out, unknown


def gated_metrics(promote_metric: str | None) -> list[str]:
    """The metrics a reproduction must match: the promotion gate's absolute ones and the
    metric its comparison is on."""
    names = [metric for _, metric, _ in ABSOLUTE_GATES]
    if promote_metric and promote_metric not in names:
        names.append(promote_metric)
    return names


@dataclass(frozen=True)
class Row:
    metric: str
    recorded: float | None
    reproduced: float | None
    difference: float | None  # relative (absolute when the recorded value is 0)
    gated: bool
    within: bool


def difference(recorded: float, reproduced: float) -> float:
    """|reproduced - recorded| relative to |recorded|; absolute when recorded is 0; 0 when
    both are the same infinity or both NaN."""
    if recorded == reproduced or (math.isnan(recorded) and math.isnan(reproduced)):
        return 0.0
    delta = abs(reproduced - recorded)
    return delta / abs(recorded) if recorded else delta


def compare(
    recorded: Mapping[str, float],
    reproduced: Mapping[str, float],
    gated: Iterable[str],
    tolerance: float,
) -> list[Row]:
    """Each gated metric the original recorded (then the informational ones), side by side.
    A gated metric is within tolerance when its difference is at most `tolerance`; one the
    reproduction lacks is not."""
    rows = []
    gated = [m for m in gated if m in recorded]
    for name in [*gated, *(m for m in INFORMATIONAL if m in recorded and m not in gated)]:
        was, now = recorded[name], reproduced.get(name)
        diff = None if now is None else difference(was, now)
        rows.append(
            Row(
                metric=name,
                recorded=was,
                reproduced=now,
                difference=diff,
                gated=name in gated,
                within=diff is not None and diff <= tolerance,
            )
        )
    return rows


def passed(rows: Iterable[Row]) -> bool:
    """Every gated metric within tolerance (and at least one was compared)."""
    gated = [r for r in rows if r.gated]
    return bool(gated) and all(r.within for r in gated)
