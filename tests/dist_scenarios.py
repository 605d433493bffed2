"""Run under torchrun by tests/test_distributed.py: several training scenarios in one 2-process launch
(starting processes dominates the time), each writing what the test then checks.

Usage: torchrun --standalone --nproc-per-node 2 tests/dist_scenarios.py SPEC.json
SPEC: {"runs": [{"config": {...}, "stop_after": int|null, "resume": bool, "copy_from": dir|null}],
       "gather": {...} | null, "reload": {...} | null, "decode": {...} | null}
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from tuneforge.config import config_from_dict
from tuneforge.methods.sampling import seeded_generators
from tuneforge.models.decode import decode
from tuneforge.models.load import attach_adapter, load_model, load_tokenizer
from tuneforge.parallel.apply import apply_fsdp
from tuneforge.train.checkpoints.gather import check_saved_tensors, gather_for_save
from tuneforge.parallel.world import init_world, shutdown_world
from tuneforge.track.console import Reporter
from tuneforge.train.checkpoints import load_checkpoint, trainable_parameters
from tuneforge.train.loop import train
from tuneforge.train.optim import build_optimizer
from tuneforge.train.outputs import save_final


def lora_model(cfg, device):
    """The tiny model with a LoRA adapter whose lora_B is made non-zero, so nothing is trivially equal; the same
    in every process."""
    torch.manual_seed(0)
    model, _ = attach_adapter(load_model(Path(cfg.base_model), device), cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    return model


def sharded_lora_model(cfg, world, device):
    return apply_fsdp(lora_model(cfg, device), world, device, cfg.distributed.fsdp, torch.float32)


def gather_scenario(spec: dict, world, device) -> None:
    """R-DIST-2: each rank writes its local shards; rank 0 saves the gathered adapter into final/."""
    cfg = config_from_dict(spec["config"])
    out = Path(spec["out"])
    model = sharded_lora_model(cfg, world, device)
    shards = {n: p.to_local().detach().clone().contiguous() for n, p in trainable_parameters(model)}
    save_file(shards, out / f"shards-{world.rank}.safetensors")
    gathered = gather_for_save(model, adapter=True)
    if world.main:
        check_saved_tensors(model, gathered)
        save_final(model, load_tokenizer(Path(cfg.base_model)), out / "final", [0], state_dict=gathered)


def reload_scenario(spec: dict, world, device) -> None:
    """R-RES-3 on 2 ranks: a sharded checkpoint loaded into a sharded model, gathered back for comparison."""
    cfg = config_from_dict(spec["config"])
    model, _ = attach_adapter(load_model(Path(cfg.base_model), device), cfg)
    apply_fsdp(model, world, device, cfg.distributed.fsdp, torch.float32)
    load_checkpoint(Path(spec["checkpoint"]), model, build_optimizer(model, cfg))
    gathered = gather_for_save(model, adapter=True)
    if world.main:
        save_file({n: t.contiguous() for n, t in gathered.items()}, Path(spec["out"]))


def decode_scenario(spec: dict, world, device) -> None:
    """GRPO's sampling under FSDP where the processes' generations have different lengths (rank r decodes
    spec["lengths"][r] tokens from its own prompts): the process done first keeps stepping, so none hangs."""
    cfg = config_from_dict(spec["config"])
    model = sharded_lora_model(cfg, world, device)
    prompts, seeds = spec["prompts"][world.rank], spec["seeds"][world.rank]
    sampling = {"temperature": 1.0, "top_p": 0.9, "generators": seeded_generators(seeds, device)}
    gens = decode(model, prompts, [], 0, spec["lengths"][world.rank], device, sampling, synced=True)
    Path(spec["out"], f"decode-{world.rank}.json").write_text(json.dumps([ids for ids, _ in gens]))


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    first = config_from_dict(spec["runs"][0]["config"])
    world, device = init_world(first.distributed, torch.device("cpu"))
    quiet = Reporter(quiet=True)
    for run in spec["runs"]:
        cfg = config_from_dict(run["config"])
        if run.get("copy_from"):
            if world.main:
                shutil.copytree(run["copy_from"], cfg.output_dir)
            world.barrier()
        train(cfg, resume=run.get("resume", False), reporter=quiet, stop_after=run.get("stop_after"))
        world.barrier()  # rank 0 finishes final/ and run.json alone
    if spec.get("gather"):
        gather_scenario(spec["gather"], world, device)
    if spec.get("reload"):
        reload_scenario(spec["reload"], world, device)
    if spec.get("decode"):
        decode_scenario(spec["decode"], world, device)
    world.barrier()
    shutdown_world()


if __name__ == "__main__":
    main()
