"""Next-token accuracy (greedy top-1 hits per predicted token), as an `evaluate` metric script.

Loaded by path (`retune.model.metrics.load_metric("next_token_accuracy")`): hub metrics cannot load
offline. Fed per-example counts with `add_batch`, so memory does not grow with the vocabulary.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """\
Next-token accuracy of a causal language model: the share of predicted positions where the
model's most likely token (argmax of the logits) is the token that actually follows. It is a
micro average over tokens, like perplexity, and readable where perplexity is not: 0.45 means
the model guesses 45% of the next tokens exactly. The caller runs the model and passes, per
example, how many positions it predicted and how many of those it got right.
"""

_KWARGS_DESCRIPTION = """\
Args:
    n_correct (`list` of `int`): per example, positions where argmax(logits) equals the next token.
    n_tokens (`list` of `int`): per example, positions predicted (padding excluded).
Returns:
    next_token_accuracy (`float`): sum(n_correct) / sum(n_tokens), in [0, 1].
    n_tokens (`int`): sum(n_tokens).
Examples:
    >>> acc = retune.model.metrics.load_metric("next_token_accuracy")
    >>> acc.add_batch(n_correct=[1, 2], n_tokens=[2, 6])
    >>> acc.compute()["next_token_accuracy"]
    0.375
"""

_CITATION = """\
@book{jurafsky2025slp,
  title={Speech and Language Processing},
  author={Jurafsky, Daniel and Martin, James H.},
  edition={3rd draft},
  year={2025},
  note={Chapter 3, N-gram Language Models}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class NextTokenAccuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"n_correct": datasets.Value("int64"), "n_tokens": datasets.Value("int64")}
            ),
            format="numpy",
        )

    def _compute(self, n_correct: np.ndarray, n_tokens: np.ndarray) -> dict[str, float | int]:
        total_tokens = int(np.sum(n_tokens))
        if total_tokens <= 0:
            raise ValueError("next_token_accuracy needs at least one predicted token")
        hits = int(np.sum(n_correct))
        if hits < 0 or hits > total_tokens:
            raise ValueError(f"n_correct sums to {hits}, outside [0, {total_tokens}] tokens")
        return {"next_token_accuracy": hits / total_tokens, "n_tokens": total_tokens}
