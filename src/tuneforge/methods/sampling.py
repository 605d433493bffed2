"""GRPO's sampling seeds: each completion's generator is seeded from (run seed, step, its place in the
global batch), so the same prompts give the same completions on any number of processes.

Why not `generate()`: with one random stream per process, what a prompt draws would depend on which
process sampled it and on what that process sampled before, so 2 processes could never be compared
with 1. The batched, seeded decoder itself (`decode`, with `synced` for FSDP, where every forward is a
collective) lives in models/decode.py with the rest of decoding.
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
