"""One attention layer of a padding-free row on CPU: the masked row against per-example attention.

    python bench/varlen_attention_cpu.py --repeats 7

The row is 8 examples whose lengths are drawn like fast_path_cpu.py's variable-length set (log-normal,
median about 120 tokens, capped at 512), with SmolLM2-135M's attention shape (9 query heads over 3
key-value heads of 64). "masked" is what transformers runs for a packed row under sdpa: the whole row
against a block-diagonal T x T mask; "per-example" is fast/varlen.py's CPU path. Forward and backward,
fp32; the fastest of `repeats` runs is kept, since a shared machine only ever slows a run down. The
outputs and gradients of both are compared, so the timing is of the same computation.
"""

from __future__ import annotations

import argparse
import random
import time

import torch
import torch.nn.functional as F

from tuneforge.fast.varlen import varlen_attention

HEADS, KV_HEADS, DIM = 9, 3, 64


def lengths(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [min(512, max(24, int(30 + rng.lognormvariate(4.5, 0.8)))) for _ in range(n)]


def masked(q, k, v, sizes):
    """(1, H, T, D) inputs, the block-diagonal causal mask built as transformers builds it for sdpa."""
    doc = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    i = torch.arange(len(doc))
    mask = (doc[:, None] == doc[None, :]) & (i[:, None] >= i[None, :])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def per_example(q, k, v, sizes):
    flat = lambda t: t[0].transpose(0, 1)  # noqa: E731  (T, heads, D)
    return varlen_attention(flat(q), flat(k), flat(v), sizes, DIM ** -0.5).transpose(0, 1)[None]


def timed(fn, inputs, repeats: int) -> tuple[float, torch.Tensor, list[torch.Tensor]]:
    best = float("inf")
    for _ in range(repeats):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        start = time.perf_counter()
        out = fn(*leaves)
        out.sum().backward()
        best = min(best, time.perf_counter() - start)
    return best, out.detach(), [t.grad for t in leaves]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--examples", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    sizes = lengths(args.examples, args.seed)
    total = sum(sizes)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, h, total, DIM) for h in (HEADS, KV_HEADS, KV_HEADS))
    t_mask, out_mask, g_mask = timed(lambda *t: masked(*t, sizes), (q, k, v), args.repeats)
    t_var, out_var, g_var = timed(lambda *t: per_example(*t, sizes), (q, k, v), args.repeats)
    torch.testing.assert_close(out_var, out_mask, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_var, g_mask):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    pairs_row, pairs_var = total * total, sum(n * n for n in sizes)
    print(f"lengths {sizes}, T = {total}; pairs: row {pairs_row:,}, per example {pairs_var:,} "
          f"({pairs_row / pairs_var:.1f}x fewer)")
    print("| attention (fwd+bwd, one layer) | best of %d, ms |" % args.repeats)
    print("|---|---|")
    print(f"| masked row (T x T mask) | {t_mask * 1e3:.1f} |")
    print(f"| per example (fast/varlen.py) | {t_var * 1e3:.1f} |")
    print(f"speed-up {t_mask / t_var:.2f}x; outputs and gradients equal")


if __name__ == "__main__":
    main()
