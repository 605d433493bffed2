"""The gated MLP's activation, `act(gate) * up`, as one autograd function (SwiGLU; GeGLU for Gemma).

transformers computes `act_fn(gate_proj(x)) * up_proj(x)`: two elementwise passes, and autograd
keeps the gate, the activation and the up projection (three intermediate-size tensors per layer,
the largest activations of a decoder layer). Here it is one pass each way keeping two, the gate and
the up projection; the activation is recomputed in the backward.

The three projections stay the model's own Linear modules (or PEFT's LoRA layers on them), so only
the activation between them changes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tuneforge.fast.kernels.launch import triton_runs


def gated_reference(gate: torch.Tensor, up: torch.Tensor, gelu: bool = False) -> torch.Tensor:
    """What transformers computes (silu, or gelu_pytorch_tanh for Gemma), left to autograd: the tests' yardstick."""
    act = F.gelu(gate, approximate="tanh") if gelu else F.silu(gate)
    return act * up


def _activation(g: torch.Tensor, gelu: bool):
    """(act(g), act'(g)) in the dtype of `g` (fp32 or fp64); the value from torch's own function, so
    the forward equals transformers' bit for bit."""
    if gelu:
        k = math.sqrt(2.0 / math.pi)
        t = torch.tanh(k * (g + 0.044715 * g**3))
        return F.gelu(g, approximate="tanh"), 0.5 * (1 + t) + 0.5 * g * (1 - t * t) * k * (1 + 3 * 0.044715 * g * g)
    s = torch.sigmoid(g)
    return F.silu(g), s * (1 + g * (1 - s))


class _Gated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, gelu: bool):
        gate, up = gate.contiguous(), up.contiguous()
        ctx.triton = triton_runs(gate)
        if ctx.triton:
            from tuneforge.fast.kernels import gated_triton

            h = gated_triton.forward(gate, up, gelu)
        else:
            wide = torch.promote_types(gate.dtype, torch.float32)
            a, _ = _activation(gate.to(wide), gelu)
            h = (a.to(gate.dtype).to(wide) * up.to(wide)).to(gate.dtype)
        ctx.save_for_backward(gate, up)
        ctx.gelu = gelu
        return h

    @staticmethod
    def backward(ctx, dh):
        gate, up = ctx.saved_tensors
        dh = dh.contiguous()
        if ctx.triton:
            from tuneforge.fast.kernels import gated_triton

            return (*gated_triton.backward(dh, gate, up, ctx.gelu), None)
        wide = torch.promote_types(gate.dtype, torch.float32)  # fp64 stays fp64: the formulas are checked exactly
        a, da = _activation(gate.to(wide), ctx.gelu)
        dhw = dh.to(wide)
        return (dhw * up.to(wide) * da).to(gate.dtype), (dhw * a.to(gate.dtype).to(wide)).to(up.dtype), None


def gated(gate: torch.Tensor, up: torch.Tensor, gelu: bool = False) -> torch.Tensor:
    """silu(gate) * up, or gelu_tanh(gate) * up; `gate` and `up` of one shape, taken to one dtype."""
    dtype = torch.promote_types(gate.dtype, up.dtype)
    return _Gated.apply(gate.to(dtype), up.to(dtype), gelu)


class FusedGatedMLP(torch.nn.Module):
    """Stands in for a transformers gated MLP (LlamaMLP, GemmaMLP...), keeping its three projections as
    they are, under the same names, so their state-dict keys and any LoRA layers on them stay."""

    def __init__(self, gate_proj: torch.nn.Module, up_proj: torch.nn.Module, down_proj: torch.nn.Module, gelu: bool):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.gelu = gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gated(self.gate_proj(x), self.up_proj(x), self.gelu))

    def extra_repr(self) -> str:
        return "act=" + ("gelu_tanh" if self.gelu else "silu")
