"""Image classification: cross-entropy of the classifier's logits against each image's class.

Held out: val_loss and val_accuracy while training; before/after, the label metrics of eval/labels.py
and the validation images the model gets wrong most confidently.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from tuneforge.data.images import pixel_batch
from tuneforge.eval.labels import label_metrics
from tuneforge.methods.objective import Runtime
from tuneforge.models.precision import autocast_for


class ImageClassification:
    name = "image_classification"
    notes = ()
    reference = None

    def __init__(self, spec, data, run: Runtime = Runtime()):
        self.spec, self.data, self.run = spec, data, run

    @classmethod
    def build(cls, spec, data, pad_id, reference, run: Runtime) -> "ImageClassification":
        return cls(spec, data, run)

    def _batch(self, examples: list, flip: random.Random | None = None) -> dict[str, torch.Tensor]:
        return {"pixel_values": pixel_batch(self.run.tokenizer, [e.record for e in examples], flip),
                "labels": torch.tensor([e.label for e in examples], dtype=torch.long)}

    def collate(self, indices: list[int], place: tuple[int, int] = (0, 0)) -> dict[str, torch.Tensor]:
        """Training images, flipped at random when augment is on: the draw is a function of the seed and the
        micro-batch's place in the run, so a resumed run sees exactly the same pixels."""
        flip = random.Random(f"{self.run.seed}:{place[0]}:{place[1]}") if self.spec.augment else None
        return self._batch([self.data.train[i] for i in indices], flip)

    def prepare(self, model, batch: dict) -> dict:
        return batch

    def units(self, batch: dict) -> dict[str, int]:
        return {"examples": int(batch["labels"].numel())}

    def loss(self, model, batch: dict, totals: dict[str, int]) -> tuple[torch.Tensor, dict]:
        logits = model(pixel_values=batch["pixel_values"]).logits.float()
        losses = F.cross_entropy(logits, batch["labels"], reduction="none")
        n = float(losses.numel())
        correct = (logits.detach().argmax(-1) == batch["labels"]).float().sum().item()
        return losses.sum() / totals["examples"], {"accuracy": (correct, n)}

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
        gold = torch.tensor([e.label for e in data.validation])
        loss = F.cross_entropy(logits, gold).item()
        if not final:
            return {"val_loss": loss, "val_accuracy": (logits.argmax(-1) == gold).float().mean().item()}
        return {"val_loss": loss, **label_report(logits.softmax(-1), gold.tolist(), data.labels,
                                                 [e.record.where for e in data.validation], self.spec.wrong_examples)}

    def preflight(self, model) -> None:
        pass

    def describe(self) -> dict:
        return {"method": self.name, "loss": "cross-entropy over the classes",
                "normalised_by": "images of the accumulated batch", "augment": self.spec.augment}


def label_report(probs: torch.Tensor, gold: list[int], names: list[str], where: list[str], hardest: int) -> dict:
    """label_metrics of the most probable class, and the `hardest` wrong predictions made with most confidence."""
    confidence, predicted = probs.max(-1)
    report = label_metrics([{g} for g in gold], [{int(p)} for p in predicted], names)
    wrong = [i for i, (g, p) in enumerate(zip(gold, predicted.tolist())) if g != p]
    wrong.sort(key=lambda i: -float(confidence[i]))
    report["most_confidently_wrong"] = [
        {"image": where[i], "label": names[gold[i]], "predicted": names[int(predicted[i])],
         "confidence": round(float(confidence[i]), 4)} for i in wrong[:hardest]]
    return report
