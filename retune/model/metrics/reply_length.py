"""Mean length of generated replies in words, as an `evaluate` script.

Loaded by path (`retune.model.metrics.load_metric("reply_length")`): hub metrics cannot load
offline.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """\
Mean reply length in whitespace-separated words, and the share of empty replies. Words, not
model tokens: two models with different tokenizers are compared on the same scale. A model
that stops at once, or rambles to the token limit, shows here before it shows in ROUGE.
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions (`list` of `str`): generated replies.
Returns:
    mean_reply_words (`float`): mean number of whitespace-separated words per reply.
    empty_reply_share (`float`): share of replies with no word at all, in [0, 1].
    n_replies (`int`): how many replies were measured.
Examples:
    >>> length = retune.model.metrics.load_metric("reply_length")
    >>> length.compute(predictions=["one two", "", "three"])["mean_reply_words"]
    1.0
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ReplyLength(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string")}),
        )

    def _compute(self, predictions: list[str]) -> dict[str, float | int]:
        if not predictions:
            raise ValueError("reply_length needs at least one reply")
        words = np.array([len(text.split()) for text in predictions])
        return {
            "mean_reply_words": float(words.mean()),
            "empty_reply_share": float((words == 0).mean()),
            "n_replies": len(words),
        }
