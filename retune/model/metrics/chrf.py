"""Corpus chrF of generated replies against reference replies, as an `evaluate` script.

Loaded by path (`retune.model.metrics.load_metric("chrf")`): hub metrics cannot load offline.
Computed by `sacrebleu`, the reference implementation.
"""

from __future__ import annotations

import datasets
import evaluate
from sacrebleu.metrics import CHRF

_DESCRIPTION = """\
chrF: character n-gram F-score (n up to 6, recall weighted twice as much as precision) of the
generated replies against the references, from n-gram statistics summed over the corpus
(sacrebleu's corpus score), on sacrebleu's 0-100 scale. It credits near misses in spelling
and morphology that word metrics score 0, and needs no tokenizer, so it suits any language.
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions (`list` of `str`): generated replies.
    references (`list` of `str`): the reference reply for each prediction.
Returns:
    chrf (`float`): corpus chrF, in [0, 100].
    n_examples (`int`): how many pairs were scored.
Examples:
    >>> chrf = retune.model.metrics.load_metric("chrf")
    >>> chrf.compute(predictions=["the cat sat"], references=["the cat sat"])["chrf"]
    100.0
"""

_CITATION = """\
@inproceedings{popovic2015chrf,
  title={chrF: character n-gram F-score for automatic MT evaluation},
  author={Popovi{\'c}, Maja},
  booktitle={Proceedings of the Tenth Workshop on Statistical Machine Translation},
  pages={392--395},
  year={2015}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ChrF(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
            reference_urls=["https://github.com/mjpost/sacrebleu"],
        )

    def _compute(self, predictions: list[str], references: list[str]) -> dict[str, float | int]:
        if not predictions:
            raise ValueError("chrf needs at least one prediction/reference pair")
        score = CHRF().corpus_score(list(predictions), [list(references)])
        return {"chrf": float(score.score), "n_examples": len(predictions)}
