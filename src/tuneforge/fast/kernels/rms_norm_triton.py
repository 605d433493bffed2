"""The RMSNorm kernels in Triton: one row per program forward, a share of the rows per program backward.

Imported only where Triton runs (fast/kernels/launch.py), so a machine without Triton never needs it.
No `from __future__ import annotations` here: Triton reads the `tl.constexpr` annotations as objects.
"""

import torch
import triton
import triton.language as tl

from tuneforge.fast.kernels.launch import programs, warps


@triton.jit
def _forward(X, W, Y, RSTD, n_cols, eps, GEMMA: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    tl.store(RSTD + row, rstd)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    xhat = x * rstd
    if GEMMA:  # (x_hat * (1 + w)) in fp32, cast once
        y = xhat * (1.0 + w)
    else:  # w * x_hat, x_hat first rounded to the input's dtype as transformers does
        y = w * xhat.to(X.dtype.element_ty).to(tl.float32)
    tl.store(Y + row * n_cols + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _backward(DY, X, W, RSTD, DX, DW, n_rows, n_cols, rows_per_program,
              GEMMA: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if GEMMA:
        w = w + 1.0
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    first = pid * rows_per_program
    for i in range(0, rows_per_program):
        row = (first + i).to(tl.int64)
        live = cols < tl.where(row < n_rows, n_cols, 0)  # past the last row: nothing to load or store
        x = tl.load(X + row * n_cols + cols, mask=live, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * n_cols + cols, mask=live, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + tl.minimum(row, n_rows - 1))
        xhat = x * rstd
        if GEMMA:
            dw += dy * xhat
        else:
            dw += dy * xhat.to(X.dtype.element_ty).to(tl.float32)
        g = dy * w  # the gradient reaching x_hat
        # d x_hat / d x = rstd * (I - x_hat x_hat^T / n): project out the part along x_hat
        dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / n_cols))
        tl.store(DX + row * n_cols + cols, dx.to(DX.dtype.element_ty), mask=live)
    tl.store(DW + pid * n_cols + cols, dw, mask=mask)


def forward(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool, out_dtype: torch.dtype):
    """(y, rstd) for rows `x` [N, H], contiguous."""
    rows, cols = x.shape
    y = torch.empty((rows, cols), dtype=out_dtype, device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(cols)
    _forward[(rows,)](x, weight, y, rstd, cols, eps, GEMMA=gemma, BLOCK=block, num_warps=warps(block))
    return y, rstd


def backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, gemma: bool):
    """(dx, dw in fp32) for rows `x` [N, H] and their output gradient `dy`, both contiguous."""
    rows, cols = x.shape
    dx = torch.empty_like(x)
    n = programs(rows, x.device)
    per = triton.cdiv(rows, n)
    dw = torch.empty((n, cols), dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(cols)
    _backward[(n,)](dy, x, weight, rstd, dx, dw, rows, cols, per, GEMMA=gemma, BLOCK=block,
                              num_warps=warps(block))
    return dx, dw.sum(0)
