"""The model registry as retune uses it: aliases, recorded gate decisions, promotion history.

Production is the alias `production` of `register.model_name`. Every alias move is also an
MLflow run in the experiment `<tracking.experiment>-promotions` (browsable in the MLflow UI),
which is what `history` reads and `rollback` replays. Used by `tasks.promote` and the CLI.
"""

from __future__ import annotations

import dataclasses
import getpass
import json
import math
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retune.config import TrackingParams
from retune.errors import RetuneError

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from retune.release.gate import Decision

PRODUCTION = "production"
CHALLENGER = "challenger"
GATE_ACTOR = "gate"
# Model version tag values are capped by the store; a reason is a sentence or two anyway.
_MAX_TAG = 4_000


class RegistryError(RetuneError):
    """The registry cannot do what was asked (no such version, nothing to roll back to, ...)."""


def cli_actor() -> str:
    """`cli:<user>` for decisions a person made from the command line."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no login name, e.g. a container with an unnamed uid
        user = "unknown"
    return f"cli:{user}"


def _now() -> datetime:
    return datetime.now(UTC)


def _int_or_none(value: str | None) -> int | None:
    return int(value) if value not in (None, "", "none") else None


@dataclass(frozen=True)
class VersionInfo:
    """One registered version as `retune models` shows it."""

    version: int
    aliases: tuple[str, ...]
    created: datetime
    run_id: str | None
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def decision(self) -> str | None:
        decision = self.tags.get("gate.decision")
        if decision and self.tags.get("gate.forced") == "true":
            return f"{decision} (forced)"
        return decision

    def metric(self, name: str) -> float | None:
        try:
            return float(self.tags[name])
        except (KeyError, ValueError):
            return None


@dataclass(frozen=True)
class Event:
    """One alias move: who moved `alias` from which version to which, when and why."""

    when: datetime
    model_name: str
    alias: str
    kind: str  # promote | propose | rollback
    from_version: int | None
    to_version: int
    forced: bool
    actor: str
    why: str
    run_id: str = ""


@dataclass(frozen=True)
class Registry:
    """A registered model's versions, aliases and promotion history in the tracking store."""

    client: MlflowClient
    tracking: TrackingParams
    model_name: str

    @classmethod
    def open(cls, tracking: TrackingParams, model_name: str) -> Registry:
        """Point MLflow at `tracking` (store and registry) and return the model's registry."""
        from mlflow import MlflowClient

        from retune.release.tracking import setup_tracking

        setup_tracking(tracking)
        return cls(client=MlflowClient(), tracking=tracking, model_name=model_name)

    def exists(self) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(self.model_name)
        except MlflowException:
            return False
        return True

    def aliases(self) -> dict[str, int]:
        """alias -> version for every alias of the model ({} if it is not registered yet)."""
        from mlflow.exceptions import MlflowException

        try:
            model = self.client.get_registered_model(self.model_name)
        except MlflowException:
            return {}
        return {alias: int(version) for alias, version in (model.aliases or {}).items()}

    def production(self) -> int | None:
        """The version the alias `production` points at, None when there is none yet."""
        return self.aliases().get(PRODUCTION)

    def version(self, version: int) -> VersionInfo:
        from mlflow.exceptions import MlflowException

        try:
            mv = self.client.get_model_version(self.model_name, str(version))
        except MlflowException:
            raise RegistryError(
                f"{self.model_name} has no version {version} in tracking.uri="
                f"{self.tracking.uri}; `retune models` lists the versions"
            ) from None
        return self._info(mv, self.aliases())

    def versions(self) -> list[VersionInfo]:
        """Every version, newest first, with its aliases and tags."""
        aliases = self.aliases()
        found = self.client.search_model_versions(f"name='{self.model_name}'")
        infos = [self._info(mv, aliases) for mv in found]
        return sorted(infos, key=lambda v: v.version, reverse=True)

    def trained_ids(self, info: VersionInfo, source: str, train_file: Path) -> set[str] | None:
        """The record ids of input file `source` that version `info` trained on: from the train
        rows its run logged at register, else (a version registered before those were logged)
        the workspace's `train_file` when the run's `train_file_sha256` says it is the same
        file; None when neither tells."""
        import pyarrow.parquet as pq
        from mlflow.artifacts import download_artifacts
        from mlflow.exceptions import MlflowException

        from retune.data.lineage import TRAIN_ROWS_ARTIFACT
        from retune.model.checkpoints import file_sha256

        if info.run_id is None:
            return None
        with tempfile.TemporaryDirectory() as tmp:
            try:
                path = download_artifacts(
                    run_id=info.run_id, artifact_path=TRAIN_ROWS_ARTIFACT, dst_path=tmp
                )
            except (MlflowException, OSError):
                path = None
            if path is not None:
                rows = pq.read_table(path, columns=["id"], filters=[("source", "=", source)])
                return set(rows.column("id").to_pylist())
        try:
            recorded = self.client.get_run(info.run_id).data.tags.get("train_file_sha256")
        except MlflowException:
            return None
        if recorded is None or not train_file.is_file() or file_sha256(train_file) != recorded:
            return None
        rows = pq.read_table(train_file, columns=["id"], filters=[("source", "=", source)])
        return set(rows.column("id").to_pylist())

    @staticmethod
    def _info(mv: Any, aliases: Mapping[str, int]) -> VersionInfo:
        version = int(mv.version)
        return VersionInfo(
            version=version,
            aliases=tuple(sorted(a for a, v in aliases.items() if v == version)),
            created=datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC),
            run_id=mv.run_id,
            tags=dict(mv.tags or {}),
        )

    def record_decision(
        self,
        version: int,
        decision: Decision,
        candidate_metrics: Mapping[str, Any],
        champion_metrics: Mapping[str, Any] | None,
        compared_version: int | None,
        decided_by: str,
        ratings: Mapping[str, Any] | None = None,
    ) -> dict[str, str]:
        """Tag `version` with the gate's decision (and its check of users' held-out ratings,
        `RatingsComparison.to_dict`, when it ran); returns the tags (the latest decision wins
        on the version; every alias move is also kept in the promotion history)."""

        def number(value: float | None) -> str:
            return "none" if value is None or not math.isfinite(value) else repr(float(value))

        tags = {
            "gate.decision": decision.outcome,
            "gate.reason": decision.reason[:_MAX_TAG],
            "gate.compared_version": str(compared_version) if compared_version else "none",
            "gate.candidate_metrics": _json(candidate_metrics),
            "gate.champion_metrics": _json(champion_metrics) if champion_metrics else "none",
            "gate.ci_low": number(decision.ci_low),
            "gate.ci_high": number(decision.ci_high),
            "gate.decided_by": decided_by,
            "gate.decided_at": _now().isoformat(),
            "gate.forced": str(decision.forced).lower(),
            "gate.ratings": _json(ratings) if ratings else "none",
        }
        for key, value in tags.items():
            self.client.set_model_version_tag(self.model_name, str(version), key, value)
        return tags

    def move_alias(
        self, alias: str, version: int, *, kind: str, why: str, forced: bool, actor: str
    ) -> Event:
        """Point `alias` at `version` and record the move in the promotion history."""
        from mlflow.exceptions import MlflowException

        before = self.aliases()
        try:
            self.client.set_registered_model_alias(self.model_name, alias, str(version))
        except MlflowException as exc:
            raise RegistryError(
                f"could not point {self.model_name}@{alias} at version {version}: {exc.message}"
            ) from exc
        if alias == PRODUCTION and before.get(CHALLENGER) == version:
            # The proposal was taken: the version is no longer merely a challenger.
            self.client.delete_registered_model_alias(self.model_name, CHALLENGER)
        event = Event(
            when=_now(),
            model_name=self.model_name,
            alias=alias,
            kind=kind,
            from_version=before.get(alias),
            to_version=version,
            forced=forced,
            actor=actor,
            why=why,
        )
        return self._log_event(event)

    def _promotions_experiment(self, create: bool) -> str | None:
        name = f"{self.tracking.experiment}-promotions"
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return str(exp.experiment_id)
        if not create:
            return None
        # An explicit artifact location, as for the main experiment: otherwise MLflow picks
        # ./mlruns of whatever directory the process runs in.
        artifacts = (Path(self.tracking.artifacts) / "promotions").resolve()
        artifacts.mkdir(parents=True, exist_ok=True)
        return str(self.client.create_experiment(name, artifact_location=artifacts.as_uri()))

    def _log_event(self, event: Event) -> Event:
        from mlflow.entities import Param

        exp_id = self._promotions_experiment(create=True)
        assert exp_id is not None
        fields = {
            "model_name": event.model_name,
            "alias": event.alias,
            "kind": event.kind,
            "version": str(event.to_version),
            "from_version": str(event.from_version) if event.from_version else "none",
            "to_version": str(event.to_version),
            "when": event.when.isoformat(),
            "forced": str(event.forced).lower(),
            "actor": event.actor,
            "why": event.why[:_MAX_TAG],
        }
        start = int(event.when.timestamp() * 1000)
        source = "none" if event.from_version is None else f"v{event.from_version}"
        target = f"{self.model_name}@{event.alias}"
        run = self.client.create_run(
            exp_id,
            start_time=start,
            tags=fields,
            run_name=f"{event.kind} {target}: {source} -> v{event.to_version}",
        )
        # Params as well as tags: immutable once written, and shown as columns in the UI.
        self.client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in fields.items()])
        self.client.set_terminated(run.info.run_id, end_time=start)
        return dataclasses.replace(event, run_id=run.info.run_id)

    def history(self) -> list[Event]:
        """Every recorded alias move of the model, newest first."""
        exp_id = self._promotions_experiment(create=False)
        if exp_id is None:
            return []
        events: list[Event] = []
        token = None
        while True:
            page = self.client.search_runs(
                [exp_id],
                filter_string=f"tags.model_name = '{self.model_name}'",
                max_results=1_000,
                page_token=token,
            )
            for run in page:
                tags = run.data.tags
                events.append(
                    Event(
                        when=datetime.fromisoformat(tags["when"]),
                        model_name=tags["model_name"],
                        alias=tags.get("alias", PRODUCTION),
                        kind=tags["kind"],
                        from_version=_int_or_none(tags.get("from_version")),
                        to_version=int(tags["to_version"]),
                        forced=tags.get("forced") == "true",
                        actor=tags.get("actor", "unknown"),
                        why=tags.get("why", ""),
                        run_id=run.info.run_id,
                    )
                )
            token = page.token
            if not token:
                break
        return sorted(events, key=lambda e: e.when, reverse=True)

    def previous_production(self) -> int:
        """The version that was production before the current one, replaying the history as a
        stack (a promotion pushes, a rollback pops), so repeated rollbacks keep going back."""
        current = self.production()
        if current is None:
            raise RegistryError(f"{self.model_name} has no production version to roll back")
        stack: list[int] = []
        for event in reversed(self.history()):
            if event.alias != PRODUCTION:
                continue
            if event.kind == "rollback":
                if stack:
                    stack.pop()
            else:
                stack.append(event.to_version)
        # Drop the current version (more than once if it was promoted twice in a row; also
        # when the alias was moved outside retune, the newest recorded one is the previous).
        while stack and stack[-1] == current:
            stack.pop()
        if not stack:
            raise RegistryError(
                f"{self.model_name}@production is v{current} and the promotion history holds "
                "no earlier production version to roll back to; `retune promote <version> "
                '--force --reason "..."` can point production at any version'
            )
        return stack[-1]

    def rollback(self, actor: str, why: str | None = None) -> Event:
        """Move `production` back to the previous production version and record it."""
        current = self.production()
        target = self.previous_production()
        return self.move_alias(
            PRODUCTION,
            target,
            kind="rollback",
            why=why or f"rolled back from v{current} to v{target}",
            forced=False,
            actor=actor,
        )


def load_version(model_name: str, version: int, log_prefix: str = "registry") -> tuple[Any, Any]:
    """(model, tokenizer) of a registered version, loaded from the registry (not a local
    folder), as any client of the registry would get it. MLflow must already point at the
    store (`Registry.open` does that)."""
    import mlflow

    print(f"{log_prefix}: loading {model_name} v{version} from the registry", flush=True)
    components = mlflow.transformers.load_model(
        f"models:/{model_name}/{version}", return_type="components"
    )
    return components["model"], components["tokenizer"]


def _json(metrics: Mapping[str, Any]) -> str:
    clean = {
        k: (float(v) if isinstance(v, int | float) and not isinstance(v, bool) else v)
        for k, v in metrics.items()
    }
    return json.dumps(clean, sort_keys=True, default=str)[:_MAX_TAG]
