"""Process settings retune owns: offline Hugging Face, telemetry off, quiet tokenizers.

Called once at each edge (CLI, stage `__main__`, flow) before any heavy library is imported.
"""

from __future__ import annotations

import os

# setdefault: a user who is online and wants a hub model sets HF_HUB_OFFLINE=0 themselves.
_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_EVALUATE_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_ENABLE_ASYNC_LOGGING": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "false",
    # The registry's mlflow.transformers flavour warns loudly about unrelated optional deps.
    "TF_CPP_MIN_LOG_LEVEL": "3",
}


def configure_environment() -> None:
    """Set retune's defaults for any of these variables the user has not set."""
    for key, value in _DEFAULTS.items():
        os.environ.setdefault(key, value)
