"""Names the drift check and the retraining trigger share: one definition, so they agree."""

from __future__ import annotations

# Emitted by the `drift-check` flow on drift; the `retrain` deployment's trigger expects it.
DRIFT_EVENT = "retune.drift.detected"


def model_resource_id(model_name: str) -> str:
    """The Prefect event resource id of a registered model (drift events are about it)."""
    return f"retune.model.{model_name}"
