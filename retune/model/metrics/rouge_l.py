"""ROUGE-L F-measure of generated replies against reference replies, as an `evaluate` script.

Loaded by path (`retune.model.metrics.load_metric("rouge_l")`): hub metrics cannot load offline.
Scored with Google's `rouge-score` package, with a Unicode-aware word tokenizer.
"""

from __future__ import annotations

import re

import datasets
import evaluate
import numpy as np
from rouge_score import rouge_scorer

_DESCRIPTION = """\
ROUGE-L: how much of a reference reply the generated reply reproduces in order, from their
longest common subsequence of words (F-measure of LCS precision and recall), averaged over
examples with equal weight. 1 means identical word sequences, 0 no word in common. Words are
lower-cased runs of letters and digits in any script (rouge-score's default tokenizer keeps
ASCII only and would score every non-English reply 0); no stemming.
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions (`list` of `str`): generated replies.
    references (`list` of `str`): the reference reply for each prediction.
Returns:
    rouge_l (`float`): mean ROUGE-L F-measure over examples, in [0, 1].
    n_examples (`int`): how many pairs were scored.
Examples:
    >>> rouge = retune.model.metrics.load_metric("rouge_l")
    >>> rouge.compute(predictions=["the cat sat"], references=["the cat sat"])["rouge_l"]
    1.0
"""

_CITATION = """\
@inproceedings{lin2004rouge,
  title={ROUGE: A Package for Automatic Evaluation of Summaries},
  author={Lin, Chin-Yew},
  booktitle={Text Summarization Branches Out},
  pages={74--81},
  year={2004}
}
"""

_WORD = re.compile(r"[^\W_]+")


class _Words:
    """rouge-score tokenizer protocol: lower-cased letter/digit runs, any script."""

    def tokenize(self, text: str) -> list[str]:
        return _WORD.findall(text.lower())


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RougeL(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
            reference_urls=["https://github.com/google-research/google-research/tree/master/rouge"],
        )

    def _compute(self, predictions: list[str], references: list[str]) -> dict[str, float | int]:
        if not predictions:
            raise ValueError("rouge_l needs at least one prediction/reference pair")
        scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_Words())
        pairs = zip(predictions, references, strict=True)
        f = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in pairs]
        return {"rouge_l": float(np.mean(f)), "n_examples": len(f)}
