"""Near-duplicates: datasketch-equal MinHash signatures, paraphrases caught, distinct texts
kept, the representative kept, and leaks from holdout to train found."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pytest
from datasketch import MinHash

from retune.data import dedup

WORDS = [f"w{i}" for i in range(5_000)]


def doc(rng: random.Random, n: int = 80) -> list[str]:
    return [rng.choice(WORDS) for _ in range(n)]


def changed(words: list[str], positions: list[int], tag: str) -> list[str]:
    out = list(words)
    for p in positions:
        out[p] = f"{tag}{p}"
    return out


def sketches(texts: list[str], threshold: float = 0.8, num_perm: int = 128) -> dedup.Sketches:
    # Two batches: rows keep counting across them.
    half = len(texts) // 2
    return dedup.sketch_batches(
        [pa.array(texts[:half]), pa.array(texts[half:])], threshold, num_perm, 3
    )


def test_signatures_equal_datasketch_minhash_of_the_same_shingles() -> None:
    texts = pa.array(["Hi, my thermostat SHOWS the wrong temperature!", "ok", "", None, "Zoë"])
    perms = dedup.permutations(128)
    sig, empty = dedup.signatures(texts, 3, perms)
    hashes, counts = dedup.shingle_hashes(texts, 3)
    assert counts.tolist() == [7, 1, 0, 0, 1]
    assert empty.tolist() == [False, False, True, True, False]
    start = 0
    for row, n in enumerate(counts):
        mh = MinHash(num_perm=128, seed=1, hashfunc=int, scheme="affine32")
        for h in hashes[start : start + n]:
            mh.update(int(h))
        start += n
        assert np.array_equal(mh.hashvalues, sig[row])


def test_casing_and_punctuation_do_not_matter_but_words_do() -> None:
    perms = dedup.permutations(64)
    texts = pa.array(
        [
            "Please reset the hub, then pair it again.",
            "please reset the hub then pair it again",
            "PLEASE... reset the hub; then pair it again!!",
            "Please reset the router, then pair it again.",
        ]
    )
    sig, _ = dedup.signatures(texts, 3, perms)
    assert np.array_equal(sig[0], sig[1]) and np.array_equal(sig[0], sig[2])
    assert not np.array_equal(sig[0], sig[3])


def test_paraphrase_is_removed_pointing_at_the_kept_original() -> None:
    rng = random.Random(1)
    original = doc(rng)
    texts = [
        " ".join(original),
        " ".join(doc(rng)),  # distinct
        " ".join(["Hello", "there", *changed(original, [40], "x")]),  # paraphrase of 0
        " ".join(doc(rng)),  # distinct
    ]
    with sketches(texts) as sk:
        (match,) = dedup.deduplicate(sk)
        assert (match.index, match.of) == (2, 0)
        assert match.similarity >= 0.8
        # The estimate is datasketch's own.
        assert match.similarity == pytest.approx(sk.minhash(2).jaccard(sk.minhash(0)))


def test_the_first_in_walking_order_is_the_representative() -> None:
    rng = random.Random(2)
    base = doc(rng)
    texts = [" ".join(changed(base, [i * 20], "v")) for i in range(3)]
    with sketches(texts) as sk:
        assert {(m.index, m.of) for m in dedup.deduplicate(sk)} == {(1, 0), (2, 0)}
        later_first = dedup.deduplicate(sk, np.array([2, 1, 0]))
        assert {(m.index, m.of) for m in later_first} == {(1, 2), (0, 2)}


def test_removed_texts_only_ever_point_at_kept_ones() -> None:
    """A ~ B and B ~ C but A !~ C: B goes (a copy of A), C stays (its only match is gone)."""
    rng = random.Random(3)
    a = doc(rng, 120)
    b = changed(a, [10, 50, 90], "b")
    c = changed(b, [30, 70, 110], "c")
    texts = [" ".join(t) for t in (a, b, c)]
    with sketches(texts, threshold=0.75, num_perm=256) as sk:
        sims = {(i, j): sk.minhash(i).jaccard(sk.minhash(j)) for i, j in ((0, 1), (1, 2), (0, 2))}
        assert sims[(0, 1)] >= 0.75 and sims[(1, 2)] >= 0.75 and sims[(0, 2)] < 0.75
        assert [(m.index, m.of) for m in dedup.deduplicate(sk)] == [(1, 0)]


def test_distinct_and_empty_texts_are_all_kept() -> None:
    rng = random.Random(4)
    texts = [" ".join(doc(rng)) for _ in range(300)] + ["", "   ", "...", ""]
    with sketches(texts) as sk:
        assert dedup.deduplicate(sk) == []


def test_lsh_finds_what_comparing_every_pair_finds() -> None:
    """On 400 texts in 100 families of paraphrases, the banded search agrees with comparing
    every pair of the same signatures, but for a rare pair just above the threshold (LSH
    makes a pair at Jaccard 0.8 a candidate with p = 0.95, at 0.9 with p > 0.9999)."""
    rng = random.Random(5)
    texts = []
    for _ in range(100):
        base = doc(rng, 60)
        texts += [" ".join(changed(base, rng.sample(range(60), k), "e")) for k in (0, 1, 2, 3)]
    with sketches(texts) as sk:
        sig = sk.signatures_of(np.arange(len(texts)))
        removed = {m.index: m.of for m in dedup.deduplicate(sk)}
    sims = (sig[:, None, :] == sig[None, :, :]).mean(axis=2)
    kept: list[int] = []
    brute: dict[int, int] = {}
    for i in range(len(texts)):
        near = [j for j in kept if sims[i, j] >= 0.8]
        if near:
            brute[i] = max(near, key=lambda j: (sims[i, j], -j))
        else:
            kept.append(i)
    assert len(removed) >= 0.97 * len(brute)
    for i, j in removed.items():
        assert sims[i, j] >= 0.8 and j not in removed
    for i in set(brute) - set(removed):
        assert sims[i, brute[i]] < 0.9


def test_a_holdout_text_with_a_near_duplicate_in_train_leaks() -> None:
    rng = random.Random(6)
    base, other = doc(rng), doc(rng)
    texts = [
        " ".join(base),  # 0 train
        " ".join(changed(base, [5], "h")),  # 1 holdout, near 0: leaks
        " ".join(other),  # 2 holdout, distinct: stays
        " ".join(changed(base, [5, 60], "h")),  # 3 holdout, near 1 (and 0)
        " ".join(doc(rng)),  # 4 train
    ]
    holdout = np.array([False, True, True, True, False])
    with sketches(texts) as sk:
        found = {m.index: m.of for m in dedup.leaks(sk, holdout)}
    assert set(found) == {1, 3}
    assert found[1] == 0


def test_a_leak_through_a_moved_holdout_text_is_found_too() -> None:
    """Holdout 2 is near only holdout 1, which is near train 0: once 1 moves, 2 leaks."""
    rng = random.Random(7)
    a = doc(rng, 120)
    b = changed(a, [10, 50, 90], "b")
    c = changed(b, [30, 70, 110], "c")
    texts = [" ".join(t) for t in (a, b, c)]
    with sketches(texts, threshold=0.75, num_perm=256) as sk:
        found = [(m.index, m.of) for m in dedup.leaks(sk, np.array([False, True, True]))]
    assert found == [(1, 0), (2, 1)]
