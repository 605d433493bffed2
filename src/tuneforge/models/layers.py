"""Where a loaded model keeps its parts: the transformers model under the DDP and PEFT wrappers, and
its decoder layers, which the fast path (checkpointing, compile) and FSDP each treat as one unit."""

from __future__ import annotations

import re

import torch

_DECODER_LAYER = re.compile(r"(?:^|\.)(?:layers|h|block|blocks|layer)\.\d+$")


def unwrap(model):
    """The model inside a DistributedDataParallel wrapper, for its own attributes (disable_adapter,
    get_base_model, ...); any other model as it is (FSDP2 shards in place, so there is nothing to unwrap).
    Forward passes that train still go through the wrapper, whose hooks must see them."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def transformers_model(model):
    """The transformers model under DDP and PEFT wrappers (its config, output layer, score head)."""
    inner = unwrap(model)
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated blocks (model.layers.N and the like)."""
    return [m for name, m in model.named_modules() if _DECODER_LAYER.search(name)]
