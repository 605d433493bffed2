"""Where a run starts: a fresh output folder, or the newest checkpoint that verifies, with every check
that the saved run and this one would take the same steps on the same data with the same adapter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from tuneforge.config import Config
from tuneforge.errors import TrainingError
from tuneforge.output_folders import marked_kind
from tuneforge.parallel.world import World
from tuneforge.train.checkpoints import list_checkpoints, newest_verified, set_aside
from tuneforge.train.outputs import RUN_ENTRIES


def resume_point(run_dir: Path, resume: bool, world: World, warn: Callable[[str], None]) -> Path | None:
    """The checkpoint to resume from: the newest that verifies; a damaged newer one is set aside, saying why."""
    if not resume:
        if list_checkpoints(run_dir) or (run_dir / "final").exists():
            raise TrainingError(
                f"output_dir: {run_dir} already holds a run. Use `--resume` to continue it, "
                "or set another output_dir (e.g. --set output_dir=runs/new)."
            )
        clash = [] if marked_kind(run_dir) == "run" else [n for n in RUN_ENTRIES if (run_dir / n).exists()]
        if clash:
            raise TrainingError(f"output_dir: {run_dir} already holds {', '.join(clash)}, which no tuneforge run wrote "
                                "there, and a run never replaces files it did not write: set another output_dir "
                                "(e.g. --set output_dir=runs/new)")
        return None
    ckpt, damaged = newest_verified(run_dir) if world.main else (None, [])
    for bad, why in damaged:
        warn(f"--resume: {bad} is damaged ({why}); set it aside as {set_aside(bad).name}"
             + (f" and resuming from the older {ckpt.name}" if ckpt is not None else ""))
    ckpt = world.broadcast(ckpt)
    if ckpt is None:
        found = "every checkpoint in it is damaged (see above)" if damaged else "it has no complete checkpoint"
        raise TrainingError(f"--resume: cannot resume {run_dir}: {found}; start without --resume")
    return ckpt


def check_same_data(world: World, hashes: dict[str, str]) -> None:
    """Every process must read the same files: a node with another copy would train on other examples."""
    for rank, other in enumerate(world.gather_objects(hashes)):
        if other != hashes:
            differ = sorted(k for k in set(hashes) | set(other) if hashes.get(k) != other.get(k))
            raise TrainingError(f"datasets: rank {rank} reads other data than rank {world.rank} ({', '.join(differ)}); "
                                "every node must see the same files (a shared file system, or identical copies)")


def _check_same_batch(state: dict, ckpt: Path, cfg: Config, micro_per_step: int, processes: int) -> None:
    """A resumed run must take the steps the saved one took, on any number of processes."""
    saved_mbs, saved_per_step = state.get("micro_batch_size"), state.get("micro_per_step")
    if saved_mbs is not None and saved_mbs != cfg.micro_batch_size:
        raise TrainingError(f"--resume: {ckpt} was written with micro_batch_size {saved_mbs}, this run has "
                            f"{cfg.micro_batch_size}; its data position counts micro-batches of {saved_mbs}, so set it back")
    if saved_per_step is not None and saved_per_step != micro_per_step:
        if cfg.global_batch_size is None and saved_per_step % processes == 0:
            advice = f"set grad_accum back to {saved_per_step // processes}"
        else:
            advice = f"set global_batch_size: {saved_per_step * saved_mbs} so that any number of processes takes the same steps"
        raise TrainingError(
            f"--resume: {ckpt} took {saved_per_step} micro-batches of {saved_mbs} per step (a global batch of "
            f"{saved_per_step * saved_mbs}), this run would take {micro_per_step}; {advice}")


def adapter_facts(cfg: Config) -> dict:
    """What fixes the shape and scale of the trained tensors: saved with each checkpoint, compared on resume."""
    facts = {"adapter": cfg.adapter}
    if cfg.adapter != "full":
        facts.update({f"lora.{k}": v for k, v in cfg.lora.model_dump(mode="json").items() if k != "dropout"})
    return facts


def _check_same_adapter(state: dict, ckpt: Path, cfg: Config) -> None:
    """Refused before any tensor is loaded: the saved weights only fit the adapter they were trained as."""
    saved, now = state.get("adapter_facts", {}), adapter_facts(cfg)
    for key in sorted(set(saved) & set(now)):
        if saved[key] != now[key]:
            raise TrainingError(f"--resume: {ckpt} was written with {key}: {json.dumps(saved[key])}, this run has "
                                f"{json.dumps(now[key])}; its weights only fit the adapter they were trained as, so set "
                                f"{key} back to {json.dumps(saved[key])} (or start a new run in another output_dir)")


def check_resumable(state: dict, ckpt: Path, cfg: Config, micro_per_step: int, processes: int,
                    file_hashes: dict[str, str]) -> None:
    """Refuse, before any tensor is loaded, a resume that would not continue the saved run."""
    if state.get("data_sha256") != file_hashes:
        raise TrainingError(f"--resume: the data files changed since {ckpt} was written, so the saved data "
                            "position means nothing; restore the files or start a new run")
    _check_same_batch(state, ckpt, cfg, micro_per_step, processes)
    _check_same_adapter(state, ckpt, cfg)
