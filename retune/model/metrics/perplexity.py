"""Corpus perplexity from per-example summed token NLL, as an `evaluate` metric script.

Loaded by path (`retune.model.metrics.load_metric("perplexity")`): hub metrics cannot load offline.
Fed per-example aggregates with `add_batch`, so the model's logits never reach the metric.
"""

from __future__ import annotations

import math

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """\
Perplexity of a causal language model over a corpus: exp(total NLL / total predicted tokens).
Every predicted token weighs the same, whichever example it is in (a micro average), so long
examples count for more than short ones. The model is run by the caller; this metric only
aggregates each example's summed negative log-likelihood (natural log) and token count, which
keeps its storage at two numbers per example however large the vocabulary or the corpus.
"""

_KWARGS_DESCRIPTION = """\
Args:
    nll_sum (`list` of `float`): per example, the summed negative log-likelihood (nats) of the
        tokens the model predicted.
    n_tokens (`list` of `int`): per example, how many tokens that sum covers.
Returns:
    perplexity (`float`): exp(sum(nll_sum) / sum(n_tokens)).
    mean_nll (`float`): sum(nll_sum) / sum(n_tokens), the cross-entropy in nats per token.
    n_tokens (`int`): sum(n_tokens).
Examples:
    >>> ppl = retune.model.metrics.load_metric("perplexity")
    >>> ppl.add_batch(nll_sum=[2.0, 4.0], n_tokens=[2, 4])
    >>> round(ppl.compute()["perplexity"], 4)
    2.7183
"""

_CITATION = """\
@article{jelinek1977perplexity,
  title={Perplexity---a measure of the difficulty of speech recognition tasks},
  author={Jelinek, Fred and Mercer, Robert L. and Bahl, Lalit R. and Baker, James K.},
  journal={The Journal of the Acoustical Society of America},
  volume={62}, number={S1}, pages={S63}, year={1977}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Perplexity(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"nll_sum": datasets.Value("float64"), "n_tokens": datasets.Value("int64")}
            ),
            format="numpy",
            reference_urls=["https://huggingface.co/docs/transformers/perplexity"],
        )

    def _compute(self, nll_sum: np.ndarray, n_tokens: np.ndarray) -> dict[str, float | int]:
        total_tokens = int(np.sum(n_tokens))
        if total_tokens <= 0:
            raise ValueError("perplexity needs at least one predicted token (n_tokens sums to 0)")
        mean_nll = float(np.sum(nll_sum, dtype=np.float64)) / total_tokens
        # math.exp overflows past ~709 nats; such a model is as good as infinitely perplexed.
        ppl = math.exp(mean_nll) if mean_nll < 700 else math.inf
        return {"perplexity": ppl, "mean_nll": mean_nll, "n_tokens": total_tokens}
