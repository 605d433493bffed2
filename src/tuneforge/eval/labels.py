"""Metrics of predicted labels against true ones, shared by text and image classification. No torch.

Each example's labels are a set of class indices: one for single-label tasks, any number for multi-label
ones, so one function serves both. Accuracy is the share of examples whose set is exactly right.
"""

from __future__ import annotations

from collections.abc import Sequence


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def per_class(gold: Sequence[set[int]], pred: Sequence[set[int]], n_classes: int) -> list[dict]:
    """Precision, recall, F1 and support (true examples) of each class, one-vs-rest."""
    rows = []
    for c in range(n_classes):
        tp = sum(1 for g, p in zip(gold, pred) if c in g and c in p)
        fp = sum(1 for g, p in zip(gold, pred) if c not in g and c in p)
        fn = sum(1 for g, p in zip(gold, pred) if c in g and c not in p)
        precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
        rows.append({"precision": precision, "recall": recall, "f1": _ratio(2 * precision * recall, precision + recall),
                     "support": tp + fn})
    return rows


def confusion(gold: Sequence[set[int]], pred: Sequence[set[int]], n_classes: int) -> list[list[int]]:
    """Rows: the true class, columns: the predicted one (single-label tasks; a multi-label example counts
    each true class against each predicted class)."""
    matrix = [[0] * n_classes for _ in range(n_classes)]
    for g, p in zip(gold, pred):
        for t in g:
            for q in p:
                matrix[t][q] += 1
    return matrix


def label_metrics(gold: Sequence[set[int]], pred: Sequence[set[int]], names: Sequence[str]) -> dict:
    """accuracy, macro and weighted F1, per-class precision/recall/F1 by name, and the confusion matrix."""
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} true label sets but {len(pred)} predictions")
    rows = per_class(gold, pred, len(names))
    support = sum(r["support"] for r in rows)
    seen = set().union(*gold, *pred)
    present = [r for c, r in enumerate(rows) if c in seen]  # a class absent from both sides says nothing
    return {
        "examples": len(gold),
        "accuracy": _ratio(sum(1 for g, p in zip(gold, pred) if g == p), len(gold)),
        "macro_f1": _ratio(sum(r["f1"] for r in present), len(present)),
        "weighted_f1": _ratio(sum(r["f1"] * r["support"] for r in rows), support),
        "per_class": {name: row for name, row in zip(names, rows)},
        "confusion": confusion(gold, pred, len(names)),
        "labels": list(names),
    }
