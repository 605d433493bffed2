"""Supervised fine-tuning objective: token cross-entropy on the trained positions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tuneforge.data.batching import collate
from tuneforge.data.template import IGNORE_INDEX
from tuneforge.eval.evaluate import evaluate, validation_loss
from tuneforge.fast import FastPath
from tuneforge.fast.causal_lm import last_hidden_state, output_layer
from tuneforge.fast.chunked_loss import linear_cross_entropy_sum
from tuneforge.fast.padding_free import collate_flat, flat_pays, model_inputs
from tuneforge.methods.objective import Runtime


def count_trained(batch: dict[str, torch.Tensor]) -> int:
    """Positions that carry a loss once labels are shifted by one."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def sft_loss_sum(model, batch: dict[str, torch.Tensor], chunked: bool = False,
                 chunk: int | None = None, kernel: bool = False) -> torch.Tensor:
    """Summed (not averaged) cross-entropy: fp32 per token, summed in fp64.

    The caller divides by the trained-token count of the whole accumulated batch, so a step's
    loss and gradients do not depend on how the batch was split into micro-batches; the fp64
    sum keeps the logged loss independent of that split too. `chunked`: the output layer runs on
    trained positions only, a chunk at a time (fast/chunked_loss.py), where the model allows it;
    `kernel` (the fast path's kernels switch) does each chunk's softmax in its Triton kernel where that runs.
    """
    labels = batch["labels"][:, 1:]
    out = output_layer(model) if chunked else None
    if out is not None:
        hidden = last_hidden_state(model, model_inputs(batch))[:, :-1]
        return linear_cross_entropy_sum(hidden.reshape(-1, hidden.size(-1)), out.head.weight, labels.reshape(-1),
                                        chunk, out.softcap, kernel)
    logits = model(**model_inputs(batch)).logits
    shift_logits = logits[:, :-1].float()
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).double().sum()


class SFT:
    name = "sft"
    notes = ()

    def __init__(self, data, pad_id: int, fast: FastPath = FastPath(), run: Runtime = Runtime()):
        self.data, self.pad_id, self.fast, self.run = data, pad_id, fast, run

    @classmethod
    def build(cls, spec, data, pad_id: int, reference, run: Runtime) -> "SFT":
        return cls(data, pad_id, run=run)

    def collate(self, indices: list[int], place: tuple[int, int] = (0, 0)) -> dict[str, torch.Tensor]:
        examples = [self.data.train[i] for i in indices]
        if self.fast.padding_free and flat_pays([len(e.input_ids) for e in examples], self.fast.pair_cost,
                                                 self.fast.varlen_attention):
            return collate_flat(examples)
        return collate(examples, self.pad_id)

    def units(self, batch) -> dict[str, int]:
        return {"tokens": count_trained(batch)}

    def prepare(self, model, batch):
        return batch

    def loss(self, model, batch, totals) -> tuple[torch.Tensor, dict]:
        loss_sum = sft_loss_sum(model, batch, self.fast.chunked_loss, self.fast.loss_chunk_tokens, self.fast.kernels)
        return loss_sum / totals["tokens"], {}

    def held_out(self, model, data, final: bool = False, reference=None) -> dict:
        """Validation loss during training; before/after, generation quality too (eval/evaluate.py)."""
        run, cfg = self.run, self.run.cfg
        if final:
            return evaluate(model, run.tokenizer, data.validation, data.end_of_turn, run.device, run.dtype, cfg, run.base)
        return validation_loss(model, data.validation, self.pad_id, run.device, run.dtype, cfg.micro_batch_size,
                               hardest=cfg.diagnose.hardest_examples)

    def preflight(self, model) -> None:
        pass

    def describe(self) -> dict:
        return {"method": self.name, "loss": "cross-entropy", "normalised_by": "trained tokens of the accumulated batch"}
