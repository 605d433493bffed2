"""Checkpoints: trainable weights, optimizer, RNG and data position; safetensors and JSON only.

A checkpoint is written into a temporary folder, fsynced, marked complete, then renamed into
place, so a crash mid-save leaves the previous checkpoint as the newest complete one. A run on
several processes writes the same folder with sharded weights instead (parallel/checkpoint.py);
`load_checkpoint` reads either kind.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

COMPLETE = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def trainable_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _fsync_tree(folder: Path) -> None:
    """Files first, then their folders, deepest first (a sharded checkpoint has a dcp/ subfolder)."""
    for path in sorted(folder.rglob("*"), key=lambda p: (p.is_dir(), -len(p.parts))) + [folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


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


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    version, state, gauss = random.getstate()
    return tensors, {"python": [version, list(state), gauss]}


def save_checkpoint(run_dir: Path, step: int, model, optimizer, state: dict, keep_last: int, world=None) -> Path:
    """Write checkpoints/step-N atomically and prune to keep_last complete checkpoints; sharded when
    `world` has several processes (each writes its part)."""
    if world is not None and world.distributed:
        from tuneforge.parallel.checkpoint import save_sharded

        return save_sharded(run_dir, step, model, optimizer, state, keep_last, world)
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    weights = {n: p.detach().cpu().contiguous() for n, p in trainable_parameters(model)}
    save_file(weights, tmp / "trainable.safetensors")
    opt_tensors, groups, scalars = _optimizer_tensors(optimizer)
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    rng_tensors, rng_json = _rng_state()
    save_file(rng_tensors, tmp / "rng.safetensors")
    (tmp / "state.json").write_text(json.dumps(
        {**state, "step": step, "param_groups": groups, "optimizer_scalars": scalars, "rng": rng_json}, indent=1
    ) + "\n")
    publish(tmp, final, run_dir, keep_last)
    return final


def publish(tmp: Path, final: Path, run_dir: Path, keep_last: int) -> None:
    """The end of every save: mark complete, fsync, rename into place, prune to keep_last checkpoints."""
    (tmp / COMPLETE).write_text("ok\n")
    _fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def restore_rng(tensors: dict[str, torch.Tensor], python_state: list) -> None:
    """Put back the random state `_rng_state` saved: torch CPU and CUDA, Python's `random`."""
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    version, state, gauss = python_state
    random.setstate((version, tuple(state), gauss))


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first; temporary or unmarked folders are never returned."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and (d / COMPLETE).is_file() and (d / "state.json").is_file():
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def load_checkpoint(ckpt: Path, model, optimizer) -> dict:
    """Restore weights, optimizer and RNG in place; returns the saved loop state.

    A sharded checkpoint loads on any number of processes; a single-process one on one process or
    under DDP (every process holds whole tensors), not into a model FSDP has sharded.
    """
    from tuneforge.parallel.checkpoint import is_sharded, load_sharded
    from tuneforge.parallel.world import env_world

    if is_sharded(ckpt):
        return load_sharded(ckpt, model, optimizer, env_world())
    if any(type(p).__name__ == "DTensor" for p in model.parameters()):
        raise ValueError(f"{ckpt} was written by a single process; resume it with one process or "
                         "distributed.strategy: ddp, then FSDP runs can follow from its sharded checkpoints")
    state = json.loads((ckpt / "state.json").read_text())
    weights = load_file(ckpt / "trainable.safetensors")
    params = dict(trainable_parameters(model))
    if set(weights) != set(params):
        missing = sorted(set(params) - set(weights))[:5]
        extra = sorted(set(weights) - set(params))[:5]
        raise ValueError(f"{ckpt}: checkpoint does not match the model (missing {missing}, unexpected {extra}); "
                         "was the config changed since the run started?")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name].to(p.device, p.dtype))
    opt_state = _unflatten(load_file(ckpt / "optimizer.safetensors"), state.get("optimizer_scalars", []))
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    restore_rng(load_file(ckpt / "rng.safetensors"), state["rng"]["python"])
    return state
