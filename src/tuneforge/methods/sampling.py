"""GRPO's completions: a batch of prompts decoded with a key-value cache, each row drawing from its own
random generator, every process stepping together.

Why not `generate()`: with one random stream per process, what a prompt draws would depend on which
process sampled it and on what that process sampled before, so 2 processes could never be compared
with 1. Here each completion has a generator seeded from (run seed, step, its place in the global
batch), and the same prompts give the same completions on any number of processes.

Under FSDP every forward is a collective (each layer's weights are gathered from all processes), and
`generate()` would call the inner transformers model, past the FSDP root's hooks. This loop calls the
model as given (the root), and with `synced` a process whose rows have all finished keeps making the
forward passes until every process is done (one all-reduced flag per token), so none waits forever.
"""

from __future__ import annotations

import hashlib

import torch


def draw_seed(*parts: int) -> int:
    """A 63-bit seed from integers (run seed, step, place...): the same on every process and machine."""
    digest = hashlib.blake2b(repr(tuple(int(p) for p in parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def seeded_generators(seeds: list[int], device) -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(s) for s in seeds]


def sample_rows(logits: torch.Tensor, temperature: float, top_p: float,
                generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row, row i drawing from generators[i], with the server's own temperature and
    top-p draw (serve.engine.pick_token), so training samples as serving does."""
    from tuneforge.serve.engine import pick_token
    from tuneforge.serve.protocol import Sampling

    sampling = Sampling(temperature=temperature, top_p=top_p)
    return torch.tensor([pick_token(row, sampling, g) for row, g in zip(logits, generators)],
                        device=logits.device)


def all_finished(finished: bool, synced: bool, device) -> bool:
    """Whether every process is done: this one's flag alone, or (synced) the flags of all of them."""
    if not synced:
        return finished
    flag = torch.tensor([0.0 if finished else 1.0], device=device)
    torch.distributed.all_reduce(flag)
    return flag.item() == 0.0


@torch.no_grad()
def decode(model, prompts: list[list[int]], stop_ids: list[int], pad_id: int, max_new_tokens: int, device,
           sampling: dict | None = None, synced: bool = False) -> list[tuple[list[int], bool]]:
    """(new ids, stopped) per prompt, the stop token kept; prompts are left-padded into one batch.

    Greedy unless `sampling` gives temperature, top_p and `generators` (one per prompt). With `synced`
    every process must call this the same number of times (a process with nothing to decode passes a
    dummy prompt): the forward passes line up because all stop on the same, all-reduced, step.
    """
    from tuneforge.serve.engine import forward_names

    was_training = model.training
    model.eval()
    n, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: each row counts from its first real token
    cache_name, extra = forward_names(model)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **extra)
    new: list[list[int]] = [[] for _ in range(n)]
    stopped = [False] * n
    stops = set(stop_ids)
    position = positions[:, -1:]
    step = 0
    while True:
        logits = out.logits[:, -1]
        # Only rows still decoding draw, so a row's generator advances once per token it keeps, however
        # long the other rows (and, under `synced`, the other processes) go on: its next turn draws the same.
        live = [i for i in range(n) if not stopped[i]] if step < max_new_tokens else []
        token = logits.argmax(-1)  # greedy; for the rows that are done, a placeholder that is dropped
        if sampling and live:
            token[live] = sample_rows(logits[live], sampling["temperature"], sampling["top_p"],
                                      [sampling["generators"][i] for i in live])
        for i, t in zip(live, token[live].tolist()):
            new[i].append(t)
            stopped[i] = t in stops
        step += 1
        # Under `synced` a process whose rows are done (or whose max_new_tokens is reached) keeps making
        # forward passes, its tokens dropped, until the flag says every process is done.
        if all_finished(all(stopped) or step >= max_new_tokens, synced, device):
            break
        mask = torch.cat([mask, mask.new_ones(n, 1)], dim=1)
        position = position + 1
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=position, use_cache=True,
                    **{cache_name: out[cache_name]}, **extra)
    model.train(was_training)
    return [(row, s) for row, s in zip(new, stopped)]
