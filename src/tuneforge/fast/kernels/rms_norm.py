"""RMSNorm as one autograd function: a Triton kernel on GPU, the same arithmetic in PyTorch elsewhere.

transformers' RMSNorm is five elementwise operations, each a pass over the activations, and autograd
keeps an fp32 copy of the input and the normalised rows for the backward. Here the forward is one
pass, the backward another, and only the input and one fp32 number per row (1 / rms) are kept.

Two forms, both computed in fp32 as transformers does:
- Llama, Mistral, Qwen2/3, Phi-3: `w * (x / rms(x)).to(x.dtype)`, the product in the weight's dtype;
- Gemma 1/2/3: `(x / rms(x) * (1 + w)).to(x.dtype)`, the weight stored as an offset from 1.
"""

from __future__ import annotations

import torch

from tuneforge.fast.kernels.launch import triton_runs

MAX_TRITON_COLS = 65536  # one row must fit one Triton block


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool = False) -> torch.Tensor:
    """What transformers computes (LlamaRMSNorm / GemmaRMSNorm), left to autograd: the tests' yardstick."""
    xf = x.float()
    xhat = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if gemma:
        return (xhat * (1.0 + weight.float())).type_as(x)
    return weight * xhat.to(x.dtype)


def _wide(dtype: torch.dtype) -> torch.dtype:
    """fp32, or fp64 for fp64 inputs (which is how the backward formulas are checked exactly)."""
    return torch.promote_types(dtype, torch.float32)


def _out_dtype(x: torch.Tensor, weight: torch.Tensor, gemma: bool) -> torch.dtype:
    return x.dtype if gemma else torch.promote_types(x.dtype, weight.dtype)


def _forward_torch(x, weight, eps, gemma):
    wide = _wide(x.dtype)
    xf = x.to(wide)
    rstd = torch.rsqrt(xf.pow(2).mean(-1) + eps)
    xhat = xf * rstd[:, None]
    y = xhat * (1.0 + weight.to(wide)) if gemma else weight.to(wide) * xhat.to(x.dtype).to(wide)
    return y.to(_out_dtype(x, weight, gemma)), rstd


def _backward_torch(dy, x, weight, rstd, gemma, need_weight):
    wide = rstd.dtype
    xhat = x.to(wide) * rstd[:, None]
    dyf = dy.to(wide)
    w = weight.to(wide) + 1.0 if gemma else weight.to(wide)
    dw = None
    if need_weight:
        dw = (dyf * (xhat if gemma else xhat.to(x.dtype).to(wide))).sum(0)
    g = dyf * w  # the gradient reaching x_hat
    # d x_hat / d x = rstd * (I - x_hat x_hat^T / n): project out the part along x_hat
    dx = rstd[:, None] * (g - xhat * (g * xhat).mean(-1, keepdim=True))
    return dx, dw


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float, gemma: bool):
        shape = x.shape
        rows = x.reshape(-1, shape[-1]).contiguous()
        ctx.triton = triton_runs(x) and shape[-1] <= MAX_TRITON_COLS
        if ctx.triton:
            from tuneforge.fast.kernels import rms_norm_triton

            y, rstd = rms_norm_triton.forward(rows, weight.contiguous(), eps, gemma, _out_dtype(x, weight, gemma))
        else:
            y, rstd = _forward_torch(rows, weight, eps, gemma)
        ctx.save_for_backward(rows, weight, rstd)
        ctx.gemma, ctx.shape = gemma, shape
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        rows, weight, rstd = ctx.saved_tensors
        dy = dy.reshape(rows.shape).contiguous()
        if ctx.triton:
            from tuneforge.fast.kernels import rms_norm_triton

            dx, dw = rms_norm_triton.backward(dy, rows, weight.contiguous(), rstd, ctx.gemma)
        else:
            dx, dw = _backward_torch(dy, rows, weight, rstd, ctx.gemma, ctx.needs_input_grad[1])
        dw = dw.to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx.to(rows.dtype).view(ctx.shape), dw, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool = False) -> torch.Tensor:
    """RMSNorm of the last dimension of `x`, in the Llama form or (gemma) the (1 + w) form."""
    return _RMSNorm.apply(x, weight, eps, gemma)


class FusedRmsNorm(torch.nn.Module):
    """Stands in for a transformers RMSNorm, holding the same weight Parameter (state-dict key `weight`).

    Spelled "RmsNorm" on purpose: transformers re-initialises modules whose class name contains
    "RMSNorm" to ones, which would be wrong for Gemma's offset weights.
    """

    def __init__(self, weight: torch.nn.Parameter, eps: float, gemma: bool):
        super().__init__()
        self.weight = weight
        self.eps = eps
        self.gemma = gemma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.gemma)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, form={'1 + w' if self.gemma else 'w'}"
