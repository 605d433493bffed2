"""Decoding, written once for eval, serve and GRPO: stop tokens, left padding, the KV-cached forward
step, and the greedy or temperature/top-p pick of each token.

Three callers, one loop underneath: `greedy_generate` (eval's exact match and `tuneforge generate`),
`decode` (GRPO's seeded batches, which must draw the same on any number of processes) and
`generate_ids` (the server's token stream, one request at a time per step).
"""

from __future__ import annotations

import inspect
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from tuneforge.parallel.apply import forward_is_collective


@dataclass
class Sampling:
    max_tokens: int | None = None  # None: the caller's default (the server's --max-tokens-default)
    temperature: float = 1.0  # OpenAI's default; 0 is greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


def stop_token_ids(tokenizer, end_of_turn: str | None) -> list[int]:
    """Every id that ends an answer: the template's end-of-turn and the tokenizer's EOS."""
    ids = []
    for tok in (end_of_turn, getattr(tokenizer, "eos_token", None)):
        if tok:
            idx = tokenizer.convert_tokens_to_ids(tok)
            if idx is not None and idx not in ids:
                ids.append(idx)
    return ids


def pick_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """Greedy at temperature 0; otherwise a draw from the temperature-scaled top-p distribution."""
    if sampling.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        keep = (sorted_p.cumsum(-1) - sorted_p) < sampling.top_p  # the most likely token always stays
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)
    return int(torch.multinomial(probs, 1, generator=generator))


def sample_rows(logits: torch.Tensor, temperature: float, top_p: float,
                generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row, row i drawing from generators[i] with pick_token, so training samples as serving does."""
    sampling = Sampling(temperature=temperature, top_p=top_p)
    return torch.tensor([pick_token(row, sampling, g) for row, g in zip(logits, generators)],
                        device=logits.device)


def forward_names(model) -> tuple[str, dict]:
    """The KV-cache argument's name (transformers renamed past_key_values to cache) and, where the
    model allows it, a request for the last position's logits only (a long prompt x vocab is GBs)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(base.forward).parameters
    cache_name = "cache" if "cache" in params else "past_key_values"
    return cache_name, ({"logits_to_keep": 1} if "logits_to_keep" in params else {})


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), each prompt right-aligned so every row's next token is in the last column."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


class Cached:
    """A left-padded batch on the KV cache: `logits` holds each row's next-token logits; `step` feeds one
    token per row. Positions count from each row's first real token, so padding changes nothing."""

    def __init__(self, model, prompts: list[list[int]], pad_id: int, device):
        self.model = model
        self.cache_name, self.extra = forward_names(model)
        ids, mask = left_pad(prompts, pad_id)
        self.mask = mask.to(device)
        positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        self.position = positions[:, -1:]
        self.out = model(input_ids=ids.to(device), attention_mask=self.mask, position_ids=positions,
                         use_cache=True, **self.extra)

    @property
    def logits(self) -> torch.Tensor:
        return self.out.logits[:, -1]

    def step(self, tokens: torch.Tensor) -> None:
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(tokens), 1)], dim=1)
        self.position = self.position + 1
        self.out = self.model(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=self.position,
                              use_cache=True, **{self.cache_name: self.out[self.cache_name]}, **self.extra)


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
    dummy prompt): the forward passes line up because all stop on the same, all-reduced, step. The model
    is called as given (an FSDP root, not the inner model `generate()` would call).
    """
    was_training = model.training
    model.eval()
    n = len(prompts)
    batch = Cached(model, prompts, pad_id, device)
    new: list[list[int]] = [[] for _ in range(n)]
    stopped = [False] * n
    stops = set(stop_ids)
    step = 0
    while True:
        logits = batch.logits
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
        batch.step(token)
    model.train(was_training)
    return [(row, s) for row, s in zip(new, stopped)]


def greedy_generate(model, prompts: list[list[int]], stop_ids: list[int], pad_id: int, max_new_tokens: int,
                    device, batch_size: int = 16) -> list[tuple[list[int], bool]]:
    """Greedy continuations in batches of `batch_size`; each is (new token ids, stopped), the stop token dropped.

    A sharded model (FSDP) decodes in step with the other processes, which answer the same prompts: were one
    process's answer to end a token earlier (last-bit differences), the others would wait on its forward."""
    out = []
    synced = forward_is_collective(model)
    for i in range(0, len(prompts), batch_size):
        for ids, stopped in decode(model, prompts[i : i + batch_size], stop_ids, pad_id, max_new_tokens, device,
                                   synced=synced):
            out.append((ids[:-1] if stopped else ids, stopped))
    return out


@torch.no_grad()
def generate_ids(model, prompt: list[int], max_new_tokens: int, sampling: Sampling, device) -> Iterator[int]:
    """New token ids one at a time, with the KV cache; the caller decides when to stop (and may stop
    reading between any two tokens, which is how the server takes turns between requests)."""
    generator = None
    if sampling.temperature > 0:
        generator = torch.Generator(device=device)
        generator.manual_seed(sampling.seed if sampling.seed is not None else secrets.randbits(63))
    batch = Cached(model, [prompt], 0, device)
    for i in range(max_new_tokens):
        tok = pick_token(batch.logits[0], sampling, generator)
        yield tok
        if i + 1 < max_new_tokens:
            batch.step(torch.tensor([tok], device=device))
