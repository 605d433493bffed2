"""Whole tensors from a sharded model for final/ and best/, and the check that what is saved is whole."""

from __future__ import annotations

import torch

from tuneforge.errors import TuneforgeError
from tuneforge.train.checkpoints.trainable import trainable_parameters


class SaveError(TuneforgeError):
    pass


def _is_sharded_param(p) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor)


def gather_for_save(model, adapter: bool) -> dict[str, torch.Tensor] | None:
    """Whole tensors for final/, on rank 0 (the other processes take part and get an empty dict), when
    the model is sharded; None when every process already holds whole tensors (one process, DDP).

    An adapter run gathers only the trained tensors; a full fine-tune gathers the whole state dict.
    """
    if not any(_is_sharded_param(p) for p in model.parameters()):
        return None
    main = torch.distributed.get_rank() == 0
    if not adapter:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        whole = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        # A tied weight (lm_head = embed_tokens) is one parameter under two names; final/ keeps the first, as
        # save_pretrained does for an unsharded model, instead of a second copy of the embedding matrix.
        tied = {name for name, _ in model.named_parameters(remove_duplicate=False)} - dict(model.named_parameters()).keys()
        return {name: t for name, t in whole.items() if name not in tied}
    out = {}
    for name, p in trainable_parameters(model):
        whole = p.full_tensor() if _is_sharded_param(p) else p  # a collective: every process, same order
        if main:
            out[name] = whole.detach().cpu()
    return out


def expected_shape(module: torch.nn.Module, param_name: str, param: torch.Tensor) -> tuple[int, ...]:
    """The shape a weight must have from its module's declaration (Linear: out x in; Embedding:
    rows x dim), not from the tensor at hand, which may be one process's shard."""
    if param_name == "weight" and isinstance(module, torch.nn.Linear) and not hasattr(module, "quant_state"):
        return (module.out_features, module.in_features)
    if param_name == "weight" and isinstance(module, torch.nn.Embedding):
        return (module.num_embeddings, module.embedding_dim)
    return tuple(param.shape)  # a DTensor's shape is the global one


def check_saved_tensors(model, tensors: dict[str, torch.Tensor]) -> None:
    """R-DIST-1: every tensor about to be saved is non-empty and has the shape its module (and, for LoRA,
    the adapter's rank r) implies; a shard or an empty placeholder stops the save, naming the tensor."""
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    ranks = {name: cfg.r for name, cfg in getattr(model, "peft_config", {}).items() if not getattr(cfg, "rank_pattern", None)}
    for name, tensor in tensors.items():
        if name not in params:
            continue  # buffers
        module_name, _, param_name = name.rpartition(".")
        want = expected_shape(modules[module_name], param_name, params[name])
        parts = name.split(".")
        for kind, dim in (("lora_A", 0), ("lora_B", 1)):
            if kind in parts and parts[parts.index(kind) + 1] in ranks and len(want) == 2:
                r = ranks[parts[parts.index(kind) + 1]]
                if want[dim] != r:
                    want = (r, want[1]) if dim == 0 else (want[0], r)
        if tensor.numel() == 0 or tuple(tensor.shape) != want:
            raise SaveError(f"refusing to save {name}: it has shape {tuple(tensor.shape)} but the model and adapter "
                            f"config imply {want}. A sharded or empty tensor would make an adapter other tools "
                            "load as garbage; this is a tuneforge bug, please report it with the config")
