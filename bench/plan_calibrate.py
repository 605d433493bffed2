"""Peak memory and tokens/s of a few training steps, next to what `tuneforge plan` predicts.

    python bench/plan_calibrate.py --rows cpu    # the built-in model on this machine's CPU
    python bench/plan_calibrate.py --rows gpu    # Llama-3.2-1B full/LoRA/QLoRA, Llama-3.1-8B LoRA/QLoRA on CUDA
    python bench/plan_calibrate.py --rows cpu --out rows.md

Every row runs in a fresh process, because peak memory is a per-process high-water mark, and
trains through the loop's own functions: load_model (the built-in model) or a random-initialised
model of the table's shape, attach_adapter, build_optimizer, then accumulate_gradients and
optimizer_step from tuneforge.train.loop on random token batches of a fixed shape. One step
warms up (the optimizer state is allocated there, so it is inside the measured peak); the next
ones are timed.

Memory on a GPU is torch.cuda.max_memory_allocated: the tensors alive at the peak, without the
CUDA context or the caching allocator's slack. On a CPU it is the same quantity read from RSS:
the runtime is warmed first (a tiny model of the same kind trains one step, so imports, thread
pools and kernel caches are resident), the RSS is read, the real model is loaded, the high-water
mark is reset through /proc/self/clear_refs (loading's own transient copies do not count), and
the peak RSS of the steps minus that reading is the model's. The child runs with a fixed glibc
mmap threshold (MALLOC_MMAP_THRESHOLD_), so freed tensors go back to the system as they would to
a caching allocator instead of staying in the heap and inflating RSS.

tokens/s is the tokens of a timed step over its median time (robust to a moment of contention).
On a machine shared with other work, wall time measures the others too; `--threads 1 --clock cpu`
then runs torch on one thread and times the process's CPU seconds, which are the wall seconds the
step would take on an idle core, and the row's device is a one-core CPU. The markdown table
printed is what bench/PLAN_CALIBRATION.md records and tests/test_plan.py checks.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from tuneforge.plan.calibration import Row, cpu_label, predict, to_markdown  # noqa: E402

BUILTIN = "smollm2-135m-instruct"
ROWS = {
    "cpu": [
        Row(BUILTIN, "lora", 4, 256, False, 0.0, "", chunked_loss=True),
        Row(BUILTIN, "full", 2, 128, False, 0.0, "", chunked_loss=True),
        Row(BUILTIN, "lora", 2, 128, False, 0.0, ""),
        Row(BUILTIN, "lora", 4, 256, False, 0.0, ""),
        Row(BUILTIN, "lora", 4, 256, True, 0.0, ""),
        Row(BUILTIN, "lora", 4, 256, False, 0.1875, ""),
        Row(BUILTIN, "full", 2, 128, False, 0.0, ""),
        Row(BUILTIN, "full", 2, 128, True, 0.0, ""),
    ],
    "gpu": [
        Row("llama-3.2-1b", "full", 4, 2048, False, 0.0, ""),
        Row("llama-3.2-1b", "lora", 4, 2048, False, 0.0, ""),
        Row("llama-3.2-1b", "qlora", 4, 2048, False, 0.0, ""),
        Row("llama-3.1-8b", "lora", 4, 2048, False, 0.0, ""),
        Row("llama-3.1-8b", "qlora", 4, 2048, False, 0.0, ""),
        Row("llama-3.1-8b", "lora", 4, 2048, False, 0.0, "", chunked_loss=True),
        Row("llama-3.1-8b", "qlora", 4, 2048, True, 0.0, "", chunked_loss=True),  # the 12 GiB goal
    ],
}
GPU_NAMES = (("H200", "H200"), ("H100", "H100-80GB"), ("L40S", "L40S"), ("A10G", "A10G"),
             ("4090", "RTX-4090"), ("3090", "RTX-3090"), ("T4", "T4"))


def device_label(device) -> str:
    """The name of this device in plan's table; a CPU counts the threads torch uses as its cores."""
    import torch

    from tuneforge.plan.hardware import cpu_facts

    if device.type == "cpu":
        _, per_cycle, ghz = cpu_facts()
        return cpu_label(torch.get_num_threads(), per_cycle, ghz)
    name = torch.cuda.get_device_name(device)
    if "A100" in name:
        return "A100-80GB" if torch.cuda.get_device_properties(device).total_memory > 50 * 1024**3 else "A100-40GB"
    for part, label in GPU_NAMES:
        if part in name:
            return label
    raise SystemExit(f"{name}: not a GPU of plan's table; add it to tuneforge/plan/hardware.py first")


def rss_mib(field: str) -> float:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1)) / 1024


def batch(row: Row, vocab: int, seed: int):
    """Random tokens, all trained; with padding, micro-batch rows shortened by 0, 1/8, 2/8, 3/8 of seq_len."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (row.micro_batch, row.seq_len), generator=g)
    mask = torch.ones_like(ids)
    if row.padding:
        for i in range(row.micro_batch):
            mask[i, row.seq_len - (i % 4) * row.seq_len // 8:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def random_model(name: str, dtype, quantize: bool, device):
    """A random-initialised model of a table shape, in dtype or NF4 on `device`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tuneforge.plan.architectures import table_shape
    from tuneforge.plan.model import hf_config_for

    spec = hf_config_for(table_shape(name))
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(spec.pop("model_type"), **spec), dtype=dtype)
    if not quantize:
        return model.to(device)
    from transformers import BitsAndBytesConfig

    # The standard QLoRA base: NF4, double quantisation, bf16 compute; embeddings and head stay bf16.
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        del model
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        return AutoModelForCausalLM.from_pretrained(tmp, quantization_config=quant, dtype=torch.bfloat16,
                                                    device_map={"": device.index or 0})


def warm_runtime(cfg, row: Row, device, dtype) -> None:
    """Train one step of a tiny model of the same kind, so that what loads lazily is loaded."""
    import gc

    from transformers import AutoModelForCausalLM, LlamaConfig

    from tuneforge.models.load import attach_adapter
    from tuneforge.fast import FastPath
    from tuneforge.methods.sft import SFT
    from tuneforge.train.loop import accumulate_gradients, build_optimizer, optimizer_step

    tiny = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=256)
    model, _ = attach_adapter(AutoModelForCausalLM.from_config(tiny).to(device), cfg)
    objective = SFT(None, 0, FastPath(chunked_loss=row.chunked_loss))
    if row.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = build_optimizer(model, cfg)
    accumulate_gradients(objective, model, [batch(replace(row, seq_len=min(row.seq_len, 128)), 256, 99)], device, dtype)
    optimizer_step(optimizer, 1e-4, 1.0)
    del model, optimizer
    gc.collect()


def measure(row: Row, steps: int, threads: int | None, clock: str) -> dict:
    """Run one row in this process; returns the measured peak MiB, tokens/s and the device label."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    now = time.process_time if clock == "cpu" else time.perf_counter

    from tuneforge.config import config_from_dict
    from tuneforge.models.load import attach_adapter, load_model, pick_device, pick_dtype, weights_dtype
    from tuneforge.models.resolve import resolve_base_model
    from tuneforge.fast import FastPath
    from tuneforge.methods.sft import SFT
    from tuneforge.train.loop import accumulate_gradients, build_optimizer, optimizer_step

    torch.manual_seed(0)
    device = pick_device("auto")
    dtype = pick_dtype("auto", device)
    cfg = config_from_dict({"datasets": [{"path": "calibration.jsonl"}], "learning_rate": 1e-4,
                            "adapter": "full" if row.method == "full" else "lora",
                            "micro_batch_size": row.micro_batch, "gradient_checkpointing": row.checkpointing})
    warm_runtime(cfg, row, device, dtype)
    baseline = rss_mib("VmRSS")
    if row.model == BUILTIN:
        model = load_model(resolve_base_model(BUILTIN)[0], device, dtype=weights_dtype(cfg.adapter, dtype))
    else:
        model = random_model(row.model, weights_dtype(cfg.adapter, dtype), row.method == "qlora", device)
    model, _ = attach_adapter(model, cfg)
    objective = SFT(None, 0, FastPath(chunked_loss=row.chunked_loss))  # batches are collated below
    if row.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = build_optimizer(model, cfg)
    vocab = model.get_input_embeddings().weight.shape[0]
    batches = [batch(row, vocab, seed) for seed in range(steps + 1)]

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
    seconds = []
    for b in batches:
        t0 = now()
        accumulate_gradients(objective, model, [b], device, dtype)
        optimizer_step(optimizer, 1e-4, 1.0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(now() - t0)
    peak = torch.cuda.max_memory_allocated() / 1024**2 if device.type == "cuda" else rss_mib("VmHWM") - baseline
    tokens = int(batches[-1]["attention_mask"].sum())  # every batch of a row has the same shape
    return {"peak_mib": peak, "tokens_per_s": tokens / statistics.median(seconds[1:]),  # the first step warms up
            "device": device_label(device), "step_seconds": [round(x, 3) for x in seconds],
            "load_average": os.getloadavg()}


def run_row(row: Row, steps: int, threads: int | None, clock: str) -> Row:
    """Measure a row in a child process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
    command = [sys.executable, __file__, "--one", json.dumps(asdict(row)), "--steps", str(steps), "--clock", clock]
    out = subprocess.run(command + (["--threads", str(threads)] if threads else []), capture_output=True, text=True, env=env)
    if out.returncode:
        print(out.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"row {row} failed")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{row.model} {row.method} mb {row.micro_batch} seq {row.seq_len} ckpt {row.checkpointing} "
          f"padding {row.padding}: {result}", file=sys.stderr)
    return replace(row, **{k: result[k] for k in ("peak_mib", "tokens_per_s", "device")})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", choices=sorted(ROWS), default="cpu")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--threads", type=int, help="torch threads on a CPU (default: torch's choice)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="time steps by wall clock, or by the process's CPU seconds (with --threads 1)")
    parser.add_argument("--out", help="also write the markdown table to this file")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu measures one core: give --threads 1")
    if args.one:
        print(json.dumps(measure(Row(**json.loads(args.one)), args.steps, args.threads, args.clock)))
        return
    rows = []
    for row in ROWS[args.rows]:
        rows.append(run_row(row, args.steps, args.threads, args.clock))
    table = to_markdown(rows, [predict(r) for r in rows])
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
