"""A LoRA linear layer as matmuls only, forward and backward: `performance.fused_lora`.

PEFT computes `base_layer(x) + lora_B(lora_A(dropout(x))) * scaling`: in training that is two more
passes over [tokens, out] in the forward (the scaling, the add, and a temporary for each), and in
the backward the scale's gradient over [tokens, out] and the sum of the two branches' dx over
[tokens, in]. Here the adapter's product accumulates into the base product's output (`addmm_`):

    forward   out = x W^T (+ b);  out += s (x A^T) B^T
    backward  dx = dy W;  dx += s (dy B) A;  dA = s (dy B)^T x;  dB = s dy^T (x A^T)

saving x and x A^T for the backward, as PEFT's autograd does; only what requires grad is computed.

How it gets into the model: `apply_fused_lora(model)` changes the class of each
`peft.tuners.lora.Linear` *instance* over a plain nn.Linear to `FusedLoraLinear`, a subclass that
takes the fused path when a call is the plain case (one active adapter, not merged, adapters on,
no dropout, no DoRA or other variant, no LoRA bias, no hooks on the parts it bypasses) and PEFT's
own forward otherwise. No PEFT or torch class is modified and the instance is still a lora.Linear,
so PEFT's isinstance checks, save_pretrained (same keys), merge_and_unload (which puts back the
base layer), disable_adapter (the DPO reference) and adding adapters all work as before; a model
reloaded from disk has plain PEFT layers. PEFT 0.21's own extension point, a LoRA variant, is given
the base layer's output already computed, so it cannot fuse the base product with the adapter's.
"""

from __future__ import annotations

import torch
from peft.tuners.lora import Linear as LoraLinear


class _FusedLora(torch.autograd.Function):
    """2-D x [tokens, in], all tensors of one dtype; `scaling` a Python number."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling):
        xa = x @ lora_a.t()  # [tokens, r]
        out = x @ weight.t() if bias is None else torch.addmm(bias, x, weight.t())
        out.addmm_(xa, lora_b.t(), alpha=scaling)
        need = ctx.needs_input_grad
        ctx.save_for_backward(x if need[1] or need[3] else None, xa if need[4] else None, weight, lora_a, lora_b)
        ctx.scaling = scaling
        return out

    @staticmethod
    def backward(ctx, dy):
        x, xa, weight, lora_a, lora_b = ctx.saved_tensors
        need_x, need_w, need_bias, need_a, need_b, _ = ctx.needs_input_grad
        s = ctx.scaling
        dx = dw = dbias = da = db = None
        with torch.autocast(dy.device.type, enabled=False):  # the forward's dtype, whatever the caller's autocast
            dy_b = dy @ lora_b if need_x or need_a else None  # [tokens, r]
            if need_x:
                dx = (dy @ weight).addmm_(dy_b, lora_a, alpha=s)
            if need_w:
                dw = dy.t() @ x
            if need_bias:
                dbias = dy.sum(0)
            if need_a:
                da = (dy_b.t() @ x).mul_(s)
            if need_b:
                db = (dy.t() @ xa).mul_(s)
        return dx, dw, dbias, da, db, None


def fused_lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                      lora_b: torch.Tensor, scaling: float, dtype: torch.dtype) -> torch.Tensor:
    """x W^T + b + scaling * (x A^T) B^T over the last dimension of `x`, computed in `dtype` (under
    autocast, its dtype: the casts autocast would make, made here; gradients flow back through them)."""
    cast = [None if t is None else t.to(dtype) for t in (x.reshape(-1, x.shape[-1]), weight, bias, lora_a, lora_b)]
    with torch.autocast(x.device.type, enabled=False):
        out = _FusedLora.apply(*cast, scaling)
    return out.view(*x.shape[:-1], out.shape[-1])


def _hooked(module: torch.nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or hasattr(module, "_hf_hook"))


class FusedLoraLinear(LoraLinear):
    """A PEFT LoRA Linear whose plain case runs as one autograd function (see the module's docstring)."""

    def fused_dtype(self, x: torch.Tensor) -> torch.dtype | None:
        """The dtype the fused path computes this call in, or None where PEFT's forward must run."""
        if self.disable_adapters or self.merged:
            return None
        active = self.active_adapters
        if len(active) != 1:
            return None
        name = active[0]
        if name not in self.lora_A or name in self.lora_variant:
            return None
        base, lora_a, lora_b, dropout = self.base_layer, self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
        if type(base) is not torch.nn.Linear or self.fan_in_fan_out or lora_b.bias is not None:
            return None
        if not (isinstance(dropout, torch.nn.Identity) or (isinstance(dropout, torch.nn.Dropout) and not dropout.training)):
            return None
        if not isinstance(self.scaling[name], (int, float)) or any(map(_hooked, (base, lora_a, lora_b, dropout))):
            return None
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        tensors = (x, base.weight, lora_a.weight, lora_b.weight) + (() if base.bias is None else (base.bias,))
        return x.dtype if all(t.dtype == x.dtype for t in tensors) else None  # mixed: PEFT's casts decide

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        dtype = None if args or kwargs else self.fused_dtype(x)
        if dtype is None:
            return super().forward(x, *args, **kwargs)
        name = self.active_adapters[0]
        return fused_lora_linear(x, self.base_layer.weight, self.base_layer.bias, self.lora_A[name].weight,
                                 self.lora_B[name].weight, self.scaling[name], dtype)


def apply_fused_lora(model: torch.nn.Module) -> list[str]:
    """Make each PEFT LoRA Linear over a plain nn.Linear a FusedLoraLinear, in place (its class only:
    same parameters, same state-dict keys); returns their names. QLoRA's quantized bases, GPT-2's
    Conv1D and LoRA layers of other kinds keep PEFT's classes."""
    swapped = []
    for name, module in model.named_modules():
        if type(module) is LoraLinear and type(module.base_layer) is torch.nn.Linear:
            module.__class__ = FusedLoraLinear
            swapped.append(name)
    return swapped
