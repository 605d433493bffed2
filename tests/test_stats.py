"""Length statistics: exact numbers on small hand-computed cases."""

from __future__ import annotations

import random
import sys

import numpy as np
import pytest

from tuneforge.data.stats import (
    histogram,
    length_outliers,
    length_summary,
    pack_first_fit_decreasing,
    packing_waste,
    padding_waste,
    save_histogram_png,
    share_over,
    tokens_per_epoch,
)
from tuneforge.errors import TuneforgeError


def test_summary_percentiles_are_actual_lengths():
    assert length_summary(range(1, 11)) == {
        "count": 10, "total_tokens": 55, "mean": 5.5, "min": 1,
        "p50": 5, "p90": 9, "p95": 10, "p99": 10, "max": 10,
    }
    assert length_summary([])["count"] == 0


def test_histogram_bins_are_integer_and_the_tail_is_not_hidden():
    assert histogram(range(1, 11), bins=5) == [(1, 3, 2), (3, 5, 2), (5, 7, 2), (7, 9, 2), (9, 11, 2)]
    assert histogram(range(1, 11), bins=3, max_len=6) == [(1, 3, 2), (3, 5, 2), (5, 7, 2), (7, 11, 4)]
    assert histogram(range(1, 11), bins=3, max_len=5) == [(1, 3, 2), (3, 5, 2), (5, 6, 1), (6, 11, 5)]
    assert histogram([]) == []


def test_share_over_counts_examples_and_lost_tokens():
    assert share_over([100, 600, 1000, 512], 512) == (2, 0.5, 88 + 488)


def test_padding_waste_in_a_known_order():
    assert padding_waste([1, 2, 3, 4], 2, seed=None) == pytest.approx(2 / 12)  # [1,2] [3,4]
    assert padding_waste([1, 4, 2, 3], 2, seed=None) == pytest.approx(4 / 14)  # [1,4] [2,3]
    assert padding_waste([4, 4, 1], 2, seed=None) == 0.0  # the last, short batch pads to its own longest
    assert padding_waste([1, 2, 3, 4], 1) == 0.0


def test_padding_waste_shuffles_deterministically():
    assert padding_waste([1, 1, 1, 4], 4, seed=5) == pytest.approx(9 / 16)  # one batch: order is moot
    lengths = list(range(1, 200))
    assert padding_waste(lengths, 8, seed=1) == padding_waste(lengths, 8, seed=1)
    assert padding_waste(lengths, 8, seed=1) != padding_waste(lengths, 8, seed=2)
    assert padding_waste(lengths, 8, seed=1) > padding_waste(lengths, 8, seed=None)  # sorted order pads least


def test_packing_known_cases():
    assert pack_first_fit_decreasing([6, 4, 5, 5], 10) == 2
    assert packing_waste([6, 4, 5, 5], 10) == 0.0
    assert packing_waste([7, 7, 7], 10) == pytest.approx(0.3)
    assert packing_waste([25, 5], 10) == pytest.approx(0.25)  # 25 is capped at 10
    assert pack_first_fit_decreasing([1, 2, 2, 3, 3, 4, 5], 10) == 2
    assert packing_waste([], 10) == 0.0


def test_packing_matches_a_plain_first_fit_decreasing():
    def plain(lengths, cap):
        bins: list[int] = []
        for x in sorted((min(v, cap) for v in lengths if v), reverse=True):
            for i, used in enumerate(bins):
                if used + x <= cap:
                    bins[i] += x
                    break
            else:
                bins.append(x)
        return len(bins)

    rng = random.Random(0)
    for _ in range(300):
        cap = rng.randint(1, 64)
        lengths = [rng.randint(0, 80) for _ in range(rng.randint(0, 60))]
        assert pack_first_fit_decreasing(lengths, cap) == plain(lengths, cap)


def test_outliers_finds_planted_long_and_short_examples():
    lengths = np.random.default_rng(0).integers(450, 551, 300).tolist()  # tight: within 10% of 500
    assert length_outliers(lengths) == []
    lengths[17], lengths[200] = 60_000, 3
    assert length_outliers(lengths) == [17, 200]
    assert length_outliers([500] * 10 + [60_000] * 2) == []  # under 20 values: no verdict


def test_outliers_when_most_lengths_are_equal():
    lengths = [512] * 30 + list(range(400, 600, 20)) + [1]
    assert length_outliers(lengths) == [40]


def test_tokens_per_epoch_follows_the_truncation_policy():
    lengths = [100, 600, 1000, 512]
    assert tokens_per_epoch(lengths, 512, "drop") == 612
    assert tokens_per_epoch(lengths, 512, "truncate_right") == 100 + 3 * 512
    assert tokens_per_epoch(lengths, 512, "truncate_left") == 100 + 3 * 512
    assert tokens_per_epoch(lengths, 1000, "error") == 2212
    with pytest.raises(TuneforgeError, match="2 examples are longer"):
        tokens_per_epoch(lengths, 512, "error")
    with pytest.raises(ValueError, match="truncation must be"):
        tokens_per_epoch(lengths, 512, "cut")


def test_histogram_png_is_written(tmp_path):
    lengths = np.random.default_rng(0).lognormal(6, 1, 1000).astype(int)
    path = save_histogram_png(lengths, tmp_path / "lengths.png", max_seq_len=1024, title="train")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_histogram_png_without_matplotlib_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(TuneforgeError, match="pip install matplotlib"):
        save_histogram_png([1, 2, 3], tmp_path / "x.png")
