"""Classification metrics checked against values worked out by hand."""

from __future__ import annotations

import pytest
from sklearn.metrics import f1_score  # scikit-learn comes with sentence-transformers, in the test extra

from tuneforge.eval.labels import label_metrics


def test_single_label_metrics_match_the_hand_computed_values():
    # true:  a a a b b c ; predicted: a a b b c c
    gold = [{0}, {0}, {0}, {1}, {1}, {2}]
    pred = [{0}, {0}, {1}, {1}, {2}, {2}]
    m = label_metrics(gold, pred, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    a, b, c = (m["per_class"][k] for k in "abc")
    assert (a["precision"], a["recall"], a["support"]) == (1.0, pytest.approx(2 / 3), 3)
    assert (b["precision"], b["recall"]) == (0.5, 0.5)
    assert (c["precision"], c["recall"]) == (0.5, 1.0)
    f1 = [0.8, 0.5, 2 / 3]
    assert m["macro_f1"] == pytest.approx(sum(f1) / 3)
    assert m["weighted_f1"] == pytest.approx((0.8 * 3 + 0.5 * 2 + 2 / 3) / 6)
    assert m["confusion"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    y, p = [min(g) for g in gold], [min(q) for q in pred]
    assert m["macro_f1"] == pytest.approx(f1_score(y, p, average="macro"))
    assert m["weighted_f1"] == pytest.approx(f1_score(y, p, average="weighted"))


def test_multi_label_accuracy_needs_the_whole_set_and_absent_classes_do_not_dilute_macro_f1():
    gold = [{0, 1}, {1}, {0}]
    pred = [{0, 1}, {1, 0}, {0}]
    m = label_metrics(gold, pred, ["x", "y", "never"])
    assert m["accuracy"] == pytest.approx(2 / 3)
    x = m["per_class"]["x"]
    assert (x["precision"], x["recall"]) == (pytest.approx(2 / 3), 1.0)
    assert m["macro_f1"] == pytest.approx((0.8 + 1.0) / 2)  # "never" is neither true nor predicted


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="2 true label sets but 1 predictions"):
        label_metrics([{0}, {1}], [{0}], ["a", "b"])
