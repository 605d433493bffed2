"""Training speed and memory: tuneforge against HF transformers + PEFT, Liger Kernel and Unsloth.

On the GPU machine (one command; results also land in $OUT/speed.json when OUT is set):

    python bench/speed.py --shapes llama-3.2-1b,llama-3.1-8b,qwen2.5-7b --data fixed,variable

A CPU smoke run of the harness itself (what CI can afford):

    python bench/speed.py --shapes tiny --data fixed,variable --device cpu --steps 3 --loss-steps 3

Setting (the seed table of issue 9): random-initialised weights of the real architectures, LoRA
r=16 alpha=16 dropout 0 on all seven linear layers, bf16, AdamW, micro-batch 4. Data `fixed`:
4 x 2048 tokens, every position trained; `variable`: lengths log-normal (median about 250, capped
at 2048), micro-batches of 4 examples. Each stack runs in its own process (Unsloth and Liger patch
transformers at import), from the same initial weights and the same batches. `tuneforge` is its
default (`performance: auto`, which includes the fused RMSNorm/SwiGLU kernels and the fused LoRA
layers on CUDA); `tuneforge-no_kernels` and `tuneforge-no_fused_lora` are the same without the one or
the other, so each pair measures one of them.

Figures per row: real (non-padding) tokens/s, peak allocated and reserved memory, model FLOP/s
and MFU against the GPU's dense bf16 peak (LoRA: 4N + 12 * layers * seq * hidden per token;
full: 6N + the same attention term), and the largest relative difference of the per-step loss
from the reference stack's over `--loss-steps` steps. A stack whose package is absent is skipped
and named.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# The real architectures come from plan's table (tuneforge.plan.architectures); "tiny" is for CPU smoke runs.
TINY = dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)
STACKS = ("hf", "tuneforge", "tuneforge-min_memory", "tuneforge-no_kernels", "tuneforge-no_fused_lora",
          "tuneforge-compile", "liger", "unsloth")
# performance: of each tuneforge stack; no_kernels is the default without the fused RMSNorm/SwiGLU kernels,
# no_fused_lora the default with PEFT's own LoRA forward,
# compile the default with each decoder layer under torch.compile
PERFORMANCE = {"tuneforge": "auto", "tuneforge-min_memory": "min_memory",
               "tuneforge-no_kernels": {"mode": "auto", "kernels": False},
               "tuneforge-no_fused_lora": {"mode": "auto", "fused_lora": False},
               "tuneforge-compile": {"mode": "auto", "compile": True}}
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MICRO_BATCH, SEQ = 4, 2048


# ---- data: the same batches for every stack -------------------------------------------------------


def lengths_for(data: str, n_batches: int, seq: int, seed: int = 0, rows: int = MICRO_BATCH) -> list[list[int]]:
    import random

    if data == "fixed":
        return [[seq] * rows for _ in range(n_batches)]
    rng = random.Random(seed)
    median = min(250, seq // 4)
    return [[max(8, min(seq, int(rng.lognormvariate(math.log(median), 0.9)))) for _ in range(rows)]
            for _ in range(n_batches)]


def make_examples(lengths: list[list[int]], vocab: int, seed: int = 0):
    """Token ids for each example of each batch; every position is trained (labels = inputs)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return [[torch.randint(3, vocab, (n,), generator=g).tolist() for n in batch] for batch in lengths]


# ---- model FLOPs ------------------------------------------------------------------------------------


def model_flops(shape: dict, lengths: list[int], n_params: int, lora: bool) -> float:
    """FLOPs of one step over examples of these lengths: weights (4N LoRA, 6N full per token) plus
    attention scores and values (12 * layers * hidden per token per position attended, forward and
    backward, no causal halving, as the usual MFU convention)."""
    per_token = (4 if lora else 6) * n_params
    attention = sum(12 * shape["num_hidden_layers"] * shape["hidden_size"] * n * n for n in lengths)
    return per_token * sum(lengths) + attention


def gpu_peak(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in device_name), None)


# ---- one stack, in its own process ------------------------------------------------------------------


def shape_spec(name: str) -> dict:
    """The config.json of a shape name: "tiny", or an architecture of plan's table."""
    from tuneforge.plan.architectures import table_shape
    from tuneforge.plan.model import hf_config_for

    if name == "tiny":
        return dict(TINY)
    shape = table_shape(name)
    if shape is None:
        raise SystemExit(f"--shapes: {name} is not in tuneforge plan's architecture table")
    return hf_config_for(shape)


def build_model(shape_name: str, device: str, dtype, seed: int):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = shape_spec(shape_name)
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.to(device), config


def padded_step(model, args):
    """The usual step of a transformers model: right-padded batch, the model's own loss, torch AdamW."""
    import torch

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)

    def step(examples):
        width = max(len(e) for e in examples)
        ids = torch.zeros((len(examples), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, e in enumerate(examples):
            ids[i, : len(e)], mask[i, : len(e)] = torch.tensor(e), 1
        labels = ids.masked_fill(mask == 0, -100)
        ids, mask, labels = ids.to(args.device), mask.to(args.device), labels.to(args.device)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def run_hf(args, dtype, liger: bool = False):
    """The reference: transformers + PEFT, padded batches, the model's own loss, torch AdamW."""
    import torch
    from peft import LoraConfig, get_peft_model

    if liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llama, apply_liger_kernel_to_qwen2

        {"llama": apply_liger_kernel_to_llama, "qwen2": apply_liger_kernel_to_qwen2}[shape_spec(args.shape)["model_type"]]()
    model, _ = build_model(args.shape, args.device, dtype, args.seed)
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    torch.manual_seed(args.seed + 1)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))
    return model, padded_step(model, args)


def run_unsloth(args, dtype):
    import tempfile

    import torch
    from unsloth import FastLanguageModel

    model, _ = build_model(args.shape, "cpu", dtype, args.seed)
    folder = Path(tempfile.mkdtemp()) / "model"
    model.save_pretrained(folder)
    del model
    model, _ = FastLanguageModel.from_pretrained(str(folder), max_seq_length=args.seq_len, dtype=dtype, load_in_4bit=False)
    torch.manual_seed(args.seed + 1)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0, target_modules=TARGETS,
                                             use_gradient_checkpointing="unsloth" if args.checkpointing else False)
    return model, padded_step(model, args)


def run_tuneforge(args, dtype, mode: str | dict):
    """tuneforge's own parts: its adapter, its SFT objective on the fast path, its optimizer step."""
    import torch

    from tuneforge.config import config_from_dict
    from tuneforge.fast.apply import apply_fast_path
    from tuneforge.fast.switches import resolve
    from tuneforge.methods.sft import SFT
    from tuneforge.models.load import attach_adapter, weights_dtype
    from tuneforge.train.loop import accumulate_gradients, optimizer_step
    from tuneforge.train.optim import build_optimizer

    cfg = config_from_dict({
        "datasets": [{"path": "unused.jsonl"}], "adapter": "lora", "learning_rate": args.lr, "max_grad_norm": None,
        "lora": {"r": 16, "alpha": 16, "dropout": 0.0, "target_modules": TARGETS},
        "gradient_checkpointing": args.checkpointing, "performance": mode,
    })
    device = torch.device(args.device)
    model, _ = build_model(args.shape, args.device, weights_dtype("lora", dtype), args.seed)
    torch.manual_seed(args.seed + 1)
    model, _ = attach_adapter(model, cfg)
    fast = resolve(cfg, device.type, model)
    apply_fast_path(model, fast, device)  # as the loop does: after the adapter
    model.train()
    optimizer = build_optimizer(model, cfg, fused=fast.fused_optimizer)
    Example = type("Example", (), {})

    def as_example(ids):
        e = Example()
        e.input_ids, e.labels = ids, ids
        return e

    def step(examples):
        data = type("Data", (), {"train": [as_example(e) for e in examples]})
        objective = SFT(data, 0, fast)
        batch = objective.collate(list(range(len(examples))))
        loss, _, _ = accumulate_gradients(objective, model, [batch], device, dtype)
        optimizer_step(optimizer, args.lr, None)
        return loss

    return model, step


def worker(args) -> dict:
    import torch

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    n = args.warmup + max(args.steps, args.loss_steps)
    shape = shape_spec(args.shape)
    batches = make_examples(lengths_for(args.data, n, args.seq_len, rows=args.micro_batch), shape["vocab_size"])
    if args.stack in ("hf", "liger"):
        model, step = run_hf(args, dtype, liger=args.stack == "liger")
    elif args.stack == "unsloth":
        model, step = run_unsloth(args, dtype)
    else:
        model, step = run_tuneforge(args, dtype, PERFORMANCE[args.stack])
    n_params = sum(p.numel() for name, p in model.named_parameters() if "lora_" not in name)
    cuda = args.device == "cuda"
    losses, times = [], []
    for i, examples in enumerate(batches):
        if cuda and i == args.warmup:
            torch.cuda.reset_peak_memory_stats()
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        losses.append(step(examples))
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    timed = list(range(args.warmup, args.warmup + args.steps))
    seconds = sum(times[i] for i in timed)
    tokens = sum(sum(len(e) for e in batches[i]) for i in timed)
    flops = sum(model_flops(shape, [len(e) for e in batches[i]], n_params, lora=True) for i in timed)
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = gpu_peak(device_name)
    return {
        "stack": args.stack, "shape": args.shape, "data": args.data, "device": device_name,
        "tokens_per_s": tokens / seconds, "median_step_s": statistics.median(times[i] for i in timed),
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 1024**3 if cuda else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 1024**3 if cuda else None,
        "tflops": flops / seconds / 1e12, "mfu": flops / seconds / peak if peak else None,
        "losses": losses[: args.loss_steps],
    }


# ---- the driver -------------------------------------------------------------------------------------


def available(stack: str) -> str | None:
    """Why a stack cannot run here, or None."""
    import importlib.util

    needs = {"liger": "liger_kernel", "unsloth": "unsloth"}.get(stack)
    if needs and importlib.util.find_spec(needs) is None:
        return f"{needs} is not installed"
    return None


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "peft", "liger-kernel", "unsloth", "triton"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def table(rows: list[dict], reference: str) -> str:
    lines = ["| shape | data | stack | real tok/s | vs ref | peak alloc GiB | peak reserved GiB | TFLOP/s | MFU | "
             "loss max rel. diff vs ref |", "|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for r in rows:
        ref = next((x for x in rows if x["stack"] == reference and x["shape"] == r["shape"] and x["data"] == r["data"]),
                   None)
        speedup = r["tokens_per_s"] / ref["tokens_per_s"] if ref else None
        drift = (max(abs(a - b) / abs(b) for a, b in zip(r["losses"], ref["losses"])) if ref and r["losses"] else None)
        lines.append(f"| {r['shape']} | {r['data']} | {r['stack']} | {r['tokens_per_s']:,.0f} | {fmt(speedup, '.2f')}x | "
                     f"{fmt(r['peak_allocated_gib'], '.2f')} | {fmt(r['peak_reserved_gib'], '.2f')} | "
                     f"{r['tflops']:.1f} | {fmt(r['mfu'], '.1%')} | {fmt(drift, '.2%')} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="llama-3.2-1b,llama-3.1-8b,qwen2.5-7b")
    p.add_argument("--data", default="fixed,variable")
    p.add_argument("--stacks", default=",".join(STACKS))
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps", type=int, default=20, help="timed steps, after the warm-up")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seq-len", type=int, default=SEQ, help="tokens per row (fixed data; the cap of variable data)")
    p.add_argument("--micro-batch", type=int, default=MICRO_BATCH, help="rows per step (1 for the longest context)")
    p.add_argument("--loss-steps", type=int, default=50, help="steps compared with the reference's losses")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="activation checkpointing in every stack (each its own kind)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--stack", help=argparse.SUPPRESS)
    p.add_argument("--shape", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    rows, skipped = [], []
    for shape in args.shapes.split(","):
        for data in args.data.split(","):
            for stack in args.stacks.split(","):
                why = available(stack)
                if why:
                    skipped.append(f"{stack}: {why}")
                    continue
                cmd = [sys.executable, __file__, "--worker", "--stack", stack, "--shape", shape, "--data", data,
                       "--device", args.device, "--steps", str(args.steps), "--warmup", str(args.warmup),
                       "--loss-steps", str(args.loss_steps), "--seq-len", str(args.seq_len), "--micro-batch", str(args.micro_batch), "--lr", str(args.lr), "--seed", str(args.seed),
                       "--checkpointing" if args.checkpointing else "--no-checkpointing"]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode != 0:
                    skipped.append(f"{stack} on {shape}/{data} failed: {done.stderr.strip().splitlines()[-1:]}")
                    continue
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(f"{shape} {data} {stack}: {rows[-1]['tokens_per_s']:,.0f} tok/s", file=sys.stderr, flush=True)
    print(table(rows, reference="hf"))
    for line in sorted(set(skipped)):
        print(f"skipped {line}")
    facts = {"date": time.strftime("%Y-%m-%d"), "command": " ".join([Path(sys.executable).name, *sys.argv]),
             "versions": versions(), "rows": rows, "skipped": skipped}
    print(json.dumps({k: facts[k] for k in ("date", "command", "versions")}))
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / "speed.json").write_text(json.dumps(facts, indent=1))


if __name__ == "__main__":
    main()
