"""Where one CPU training step's time goes: torch.profiler over one step of `bench/vs_trl_cpu.py`'s tuneforge run.

    python bench/profile_step_cpu.py                        # variable-length data, the defaults (performance: auto)
    python bench/profile_step_cpu.py --data quickstart --performance '{"fused_lora": false}'

The same settings as vs_trl_cpu.py (the built-in model, LoRA r16 alpha 32 on all linear layers, fp32,
micro-batch 8, max_seq_len 512). Steps 1-2 warm up; step `--step` runs under the profiler. Prints the
top operators by self CPU time, the share of attention calls, the loss, the LoRA layers and the time no
operator accounts for (Python and dispatch), per step and per decoder layer.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import tuneforge.train.loop as loop
from fast_path_cpu import EXAMPLES, variable_length_data
from tuneforge.config import config_from_dict
from tuneforge.track.console import Reporter
from vs_trl_cpu import LORA

GROUPS = {  # operator name prefixes -> what they are
    "attention": ("aten::_scaled_dot_product", "aten::scaled_dot_product", "aten::_flash_attention",
                  "aten::_efficient_attention"),
    "matmul": ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::matmul"),
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", choices=["quickstart", "variable-length"], default="variable-length")
    p.add_argument("--step", type=int, default=3)
    p.add_argument("--performance", default="{}", help="performance: keys as JSON")
    p.add_argument("--top", type=int, default=20)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data, max_len = {"quickstart": (EXAMPLES / "data" / "quickstart_train.jsonl", 256),
                         "variable-length": (variable_length_data(tmp / "variable.jsonl"), 512)}[args.data]
        cfg = {"base_model": "smollm2-135m-instruct", "adapter": "lora", "lora": LORA, "device": "cpu",
               "precision": "fp32", "datasets": [{"path": str(data)}], "max_seq_len": max_len, "micro_batch_size": 8,
               "max_steps": args.step, "learning_rate": 2e-4, "scheduler": "constant", "output_dir": str(tmp / "out"),
               "evaluation": {"before_after": False}, "diagnose": {"enabled": False},
               "performance": json.loads(args.performance)}
        seen, result = [0], {}
        accumulate = loop.accumulate_gradients

        def profiled(objective, model, batches, *a, **kw):
            seen[0] += 1
            if seen[0] != args.step:
                return accumulate(objective, model, batches, *a, **kw)
            layers = len(model.base_model.model.model.layers)
            with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
                t0 = time.perf_counter()
                with record_function("## forward+backward"):
                    out = accumulate(objective, model, batches, *a, **kw)
                wall = time.perf_counter() - t0
            result.update(prof=prof, wall=wall, layers=layers, tokens=out[1].get("tokens"),
                          lengths=[int((b["position_ids"] == 0).sum()) if "position_ids" in b else None for b in batches])
            return out

        loop.accumulate_gradients = profiled
        print(f"torch threads: {torch.get_num_threads()}")
        loop.train(config_from_dict(cfg), reporter=Reporter(quiet=True))
    report(result, args.top)


def report(result: dict, top: int) -> None:
    events = result["prof"].key_averages()
    wall_us = result["wall"] * 1e6
    print(f"step {result['tokens']} tokens, forward+backward {result['wall']:.2f} s wall, "
          f"{result['layers']} decoder layers")
    print(f"| operator | self CPU s | share of step | calls |")
    print("|---|---|---|---|")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]:
        print(f"| {e.key} | {e.self_cpu_time_total / 1e6:.3f} | {e.self_cpu_time_total / wall_us:.1%} | {e.count} |")
    ops_us = sum(e.self_cpu_time_total for e in events if e.key.startswith("aten::"))
    for name, prefixes in GROUPS.items():
        us = sum(e.self_cpu_time_total for e in events if e.key.startswith(prefixes))
        calls = sum(e.count for e in events if e.key.startswith(prefixes))
        print(f"{name}: {us / 1e6:.3f} s self ({us / wall_us:.1%} of the step), {calls} calls")
    for key in ("_LinearCrossEntropy", "_FusedLora", "SdpaAttention", "autograd::engine"):
        hits = [e for e in events if key in e.key]
        for e in hits:
            print(f"{e.key}: {e.cpu_time_total / 1e6:.3f} s total ({e.cpu_time_total / wall_us:.1%}), {e.count} calls")
    outside = wall_us - ops_us
    print(f"not in any aten operator (Python, autograd bookkeeping, dispatch): {outside / 1e6:.3f} s "
          f"({outside / wall_us:.1%}), {outside / 1e3 / result['layers']:.1f} ms per decoder layer")


if __name__ == "__main__":
    main()
