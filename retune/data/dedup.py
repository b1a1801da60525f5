"""Near-duplicate texts: MinHash signatures of word shingles and LSH, shared by `hygiene`
(one representative per group of near-duplicates) and `split` (no holdout text with a
near-duplicate in train).

Signatures are datasketch's `MinHash(scheme="affine32")` exactly (its permutations, its
MurmurHash3 pre-mix; a test checks they are equal) and the bands and rows are those datasketch's
`MinHashLSH` picks, but both are computed for a whole Arrow batch at once with numpy: a Python
call per text would not prepare a million conversations in minutes on two cores. Band keys stay
in memory (8 bytes per band per text); signatures go to a temporary file, read back only for
candidate pairs, whose estimated Jaccard similarity decides.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

if TYPE_CHECKING:
    from datasketch import LeanMinHash

# The word hash past a text's last word: short texts and text ends still give shingles.
_PAD = np.uint64(0x9E3779B97F4A7C15)
_MIX = np.uint64(0xBF58476D1CE4E5B9)
# Shingle rows per numpy block: a (rows x num_perm) uint32 block stays near 16 MB.
_BLOCK_ROWS = 32_768
# Candidate pairs per LSH bucket: each text with the bucket's first text and the _WINDOW texts
# before it (in walking order), so a bucket of thousands of look-alikes stays linear; the
# leakage check pairs each holdout text with up to _CROSS_CAP texts of its bucket.
_WINDOW = 16
_CROSS_CAP = 5_000
_PAIR_BLOCK = 16_384  # pairs compared per numpy step
_SLAB_ROWS = 65_536  # signature rows read from the file at a time
# LSH (false candidate, missed pair) weights: every candidate pair is checked against the
# threshold anyway, so a miss costs more than a candidate. At 0.8 and 128 permutations this
# gives 16 bands of 8 rows: a pair at Jaccard 0.85 becomes a candidate with p = 0.994
# (datasketch's default 0.5/0.5 gives 9 x 13 and p = 0.69).
_LSH_WEIGHTS = (0.05, 0.95)


@dataclass(frozen=True)
class Match:
    """Text `index` is a near-duplicate of text `of` (row numbers of the sketched input)."""

    index: int
    of: int
    similarity: float  # MinHash estimate of the Jaccard similarity of their shingle sets


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) datasketch picks for `threshold` with misses weighted 19:1 over
    false candidates."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=_LSH_WEIGHTS)
    return int(lsh.b), int(lsh.r)


def permutations(num_perm: int, seed: int = 1) -> np.ndarray:
    """datasketch's affine32 permutation parameters (a 2 x num_perm uint32 array)."""
    from datasketch import MinHash

    perms: np.ndarray = MinHash(num_perm=num_perm, seed=seed, scheme="affine32").permutations
    return perms


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer, as datasketch applies it before permuting."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def _byte_table() -> np.ndarray:
    """Which bytes belong to words: ASCII letters and digits, and every byte of a non-ASCII
    character (letters of other scripts; rare non-ASCII punctuation rides along)."""
    table = np.zeros(256, dtype=bool)
    for lo, hi in ((ord("0"), ord("9")), (ord("a"), ord("z")), (ord("A"), ord("Z")), (128, 255)):
        table[lo : hi + 1] = True
    return table


_WORD_BYTES = _byte_table()
_BASE = np.uint64(0x100000001B3)  # odd, so invertible modulo 2^64
_BASE_INV = np.uint64(pow(int(_BASE), -1, 1 << 64))
# Bytes of text per numpy pass: bounds the uint64 temporaries (~8 of them) near 8 MB each.
_CHUNK_BYTES = 1 << 20


def _fmix64(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))


def _utf8(texts: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(bytes, offsets rebased to 0) of a string array, nulls as empty strings."""
    if texts.null_count:
        texts = pc.fill_null(texts, "")
    width = np.int64 if pa.types.is_large_string(texts.type) else np.int32
    offsets = np.frombuffer(texts.buffers()[1], dtype=width)[
        texts.offset : texts.offset + len(texts) + 1
    ].astype(np.int64)
    data = texts.buffers()[2]
    raw = np.frombuffer(data, dtype=np.uint8) if data is not None else np.empty(0, np.uint8)
    return raw[offsets[0] : offsets[-1]], offsets - offsets[0]


def _word_spans(texts: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """64-bit hashes of every word of every text (lowercased), and words per text."""
    data, offs = _utf8(pc.utf8_lower(texts))
    n = len(offs) - 1
    if len(data) == 0:
        return np.empty(0, np.uint64), np.zeros(n, np.int64), offs
    word = _WORD_BYTES[data]
    before = np.empty_like(word)
    before[0], before[1:] = False, word[:-1]
    after = np.empty_like(word)
    after[-1], after[:-1] = False, word[1:]
    # A word never runs from one text into the next.
    starts_at = offs[:-1][offs[:-1] < len(data)]
    before[starts_at] = False
    ends_at = offs[1:][offs[1:] > 0] - 1
    after[ends_at] = False
    starts = np.flatnonzero(word & ~before)
    ends = np.flatnonzero(word & ~after) + 1
    # Polynomial hash of each word from prefix sums: sum(c_j B^j) over the word, divided by
    # B^start (B is odd, so it has an inverse modulo 2^64), so the same word hashes the same
    # wherever it appears.
    powers = np.full(len(data), _BASE, dtype=np.uint64)
    powers[0] = 1
    np.cumprod(powers, out=powers)
    prefix = np.zeros(len(data) + 1, dtype=np.uint64)
    np.cumsum(data.astype(np.uint64) * powers, out=prefix[1:])
    powers[:] = _BASE_INV
    powers[0] = 1
    np.cumprod(powers, out=powers)
    h = _fmix64(
        (prefix[ends] - prefix[starts]) * powers[starts] + (ends - starts).astype(np.uint64)
    )
    doc = np.searchsorted(offs, starts, side="right") - 1
    counts = np.bincount(doc, minlength=n).astype(np.int64)
    return h, counts, offs


def _chunks(texts: pa.Array) -> Iterator[pa.Array]:
    """Consecutive slices of `texts` of about _CHUNK_BYTES of text each (at least one text)."""
    _, offs = _utf8(texts)
    i, n = 0, len(texts)
    while i < n:
        j = max(int(np.searchsorted(offs, offs[i] + _CHUNK_BYTES, side="right")) - 1, i + 1)
        yield texts.slice(i, j - i)
        i = j


def shingle_hashes(texts: pa.Array | pa.ChunkedArray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """32-bit hashes of each text's k-word shingles (lowercased, punctuation dropped): one
    shingle per word, the last ones padded past the text's end. Returns (hashes, counts)."""
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks()
    parts = [_shingles(chunk, k) for chunk in _chunks(texts)]
    if not parts:
        return np.empty(0, np.uint32), np.zeros(0, np.int64)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _shingles(texts: pa.Array, k: int) -> tuple[np.ndarray, np.ndarray]:
    w, counts, _ = _word_spans(texts)
    if len(w) == 0:
        return np.empty(0, dtype=np.uint32), counts
    ends = np.repeat(np.cumsum(counts), counts)  # exclusive end of each word's text
    pos = np.arange(len(w))
    h = w.copy()
    for j in range(1, k):
        at = pos + j
        nxt = np.where(at < ends, w[np.minimum(at, len(w) - 1)], _PAD)
        h = h * _MIX + nxt
    h = _fmix64(h)
    return (h >> np.uint64(32)).astype(np.uint32), counts


def signatures(
    texts: pa.Array | pa.ChunkedArray, k: int, perms: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """MinHash signatures (n x num_perm uint32) of `texts`, equal to datasketch's
    `MinHash(scheme="affine32")` updated with `shingle_hashes`; and a mask of texts without a
    word (their signature is all-max and they never match)."""
    hashes, counts = shingle_hashes(texts, k)
    a, b = perms[0], perms[1]
    n, num_perm = len(counts), perms.shape[1]
    sig = np.full((n, num_perm), np.iinfo(np.uint32).max, dtype=np.uint32)
    empty = counts == 0
    docs = np.flatnonzero(~empty)
    if len(docs) == 0:
        return sig, empty
    mixed = _fmix32(hashes)
    starts = np.concatenate(([0], np.cumsum(counts[docs])[:-1]))
    ends = starts + counts[docs]
    # Permutations along rows, shingles along columns: the min over each text's shingles is
    # then a reduction along contiguous memory (several times faster than down columns).
    buf = np.empty((num_perm, _BLOCK_ROWS), dtype=np.uint32)
    i = 0
    while i < len(docs):
        # Whole texts per block, at least one even if it alone is longer than a block.
        j = max(int(np.searchsorted(ends, starts[i] + _BLOCK_ROWS, side="right")), i + 1)
        s0, s1 = starts[i], ends[j - 1]
        block = (
            buf[:, : s1 - s0]
            if s1 - s0 <= _BLOCK_ROWS
            else np.empty((num_perm, s1 - s0), np.uint32)
        )
        np.multiply(a[:, None], mixed[None, s0:s1], out=block)
        block += b[:, None]
        sig[docs[i:j]] = np.minimum.reduceat(block, starts[i:j] - s0, axis=1).T
        i = j
    return sig, empty


def band_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """One 64-bit key per LSH band (n x bands): equal keys mark candidate pairs."""
    keys = np.zeros((sig.shape[0], bands), dtype=np.uint64)
    for band in range(bands):
        h = np.zeros(sig.shape[0], dtype=np.uint64)
        for col in range(band * rows, (band + 1) * rows):
            h = h * _MIX + sig[:, col].astype(np.uint64)
        keys[:, band] = h
    return keys


class Sketches:
    """MinHash sketches of n texts, fed batch by batch: LSH band keys in memory (8 bytes per
    band per text), signatures in a temporary file, read back only for candidate pairs."""

    def __init__(
        self, threshold: float, num_perm: int, shingle_words: int, workdir: Path | None = None
    ) -> None:
        self.threshold = threshold
        self.num_perm = num_perm
        self.shingle_words = shingle_words
        self.bands, self.rows = lsh_bands(threshold, num_perm)
        self.perms = permutations(num_perm)
        self._dir = Path(tempfile.mkdtemp(prefix="retune-minhash-", dir=workdir))
        self._path = self._dir / "signatures.u32"
        self._out: Any = self._path.open("wb")
        self._keys: list[np.ndarray] = []
        self._empty: list[np.ndarray] = []
        self.keys = np.empty((0, self.bands), dtype=np.uint64)
        self.empty = np.empty(0, dtype=bool)
        self.n = 0
        self.stats: dict[str, int] = {}  # pair counts of the last deduplicate/leaks call

    def add(self, texts: pa.Array | pa.ChunkedArray) -> None:
        """Sketch the next batch of texts (rows n, n+1, ...)."""
        if self._out is None:
            raise RuntimeError("Sketches.add after the sketches were read")
        sig, empty = signatures(texts, self.shingle_words, self.perms)
        self._out.write(sig.tobytes())
        self._keys.append(band_keys(sig, self.bands, self.rows))
        self._empty.append(empty)
        self.n += len(empty)

    def finish(self) -> Sketches:
        """Stop adding; gather the band keys (called by every reader)."""
        if self._out is not None:
            self._out.close()
            self._out = None
            if self._keys:
                self.keys = np.concatenate(self._keys)
                self.empty = np.concatenate(self._empty)
            self._keys, self._empty = [], []
        return self

    def signatures_of(self, rows: np.ndarray) -> np.ndarray:
        """Signatures of `rows` (sorted, unique), read from the file a slab at a time."""
        self.finish()
        out = np.empty((len(rows), self.num_perm), dtype=np.uint32)
        width = self.num_perm * 4
        for lo in range(0, self.n, _SLAB_ROWS):
            a, b = np.searchsorted(rows, [lo, lo + _SLAB_ROWS])
            if a == b:
                continue
            hi = int(rows[b - 1]) + 1
            slab = np.fromfile(
                self._path, dtype=np.uint32, count=(hi - lo) * self.num_perm, offset=lo * width
            ).reshape(-1, self.num_perm)
            out[a:b] = slab[rows[a:b] - lo]
        return out

    def minhash(self, i: int) -> LeanMinHash:
        """Text `i`'s sketch as a datasketch LeanMinHash."""
        from datasketch import LeanMinHash

        sig = self.signatures_of(np.array([i]))[0]
        return LeanMinHash(seed=1, hashvalues=sig, scheme="affine32")

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> Sketches:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _groups(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For texts (already in walking order) and one band's keys: the positions sorted by
    (key, position), each one's group start in that sorting, and its group's size; texts alone
    in their group are left out."""
    o = np.lexsort((np.arange(len(keys)), keys))
    ks = keys[o]
    first = np.ones(len(o), dtype=bool)
    first[1:] = ks[1:] != ks[:-1]
    gstart = np.flatnonzero(first)
    size = np.diff(np.append(gstart, len(o)))
    gid = np.cumsum(first) - 1
    multi = size[gid] > 1
    # Re-base group starts onto the filtered order.
    kept = np.flatnonzero(multi)
    o, gid = o[kept], gid[kept]
    new_start = np.searchsorted(kept, gstart)
    return o, new_start[gid], size[gid]


def _window_pairs(keys: np.ndarray, window: int) -> np.ndarray:
    """Candidate pairs (as later * n + earlier, positions in walking order) of one band: each
    text with the first text of its bucket and the `window` texts before it there."""
    o, start, _ = _groups(keys)
    n = len(keys)
    at = np.arange(len(o))
    offset = at - start
    parts = [o[offset > 0] * n + o[start[offset > 0]]]
    for d in range(1, window + 1):
        m = offset > d
        parts.append(o[m] * n + o[at[m] - d])
    return np.unique(np.concatenate(parts)) if parts else np.empty(0, np.int64)


def _cross_pairs(keys: np.ndarray, marked: np.ndarray, cap: int) -> np.ndarray:
    """Candidate pairs (as larger * n + smaller) of one band between every marked text and
    every other text of its bucket (the first `cap` of a bigger bucket)."""
    o, start, size = _groups(keys)
    n = len(keys)
    hits = np.flatnonzero(marked[o])
    if len(hits) == 0:
        return np.empty(0, np.int64)
    counts = np.minimum(size[hits], cap)
    total = int(counts.sum())
    base = np.repeat(start[hits], counts)
    step = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
    me = np.repeat(o[hits], counts)
    other = o[base + step]
    keep = me != other
    me, other = me[keep], other[keep]
    return np.unique(np.maximum(me, other) * n + np.minimum(me, other))


def _similar(
    sk: Sketches, walk: np.ndarray, codes: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The candidate pairs (codes over walking positions) whose estimated Jaccard similarity
    reaches the threshold: (first, second, similarity)."""
    n = len(walk)
    a, b = codes // n, codes % n
    if len(codes) == 0:
        sk.stats = {"candidate_pairs": 0, "similar_pairs": 0}
        return a, b, np.empty(0)
    rows = np.unique(np.concatenate((walk[a], walk[b])))
    sig = sk.signatures_of(rows)
    ia, ib = np.searchsorted(rows, walk[a]), np.searchsorted(rows, walk[b])
    sims = np.empty(len(codes))
    for lo in range(0, len(codes), _PAIR_BLOCK):
        hi = lo + _PAIR_BLOCK
        eq = sig[ia[lo:hi]] == sig[ib[lo:hi]]
        sims[lo:hi] = np.count_nonzero(eq, axis=1) / sk.num_perm
    ok = sims >= sk.threshold
    sk.stats = {"candidate_pairs": len(codes), "similar_pairs": int(ok.sum())}
    return a[ok], b[ok], sims[ok]


def _walk(sk: Sketches, order: np.ndarray | None) -> np.ndarray:
    sk.finish()
    walk = np.arange(sk.n) if order is None else np.asarray(order, dtype=np.int64)
    return walk[~sk.empty[walk]]


def deduplicate(sk: Sketches, order: np.ndarray | None = None) -> list[Match]:
    """Walk the texts in `order` (default: row order; rows left out are ignored) and keep each
    unless it is a near-duplicate of a text kept before it. Returns the removed ones, each
    pointing at the most similar kept text it matches (never at another removed one)."""
    walk = _walk(sk, order)
    n = len(walk)
    codes = np.unique(
        np.concatenate(
            [_window_pairs(sk.keys[walk, band], _WINDOW) for band in range(sk.bands)]
            or [np.empty(0, np.int64)]
        )
    )
    later, earlier, sims = _similar(sk, walk, codes)
    # For each text in walking order, its matches best first (most similar, then earliest).
    by = np.lexsort((earlier, -sims, later))
    kept = np.ones(n, dtype=bool)
    removed: list[Match] = []
    decided = -1
    for p in by:
        i, j = int(later[p]), int(earlier[p])
        if i == decided or not kept[j]:
            continue
        kept[i] = False
        decided = i
        removed.append(Match(index=int(walk[i]), of=int(walk[j]), similarity=float(sims[p])))
    return removed


def leaks(sk: Sketches, holdout: np.ndarray, order: np.ndarray | None = None) -> list[Match]:
    """Holdout texts (mask `holdout` over rows) with a near-duplicate in train, where a
    holdout text found leaking counts as train from then on (it is going to move there), until
    no more are found. Each match points at the most similar train (or moved) text."""
    walk = _walk(sk, order)
    n = len(walk)
    marked = np.asarray(holdout, dtype=bool)[walk]
    codes = np.unique(
        np.concatenate(
            [_cross_pairs(sk.keys[walk, band], marked, _CROSS_CAP) for band in range(sk.bands)]
            or [np.empty(0, np.int64)]
        )
    )
    a, b, sims = _similar(sk, walk, codes)
    # Both directions: (holdout text, partner, similarity).
    h = np.concatenate((a, b))
    p = np.concatenate((b, a))
    s = np.concatenate((sims, sims))
    keep = marked[h]
    h, p, s = h[keep], p[keep], s[keep]
    train = ~marked
    found: list[Match] = []
    moved = np.zeros(n, dtype=bool)
    while True:
        live = ~moved[h] & train[p]
        if not live.any():
            break
        hh, pp, ss = h[live], p[live], s[live]
        by = np.lexsort((pp, -ss, hh))
        firsts = by[np.r_[True, hh[by][1:] != hh[by][:-1]]]
        for q in firsts:
            found.append(
                Match(index=int(walk[hh[q]]), of=int(walk[pp[q]]), similarity=float(ss[q]))
            )
        moved[hh[firsts]] = True
        train[hh[firsts]] = True
    return found


def sketch_batches(
    batches: Iterable[pa.Array | pa.ChunkedArray],
    threshold: float,
    num_perm: int,
    shingle_words: int,
) -> Sketches:
    """Sketches of every text in `batches` (rows in order); close() it when done."""
    sk = Sketches(threshold, num_perm, shingle_words, workdir=_workdir())
    try:
        for texts in batches:
            sk.add(texts)
    except BaseException:
        sk.close()
        raise
    return sk.finish()


def _workdir() -> Path | None:
    """Where signature files go: $RETUNE_TMPDIR if set, else the system temp folder."""
    value = os.environ.get("RETUNE_TMPDIR")
    return Path(value) if value else None


def iter_texts(
    table: pa.Table, column: str = "text", batch_rows: int = 8_192
) -> Iterator[pa.Array]:
    """A table's text column in batches, for `sketch_batches`."""
    for batch in table.select([column]).to_batches(max_chunksize=batch_rows):
        yield batch.column(0)
