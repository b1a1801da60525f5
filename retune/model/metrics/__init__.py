"""retune's metrics as `evaluate` metric scripts, kept in the repository and loaded by path.

`evaluate.load("perplexity")` fetches from the hub and fails offline; a script loaded by its
path does not. Used by the `evaluate` stage and by anyone scoring a retune model by hand.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import evaluate

METRICS_DIR = Path(__file__).resolve().parent
NAMES = (
    "perplexity",
    "next_token_accuracy",
    "rouge_l",
    "chrf",
    "distinct_n",
    "reply_length",
    "unsafe_share",
)


def metric_path(name: str) -> Path:
    """The metric script for `name` (one of `NAMES`)."""
    if name not in NAMES:
        raise ValueError(f"unknown retune metric {name!r}; known: {', '.join(NAMES)}")
    return METRICS_DIR / f"{name}.py"


def load_metric(name: str, cache_dir: Path | None = None) -> evaluate.EvaluationModule:
    """Load retune's metric `name` by path (offline-safe).

    `cache_dir` is where `add_batch` spills its Arrow rows until `compute` (which deletes them);
    give a private temporary folder so concurrent runs never share evaluate's default cache
    file and lock under ~/.cache/huggingface/metrics.
    """
    import evaluate

    return evaluate.load(
        str(metric_path(name)), cache_dir=str(cache_dir) if cache_dir is not None else None
    )
