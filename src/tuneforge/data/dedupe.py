"""Find exact and near-duplicate texts, within a training set and between splits (leakage).

Exact copies share `exact_key`. Near copies are found with MinHash over character n-grams and
banded LSH: a signature of `num_perm` minima estimates the Jaccard similarity of two texts'
n-gram sets, and texts that agree on a whole band of the signature become candidates, which
are then checked against the threshold. Everything is deterministic for a given seed.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Hashable, Iterable, Sequence

import numpy as np

# The universal hash family (a*h + b) mod P uses the Mersenne prime P = 2^31 - 1, not 2^61 - 1, so
# the maths stays exact in uint64 (with 2^61 - 1, a*h would reach 2^93). With h < P, b < P and a
# drawn below 2^30, a*h + b < 2^61 + 2^31; one fold, (x >> 31) + (x & P), leaves a value below 2P
# and one conditional subtraction makes it exactly x mod P: seven array passes per shingle and
# permutation, where a up to P would need a second fold. Signatures fit in uint32.
MERSENNE_31 = (1 << 31) - 1
_P = np.uint64(MERSENNE_31)
_S31 = np.uint64(31)
_BASE = np.uint32(0x01000193)  # odd multiplier of the polynomial n-gram hash (FNV prime)
_BATCH = 1024  # texts per work item; each item's rows of the result are its own
_PIECE = 1024  # shingles per hashing step: two (num_perm, _PIECE) uint64 blocks stay in cache


def normalize(text: str) -> str:
    """Two texts are the same when they differ only in letter case or in whitespace (how much,
    and which kind: spaces, tabs, newlines, including at both ends)."""
    return " ".join(text.lower().split())


def exact_key(text: str) -> bytes:
    """16-byte digest of the normalized text: equal keys mean the same text, for any length."""
    data = normalize(text).encode("utf-8", "surrogatepass")
    return hashlib.blake2b(data, digest_size=16).digest()


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's finalizer: spreads every input bit over the whole 32-bit hash."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def _window_hashes(codes: np.ndarray, width: int) -> np.ndarray:
    """32-bit hash of every `width`-long window of code points (polynomial mod 2^32, mixed)."""
    n = len(codes) - width + 1
    h = np.zeros(n, dtype=np.uint32)
    for j in range(width):
        h = h * _BASE + codes[j : j + n]
    return _fmix32(h)


def _codes(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4").astype(np.uint32)


def estimated_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """The share of signature positions that agree estimates the Jaccard similarity of the sets."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"signatures of different shapes: {a.shape} and {b.shape}")
    return float(np.mean(a == b))


class MinHasher:
    """MinHash signatures of texts, over the set of character n-grams of the normalized text.

    A text shorter than `ngram` characters is one shingle. Each shingle is hashed once to 32 bits
    and reduced mod P = 2^31 - 1; permutation i is then h -> (a_i*h + b_i) mod P, computed for all
    i at once. Two distinct shingles share h with chance about 2^-31, far below MinHash's own error.
    """

    def __init__(self, num_perm: int = 64, ngram: int = 5, seed: int = 0):
        if num_perm < 1 or ngram < 1:
            raise ValueError(f"num_perm and ngram must be >= 1, got {num_perm} and {ngram}")
        self.num_perm, self.ngram, self.seed = num_perm, ngram, seed
        rng = np.random.default_rng(seed)
        self._a = rng.integers(1, 1 << 30, num_perm, dtype=np.uint64)[:, None]
        self._b = rng.integers(0, MERSENNE_31, num_perm, dtype=np.uint64)[:, None]

    def signature(self, text: str) -> np.ndarray:
        """uint32 array of shape (num_perm,)."""
        return self.signatures([text])[0]

    def signatures(self, texts: Iterable[str]) -> np.ndarray:
        """uint32 array of shape (len(texts), num_perm); batches run on all CPU cores (numpy
        releases the GIL), and the result does not depend on how many there are."""
        texts = list(texts)
        batches = [texts[i : i + _BATCH] for i in range(0, len(texts), _BATCH)]
        if len(batches) <= 1:
            parts = [self._batch(b) for b in batches]
        else:
            with ThreadPoolExecutor(min(len(batches), os.cpu_count() or 1)) as pool:
                parts = list(pool.map(self._batch, batches))
        return np.concatenate(parts) if parts else np.zeros((0, self.num_perm), dtype=np.uint32)

    def _shingles(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Shingle hashes of all texts, one run after another, and where each text's run starts."""
        k = self.ngram
        norm = [normalize(t) for t in texts]
        lengths = np.fromiter(map(len, norm), dtype=np.int64, count=len(norm))
        codes = np.concatenate([_codes("".join(norm)), np.zeros(k, dtype=np.uint32)])
        every = _window_hashes(codes, k)  # windows at every position; some cross into the next text
        counts = np.maximum(lengths - k + 1, 1)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        text_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        positions = np.arange(counts.sum()) - np.repeat(starts - text_starts, counts)
        hashes = every[positions]
        for i in np.flatnonzero(lengths < k):  # a short text is one shingle: the whole text
            hashes[starts[i]] = _window_hashes(_codes(norm[i]), int(lengths[i]))[0]
        return hashes.astype(np.uint64) % _P, starts

    def _batch(self, texts: list[str]) -> np.ndarray:
        hashes, starts = self._shingles(texts)
        sig = np.full((len(texts), self.num_perm), MERSENNE_31, dtype=np.uint64)
        x = np.empty((self.num_perm, _PIECE), dtype=np.uint64)
        y = np.empty_like(x)
        for lo in range(0, len(hashes), _PIECE):
            h = hashes[lo : lo + _PIECE]
            xv, yv = x[:, : len(h)], y[:, : len(h)]
            np.multiply(self._a, h, out=xv)
            np.add(xv, self._b, out=xv)  # x < 2^61 + 2^31
            np.right_shift(xv, _S31, out=yv)  # 2^31 == 1 (mod P), so x == (x >> 31) + (x & P)
            np.bitwise_and(xv, _P, out=xv)
            np.add(xv, yv, out=xv)  # x < 2^31 + 2^30 < 2P
            np.subtract(xv, _P, out=yv)  # x - P wraps around to a huge value when x < P,
            np.minimum(xv, yv, out=xv)  # so the smaller of the two is x mod P
            # Texts starting inside this piece, plus the one running into it from the last piece.
            first = np.searchsorted(starts, lo, side="right") - 1
            owners = np.arange(first, np.searchsorted(starts, lo + len(h)))
            cuts = np.maximum(starts[owners] - lo, 0)
            part = np.minimum.reduceat(xv, cuts, axis=1).T
            sig[owners] = np.minimum(sig[owners], part)
        return sig.astype(np.uint32)


def choose_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) with bands * rows == num_perm whose S-curve midpoint (1/bands)^(1/rows) is
    the largest at or below the threshold (the lowest one if none is). Leaning low is deliberate:
    every candidate is checked against the threshold, so a false positive costs one comparison,
    while a false negative is a duplicate never seen. At 0.8 and 64 permutations this is 8 x 8,
    which makes a pair at similarity 0.85 a candidate 92% of the time."""
    splits = [(b, num_perm // b) for b in range(1, num_perm + 1) if num_perm % b == 0]
    midpoint = lambda br: (1 / br[0]) ** (1 / br[1])  # noqa: E731
    at_or_below = [br for br in splits if midpoint(br) <= threshold]
    return max(at_or_below, key=midpoint) if at_or_below else min(splits, key=midpoint)


class LSHIndex:
    """Banded LSH over MinHash signatures; `query` returns only candidates that pass the threshold."""

    def __init__(self, threshold: float = 0.8, num_perm: int = 64):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        self.threshold, self.num_perm = threshold, num_perm
        self.bands, self.rows = choose_bands(threshold, num_perm)
        self._buckets: list[dict[bytes, list[int]]] = [{} for _ in range(self.bands)]
        self._keys: list[Hashable] = []
        self._seen: set[Hashable] = set()
        self._sigs = np.zeros((16, num_perm), dtype=np.uint64)

    def __len__(self) -> int:
        return len(self._keys)

    def _bands(self, sig: np.ndarray) -> list[bytes]:
        sig = np.asarray(sig, dtype=np.uint64)
        if sig.shape != (self.num_perm,):
            raise ValueError(f"signature shape {sig.shape}, expected ({self.num_perm},)")
        return [sig[i * self.rows : (i + 1) * self.rows].tobytes() for i in range(self.bands)]

    def add(self, key: Hashable, sig: np.ndarray) -> None:
        if key in self._seen:
            raise ValueError(f"key {key!r} is already in the index")
        bands = self._bands(sig)
        n = len(self._keys)
        if n == len(self._sigs):
            self._sigs = np.concatenate([self._sigs, np.zeros_like(self._sigs)])
        self._sigs[n] = sig
        self._keys.append(key)
        self._seen.add(key)
        for bucket, band in zip(self._buckets, bands):
            bucket.setdefault(band, []).append(n)

    def query_scored(self, sig: np.ndarray) -> list[tuple[Hashable, float]]:
        """(key, estimated Jaccard) of every indexed signature at or above the threshold, in
        insertion order."""
        found: set[int] = set()
        for bucket, band in zip(self._buckets, self._bands(sig)):
            found.update(bucket.get(band, ()))
        if not found:
            return []
        ids = np.array(sorted(found))
        sims = np.mean(self._sigs[ids] == np.asarray(sig, dtype=np.uint64), axis=1)
        keep = sims >= self.threshold
        return [(self._keys[i], float(s)) for i, s in zip(ids[keep], sims[keep])]

    def query(self, sig: np.ndarray) -> list[Hashable]:
        """Keys whose estimated Jaccard with `sig` is at least the threshold, in insertion order."""
        return [key for key, _ in self.query_scored(sig)]


def near_duplicate_groups(
    texts: Sequence[str], threshold: float = 0.8, num_perm: int = 64, ngram: int = 5, seed: int = 0
) -> list[tuple[int, int, float]]:
    """(index, index of the first earlier match, estimated similarity) for every text that
    repeats an earlier one. An exact copy points to its first exact copy with similarity 1.0;
    it is not indexed again, so a text repeated many times costs no more than once."""
    sigs = MinHasher(num_perm, ngram, seed).signatures(texts)
    index = LSHIndex(threshold, num_perm)
    first_of: dict[bytes, int] = {}
    found: list[tuple[int, int, float]] = []
    for i, text in enumerate(texts):
        key = exact_key(text)
        if key in first_of:
            found.append((i, first_of[key], 1.0))
            continue
        first_of[key] = i
        matches = index.query_scored(sigs[i])
        if matches:
            found.append((i, *matches[0]))
        index.add(i, sigs[i])
    return found


def cross_duplicates(
    train_texts: Sequence[str],
    other_texts: Sequence[str],
    threshold: float = 0.8,
    num_perm: int = 64,
    ngram: int = 5,
    seed: int = 0,
) -> list[tuple[int, int, float]]:
    """The leakage check: (other index, train index, similarity) for each validation or test
    text that exactly or nearly repeats a training text, naming the first such training text."""
    hasher = MinHasher(num_perm, ngram, seed)
    index = LSHIndex(threshold, num_perm)
    first_of: dict[bytes, int] = {}
    for i, (text, sig) in enumerate(zip(train_texts, hasher.signatures(train_texts))):
        key = exact_key(text)
        if key not in first_of:
            first_of[key] = i
            index.add(i, sig)
    leaks: list[tuple[int, int, float]] = []
    for j, (text, sig) in enumerate(zip(other_texts, hasher.signatures(other_texts))):
        key = exact_key(text)
        if key in first_of:
            leaks.append((j, first_of[key], 1.0))
            continue
        matches = index.query_scored(sig)
        if matches:
            leaks.append((j, *matches[0]))
    return leaks
