"""What diagnosis does to a run: roll back to the last checkpoint, keep the best weights for early stopping.

The best weights are the trainable tensors only (the adapter, or all weights for a full fine-tune),
written atomically to <output_dir>/best/ each time the watched metric improves, so a crash or an
early stop never loses them.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from tuneforge.parallel.world import SINGLE, World
from tuneforge.train.checkpoints import list_checkpoints, load_checkpoint, trainable_parameters
from tuneforge.train.checkpoints.gather import gather_for_save


def save_best(run_dir: Path, model, step: int, metric: str, value: float, world: World = SINGLE,
              adapter: bool = True) -> Path:
    """On several processes every one takes part (FSDP gathers the shards into whole tensors), rank 0
    writes, and the others wait until it has."""
    folder, tmp = run_dir / "best", run_dir / ".tmp-best"
    gathered = gather_for_save(model, adapter)  # None unless sharded
    if world.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        tensors = gathered if gathered is not None else {n: p.detach() for n, p in trainable_parameters(model)}
        save_file({n: t.cpu().contiguous() for n, t in tensors.items()}, tmp / "trainable.safetensors")
        (tmp / "best.json").write_text(json.dumps({"step": step, "metric": metric, "value": value}) + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    world.barrier()
    return folder


def load_best(run_dir: Path, model) -> dict:
    """Put the best weights back into the model (each FSDP process its shard of them); returns
    best.json (step, metric, value)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    weights = load_file(run_dir / "best" / "trainable.safetensors")
    with torch.no_grad():
        for name, p in trainable_parameters(model):
            whole = weights[name].to(p.device, p.dtype)
            p.copy_(distribute_tensor(whole, p.device_mesh, p.placements) if isinstance(p, DTensor) else whole)
    return json.loads((run_dir / "best" / "best.json").read_text())


def read_best(run_dir: Path) -> tuple[int, float] | None:
    """(step, value) of the best evaluation so far, for a resumed run's early stopping; None if none."""
    path = run_dir / "best" / "best.json"
    if not path.is_file():
        return None
    best = json.loads(path.read_text())
    return best["step"], best["value"]


def roll_back(run_dir: Path, model, optimizer, safe: Callable[[int], bool]) -> dict:
    """Restore the newest checkpoint that `safe` accepts (else the oldest one kept): weights, optimizer,
    RNG; returns its loop state. A checkpoint written while the loss was already climbing is skipped."""
    ckpts = list_checkpoints(run_dir)
    chosen = next((c for c in reversed(ckpts) if safe(int(c.name.removeprefix("step-")))), ckpts[0])
    return load_checkpoint(chosen, model, optimizer)
