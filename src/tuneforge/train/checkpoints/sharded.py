"""Sharded checkpoints with torch.distributed.checkpoint (DCP).

Every process writes its shards of the trainable weights and optimizer state into the checkpoint's
temporary folder; after a barrier rank 0 adds the loop state, marks it complete and renames it into
place, as a single-process checkpoint is (folders.publish). DCP records each tensor's global
shape, so a checkpoint loads on any number of processes, one included (it reshards on load).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tuneforge.parallel.world import SINGLE, World
from tuneforge.train.checkpoints.folders import disk_full_removes, publish, read_state, start_folder, step_folders
from tuneforge.train.checkpoints.rng import restore_rng, rng_state
from tuneforge.train.checkpoints.trainable import trainable_parameters

DCP_DIR = "dcp"


def is_sharded(ckpt: Path) -> bool:
    return (ckpt / DCP_DIR).is_dir()


def _state(model, optimizer) -> dict:
    """The trainable weights and the optimizer state, keyed by parameter name (not position), so they
    match again after resharding. Frozen base weights are left out: they come from the base model."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    weights, optim = get_state_dict(model, optimizer)
    names = {n for n, _ in trainable_parameters(model)}
    return {"model": {k: v for k, v in weights.items() if k in names}, "optimizer": optim}


def save_sharded(run_dir: Path, step: int, model, optimizer, state: dict, keep_last: int, world: World) -> Path:
    """checkpoints/step-N written by every process at once; complete only once all have written."""
    import torch.distributed.checkpoint as dcp

    tmp, final = step_folders(run_dir, step)
    if world.main:
        start_folder(run_dir, step)
    world.barrier()
    shards = _state(model, optimizer)
    needed = sum(t.numel() * t.element_size() for t in _tensors(shards))  # all processes: a DTensor has its global size
    with disk_full_removes(tmp, step, needed):  # a full disk ends this process; torchrun then ends the others
        dcp.save(shards, checkpoint_id=str(tmp / DCP_DIR))
        rng_tensors, rng_json = rng_state()  # each process has its own random stream (dropout)
        save_file(rng_tensors, tmp / f"rng-{world.rank}.safetensors")
        (tmp / f"rng-{world.rank}.json").write_text(json.dumps(rng_json) + "\n")
        world.barrier()
        if world.main:
            (tmp / "state.json").write_text(json.dumps({**state, "step": step, "world_size": world.size}, indent=1) + "\n")
            publish(tmp, final, run_dir, keep_last)
    world.barrier()
    return final


def _tensors(tree) -> list[torch.Tensor]:
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in _tensors(v)]
    if isinstance(tree, (list, tuple)):
        return [t for v in tree for t in _tensors(v)]
    return [tree] if torch.is_tensor(tree) else []


def load_sharded(ckpt: Path, model, optimizer, world: World = SINGLE) -> dict:
    """Restore weights and optimizer (resharded to this run's processes) and, when the number of
    processes is unchanged, each one's random state; returns the saved loop state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = read_state(ckpt)
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
