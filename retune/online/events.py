"""Names the flows share (the drift event, the deployments it and the data check start): one
definition, so the deployments, their triggers and the checks that run them agree.
"""

from __future__ import annotations

# Deployment names in Prefect's "<flow name>/<deployment name>" form.
RETRAIN_DEPLOYMENT = "retrain/retrain"
DATA_CHECK_DEPLOYMENT = "data-check/data-check"
DRIFT_CHECK_DEPLOYMENT = "drift-check/drift-check"

# Emitted by the `drift-check` flow on drift; the `retrain` deployment's trigger expects it.
DRIFT_EVENT = "retune.online.drift.detected"


def model_resource_id(model_name: str) -> str:
    """The Prefect event resource id of a registered model (drift events are about it)."""
    return f"retune.model.{model_name}"
