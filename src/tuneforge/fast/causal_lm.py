"""A causal LM taken apart into its decoder and output layer, so a loss can skip the full logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Architectures whose logits are exactly output_layer(last hidden state), soft-capped for Gemma 2/3.
# Others (logit scaling in Cohere or Granite, say) keep the plain path.
SPLITTABLE = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"}


@dataclass
class CausalLMParts:
    decoder: torch.nn.Module  # input ids -> last hidden states
    head: torch.nn.Linear
    softcap: float | None


def split_causal_lm(model) -> CausalLMParts | None:
    """The decoder, output layer and final soft-cap of a supported causal LM, under a PEFT wrapper
    or not; None when the output layer is not a plain linear map (a LoRA or quantized head)."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(lm, "config", None)
    if config is None or config.model_type not in SPLITTABLE:
        return None
    head = lm.get_output_embeddings()
    decoder = getattr(lm, lm.base_model_prefix, None)
    if type(head) is not torch.nn.Linear or head.bias is not None or decoder is None:
        return None
    return CausalLMParts(decoder, head, getattr(config, "final_logit_softcapping", None))
