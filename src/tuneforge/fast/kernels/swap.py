"""Put the kernels into a loaded model: module instances swapped, transformers' classes left as they are.

Each RMSNorm becomes a FusedRmsNorm holding the same weight Parameter, and each gated MLP a
FusedGatedMLP holding the same three projections, so state-dict keys (and a LoRA adapter's keys)
do not change. Only classes whose forward is known to be the plain form are swapped; anything
else, or any module carrying hooks (accelerate's offloading, say), is left alone.
"""

from __future__ import annotations

import torch

from tuneforge.fast.kernels.gated_mlp import FusedGatedMLP
from tuneforge.fast.kernels.rms_norm import FusedRmsNorm

# RMSNorm classes and whether they scale by (1 + w) (Gemma) rather than w; all compute in fp32.
RMS_NORMS = {
    "LlamaRMSNorm": False, "MistralRMSNorm": False, "Qwen2RMSNorm": False, "Qwen3RMSNorm": False,
    "Phi3RMSNorm": False, "GemmaRMSNorm": True, "Gemma2RMSNorm": True, "Gemma3RMSNorm": True,
}
# MLPs computing down_proj(act_fn(gate_proj(x)) * up_proj(x)), and nothing more.
GATED_MLPS = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "GemmaMLP", "Gemma2MLP", "Gemma3MLP"}
# transformers' activation modules, by class name: silu (SwiGLU) or the tanh-approximated gelu (GeGLU).
SILU = {"SiLUActivation", "SiLU"}
GELU_TANH = {"GELUTanh", "PytorchGELUTanh"}


def _hooked(module: torch.nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or hasattr(module, "_hf_hook"))


def _norm(module: torch.nn.Module) -> FusedRmsNorm | None:
    gemma = RMS_NORMS.get(type(module).__name__)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if gemma is None or eps is None or not isinstance(getattr(module, "weight", None), torch.nn.Parameter):
        return None
    return FusedRmsNorm(module.weight, float(eps), gemma)


def _mlp(module: torch.nn.Module) -> FusedGatedMLP | None:
    if type(module).__name__ not in GATED_MLPS:
        return None
    act = type(getattr(module, "act_fn", None)).__name__
    if act not in SILU | GELU_TANH or not all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj")):
        return None
    return FusedGatedMLP(module.gate_proj, module.up_proj, module.down_proj, gelu=act in GELU_TANH)


def apply_kernels(model: torch.nn.Module) -> list[str]:
    """Swap the model's RMSNorm and gated-MLP modules for the fused ones, in place, under PEFT or not;
    returns the names of the modules swapped (none for an architecture not listed above)."""
    swapped = []
    for name, module in list(model.named_modules()):
        if not name or _hooked(module):
            continue
        fused = _norm(module) or _mlp(module)
        if fused is None:
            continue
        parent_name, _, child = name.rpartition(".")
        fused.train(module.training)
        setattr(model.get_submodule(parent_name), child, fused)
        swapped.append(name)
    return swapped
