"""The processes of a run: rank, size, device, and the few collectives the loop needs.

A single process is a world of size 1 whose collectives do nothing, so the loop calls them unconditionally.
Under torchrun (or srun) the environment holds RANK, WORLD_SIZE and LOCAL_RANK; `init_world` joins that job.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from typing import Callable
from datetime import timedelta

import torch

from tuneforge.errors import ConfigError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0 alone writes logs, metrics, run.json and the non-sharded files of checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    @contextlib.contextmanager
    def main_first(self, ready: Callable[[], bool] | None = None, patience_s: float = 24 * 3600):
        """Rank 0 runs the block first (preparing data into the cache, converting a model), the others
        then run it and find the result cached; nothing is prepared twice at the same time (R-DIST-4).

        With `ready` (has rank 0's result appeared? e.g. the data cache's content-hashed folder), the
        others poll for it instead of waiting in a collective, so a preparation longer than the
        collective timeout does not fail the job. Should rank 0 fail, torchrun ends them all."""
        if not self.main:
            if ready is None:
                self.barrier()
            else:
                wait_until(ready, patience_s)
        yield
        if self.main and ready is None:
            self.barrier()

    def sum(self, values: dict[str, float]) -> dict[str, float]:
        """Each value summed over all processes (in float64: exact for counts below 2**53)."""
        if not self.distributed or not values:
            return dict(values)
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.collective_device)
        torch.distributed.all_reduce(t)
        return {k: (int(v) if isinstance(values[k], int) else v) for k, v in zip(keys, t.tolist())}

    def gather_objects(self, obj) -> list:
        """`obj` from every process, in rank order (small Python values only)."""
        if not self.distributed:
            return [obj]
        out: list = [None] * self.size
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """Rank 0's `obj` on every process (small Python values only): one decision for all of them."""
        if not self.distributed:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    @property
    def collective_device(self) -> torch.device:
        """Where tensors for collectives live: the GPU under nccl, the CPU under gloo."""
        backend = torch.distributed.get_backend() if self.distributed else "gloo"
        return torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")


SINGLE = World()


def wait_until(ready: Callable[[], bool], patience_s: float, poll_s: float = 0.5) -> None:
    start = time.monotonic()
    while not ready():
        if time.monotonic() - start > patience_s:
            raise TimeoutError(f"waited {patience_s:.0f} s for rank 0 to prepare the data; it never finished")
        time.sleep(poll_s)


def env_world() -> World:
    """The world torchrun/srun describe in the environment; one process when they say nothing."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return SINGLE
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return World(rank, size, int(os.environ.get("LOCAL_RANK", rank)))


def backend_for(name: str, device: torch.device) -> str:
    """auto: nccl for CUDA tensors with gloo beside it for CPU ones (offload, object collectives); gloo on CPU."""
    if name == "auto":
        return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    if name == "nccl" and device.type != "cuda":
        raise ConfigError(f"distributed.backend: nccl needs CUDA GPUs, but the run is on {device.type}; use gloo or auto")
    return name


def init_world(spec, device: torch.device) -> tuple[World, torch.device]:
    """Join the job the environment describes; returns the world and this process's device
    (cuda:LOCAL_RANK on GPUs). Reuses a process group that is already set up."""
    world = env_world()
    if not world.distributed:
        return world, device
    if device.type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"local rank {world.local_rank} has no GPU: this machine shows "
                              f"{torch.cuda.device_count()}; launch at most that many processes per node")
        torch.cuda.set_device(world.local_rank)
        device = torch.device("cuda", world.local_rank)
    elif device.type != "cpu":
        raise ConfigError(f"device: {device.type} cannot train with several processes; use cuda or cpu")
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend=backend_for(spec.backend, device), timeout=timedelta(minutes=spec.timeout_minutes),
            device_id=device if device.type == "cuda" else None,
        )
    return world, device


def shutdown_world() -> None:
    """Leave the process group at the end of a run (torchrun then sees a clean exit)."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
