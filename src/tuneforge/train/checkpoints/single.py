"""A single-process checkpoint: trainable weights, optimizer, RNG and loop state; safetensors and JSON only."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tuneforge.errors import TuneforgeError
from tuneforge.train.checkpoints.folders import disk_full_removes, publish, read_state, start_folder
from tuneforge.train.checkpoints.rng import restore_rng, rng_state
from tuneforge.train.checkpoints.trainable import trainable_parameters


class CheckpointMismatch(TuneforgeError):
    pass


def _flatten(prefix: str, value, tensors: dict[str, torch.Tensor], scalars: list[str]) -> None:
    """Optimizer state as flat safetensors keys; nested dicts (bitsandbytes' quantization state) become
    dotted keys, and Python numbers are remembered so they come back as numbers, not tensors."""
    if isinstance(value, dict):
        for key, sub in value.items():
            _flatten(f"{prefix}.{key}", sub, tensors, scalars)
        return
    if not torch.is_tensor(value):
        scalars.append(prefix)
        value = torch.tensor(value)
    tensors[prefix] = value.detach().cpu().contiguous()


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict], list[str]]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: list[str] = []
    for idx, state in sd["state"].items():
        _flatten(str(idx), state, tensors, scalars)
    seen: set[int] = set()
    for key, t in tensors.items():  # bitsandbytes shares one quantization map between parameters
        if t.numel() and t.data_ptr() in seen:
            tensors[key] = t.clone()  # safetensors stores no shared memory
        seen.add(t.data_ptr())
    return tensors, sd["param_groups"], scalars


def _unflatten(tensors: dict[str, torch.Tensor], scalars: list[str]) -> dict[int, dict]:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        idx, *path = key.split(".")
        node = state.setdefault(int(idx), {})
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value.item() if key in scalars else value
    return state


def save_single(run_dir: Path, step: int, model, optimizer, state: dict, keep_last: int) -> Path:
    """checkpoints/step-N from one process (or rank 0 of DDP, where every process holds whole tensors)."""
    weights = {n: p.detach().cpu().contiguous() for n, p in trainable_parameters(model)}
    opt_tensors, groups, scalars = _optimizer_tensors(optimizer)
    rng_tensors, rng_json = rng_state()
    needed = sum(t.nbytes for d in (weights, opt_tensors, rng_tensors) for t in d.values())
    tmp, final = start_folder(run_dir, step)
    with disk_full_removes(tmp, step, needed):
        save_file(weights, tmp / "trainable.safetensors")
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        save_file(rng_tensors, tmp / "rng.safetensors")
        (tmp / "state.json").write_text(json.dumps(
            {**state, "step": step, "param_groups": groups, "optimizer_scalars": scalars, "rng": rng_json}, indent=1
        ) + "\n")
        publish(tmp, final, run_dir, keep_last)
    return final


def load_single(ckpt: Path, model, optimizer) -> dict:
    """Restore weights, optimizer and RNG in place; returns the saved loop state. Loads on one process
    or under DDP (every process holds whole tensors), not into a model FSDP has sharded."""
    if any(type(p).__name__ == "DTensor" for p in model.parameters()):
        raise CheckpointMismatch(f"{ckpt} was written by a single process; resume it with one process or "
                                 "distributed.strategy: ddp, then FSDP runs can follow from its sharded checkpoints")
    state = read_state(ckpt)
    weights = load_file(ckpt / "trainable.safetensors")
    params = dict(trainable_parameters(model))
    if set(weights) != set(params):
        missing = sorted(set(params) - set(weights))[:5]
        extra = sorted(set(weights) - set(params))[:5]
        raise CheckpointMismatch(f"{ckpt}: checkpoint does not match the model (missing {missing}, unexpected "
                                 f"{extra}); was the config changed since the run started?")
    for name, p in params.items():
        if weights[name].shape != p.shape:
            raise CheckpointMismatch(f"{ckpt}: {name} was saved with shape {tuple(weights[name].shape)}, the model has "
                                     f"{tuple(p.shape)}; was the adapter config (lora.r, target_modules) changed "
                                     "since the run started? Set it back or start a new run")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name].to(p.device, p.dtype))
    opt_state = _unflatten(load_file(ckpt / "optimizer.safetensors"), state.get("optimizer_scalars", []))
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    restore_rng(load_file(ckpt / "rng.safetensors"), state["rng"]["python"])
    return state
