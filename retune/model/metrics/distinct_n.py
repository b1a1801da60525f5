"""Distinct-1 and distinct-2 of generated replies (lexical diversity), as an `evaluate` script.

Loaded by path (`retune.model.metrics.load_metric("distinct_n")`): hub metrics cannot load offline.
"""

from __future__ import annotations

import re

import datasets
import evaluate

_DESCRIPTION = """\
Distinct-n: the number of different word n-grams across all generated replies divided by the
total number of word n-grams in them, for n = 1 and 2. Near 0 means the model says the same
few things to everyone (a collapsed or over-fitted model); near 1 means almost no n-gram
repeats. Words are lower-cased runs of letters and digits in any script. It is a corpus
figure: it depends on how many replies are pooled, so compare models on the same count.
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions (`list` of `str`): generated replies.
Returns:
    distinct_1 (`float`): unique words / words, in [0, 1] (0 when there are no words).
    distinct_2 (`float`): unique word bigrams / bigrams, in [0, 1] (0 when there are none).
Examples:
    >>> distinct = retune.model.metrics.load_metric("distinct_n")
    >>> distinct.compute(predictions=["a b a", "a b"])["distinct_1"]
    0.4
"""

_CITATION = """\
@inproceedings{li2016diversity,
  title={A Diversity-Promoting Objective Function for Neural Conversation Models},
  author={Li, Jiwei and Galley, Michel and Brockett, Chris and Gao, Jianfeng and Dolan, Bill},
  booktitle={Proceedings of NAACL-HLT},
  pages={110--119},
  year={2016}
}
"""

_WORD = re.compile(r"[^\W_]+")
_ORDERS = (1, 2)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class DistinctN(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string")}),
        )

    def _compute(self, predictions: list[str]) -> dict[str, float]:
        seen: dict[int, set[tuple[str, ...]]] = {n: set() for n in _ORDERS}
        total = dict.fromkeys(_ORDERS, 0)
        for text in predictions:
            words = _WORD.findall(text.lower())
            for n in _ORDERS:
                grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
                seen[n].update(grams)
                total[n] += len(grams)
        return {f"distinct_{n}": len(seen[n]) / total[n] if total[n] else 0.0 for n in _ORDERS}
