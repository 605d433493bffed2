"""Peak memory of a LoRA-DPO step against a LoRA-SFT step over the same rows (R-PREF-1).

Each measurement runs in a fresh process, its peak resident memory reset after loading, so the
peak belongs to one kind of step alone: the built-in model, examples/dpo.yaml's data, B pairs for DPO and the same
2B sequences for SFT, a few steps each. On a GPU the same script reports torch's peak allocated
memory instead.

    python bench/preference_memory.py [--pairs 8] [--steps 3] [--chunked]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def measure(method: str, pairs: int, steps: int, chunked: bool) -> dict:
    import torch

    from tuneforge.fast import FastPath

    from tuneforge.config import load_config
    from tuneforge.data.batching import collate
    from tuneforge.data.dataset import prepare_data
    from tuneforge.methods.build import build_objective
    from tuneforge.methods.run import run_objective
    from tuneforge.methods.reference import Reference
    from tuneforge.methods.sft import SFT
    from tuneforge.models.load import attach_adapter, load_model, load_tokenizer, pick_device
    from tuneforge.models.resolve import resolve_base_model

    cfg = load_config("examples/dpo.yaml")
    folder, _ = resolve_base_model(cfg.base_model)
    tok = load_tokenizer(folder)
    data = prepare_data(cfg, tok)
    device = pick_device("auto")
    model, _ = attach_adapter(load_model(folder, device), cfg)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    fast = FastPath(chunked_loss=chunked)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:  # the steps' peak alone: the kernel's high-water mark restarts here, after loading
        open("/proc/self/clear_refs", "w").write("5")
    for step in range(steps):
        idx = list(range(step * pairs, (step + 1) * pairs))
        if method == "dpo":
            objective = build_objective(cfg, data, tok.pad_token_id, Reference(), fast)
            batch = objective.collate(idx)
        else:
            objective = SFT(data, tok.pad_token_id, fast)
            batch = collate([data.train[i] for i in idx] + [data.train_rejected[i] for i in idx], tok.pad_token_id)
        run_objective(objective, model, [batch], device, torch.float32, backward=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("VmHWM:")) * 1024)
    return {"method": method, "device": device.type, "peak_bytes": peak}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--chunked", action="store_true", help="the chunked loss / log-probs (performance: auto)")
    ap.add_argument("--one", choices=["sft", "dpo"])
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.pairs, args.steps, args.chunked)))
        return
    results = {}
    for method in ("sft", "dpo"):
        out = subprocess.run([sys.executable, __file__, "--one", method, "--pairs", str(args.pairs),
                              "--steps", str(args.steps)] + (["--chunked"] if args.chunked else []),
                             capture_output=True, text=True, check=True)
        results[method] = json.loads(out.stdout.strip().splitlines()[-1])
    sft, dpo = results["sft"]["peak_bytes"], results["dpo"]["peak_bytes"]
    kind = "peak allocated" if results["sft"]["device"] == "cuda" else "peak RSS"
    print(f"{kind}: LoRA-SFT {sft / 2**20:.0f} MiB, LoRA-DPO {dpo / 2**20:.0f} MiB, ratio {dpo / sft:.3f} "
          f"({args.pairs} pairs = {2 * args.pairs} sequences per step, {args.steps} steps, "
          f"{'chunked' if args.chunked else 'full'} logits)")


if __name__ == "__main__":
    main()
