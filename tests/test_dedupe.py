"""Exact and near-duplicate detection: planted copies are found, unrelated texts are not."""

from __future__ import annotations

import random

import numpy as np
import pytest

from tuneforge.data.dedupe import (
    LSHIndex,
    MinHasher,
    choose_bands,
    cross_duplicates,
    estimated_jaccard,
    exact_key,
    near_duplicate_groups,
    normalize,
)

_rng = random.Random(0)
VOCAB = ["".join(_rng.choices("abcdefghijklmnopqrstuvwxyz", k=_rng.randint(2, 9))) for _ in range(3000)]


def words(seed: int, n: int = 200) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice(VOCAB) for _ in range(n)]


def edited(seed: int, n_changed: int, n: int = 200) -> tuple[str, str]:
    """A 200-word text and a copy with `n_changed` words replaced by words not in it."""
    original = words(seed, n)
    copy = list(original)
    for k, pos in enumerate(random.Random(seed + 1).sample(range(n), n_changed)):
        copy[pos] = f"zz{k}qq"
    return " ".join(original), " ".join(copy)


def shingle_jaccard(a: str, b: str, k: int = 5) -> float:
    sa = {normalize(a)[i : i + k] for i in range(len(normalize(a)) - k + 1)}
    sb = {normalize(b)[i : i + k] for i in range(len(normalize(b)) - k + 1)}
    return len(sa & sb) / len(sa | sb)


def test_normalize_and_exact_key_ignore_case_and_whitespace_only():
    assert normalize("  Hello\t\tWORLD\n again ") == "hello world again"
    key = exact_key("Hello world")
    assert len(key) == 16
    assert exact_key("  hello \n WORLD ") == key
    assert exact_key("Hello, world") != key


def test_signatures_are_deterministic_per_seed_and_do_not_depend_on_batching():
    texts = [" ".join(words(s, 400)) for s in range(5)] + ["", "abc", "x" * 3000]
    sigs = MinHasher(seed=3).signatures(texts)
    assert sigs.shape == (len(texts), 64)
    assert np.array_equal(sigs, MinHasher(seed=3).signatures(texts))
    assert np.array_equal(sigs, np.stack([MinHasher(seed=3).signature(t) for t in texts]))
    assert not np.array_equal(sigs, MinHasher(seed=4).signatures(texts))


def test_a_text_shorter_than_the_ngram_is_one_shingle():
    h = MinHasher(ngram=5)
    assert np.array_equal(h.signature("abc"), h.signature(" ABC "))
    assert estimated_jaccard(h.signature("abc"), h.signature("abd")) < 0.2
    assert h.signature("").shape == (64,)


@pytest.mark.parametrize("n_changed", [1, 10, 30, 60])
def test_estimated_jaccard_is_close_to_the_true_jaccard(n_changed):
    a, b = edited(seed=n_changed, n_changed=n_changed)
    h = MinHasher(num_perm=256)
    est = estimated_jaccard(h.signature(a), h.signature(b))
    assert est == pytest.approx(shingle_jaccard(a, b), abs=0.1)  # 256 perms: sd <= 0.03


def test_bands_split_the_signature_and_lean_towards_recall():
    assert choose_bands(0.8, 64) == (8, 8)
    for threshold in (0.3, 0.5, 0.7, 0.9, 0.95):
        for num_perm in (16, 64, 128, 100):
            b, r = choose_bands(threshold, num_perm)
            assert b * r == num_perm


def test_lsh_query_returns_keys_above_threshold_in_insertion_order():
    a, near_a = edited(seed=1, n_changed=1)
    h = MinHasher()
    index = LSHIndex(threshold=0.8)
    index.add("second", h.signature(near_a))
    index.add("unrelated", h.signature(" ".join(words(99))))
    index.add("first", h.signature(a))
    assert index.query(h.signature(a)) == ["second", "first"]
    assert index.query(h.signature(" ".join(words(50)))) == []
    with pytest.raises(ValueError, match="already"):
        index.add("first", h.signature(a))


def test_planted_near_and_exact_copies_are_found_and_nothing_else():
    texts = [" ".join(words(100 + s)) for s in range(40)]
    original, one_word_changed = edited(seed=7, n_changed=1)
    texts[5] = original
    texts.append(one_word_changed)  # index 40
    texts.append("  " + original.upper() + "\n")  # index 41: an exact copy after normalization
    found = near_duplicate_groups(texts, threshold=0.8)
    assert [(i, j) for i, j, _ in found] == [(40, 5), (41, 5)]
    assert found[0][2] > 0.9
    assert found[1][2] == 1.0


def test_higher_threshold_flags_a_subset():
    texts = []
    for n_changed in (1, 5, 10, 20, 35, 60):
        texts += edited(seed=n_changed, n_changed=n_changed)
    flagged = [{i for i, _, _ in near_duplicate_groups(texts, threshold=t)} for t in (0.3, 0.5, 0.7, 0.8, 0.9, 0.95)]
    for lower, higher in zip(flagged, flagged[1:]):
        assert higher <= lower
    assert len(flagged[0]) > len(flagged[-1]) >= 1


def test_cross_duplicates_finds_a_planted_leak():
    train = [" ".join(words(200 + s)) for s in range(30)]
    original, near = edited(seed=8, n_changed=1)
    train[7] = original
    validation = [" ".join(words(300 + s)) for s in range(10)]
    validation[2] = near
    validation[6] = train[3].upper()
    leaks = cross_duplicates(train, validation, threshold=0.8)
    assert [(j, i) for j, i, _ in leaks] == [(2, 7), (6, 3)]
    assert leaks[0][2] > 0.9 and leaks[1][2] == 1.0
    assert cross_duplicates(train, [" ".join(words(400 + s)) for s in range(10)]) == []
