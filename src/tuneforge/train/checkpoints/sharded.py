"""Sharded checkpoints with torch.distributed.checkpoint (DCP), and the gathered weights of final/.

Every process writes its shards of the trainable weights and optimizer state into the checkpoint's
temporary folder; after a barrier rank 0 adds the loop state, marks it complete and renames it into
place, as a single-process checkpoint is (train/checkpoint.py). DCP records each tensor's global
shape, so a checkpoint loads on any number of processes, one included (it reshards on load).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tuneforge.errors import TuneforgeError
from tuneforge.parallel.world import SINGLE, World

DCP_DIR = "dcp"


class SaveError(TuneforgeError):
    pass


def is_sharded(ckpt: Path) -> bool:
    return (ckpt / DCP_DIR).is_dir()


def _state(model, optimizer) -> dict:
    """The trainable weights and the optimizer state, keyed by parameter name (not position), so they
    match again after resharding. Frozen base weights are left out: they come from the base model."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from tuneforge.train.checkpoint import trainable_parameters

    weights, optim = get_state_dict(model, optimizer)
    names = {n for n, _ in trainable_parameters(model)}
    return {"model": {k: v for k, v in weights.items() if k in names}, "optimizer": optim}


def save_sharded(run_dir: Path, step: int, model, optimizer, state: dict, keep_last: int, world: World) -> Path:
    """checkpoints/step-N written by every process at once; complete only once all have written."""
    import torch.distributed.checkpoint as dcp

    from tuneforge.train.checkpoint import _rng_state, publish

    root = run_dir / "checkpoints"
    final, tmp = root / f"step-{step}", root / f".tmp-step-{step}"
    if world.main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    world.barrier()
    dcp.save(_state(model, optimizer), checkpoint_id=str(tmp / DCP_DIR))
    rng_tensors, rng_json = _rng_state()  # each process has its own random stream (dropout)
    save_file(rng_tensors, tmp / f"rng-{world.rank}.safetensors")
    (tmp / f"rng-{world.rank}.json").write_text(json.dumps(rng_json) + "\n")
    world.barrier()
    if world.main:
        (tmp / "state.json").write_text(json.dumps({**state, "step": step, "world_size": world.size}, indent=1) + "\n")
        publish(tmp, final, run_dir, keep_last)
    world.barrier()
    return final


def load_sharded(ckpt: Path, model, optimizer, world: World = SINGLE) -> dict:
    """Restore weights and optimizer (resharded to this run's processes) and, when the number of
    processes is unchanged, each one's random state; returns the saved loop state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    from tuneforge.train.checkpoint import restore_rng

    state = json.loads((ckpt / "state.json").read_text())
    target = _state(model, optimizer)
    dcp.load(target, checkpoint_id=str(ckpt / DCP_DIR))
    set_state_dict(model, optimizer, model_state_dict=target["model"], optim_state_dict=target["optimizer"],
                   options=StateDictOptions(strict=False))
    rng = ckpt / f"rng-{world.rank}.safetensors"
    if state.get("world_size") == world.size and rng.is_file():
        restore_rng(load_file(rng), json.loads((ckpt / f"rng-{world.rank}.json").read_text())["python"])
    else:
        # Another number of processes cannot continue each one's stream: a fresh one per process and step
        # (only dropout draws from it; the data order is a function of the seed and epoch).
        seed = state["step"] * 1_000_003 + world.rank
        torch.manual_seed(seed)
        random.seed(seed)
    return state


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

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    from tuneforge.train.checkpoint import trainable_parameters

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
