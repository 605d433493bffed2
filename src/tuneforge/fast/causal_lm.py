"""A causal LM's output layer, taken out so that a loss can skip the full logits.

The model still runs its own forward (through any PEFT, DDP or checkpointing wrapper, whose hooks
must see it), asked for its last hidden state and the logits of one position only; the loss then
applies the output layer itself, a chunk of positions at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tuneforge.models.layers import transformers_model

# Architectures whose logits are exactly output_layer(last hidden state), soft-capped for Gemma 2/3,
# and whose hidden_states[-1] is that last (normed) state. Others (logit scaling in Cohere or
# Granite, say) keep the plain path.
SPLITTABLE = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"}


@dataclass
class OutputLayer:
    head: torch.nn.Linear
    softcap: float | None


def output_layer(model) -> OutputLayer | None:
    """The output layer and final soft-cap of a supported causal LM, under PEFT and DDP wrappers or
    not; None when it is not a plain linear map (a LoRA or quantized head) or the model is not one."""
    lm = transformers_model(model)
    config = getattr(lm, "config", None)
    if config is None or config.model_type not in SPLITTABLE:
        return None
    head = lm.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    return OutputLayer(head, getattr(config, "final_logit_softcapping", None))


def last_hidden_state(model, inputs: dict) -> torch.Tensor:
    """The model's final (normed) hidden states, from its own forward, computing one position's logits."""
    return model(**inputs, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
