"""Output layer + cross-entropy in chunks of tokens: the loss and its gradients without the full logits.

A causal LM's logits are tokens x vocabulary: 4 x 2048 tokens of a 128k vocabulary are 4 GiB in
fp32, and their gradient as much again. Here only the positions that carry a label go through the
output layer (prompt positions are masked anyway), `chunk` of them at a time, and each chunk's
gradient is computed at once in the forward pass, so one chunk's logits are all that ever exist.
The backward pass only scales the stored gradients by the incoming one. With the fast path's kernels
switch, a chunk's log-sum-exp and gradient come from one Triton kernel (fast/kernels/cross_entropy_triton.py)
wherever Triton runs; this file's PyTorch arithmetic is the path everywhere else.
"""

from __future__ import annotations

import torch

from tuneforge.data.template import IGNORE_INDEX
from tuneforge.fast import default_chunk
from tuneforge.fast.kernels.launch import triton_runs

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the kernel computes in fp32


def chunk_logits(h: torch.Tensor, weight: torch.Tensor, softcap: float | None, temperature: float = 1.0):
    """One chunk's logits as the model gives them (matmul in the hidden dtype, softmax in at least fp32;
    soft-capped for Gemma 2/3), divided by `temperature`; and the soft-cap's tanh, for the gradient."""
    z = h @ weight.t()
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    capped = None
    if softcap:
        capped = torch.tanh(z / softcap)
        z = softcap * capped
    return z / temperature if temperature != 1.0 else z, capped


def kernel_runs(h: torch.Tensor, kernel: bool) -> bool:
    """Whether a chunk of hidden states `h` goes through the Triton cross-entropy kernel: asked for, where
    Triton runs, and not in fp64 (the tests' exact checks, which the PyTorch path keeps exact; autocast
    leaves fp64 alone, so the products are fp64 exactly when `h` is)."""
    return kernel and h.dtype in KERNEL_DTYPES and triton_runs(h)


def kernel_rows(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, softcap: float | None,
                temperature: float = 1.0, grad: bool = False, scale: torch.Tensor | None = None):
    """The Triton cross-entropy kernel over one chunk's products `h @ weight.T` (in h's dtype: under
    autocast no fp32 copy is made): (lse, label logit) per row, and the products, which with `grad`
    now hold the gradient (fast/kernels/cross_entropy_triton.py)."""
    from tuneforge.fast.kernels import cross_entropy_triton

    z = h @ weight.t()
    lse, target = cross_entropy_triton.rows(z, labels, softcap, temperature, grad, scale)
    return lse, target, z


def chunk_cross_entropy(h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, softcap: float | None,
                        grad: bool, kernel: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk's summed cross-entropy (fp64) and, with `grad`, its gradient with respect to the products
    `h @ weight.T` in h's dtype: in the Triton kernel (`kernel`, where it runs), or in PyTorch."""
    if kernel_runs(h, kernel):
        lse, target, z = kernel_rows(h, weight, y, softcap, grad=grad)
        return (lse - target).double().sum(), z.to(h.dtype) if grad else None
    logits, capped = chunk_logits(h, weight, softcap)
    lse = torch.logsumexp(logits, dim=-1)
    total = (lse - logits.gather(1, y[:, None]).squeeze(1)).double().sum()
    if not grad:
        return total, None
    dz = torch.softmax(logits, dim=-1)  # d(sum of CE)/d(logits) = softmax - one-hot
    dz[torch.arange(y.numel(), device=dz.device), y] -= 1
    if capped is not None:
        dz *= 1 - capped * capped
    return total, dz.to(h.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk: int, softcap: float | None, kernel: bool):
        ctx.weight_dtype = weight.dtype
        rows = (labels != IGNORE_INDEX).nonzero().squeeze(-1)
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        wide = torch.promote_types(weight.dtype, torch.float32)
        grad_weight = torch.zeros_like(weight, dtype=wide) if ctx.needs_input_grad[1] else None
        need_grad = grad_hidden is not None or grad_weight is not None
        for start in range(0, rows.numel(), chunk):
            idx = rows[start : start + chunk]
            h = hidden[idx]
            loss, grad = chunk_cross_entropy(h, weight, labels[idx], softcap, need_grad, kernel)
            total += loss
            if grad_hidden is not None:
                grad_hidden[idx] = grad @ weight.to(h.dtype)
            if grad_weight is not None:
                grad_weight += (grad.t() @ h).to(wide)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = (grad_hidden * grad_total.to(grad_hidden.dtype)) if grad_hidden is not None else None
        gw = (grad_weight * grad_total.to(grad_weight.dtype)).to(ctx.weight_dtype) if grad_weight is not None else None
        return gh, gw, None, None, None, None


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                             chunk: int | None = None, softcap: float | None = None,
                             kernel: bool = False) -> torch.Tensor:
    """Summed cross-entropy (fp64) of `labels` under logits `hidden @ weight.T` (optionally soft-capped
    as Gemma 2/3 do), positions labelled IGNORE_INDEX skipped. `hidden` is [N, H], `labels` [N].
    `kernel`: the fast path's kernels switch (the Triton cross-entropy kernel where Triton runs)."""
    return _LinearCrossEntropy.apply(hidden, weight, labels, chunk or default_chunk(weight.size(0)), softcap, kernel)

