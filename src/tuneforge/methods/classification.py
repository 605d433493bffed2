"""Text classification: a classifier head over an encoder (or a decoder's score head), one logit per class.

Single-label data trains cross-entropy over the classes; multi-label data a sigmoid per class (binary
cross-entropy, averaged over the classes), as transformers' own sequence-classification heads compute them.
Losses are summed over examples and divided by the examples of the whole accumulated batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tuneforge.data.batching import collate
from tuneforge.data.labels import label_counts
from tuneforge.eval.labels import label_metrics
from tuneforge.methods.objective import Runtime
from tuneforge.models.precision import autocast_for


def collate_labelled(examples: list, targets, pad_id: int, token_types: bool, multi_label: bool) -> dict:
    """Right-padded ids and mask (+ token type ids, for models that read them) and each row's classes:
    an index (single-label) or a multi-hot row (multi-label)."""
    padded = collate(examples, pad_id)
    batch = {"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"]}
    if token_types:  # the per-token array holds the segment of each token (data/labels.py)
        batch["token_type_ids"] = padded["labels"].clamp(min=0)
    rows = torch.as_tensor(targets)
    batch["targets"] = rows.float() if multi_label else rows.argmax(-1)
    return batch


def class_logits(model, batch: dict) -> torch.Tensor:
    """The head's logits (fp32), one row per example."""
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    return model(**inputs).logits.float()


def classification_losses(logits: torch.Tensor, targets: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """One loss per example: cross-entropy, or binary cross-entropy averaged over the classes."""
    if multi_label:
        return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(-1)
    return F.cross_entropy(logits, targets, reduction="none")


def predicted_sets(probs: torch.Tensor, multi_label: bool, threshold: float) -> list[set[int]]:
    """The classes predicted: the most probable one, or every class at or above `threshold` (multi-label)."""
    if multi_label:
        return [set(torch.nonzero(row >= threshold).flatten().tolist()) for row in probs]
    return [{int(i)} for i in probs.argmax(-1)]


def gold_sets(targets: torch.Tensor, multi_label: bool) -> list[set[int]]:
    """The true classes of each row of targets: class indices, or multi-hot rows (multi-label)."""
    if multi_label:
        return [set(torch.nonzero(row > 0).flatten().tolist()) for row in targets]
    return [{int(i)} for i in targets]


def class_probabilities(logits: torch.Tensor, multi_label: bool) -> torch.Tensor:
    return torch.sigmoid(logits) if multi_label else torch.softmax(logits, -1)


def confidently_wrong(records, gold: list[set[int]], pred: list[set[int]], probs: torch.Tensor, names: list[str],
                      n: int) -> list[dict]:
    """The `n` wrong predictions the model was surest of: text, true and predicted classes, and the probability
    of the most confident mistaken class (a wrongly predicted one, or one wrongly left out as 1 - p)."""
    wrong = []
    for i, (g, p) in enumerate(zip(gold, pred)):
        if g == p:
            continue
        sure = max([float(probs[i, c]) for c in p - g] + [1 - float(probs[i, c]) for c in g - p])
        rec = records[i]
        wrong.append({"where": rec.where, "text": rec.text, **({"text_pair": rec.fields["text_pair"]}
                                                               if rec.fields.get("text_pair") else {}),
                      "true": [names[c] for c in sorted(g)], "predicted": [names[c] for c in sorted(p)],
                      "probability": round(sure, 4)})
    return sorted(wrong, key=lambda w: -w["probability"])[:n]


class Classification:
    name = "classification"
    notes: tuple[str, ...] = ()  # set per run: the classes and the data's findings

    def __init__(self, spec, data, pad_id: int, run: Runtime = Runtime()):
        self.spec, self.data, self.pad_id, self.run = spec, data, pad_id, run
        counts = label_counts(data)
        self.notes = (f"{len(counts)} classes ({'multi-label' if data.multi_label else 'single-label'}), "
                      "training examples each: " + ", ".join(f"{n} {c}" for n, c in counts.items()), *data.findings)

    @classmethod
    def build(cls, spec, data, pad_id: int, reference, run: Runtime) -> "Classification":
        return cls(spec, data, pad_id, run)

    def _collate(self, split, targets, indices: list[int]) -> dict:
        return collate_labelled([split[i] for i in indices], targets[indices], self.pad_id, self.data.token_types,
                                self.data.multi_label)

    def collate(self, indices: list[int], place: tuple[int, int] = (0, 0)) -> dict:
        return self._collate(self.data.train, self.data.train_targets, indices)

    def units(self, batch) -> dict[str, int]:
        return {"examples": batch["input_ids"].size(0), "tokens": int(batch["attention_mask"].sum())}

    def prepare(self, model, batch):
        return batch

    def loss(self, model, batch, totals) -> tuple[torch.Tensor, dict]:
        logits = class_logits(model, batch)
        losses = classification_losses(logits, batch["targets"], self.data.multi_label)
        pred = predicted_sets(class_probabilities(logits.detach(), self.data.multi_label), self.data.multi_label,
                              self.spec.threshold)
        right = sum(p == g for p, g in zip(pred, self._gold(batch["targets"])))
        return losses.sum() / totals["examples"], {"accuracy": (float(right), float(len(pred)))}

    def _gold(self, targets: torch.Tensor) -> list[set[int]]:
        return gold_sets(targets, self.data.multi_label)

    @torch.no_grad()
    def held_out(self, model, data, final: bool = False, reference=None) -> dict:
        """val_loss, val_accuracy and val_macro_f1 during training; before/after, every label metric, the most
        confidently wrong examples and the multi-label threshold."""
        run, n = self.run, len(data.validation)
        size = run.cfg.micro_batch_size
        was_training = model.training
        model.eval()
        losses, all_probs, gold = [], [], []
        for start in range(0, n, size):
            batch = self._collate(data.validation, data.validation_targets, list(range(start, min(n, start + size))))
            batch = {k: v.to(run.device) for k, v in batch.items()}
            with autocast_for(run.device, run.dtype):
                logits = class_logits(model, batch)
            losses.append(classification_losses(logits, batch["targets"], data.multi_label).double().cpu())
            all_probs.append(class_probabilities(logits, data.multi_label).cpu())
            gold += self._gold(batch["targets"].cpu())
        model.train(was_training)
        probs = torch.cat(all_probs)
        pred = predicted_sets(probs, data.multi_label, self.spec.threshold)
        metrics = label_metrics(gold, pred, data.labels)
        loss = float(torch.cat(losses).mean())
        if not final:
            return {"val_loss": loss, "val_accuracy": metrics["accuracy"], "val_macro_f1": metrics["macro_f1"]}
        return {"val_loss": loss, **metrics, **({"threshold": self.spec.threshold} if data.multi_label else {}),
                "confidently_wrong": confidently_wrong(data.validation.records, gold, pred, probs, data.labels,
                                                       self.spec.wrong_examples)}

    def preflight(self, model) -> None:
        pass

    def describe(self) -> dict:
        multi = self.data.multi_label
        return {"method": self.name, "classes": len(self.data.labels),
                "loss": "binary cross-entropy per class (sigmoid)" if multi else "cross-entropy over the classes",
                **({"threshold": self.spec.threshold} if multi else {}),
                "normalised_by": "examples of the accumulated batch"}
