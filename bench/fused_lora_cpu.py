"""One LoRA linear layer on CPU: PEFT's forward against fast/fused_lora.py's, forward and backward.

    python bench/fused_lora_cpu.py --repeats 30

SmolLM2-135M's projection shapes (hidden 576, MLP 1536) over 640 tokens (a micro-batch of 8 quickstart
chats) and 2,048 tokens; LoRA r=16, alpha 32, the base weight frozen, x requiring grad, fp32. The two
paths alternate and the fastest of `repeats` runs of each is kept, since a shared machine only ever slows
a run down. Outputs and gradients (x, A, B) are compared, so the timing is of the same computation.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from peft import LoraConfig, get_peft_model

from tuneforge.fast.fused_lora import apply_fused_lora

SHAPES = [(640, 576, 576), (640, 576, 1536), (640, 1536, 576), (2048, 576, 1536)]  # tokens, in, out


def step(model, x: torch.Tensor, dy: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
    x = x.detach().clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    out = model(x)
    out.backward(dy)
    seconds = time.perf_counter() - start
    return seconds, [out.detach(), x.grad] + [p.grad for p in model.parameters() if p.requires_grad]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"| tokens x in -> out | PEFT ms | fused ms | fused / PEFT |  ({args.threads} threads, best of {args.repeats})")
    print("|---|---|---|---|")
    for tokens, fin, fout in SHAPES:
        torch.manual_seed(0)
        base = torch.nn.Sequential(torch.nn.Linear(fin, fout, bias=False))
        peft = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=["0"], init_lora_weights=False))
        fused = copy.deepcopy(peft)
        apply_fused_lora(fused)
        x, dy = torch.randn(tokens, fin), torch.randn(tokens, fout)
        best = {"peft": float("inf"), "fused": float("inf")}
        for _ in range(args.repeats):
            for name, model in (("peft", peft), ("fused", fused)):
                seconds, results = step(model, x, dy)
                best[name] = min(best[name], seconds)
                if name == "peft":
                    expected = results
                else:
                    for got, want in zip(results, expected):
                        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        print(f"| {tokens} x {fin} -> {fout} | {1e3 * best['peft']:.2f} | {1e3 * best['fused']:.2f} | "
              f"{best['fused'] / best['peft']:.2f} |")


if __name__ == "__main__":
    main()
