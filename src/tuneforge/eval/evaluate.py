"""Before/after evaluation: validation loss and perplexity, and exact match of greedy answers."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tuneforge.data.batching import collate
from tuneforge.data.tokenized import Example
from tuneforge.data.template import IGNORE_INDEX, encode_segment_lists, generation_prompt
from tuneforge.eval.forgetting import general_perplexity
from tuneforge.eval.suite import score_suite
from tuneforge.models.decode import greedy_generate, stop_token_ids
from tuneforge.models.precision import autocast_for


def token_losses(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of every position (fp32; 0 where not trained) and the mask of trained positions."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    shift = logits[:, :-1].float()
    losses = F.cross_entropy(shift.reshape(-1, shift.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                             reduction="none")
    return losses.view(labels.shape), labels != IGNORE_INDEX


@torch.no_grad()
def validation_loss(model, examples: list[Example], pad_id: int, device, dtype, batch_size: int = 8,
                    hardest: int = 0) -> dict:
    """Token-weighted mean cross-entropy over the trained tokens of the validation set, with the
    per-token loss percentiles and the `hardest` examples (highest mean loss) by file:line.

    The sum is taken in fp64 in the same order as the training loss, so it matches sft_loss_sum.
    """
    was_training = model.training
    model.eval()
    total, count, per_token, per_example = 0.0, 0, [], []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
        with autocast_for(device, dtype):
            losses, mask = token_losses(model, batch)
        total += losses.double().sum().item()
        count += int(mask.sum())
        per_token.append(losses[mask].cpu())
        sums, ns = losses.double().sum(1).tolist(), mask.sum(1).tolist()
        per_example += [(s / max(n, 1), n, ex) for s, n, ex in zip(sums, ns, chunk)]
    model.train(was_training)
    loss = total / max(count, 1)
    out = {"val_loss": loss, "perplexity": math.exp(min(loss, 50.0)), "val_tokens": count}
    if count:
        q = np.percentile(torch.cat(per_token).numpy(), [50, 90, 99, 100])
        out.update({f"val_token_loss_{k}": float(v) for k, v in zip(("p50", "p90", "p99", "max"), q)})
    if hardest:
        worst = sorted(per_example, key=lambda t: -t[0])[:hardest]
        out["val_hardest"] = [{"where": ex.record.where, "loss": mean, "tokens": n} for mean, n, ex in worst]
    return out


def reference_pair(tokenizer, ex: Example, end_of_turn: str | None = None) -> tuple[list[int], str] | None:
    """(prompt ids, reference answer) for an example whose last turn is the answer, else None."""
    rec = ex.record
    if rec.kind == "chat" and rec.messages and rec.messages[-1]["role"] == "assistant":
        content = rec.messages[-1].get("content")
        if isinstance(content, str):
            return generation_prompt(tokenizer, rec.messages[:-1], end_of_turn), content
    if rec.kind == "completion":
        # Tokenized as training tokenizes the prompt segment (BOS included when the tokenizer adds one).
        [(ids, _)] = encode_segment_lists(tokenizer, [[(rec.prompt, False)]])
        return ids.tolist(), rec.completion
    return None


def question(ex: Example) -> str:
    """The prompt as a person would read it (the last user turn, or a completion's prompt), for a judge."""
    rec = ex.record
    users = [m.get("content") for m in rec.messages if m.get("role") == "user"]
    return str(users[-1]) if rec.kind == "chat" and users else str(rec.prompt)


def exact_match(model, tokenizer, examples: list[Example], end_of_turn: str | None, device,
                max_examples: int = 200, max_new_tokens: int | None = None, batch_size: int = 16) -> dict | None:
    """Share of held-out prompts whose greedy answer equals the reference, and share that stopped by itself."""
    kept = [(ex, p) for ex in examples[:max_examples] if (p := reference_pair(tokenizer, ex, end_of_turn)) is not None]
    if not kept:
        return None
    prompts, refs = [p for _, (p, _) in kept], [r for _, (_, r) in kept]
    if max_new_tokens is None:
        longest = max(len(tokenizer(r, add_special_tokens=False).input_ids) for r in refs)
        max_new_tokens = 2 * longest + 8
    stops = stop_token_ids(tokenizer, end_of_turn)
    gens = greedy_generate(model, prompts, stops, tokenizer.pad_token_id, max_new_tokens, device, batch_size)
    answers = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids, _ in gens]
    hits = [a == r.strip() for a, r in zip(answers, refs)]
    samples = [
        {"prompt": tokenizer.decode(p, skip_special_tokens=False), "reference": r, "answer": a, "stopped": s,
         "where": ex.record.where, "fields": ex.record.fields, "question": question(ex)}
        for (ex, _), p, r, a, (_, s) in zip(kept, prompts, refs, answers, gens)
    ]
    return {
        "exact_match": sum(hits) / len(hits),
        "stopped": sum(s for _, s in gens) / len(gens),
        "n": len(hits),
        "samples": samples,
    }


def evaluate(model, tokenizer, examples: list[Example], end_of_turn: str | None, device, dtype, cfg,
             base: Path | None = None) -> dict:
    """Everything the before/after table shows, for one model state: the suite's metrics on the greedy answers
    and the general-text perplexity too when the config asks (`base`: where user metric modules are found)."""
    spec = cfg.evaluation
    result = validation_loss(model, examples, tokenizer.pad_token_id, device, dtype, cfg.micro_batch_size)
    with autocast_for(device, dtype):
        em = exact_match(model, tokenizer, examples, end_of_turn, device, spec.max_examples, spec.max_new_tokens,
                         spec.batch_size)
    if em is not None:
        result.update(em)
        if spec.suite:
            result["suite"] = score_suite(spec.suite, em["samples"], base)
    if spec.forgetting:
        result.update(general_perplexity(model, tokenizer, spec.forgetting.path, spec.forgetting.max_tokens,
                                         cfg.max_seq_len, device, dtype))
    return result
