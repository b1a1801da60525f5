"""`retune reproduce`: rebuild a registered model (or any pipeline run) from its MLflow run.

The run's tags name the code (`git_commit`) and the inputs' DVC data version (`incoming_dvc`);
its params are the settings. This checks that commit out into a separate git work tree,
restores the inputs there from the DVC cache or the default DVC remote, replays the settings
as overrides of that commit's params.yaml, runs that commit's stages up to `evaluate` (no
cv, no register, no promote: nothing in the registry moves) and compares the metrics. The
rebuilt run goes into the same MLflow store, tagged `retune.reproduction_of=<run id>`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from retune.artifacts import TRAIN_REPORT
from retune.config import Params
from retune.data.snapshot import INCOMING_DVC_TAG, PREFERENCE_DVC_TAG, dvc_root, restore
from retune.errors import RetuneError
from retune.release.reproduce import (
    REPRODUCTION_OF,
    Provenance,
    Ref,
    Row,
    compare,
    gated_metrics,
    parse_ref,
    passed,
    provenance,
    replay_overrides,
)
from retune.release.tracking import resolved_uri, setup_tracking
from retune.reports import write_json

# Stages a reproduction does not run: folds are extra trainings that decide nothing, and
# register and promote would move the registry.
SKIPPED_STAGES = ("cv", "register", "promote")
LAST_STAGE = "evaluate"
REPORT_FILE = "reproduce.json"
COMPARISON_TABLE = "reproduce/comparison.json"

# Run in the work tree by its own interpreter: that commit's settings, flattened as its train
# stage logged them (secrets masked, cut at MLflow's limit), so the two compare key by key.
_COMMITTED_PARAMS = """
import json
from pathlib import Path
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH as cut
from retune.config import load_params
from retune.masking import safe_params
flat = safe_params(load_params(Path("params.yaml"), []))
print(json.dumps({k: v[:cut] for k, v in flat.items()}))
"""


@dataclass(frozen=True)
class ReproduceResult:
    ref: str
    run_id: str  # the run rebuilt
    reproduction_run_id: str
    commit: str
    data_version: str  # the inputs' DVC data version
    data_from: str  # the DVC cache or remote it was restored from
    overrides: list[str]
    rows: list[Row]
    data_version_matches: bool  # the clean records' data_version tags agree
    tolerance: float
    passed: bool
    wall_s: float
    workdir: str | None  # kept with --keep (or after a failed stage), else removed


def _git(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["git", *args], cwd=root, capture_output=True, text=True, check=check, timeout=300
    )


def project_root(params_file: Path) -> Path:
    """The git repository the params file is in: where the run's commit must be."""
    where = params_file.resolve().parent
    found = _git(where, "rev-parse", "--show-toplevel", check=False)
    if found.returncode != 0:
        raise RetuneError(
            f"{where} is not in a git repository: reproduce checks the run's commit out of the "
            "project's repository; run it from the project"
        )
    return Path(found.stdout.strip())


def resolve_run(client: Any, ref: Ref) -> str:
    """The MLflow run id that `ref` names, with a clear error when it names nothing."""
    from mlflow.exceptions import MlflowException

    try:
        if ref.kind == "run":
            return str(client.get_run(ref.run_id).info.run_id)
        if ref.kind == "version":
            mv = client.get_model_version(ref.model_name, str(ref.version))
        else:
            mv = client.get_model_version_by_alias(ref.model_name, ref.alias)
    except MlflowException:
        raise RetuneError(
            f"{ref} is not in this MLflow store: `retune models` lists the versions and "
            "aliases, the MLflow UI the runs"
        ) from None
    if not mv.run_id:
        raise RetuneError(f"{ref} was registered without an MLflow run: nothing to rebuild")
    return str(mv.run_id)


def _check_commit(root: Path, commit: str) -> None:
    if _git(root, "cat-file", "-e", f"{commit}^{{commit}}", check=False).returncode != 0:
        raise RetuneError(
            f"commit {commit[:12]} is not in the repository at {root}: fetch it (`git fetch`, "
            "or the branch it was pushed to) and retry"
        )


def _new_workdir(workdir: Path | None) -> Path:
    if workdir is None:
        return Path(tempfile.mkdtemp(prefix="retune-reproduce-")) / "tree"
    if workdir.exists() and any(workdir.iterdir()):
        raise RetuneError(f"--workdir {workdir}: not empty; name a new or empty folder")
    if workdir.exists():
        workdir.rmdir()
    return workdir.resolve()


def add_worktree(root: Path, commit: str, workdir: Path | None) -> Path:
    """A detached git work tree of `commit` (in a new temporary folder unless `workdir`)."""
    tree = _new_workdir(workdir)
    made = _git(root, "worktree", "add", "--detach", str(tree), commit, check=False)
    if made.returncode != 0:
        raise RetuneError(f"git worktree add {tree} {commit[:12]}: {made.stderr.strip()}")
    return tree


def remove_worktree(root: Path, tree: Path) -> None:
    _git(root, "worktree", "remove", "--force", str(tree), check=False)
    _git(root, "worktree", "prune", check=False)
    if tree.name == "tree" and tree.parent.name.startswith("retune-reproduce-"):
        shutil.rmtree(tree.parent, ignore_errors=True)


def _env(tree: Path) -> dict[str, str]:
    return os.environ | {"PYTHONPATH": str(tree), "PYTHONUNBUFFERED": "1"}


def committed_params(tree: Path) -> dict[str, str]:
    """The commit's params.yaml as its own code reads and logs it."""
    done = subprocess.run(
        [sys.executable, "-c", _COMMITTED_PARAMS],
        cwd=tree,
        env=_env(tree),
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:]
        raise RetuneError(
            f"the commit's code cannot read its params.yaml in {tree}: "
            f"{tail[0] if tail else 'no output'}"
        )
    flat: dict[str, str] = json.loads(done.stdout.strip().splitlines()[-1])
    return flat


def stages(tree: Path) -> list[str]:
    """The commit's dvc.yaml stages up to LAST_STAGE, less SKIPPED_STAGES, in order."""
    declared = list((yaml.safe_load((tree / "dvc.yaml").read_text()) or {}).get("stages", {}))
    if LAST_STAGE not in declared:
        raise RetuneError(f"the commit's dvc.yaml has no {LAST_STAGE!r} stage: nothing to compare")
    upto = declared[: declared.index(LAST_STAGE) + 1]
    return [name for name in upto if name not in SKIPPED_STAGES]


def _tree_paths(recorded: dict[str, str]) -> tuple[dict[str, Path], list[str]]:
    """Each `paths.*` setting as a path inside the work tree, and overrides for those the run
    had outside the project (absolute), so that nothing the rebuild writes lands there."""
    relative: dict[str, Path] = {"incoming": Path("data/incoming")}
    moved = []
    for key, value in recorded.items():
        if key.startswith("paths.") and value not in ("None", ""):
            name = key.removeprefix("paths.")
            if Path(value).is_absolute():
                relative[name] = Path("reproduce") / name
                moved.append(f"{key}={relative[name].as_posix()}")
            else:
                relative[name] = Path(value)
    return relative, moved


def restore_data(
    data_root: Path, run_id: str, tags: dict[str, str], tree: Path, where: dict[str, Path]
) -> str:
    """Restore the run's inputs (and its preference data, when it was tuned on some kept as a
    data version) into the work tree. Returns where the inputs came from."""
    md5 = tags[INCOMING_DVC_TAG]
    source = restore(data_root, md5, tree / where["incoming"], f"run {run_id}'s inputs")
    print(f"reproduce: inputs {md5} restored from {source} into {where['incoming']}", flush=True)
    preference = tags.get(PREFERENCE_DVC_TAG)
    folder = where.get("preference", Path("data/preference"))
    if preference:
        came = restore(data_root, preference, tree / folder, f"run {run_id}'s preference data")
        print(f"reproduce: preference data {preference} restored from {came}", flush=True)
    elif tags.get("preference", "").startswith("tuned"):
        print(
            "reproduce: warning: the run was preference-tuned on data that was not kept as a DVC "
            "data version (it ran before retune kept one): the rebuild is not tuned on it, so "
            "its metrics may differ",
            flush=True,
        )
    return source


def _base_model(root: Path, recorded: dict[str, str]) -> list[str]:
    """A pretrained base the run named by a path inside the project (`models/base/...`, which
    git does not hold) is read from the project: the work tree has no copy."""
    base = recorded.get("train.base_model", "scratch")
    if base == "scratch" or Path(base).is_absolute() or not (root / base).is_dir():
        return []
    return [f"train.base_model={(root / base).resolve()}"]


def run_stages(tree: Path, names: list[str], overrides: list[str], log: Path) -> None:
    """Run each stage as `dvc repro` would (`python -m tasks.<stage>`), in the work tree with
    its own code; their output goes to the console and to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w", encoding="utf-8") as fh:
        for i, name in enumerate(names, 1):
            print(f"reproduce: [{i}/{len(names)}] {name}", flush=True)
            started = time.perf_counter()
            proc = subprocess.Popen(
                [sys.executable, "-m", f"tasks.{name}", *overrides],
                cwd=tree,
                env=_env(tree),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            assert proc.stdout is not None
            for line in proc.stdout:
                fh.write(line)
                print(f"  {line}", end="", flush=True)
            if proc.wait() != 0:
                raise StageFailed(
                    f"stage {name} of the rebuild failed (exit {proc.returncode}); its output "
                    f"is in {log}; the work tree {tree} is kept to look into"
                )
            print(f"reproduce: {name} done in {time.perf_counter() - started:.1f} s", flush=True)


class StageFailed(RetuneError):
    """A stage of the rebuild exited non-zero (the work tree is kept)."""


def _record(client: Any, original: str, new: str, rows: list[Row], ok: bool) -> None:
    """Link the rebuilt run to the original and log the comparison into it."""
    import pandas as pd
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

    client.set_tag(new, REPRODUCTION_OF, original)
    client.set_tag(new, MLFLOW_RUN_NAME, f"reproduce-{original[:8]}")
    client.set_tag(new, "retune.reproduce.passed", str(ok).lower())
    table = pd.DataFrame([asdict(r) for r in rows])
    client.log_table(new, data=table, artifact_file=COMPARISON_TABLE)


def reproduce(
    params: Params,
    params_file: Path,
    reference: str,
    allow_dirty: bool = False,
    tolerance: float = 0.01,
    keep: bool = False,
    workdir: Path | None = None,
) -> ReproduceResult:
    """Rebuild the run `reference` names (see the module) and compare its metrics."""
    from mlflow import MlflowClient

    started = time.perf_counter()
    ref = parse_ref(reference)
    setup_tracking(params.tracking)
    client = MlflowClient()
    run_id = resolve_run(client, ref)
    original = client.get_run(run_id)
    recorded = dict(original.data.params)
    source: Provenance = provenance(run_id, original.data.tags, allow_dirty)
    root = project_root(params_file)
    data_root = dvc_root(root)
    if data_root is None:
        raise RetuneError(f"{root} is not a DVC repository: its data versions cannot be restored")
    _check_commit(root, source.commit)
    print(f"reproduce: {ref} is run {run_id}, commit {source.commit[:12]}", flush=True)

    tree = add_worktree(root, source.commit, workdir)
    kept = keep
    try:
        where, moved = _tree_paths(recorded)
        data_from = restore_data(data_root, run_id, dict(original.data.tags), tree, where)
        replayed, unknown = replay_overrides(recorded, committed_params(tree))
        if unknown:
            print(
                f"reproduce: warning: {len(unknown)} recorded settings are not in the commit's "
                f"params.yaml and are not replayed: {', '.join(unknown[:5])}",
                flush=True,
            )
        store = [
            f"tracking.uri={resolved_uri(params.tracking.uri)}",
            f"tracking.artifacts={Path(params.tracking.artifacts).resolve()}",
            f"tracking.experiment={client.get_experiment(original.info.experiment_id).name}",
        ]
        overrides = replayed + moved + _base_model(root, recorded) + store
        if replayed:
            print(f"reproduce: the run's own settings: {' '.join(replayed)}", flush=True)
        try:
            run_stages(tree, stages(tree), overrides, tree / "reproduce.log")
        except StageFailed:
            kept = True
            raise
        folder = where.get(TRAIN_REPORT.folder, Path(TRAIN_REPORT.folder))
        train_report = tree / folder / str(TRAIN_REPORT.file)
        new_id = str(json.loads(train_report.read_text(encoding="utf-8"))["run_id"])
        rebuilt = client.get_run(new_id)
        rows = compare(
            original.data.metrics,
            rebuilt.data.metrics,
            gated_metrics(recorded.get("promote.metric")),
            tolerance,
        )
        same_data = original.data.tags.get("data_version") == rebuilt.data.tags.get("data_version")
        ok = passed(rows) and same_data
        _record(client, run_id, new_id, rows, ok)
    finally:
        if not kept:
            remove_worktree(root, tree)
    result = ReproduceResult(
        ref=str(ref),
        run_id=run_id,
        reproduction_run_id=new_id,
        commit=source.commit,
        data_version=source.incoming_md5,
        data_from=data_from,
        overrides=replayed,
        rows=rows,
        data_version_matches=same_data,
        tolerance=tolerance,
        passed=ok,
        wall_s=round(time.perf_counter() - started, 1),
        workdir=str(tree) if kept else None,
    )
    write_json(params.paths.reports / REPORT_FILE, asdict(result))
    return result
