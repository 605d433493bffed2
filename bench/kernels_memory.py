"""What the fused kernels keep for the backward pass: activation bytes per token per decoder layer.

    python bench/kernels_memory.py --shapes llama-3.2-1b,llama-3.1-8b --tokens 256

Autograd saves the same tensors on CPU and GPU, and the kernels' PyTorch path keeps what their
Triton path keeps (the input and one fp32 number per row for RMSNorm; gate and up for the gated
activation), so this runs on CPU. It says nothing about speed, which needs the GPU (bench/speed.py).

Setting: as the training loop runs bf16 (tuneforge.models.load.weights_dtype and autocast): LoRA r=16
on the seven linear layers over bf16 weights, and full fine-tuning over fp32 weights, both under
bf16 autocast. Random weights of the shape from plan's table, one and two decoder layers (the
difference is one layer), a small vocabulary (the output layer is the same either way), `--tokens`
and twice as many (the difference is what grows with the tokens: autocast's bf16 copies of fp32
weights are saved too, once per step). Counted: every tensor autograd saves during the forward, each
storage once. The plain figure includes attention as CPU runs it (GPU FlashAttention keeps less);
the difference is the kernels' alone.
"""

from __future__ import annotations

import argparse

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def saved_bytes(model, ids) -> int:
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, labels=ids)
    return sum(seen.values())


def build(shape: str, layers: int, adapter: str, kernels: bool):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from tuneforge.fast.kernels import apply_kernels
    from tuneforge.models.load import weights_dtype
    from tuneforge.plan.architectures import table_shape
    from tuneforge.plan.model import hf_config_for

    spec = hf_config_for(table_shape(shape))
    spec.update(num_hidden_layers=layers, vocab_size=1024)
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=weights_dtype(adapter, torch.bfloat16))
    if adapter == "lora":
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))
    if kernels:
        apply_kernels(model)
    return model.train()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="llama-3.2-1b")
    p.add_argument("--tokens", type=int, default=256)
    args = p.parse_args()
    torch.set_num_threads(min(4, torch.get_num_threads()))
    t = args.tokens
    ids = {n: torch.randint(0, 1024, (1, n)) for n in (t, 2 * t)}
    print("| shape | adapter | plain B/token/layer | kernels B/token/layer | kept less |")
    print("|---|---|---:|---:|---:|")
    for shape in args.shapes.split(","):
        for adapter in ("lora", "full"):
            per_layer = {}
            for kernels in (False, True):
                one, two = build(shape, 1, adapter, kernels), build(shape, 2, adapter, kernels)
                layer = {n: saved_bytes(two, ids[n]) - saved_bytes(one, ids[n]) for n in ids}
                per_layer[kernels] = (layer[2 * t] - layer[t]) / t
            plain, fused = per_layer[False], per_layer[True]
            print(f"| {shape} | {adapter} | {plain:,.0f} | {fused:,.0f} | {plain - fused:,.0f} B ({1 - fused / plain:.0%}) |",
                  flush=True)


if __name__ == "__main__":
    main()
