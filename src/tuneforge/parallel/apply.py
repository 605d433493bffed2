"""Parallelism as functions applied to a model, like the fast path: `apply_ddp`, `apply_fsdp`.

The loop trains whatever `parallelize` returns and never asks which strategy it is. Both strategies
average gradients over processes; the objectives' losses are scaled to make that average the gradient
of the global loss (methods.run_objective).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from tuneforge.errors import ConfigError
from tuneforge.models.layers import decoder_layers
from tuneforge.parallel.world import World
from tuneforge.plan.memory import FIT_SHARE  # auto picks ddp when the estimated peak fits this share of one GPU


def estimated_peak_bytes(cfg, folder: Path) -> float | None:
    """plan's memory estimate of one process holding the whole model and optimizer; None if unknown."""
    from tuneforge.plan.memory import compute_dtype, memory
    from tuneforge.plan.model import shape_from_hf_config
    from tuneforge.plan.report import settings_from_config

    try:
        shape, _ = shape_from_hf_config(json.loads((Path(folder) / "config.json").read_text()))
        settings, _ = settings_from_config(cfg, cfg.max_seq_len, padded=True)
        return memory(shape, settings, compute_dtype(cfg.precision, is_cpu=False)).peak
    except Exception:  # an unusual model: auto then falls back to ddp
        return None


def choose_strategy(cfg, world: World, device: torch.device, folder: Path) -> str:
    """The strategy this run uses: none for one process; auto is ddp unless the model and optimizer
    would not fit one GPU (plan's estimate), and ddp on CPU, where memory is rarely the limit."""
    strategy = cfg.distributed.strategy
    if not world.distributed:
        return "none"
    if strategy == "none":
        raise ConfigError(f"distributed.strategy: none, but {world.size} processes were launched; "
                          "set ddp, fsdp or auto, or launch one process")
    if strategy != "auto":
        return strategy
    if device.type != "cuda":
        return "ddp"
    peak = estimated_peak_bytes(cfg, folder)
    total = torch.cuda.get_device_properties(device).total_memory
    return "fsdp" if peak is not None and peak > FIT_SHARE * total else "ddp"


def forward_is_collective(model) -> bool:
    """Whether a forward of `model` needs every process (FSDP gathers each layer's weights from all of
    them), so that code running forwards on its own (sampling) must keep the processes in step."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def apply_ddp(model, device: torch.device):
    """DistributedDataParallel around the model: weights broadcast from rank 0, gradients all-reduced
    during backward. Buffers are not re-broadcast each forward (rotary tables are the same everywhere)."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   forward_sync_buffers=False)


def apply_fsdp(model, world: World, device: torch.device, spec, compute: torch.dtype):
    """FSDP2: `fully_shard` each decoder layer, then the root (embeddings, final norm, head).

    The model is changed in place (its parameters become sharded DTensors), so the optimizer is built after.
    Each layer's weights are gathered in `param_dtype` just before use; gradients are reduce-scattered in
    `reduce_dtype`. FSDP2 shards every parameter on its own, so frozen and trained weights may share a layer.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    param_dtype = compute if spec.param_dtype == "auto" else dtypes[spec.param_dtype]
    mesh = init_device_mesh(device.type, (world.size,))
    common = {"mesh": mesh, "mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=dtypes[spec.reduce_dtype])}
    if spec.cpu_offload:
        common["offload_policy"] = CPUOffloadPolicy()
    layers = decoder_layers(model)
    if not layers:
        raise ConfigError("distributed.strategy: fsdp shards a model per decoder layer, and no layers were found "
                          "(modules named layers.N); use distributed.strategy: ddp for this model")
    for layer in layers:
        fully_shard(layer, reshard_after_forward=spec.reshard_after_forward, **common)
    # The root's weights (embeddings, head) are needed again at once for backward: kept gathered.
    fully_shard(model, reshard_after_forward=False, **common)
    return model


def parallelize(model, strategy: str, world: World, device: torch.device, spec, compute: torch.dtype):
    """The module the loop trains: the model itself (none, fsdp: sharded in place) or a DDP wrapper."""
    if strategy == "ddp":
        return apply_ddp(model, device)
    if strategy == "fsdp":
        return apply_fsdp(model, world, device, spec, compute)
    return model


@contextlib.contextmanager
def gradient_sync(model, enabled: bool):
    """Around one micro-batch's backward: DDP skips its all-reduce on all but the last micro-batch of a
    step (the gradients add up locally first). FSDP reduce-scatters every micro-batch, which keeps the
    gradients sharded; skipping it would hold whole gradients of every layer in memory."""
    from torch.nn.parallel import DistributedDataParallel

    if enabled or not isinstance(model, DistributedDataParallel):
        yield
        return
    with model.no_sync():
        yield
