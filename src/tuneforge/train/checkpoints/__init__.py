"""Checkpoints of training state, single-process and sharded: one on-disk format, one package.

checkpoints/step-N holds the trainable weights, optimizer, RNG and loop state (state.json); a run on
several processes writes the same folder with DCP shards in dcp/ instead of trainable and optimizer
files. Either kind is written aside and published with a manifest (folders, manifest), and
`load_checkpoint` reads either kind.
"""

from __future__ import annotations

from pathlib import Path

from tuneforge.parallel.world import World, env_world
from tuneforge.train.checkpoints.folders import (
    DiskFullError,
    list_checkpoints,
    newest_verified,
    read_state,
    set_aside,
    written_steps,
)
from tuneforge.train.checkpoints.manifest import damage
from tuneforge.train.checkpoints.sharded import is_sharded, load_sharded, save_sharded
from tuneforge.train.checkpoints.single import CheckpointMismatch, load_single, save_single
from tuneforge.train.checkpoints.trainable import trainable_parameters

__all__ = ["CheckpointMismatch", "DiskFullError", "damage", "list_checkpoints", "load_checkpoint",
           "newest_verified", "read_state", "save_checkpoint", "set_aside", "trainable_parameters", "written_steps"]


def save_checkpoint(run_dir: Path, step: int, model, optimizer, state: dict, keep_last: int,
                    world: World | None = None) -> Path:
    """Write checkpoints/step-N atomically and prune to keep_last complete checkpoints; sharded when
    `world` has several processes (each writes its part)."""
    if world is not None and world.distributed:
        return save_sharded(run_dir, step, model, optimizer, state, keep_last, world)
    return save_single(run_dir, step, model, optimizer, state, keep_last)


def load_checkpoint(ckpt: Path, model, optimizer) -> dict:
    """Restore weights, optimizer and RNG in place; returns the saved loop state.

    A sharded checkpoint loads on any number of processes; a single-process one on one process or
    under DDP (every process holds whole tensors), not into a model FSDP has sharded.
    """
    if is_sharded(ckpt):
        return load_sharded(ckpt, model, optimizer, env_world())
    return load_single(ckpt, model, optimizer)

