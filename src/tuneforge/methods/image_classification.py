"""Image classification: cross-entropy of the classifier's logits against each image's class; for multi-label
data (list labels) a sigmoid per class, binary cross-entropy averaged over the classes, a class predicted at
or above `threshold`, as transformers' own multi-label heads compute them.

Held out: val_loss and val_accuracy while training; before/after, the label metrics of eval/labels.py
and the validation images the model gets wrong most confidently.
"""

from __future__ import annotations

import random

import torch

from tuneforge.data.images import pixel_batch
from tuneforge.eval.labels import label_metrics
from tuneforge.methods.classification import class_probabilities, classification_losses, gold_sets, predicted_sets
from tuneforge.methods.objective import Runtime
from tuneforge.models.precision import autocast_for


class ImageClassification:
    name = "image_classification"
    notes = ()
    reference = None

    def __init__(self, spec, data, run: Runtime = Runtime()):
        self.spec, self.data, self.run = spec, data, run
        self.multi = bool(getattr(data, "multi_label", False))

    @classmethod
    def build(cls, spec, data, pad_id, reference, run: Runtime) -> "ImageClassification":
        return cls(spec, data, run)

    def _batch(self, examples: list, flip: random.Random | None = None) -> dict[str, torch.Tensor]:
        return {"pixel_values": pixel_batch(self.run.tokenizer, [e.record for e in examples], flip),
                "labels": self._targets(examples)}

    def _targets(self, examples: list) -> torch.Tensor:
        """Each image's class index, or (multi-label) its multi-hot row."""
        if not self.multi:
            return torch.tensor([e.label for e in examples], dtype=torch.long)
        rows = torch.zeros(len(examples), len(self.data.labels))
        for i, e in enumerate(examples):
            rows[i, list(e.targets)] = 1.0
        return rows

    def collate(self, indices: list[int], place: tuple[int, int] = (0, 0)) -> dict[str, torch.Tensor]:
        """Training images, flipped at random when augment is on: the draw is a function of the seed and the
        micro-batch's place in the run, so a resumed run sees exactly the same pixels."""
        flip = random.Random(f"{self.run.seed}:{place[0]}:{place[1]}") if self.spec.augment else None
        return self._batch([self.data.train[i] for i in indices], flip)

    def prepare(self, model, batch: dict) -> dict:
        return batch

    def units(self, batch: dict) -> dict[str, int]:
        return {"examples": int(batch["labels"].size(0))}

    def loss(self, model, batch: dict, totals: dict[str, int]) -> tuple[torch.Tensor, dict]:
        logits = model(pixel_values=batch["pixel_values"]).logits.float()
        losses = classification_losses(logits, batch["labels"], self.multi)
        correct = sum(p == g for p, g in zip(self._predicted(logits.detach()), self._gold(batch["labels"])))
        return losses.sum() / totals["examples"], {"accuracy": (float(correct), float(losses.numel()))}

    def _predicted(self, logits: torch.Tensor) -> list[set[int]]:
        return predicted_sets(class_probabilities(logits, self.multi), self.multi, self.spec.threshold)

    def _gold(self, targets: torch.Tensor) -> list[set[int]]:
        return gold_sets(targets, self.multi)

    @torch.no_grad()
    def logits(self, model, examples: list) -> torch.Tensor:
        """The classifier's logits for these images, in order, without augmentation."""
        run, size = self.run, self.run.cfg.micro_batch_size
        was_training = model.training
        model.eval()
        out = []
        for i in range(0, len(examples), size):
            pixels = self._batch(examples[i : i + size])["pixel_values"].to(run.device)
            with autocast_for(run.device, run.dtype):
                out.append(model(pixel_values=pixels).logits.float().cpu())
        model.train(was_training)
        return torch.cat(out)

    def held_out(self, model, data, final: bool = False, reference=None) -> dict:
        """val_loss and val_accuracy while training; before/after, also the label metrics and the most
        confidently wrong images."""
        logits = self.logits(model, data.validation)
        targets = self._targets(data.validation)
        loss = classification_losses(logits, targets, self.multi).mean().item()
        gold, pred = self._gold(targets), self._predicted(logits)
        if not final:
            return {"val_loss": loss, "val_accuracy": sum(p == g for p, g in zip(pred, gold)) / max(len(gold), 1)}
        report = label_report(class_probabilities(logits, self.multi), gold, pred, data.labels,
                              [e.record.where for e in data.validation], self.spec.wrong_examples)
        return {"val_loss": loss, **report, **({"threshold": self.spec.threshold} if self.multi else {})}

    def preflight(self, model) -> None:
        pass

    def describe(self) -> dict:
        loss = "binary cross-entropy per class (sigmoid)" if self.multi else "cross-entropy over the classes"
        return {"method": self.name, "loss": loss, **({"threshold": self.spec.threshold} if self.multi else {}),
                "normalised_by": "images of the accumulated batch", "augment": self.spec.augment}


def label_report(probs: torch.Tensor, gold: list[set[int]], pred: list[set[int]], names: list[str], where: list[str],
                 hardest: int) -> dict:
    """label_metrics of the predicted classes, and the `hardest` wrong predictions made with most confidence: the
    probability of the surest wrongly predicted class (multi-label, when none was: 1 - p of the surest missed one)."""
    report = label_metrics(gold, pred, names)
    wrong = []
    for i, (g, p) in enumerate(zip(gold, pred)):
        if g != p:
            sure = max([float(probs[i, c]) for c in p - g] or [1 - float(probs[i, c]) for c in g - p])
            wrong.append((sure, i))
    wrong.sort(key=lambda w: -w[0])

    def named(classes: set[int]) -> str:
        return ", ".join(names[c] for c in sorted(classes))

    report["most_confidently_wrong"] = [{"image": where[i], "label": named(gold[i]), "predicted": named(pred[i]),
                                         "confidence": round(sure, 4)} for sure, i in wrong[:hardest]]
    return report
