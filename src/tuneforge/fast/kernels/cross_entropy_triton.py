"""Cross-entropy over rows of output-layer products in Triton, one row per program: the chunked losses' softmax.

A row is read once for its log-sum-exp (a running max and sum over blocks of the vocabulary) and,
when the gradient is asked for, once more to overwrite it in place with d(lse - logit[label]) / dz.
The soft-cap and temperature are applied to the raw products inside, so neither an fp32 copy of a
chunk's logits nor its tanh nor its softmax is ever a tensor: PyTorch needs about six passes over
such buffers for the same numbers (fast/chunked_loss.py keeps that path for everywhere else).

Imported only where Triton runs (fast/kernels/launch.py), so a machine without Triton never needs it.
No `from __future__ import annotations` here: Triton reads the `tl.constexpr` annotations as objects.
"""

import torch
import triton
import triton.language as tl

from tuneforge.fast.kernels.launch import warps

MAX_BLOCK = 8192  # vocabulary entries per step along a row


@triton.jit
def _cross_entropy(Z, LABELS, SCALE, LSE, TARGET, n_cols, softcap, temperature,
                   SOFTCAP: tl.constexpr, GRAD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = Z + row * n_cols
    label = tl.load(LABELS + row)
    # The label's logit, read before the row is overwritten. tanh(a) is written as 2 sigmoid(2a) - 1,
    # which every Triton backend has.
    target = tl.load(z_row + label).to(tl.float32)
    if SOFTCAP:
        target = softcap * (2.0 * tl.sigmoid(2.0 * (target / softcap)) - 1.0)
    target = target / temperature
    m = float("-inf")
    s = 0.0
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32)
        if SOFTCAP:
            x = softcap * (2.0 * tl.sigmoid(2.0 * (x / softcap)) - 1.0)
        x = tl.where(mask, x / temperature, float("-inf"))  # after the cap: a capped -inf would be -softcap
        m_next = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_next) + tl.sum(tl.exp(x - m_next), axis=0)
        m = m_next
    lse = m + tl.log(s)
    tl.store(LSE + row, lse)
    tl.store(TARGET + row, target)
    if GRAD:
        scale = 1.0 / temperature
        if SCALE is not None:
            scale = scale * tl.load(SCALE + row).to(tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            x = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32)
            d = scale  # d logit / dz, times the row's factor
            if SOFTCAP:
                t = 2.0 * tl.sigmoid(2.0 * (x / softcap)) - 1.0
                x = softcap * t
                d = scale * (1.0 - t * t)
            p = tl.exp(x / temperature - lse)
            g = (p - tl.where(cols == label, 1.0, 0.0)) * d  # softmax - one-hot
            tl.store(z_row + cols, g.to(Z.dtype.element_ty), mask=mask)


def rows(z: torch.Tensor, labels: torch.Tensor, softcap: float | None, temperature: float = 1.0,
         grad: bool = False, scale: torch.Tensor | None = None):
    """(lse, logit[label]) per row, fp32, of the logits `z` [N, V] (contiguous raw products `h @ W.T`)
    soft-capped and divided by `temperature`; every label a real token id. With `grad`, `z` is
    overwritten with d(lse - logit[label]) / dz, each row times `scale` (none: 1), in z's dtype."""
    n, cols = z.shape
    lse = torch.empty(n, dtype=torch.float32, device=z.device)
    target = torch.empty_like(lse)
    block = min(MAX_BLOCK, triton.next_power_of_2(cols))
    _cross_entropy[(n,)](z, labels.contiguous(), scale, lse, target, cols, float(softcap or 1.0), float(temperature),
                         SOFTCAP=bool(softcap), GRAD=grad, BLOCK=block, num_warps=warps(block))
    return lse, target
