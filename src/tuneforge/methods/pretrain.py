"""Pre-training objective (method: pretrain): next-token cross-entropy on every token of raw-text blocks.

From scratch (init: random) or continued pre-training (init: pretrained). Held out: validation loss and
bits per byte = total nats / ln 2 / UTF-8 bytes of the predicted tokens, which compares across
tokenizers (a tokenizer with longer tokens has a higher loss per token for the same text); and greedy
continuations of fixed prompts, so a run shows what it learned in words.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from tuneforge.data.bpe import token_byte_lengths
from tuneforge.fast import FastPath
from tuneforge.methods.objective import Runtime
from tuneforge.methods.sft import SFT, count_trained, sft_loss_sum
from tuneforge.models.decode import greedy_generate
from tuneforge.models.precision import autocast_for


def bits_per_byte(nats: float, n_bytes: int) -> float | None:
    return nats / math.log(2) / n_bytes if n_bytes else None


def held_out_baseline(train, validation, token_bytes: np.ndarray) -> tuple[int, float | None]:
    """(UTF-8 bytes of the tokens a held-out pass predicts, bits per byte of a unigram model of the training
    tokens on them): the predicted tokens are every validation block's tokens after its first; the unigram
    counts come from the shards (add-one smoothed), the floor a model that ignores context reaches."""
    counts = np.zeros(len(token_bytes), dtype=np.float64)
    for shard in train.maps:
        counts += np.bincount(shard, minlength=len(token_bytes))[: len(token_bytes)]
    bits = -np.log2((counts + 1) / (counts.sum() + len(counts)))
    n_bytes, total = 0, 0.0
    for i in range(len(validation)):
        targets = validation.block(i)[1:]
        n_bytes += int(token_bytes[targets].sum())
        total += float(bits[targets].sum())
    return n_bytes, (total / n_bytes if n_bytes else None)


def block_batch(blocks, indices: list[int]) -> dict[str, torch.Tensor]:
    """Blocks of one length as a batch, every token a label; positions restart at each document start, so
    (with no attention mask) no token attends across a document boundary (fast/padding_free.py's packed rows)."""
    ids = torch.from_numpy(np.stack([blocks.block(i) for i in indices]))
    positions = torch.from_numpy(np.stack([blocks.positions(i) for i in indices]))
    return {"input_ids": ids, "labels": ids.clone(), "position_ids": positions,
            "attention_mask": torch.ones_like(ids)}


@torch.no_grad()
def held_out_loss(model, blocks, batch_size: int, device, dtype) -> tuple[float, int]:
    """(nats summed in fp64, tokens predicted) over every validation block, attended as in training."""
    was_training = model.training
    model.eval()
    nats, tokens = 0.0, 0
    n = len(blocks)
    full = n - 1 if n and len(blocks.block(n - 1)) <= blocks.seq else n  # the last may be shorter: run alone
    groups = [list(range(i, min(i + batch_size, full))) for i in range(0, full, batch_size)] + [[full]] * (n - full)
    for indices in groups:
        batch = {k: v.to(device) for k, v in block_batch(blocks, indices).items()}
        with autocast_for(device, dtype):
            nats += sft_loss_sum(model, batch).item()
        tokens += count_trained(batch)
    model.train(was_training)
    return nats, tokens


class Pretrain:
    name = "pretrain"
    notes = ()

    def __init__(self, spec, data, pad_id: int, fast: FastPath = FastPath(), run: Runtime = Runtime()):
        self.spec, self.data, self.pad_id, self.fast, self.run = spec, data, pad_id, fast, run
        self.token_bytes = token_byte_lengths(run.tokenizer)
        self._baseline: tuple[int, float | None] | None = None

    @classmethod
    def build(cls, spec, data, pad_id: int, reference, run: Runtime) -> "Pretrain":
        return cls(spec, data, pad_id, run=run)

    def collate(self, indices: list[int], place: tuple[int, int] = (0, 0)) -> dict[str, torch.Tensor]:
        return block_batch(self.data.train, indices)

    # The loss is SFT's, over every token of the block: normalised by the trained tokens of the accumulated batch.
    units, prepare, loss = SFT.units, SFT.prepare, SFT.loss

    def samples(self, model) -> list[dict]:
        """Greedy continuations of the fixed prompts, each started as a new document (after EOS)."""
        tok, run = self.run.tokenizer, self.run
        eos = tok.eos_token_id
        prompts = [[eos] + tok(p, add_special_tokens=False)["input_ids"] for p in self.spec.prompts]
        was_training = model.training
        model.eval()
        with autocast_for(run.device, run.dtype):
            gens = greedy_generate(model, prompts, [eos], self.pad_id, self.spec.sample_tokens, run.device)
        model.train(was_training)
        return [{"prompt": p, "reference": p, "answer": p + tok.decode(ids, skip_special_tokens=True), "stopped": s}
                for p, (ids, s) in zip(self.spec.prompts, gens)]

    def held_out(self, model, data, final: bool = False, reference=None) -> dict:
        """val_loss and val_bpb on every validation token; the samples; when `final`, the sizes measured too."""
        run = self.run
        nats, tokens = held_out_loss(model, data.validation, run.cfg.micro_batch_size, run.device, run.dtype)
        if self._baseline is None:
            self._baseline = held_out_baseline(data.train, data.validation, self.token_bytes)
        n_bytes, unigram_bpb = self._baseline
        loss = nats / max(tokens, 1)
        result = {"val_loss": loss, "perplexity": math.exp(min(loss, 50.0)), "val_tokens": tokens,
                  "val_bpb": bits_per_byte(nats, n_bytes)}
        samples = self.samples(model)
        if not final:
            return {**result, "val_samples": [{"prompt": s["prompt"], "text": s["answer"]} for s in samples]}
        return {**result, "unigram_bpb": unigram_bpb, "bytes_per_token": n_bytes / max(result["val_tokens"], 1),
                "vocab_size": len(run.tokenizer), "samples": samples}

    def preflight(self, model) -> None:
        pass

    def describe(self) -> dict:
        return {"method": self.name, "loss": "cross-entropy on every token",
                "normalised_by": "tokens of the accumulated batch"}
