"""The gated activation kernels in Triton: elementwise, one block of elements per program.

Imported only where Triton runs (fast/kernels/launch.py), so a machine without Triton never needs it.
No `from __future__ import annotations` here: Triton reads the `tl.constexpr` annotations as objects.
"""

import torch
import triton
import triton.language as tl

PER_PROGRAM = 1024  # elements
# tanh-gelu's constants, sqrt(2/pi) = 0.7978845608028654 and 0.044715, are written into the kernels:
# compiled Triton reads only constexpr globals, and its interpreter does not mix those with tensors.


@triton.jit
def _forward(G, U, H, n, GELU: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    if GELU:  # tanh(z) written as 2 sigmoid(2z) - 1, which every Triton backend has
        t = 2.0 * tl.sigmoid(2.0 * 0.7978845608028654 * (g + 0.044715 * g * g * g)) - 1.0
        a = 0.5 * g * (1.0 + t)
    else:
        a = g * tl.sigmoid(g)
    a = a.to(G.dtype.element_ty).to(tl.float32)  # the activation rounded to the input's dtype, as transformers has it
    tl.store(H + offs, (a * u).to(H.dtype.element_ty), mask=mask)


@triton.jit
def _backward(DH, G, U, DG, DU, n, GELU: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dh = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    if GELU:
        t = 2.0 * tl.sigmoid(2.0 * 0.7978845608028654 * (g + 0.044715 * g * g * g)) - 1.0
        a = 0.5 * g * (1.0 + t)
        da = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * g * g)
    else:
        s = tl.sigmoid(g)
        a = g * s
        da = s * (1.0 + g * (1.0 - s))
    a = a.to(G.dtype.element_ty).to(tl.float32)
    tl.store(DU + offs, (dh * a).to(DU.dtype.element_ty), mask=mask)
    tl.store(DG + offs, (dh * u * da).to(DG.dtype.element_ty), mask=mask)


def forward(gate: torch.Tensor, up: torch.Tensor, gelu: bool) -> torch.Tensor:
    n = gate.numel()
    h = torch.empty_like(gate)
    _forward[(triton.cdiv(n, PER_PROGRAM),)](gate, up, h, n, GELU=gelu, BLOCK=PER_PROGRAM)
    return h


def backward(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, gelu: bool):
    n = gate.numel()
    dg, du = torch.empty_like(gate), torch.empty_like(up)
    _backward[(triton.cdiv(n, PER_PROGRAM),)](dh, gate, up, dg, du, n, GELU=gelu, BLOCK=PER_PROGRAM)
    return dg, du
