"""Abusive or toxic conversations: an offline classifier (alt-profanity-check, whose model
ships inside the wheel) scored sentence by sentence, and a blocklist of words and phrases.

Used by the `hygiene` stage. Sentences, not whole messages, are scored: the classifier's
TF-IDF features are length-normalised, so one insult inside a long, neutral message would
otherwise score low.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# Speakers whose words are screened: the system prompt is the operator's own text.
SCREENED_ROLES = ("user", "assistant", "text")
_SENTENCE_END = r"([.!?])\s+"
_NON_TOKEN = r"[^\pL\pN_]+"
_SNIPPET_CHARS = 160


@dataclass(frozen=True)
class Flag:
    """Why conversation `index` (row of the screened batch) is unsafe."""

    index: int
    score: float  # the classifier's highest sentence probability in the conversation
    term: str | None  # the first blocklist term found, if any
    role: str  # who said the flagged sentence
    sentence: str  # the flagged sentence (the matching one, else the highest scoring)

    @property
    def reason(self) -> str:
        if self.term is not None:
            return f"blocklist term {self.term!r}"
        return f"classifier probability {self.score:.3f}"


def blocklist_pattern(terms: Sequence[str]) -> str | None:
    """One case-insensitive, whole-word RE2/Python regex for the terms (spaces match any run
    of whitespace), or None for an empty list."""
    words = [t.strip() for t in terms if t.strip()]
    if not words:
        return None
    alts = [r"\s+".join(re.escape(part) for part in w.split()) for w in words]
    return r"(?i)\b(?:" + "|".join(alts) + r")\b"


def classifier_probabilities(texts: list[str]) -> np.ndarray:
    """alt-profanity-check's own `predict_prob`: each text's probability of being offensive."""
    if not texts:
        return np.empty(0)
    from profanity_check import predict_prob

    return np.asarray(predict_prob(texts), dtype=np.float64)


class Classifier:
    """alt-profanity-check's model (TF-IDF words, then calibrated linear SVMs) with the
    feature extraction done by Arrow over a whole batch: the package's `predict_prob`
    tokenizes in a Python loop, ~10x slower. Same vocabulary, idf weights, l2 norm and model;
    `tests/test_hygiene.py` checks the probabilities agree."""

    def __init__(self) -> None:
        from profanity_check import profanity_check as package

        vectorizer = package.vectorizer
        self.model = package.model
        self.vocabulary: dict[str, int] = vectorizer.vocabulary_
        self.idf = np.asarray(vectorizer.idf_, dtype=np.float64)

    def probabilities(self, texts: pa.Array | pa.ChunkedArray) -> np.ndarray:
        from scipy.sparse import csr_matrix
        from sklearn.preprocessing import normalize

        n = len(texts)
        if n == 0:
            return np.empty(0)
        # The vectorizer's token_pattern (?u)\b\w\w+\b: runs of 2+ letters, digits or "_".
        tokens = pc.split_pattern_regex(pc.utf8_lower(texts), _NON_TOKEN)
        flat = pc.list_flatten(tokens)
        owner = pc.list_parent_indices(tokens).to_numpy()
        long = pc.greater_equal(pc.utf8_length(flat), 2).to_numpy(zero_copy_only=False)
        flat, owner = flat.filter(pa.array(long)), owner[long]
        encoded = pc.dictionary_encode(flat)
        lookup = np.array(
            [self.vocabulary.get(t, -1) for t in encoded.dictionary.to_pylist()], dtype=np.int64
        )
        column = lookup[encoded.indices.to_numpy()] if len(flat) else np.empty(0, np.int64)
        known = column >= 0
        counts = csr_matrix(
            (np.ones(int(known.sum())), (owner[known], column[known])),
            shape=(n, len(self.idf)),
        )
        features = normalize(counts.multiply(self.idf).tocsr(), norm="l2", copy=False)
        return np.asarray(self.model.predict_proba(features)[:, 1], dtype=np.float64)


class Screen:
    """Scores conversations by their most offensive sentence; flags those at or above
    `threshold`, or containing a blocklist term."""

    def __init__(self, threshold: float, blocklist: Sequence[str]) -> None:
        self.threshold = threshold
        self.pattern = blocklist_pattern(blocklist)
        self._regex = re.compile(self.pattern) if self.pattern else None
        self.classifier = Classifier()
        self.sentences_scored = 0

    def screen(self, messages: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, list[Flag]]:
        """`messages`: a records `messages` column (list of {role, content}). Returns each
        conversation's highest sentence probability and the flagged ones, in row order."""
        if isinstance(messages, pa.ChunkedArray):
            messages = messages.combine_chunks()
        n = len(messages)
        best = np.zeros(n)
        flat = pc.list_flatten(messages)
        conv = pc.list_parent_indices(messages).to_numpy()
        roles = flat.field("role")
        keep = pc.is_in(roles, pa.array(SCREENED_ROLES)).to_numpy(zero_copy_only=False)
        if not keep.any():
            return best, []
        keep_arr = pa.array(keep)
        roles = roles.filter(keep_arr)
        contents = flat.field("content").filter(keep_arr)
        conv = conv[keep]
        split = pc.split_pattern(pc.replace_substring_regex(contents, _SENTENCE_END, "\\1\n"), "\n")
        sentences = pc.utf8_trim_whitespace(pc.list_flatten(split))
        msg = pc.list_parent_indices(split).to_numpy()
        nonempty = pc.not_equal(sentences, "").to_numpy(zero_copy_only=False)
        sentences = sentences.filter(pa.array(nonempty))
        msg = msg[nonempty]
        if len(sentences) == 0:
            return best, []
        # Support talk repeats itself ("Thanks!", template answers): score each sentence once.
        encoded = pc.dictionary_encode(sentences)
        scores = self.classifier.probabilities(encoded.dictionary)[encoded.indices.to_numpy()]
        self.sentences_scored += len(encoded.dictionary)
        owner = conv[msg]
        np.maximum.at(best, owner, scores)
        flagged = best >= self.threshold
        matched = np.zeros(len(sentences), dtype=bool)
        if self.pattern is not None:
            matched = pc.match_substring_regex(sentences, self.pattern).to_numpy(
                zero_copy_only=False
            )
            flagged[owner[matched]] = True
        flags = []
        for i in np.flatnonzero(flagged):
            # `owner` is sorted: a conversation's sentences are one run.
            lo, hi = np.searchsorted(owner, [i, i + 1])
            rows = np.arange(lo, hi)
            hits = rows[matched[rows]]
            at = int(hits[0]) if len(hits) else int(rows[np.argmax(scores[rows])])
            sentence = str(sentences[at].as_py())
            term = None
            if len(hits) and self._regex is not None:
                found = self._regex.search(sentence)
                term = found.group(0).lower() if found else None
            flags.append(
                Flag(
                    index=int(i),
                    score=round(float(best[i]), 4),
                    term=term,
                    role=str(roles[msg[at]].as_py()),
                    sentence=sentence[:_SNIPPET_CHARS],
                )
            )
        return best, flags
