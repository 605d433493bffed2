"""tuneforge against TRL's SFTTrainer + PEFT on CPU, the same work, alternating in one run.

    python bench/vs_trl_cpu.py --steps 8 --rounds 2                      # quickstart and variable-length data
    python bench/vs_trl_cpu.py --steps 8 --rounds 2 --busy               # a 2-thread matmul job running beside both

Both train the built-in model (SmolLM2-135M-Instruct) with LoRA r16 alpha 32 on all linear layers, fp32,
micro-batch 8, lr 2e-4, no evaluation, no checkpoints, each run in a fresh process. The order alternates
(TRL, tuneforge, TRL, tuneforge, ...) so that a shared machine's slow spells fall on both. Each run reports
its median step time over the steps after the first two (warm-up) and the median real (non-padding) tokens
of those steps, so tokens/s compares the same examples' cost; the ratio is per round. Each round first
measures the machine's 2048 fp32 matmul rate (GFLOP/s), so that a table says how loaded the machine was.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fast_path_cpu import EXAMPLES, variable_length_data

LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
TRL_RUN = """
import json, statistics, sys, time
import torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer
from tuneforge.models.resolve import resolve_base_model

data, steps, micro_batch, max_len = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
folder, _ = resolve_base_model("smollm2-135m-instruct")
times, tokens = [], []

class Clock(TrainerCallback):
    def on_step_begin(self, args, state, control, **kw):
        self.t0 = time.perf_counter()
    def on_step_end(self, args, state, control, **kw):
        times.append(time.perf_counter() - self.t0)

class Counted(SFTTrainer):
    def compute_loss(self, model, inputs, *a, **kw):
        tokens.append(int(inputs["attention_mask"].sum()))
        return super().compute_loss(model, inputs, *a, **kw)

args = SFTConfig(output_dir=sys.argv[5], per_device_train_batch_size=micro_batch, max_steps=steps, learning_rate=2e-4,
                 lr_scheduler_type="constant", logging_steps=1000, save_strategy="no", report_to=[], use_cpu=True,
                 bf16=False, fp16=False, max_length=max_len, dataloader_num_workers=0, seed=42)
lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
trainer = Counted(model=str(folder), args=args, train_dataset=load_dataset("json", data_files=data, split="train"),
                  peft_config=lora, callbacks=[Clock()])
trainer.train()
print(json.dumps({"step_s": times, "tokens": tokens}))
"""
BUSY = """
import torch
torch.set_num_threads(2)
a = torch.randn(1024, 1024)
while True:
    a = torch.tanh(a @ a)
"""


def tuneforge_run(data: Path, out: Path, steps: int, micro_batch: int, max_len: int) -> dict:
    cfg = {"base_model": "smollm2-135m-instruct", "adapter": "lora", "lora": LORA, "device": "cpu", "precision": "fp32",
           "datasets": [{"path": str(data)}], "max_seq_len": max_len, "micro_batch_size": micro_batch,
           "max_steps": steps, "learning_rate": 2e-4, "scheduler": "constant", "output_dir": str(out),
           "evaluation": {"before_after": False}, "diagnose": {"enabled": False}}
    code = ("import json, sys; from tuneforge.config import config_from_dict; from tuneforge.track.console import "
            "Reporter; from tuneforge.train.loop import train; "
            "train(config_from_dict(json.loads(sys.argv[1])), reporter=Reporter(quiet=True))")
    subprocess.run([sys.executable, "-c", code, json.dumps(cfg)], capture_output=True, text=True, check=True)
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()][2:]
    return _summary([m["step_s"] for m in records], [m["tokens"] for m in records])


def trl_run(data: Path, out: Path, steps: int, micro_batch: int, max_len: int) -> dict:
    done = subprocess.run([sys.executable, "-c", TRL_RUN, str(data), str(steps), str(micro_batch), str(max_len), str(out)],
                          capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # TRL counts a micro-batch's tokens in compute_loss; one micro-batch a step here.
    return _summary(result["step_s"][2:], result["tokens"][2:])


def matmul_rate(size: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of a size x size fp32 matmul on this machine now (the best of `repeats`), in a fresh
    process with torch's default threads, as the runs have: how fast the machine was during a round."""
    code = (f"import time, torch; a = torch.randn({size}, {size}); b = a @ a; best = 1e9\n"
            f"for _ in range({repeats}):\n t = time.perf_counter(); a @ a; best = min(best, time.perf_counter() - t)\n"
            f"print(2 * {size}**3 / best / 1e9)")
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def _summary(step_s: list[float], tokens: list[int]) -> dict:
    step, tok = statistics.median(step_s), statistics.median(tokens)
    return {"step_s": step, "tokens": tok, "tokens_per_s": tok / step}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--data", nargs="+", choices=["quickstart", "variable-length"], default=["quickstart", "variable-length"])
    p.add_argument("--busy", action="store_true", help="run a 2-thread matmul job beside both")
    args = p.parse_args()
    busy = subprocess.Popen([sys.executable, "-c", BUSY]) if args.busy else None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            sets = {"quickstart": (EXAMPLES / "data" / "quickstart_train.jsonl", 256),
                    "variable-length": (variable_length_data(tmp / "variable.jsonl"), 512)}
            print(f"machine: {'busy (2-thread job beside)' if busy else 'as found'}; {time.strftime('%Y-%m-%d %H:%M')}")
            print("| data | round | TRL tokens/s | tuneforge tokens/s | ratio | TRL step s | tuneforge step s | "
                  "matmul GFLOP/s |")
            print("|---|---|---|---|---|---|---|---|")
            for name in args.data:
                data, max_len = sets[name]
                for r in range(1, args.rounds + 1):
                    rate = matmul_rate()
                    peer = trl_run(data, tmp / f"trl-{name}-{r}", args.steps, args.micro_batch, max_len)
                    ours = tuneforge_run(data, tmp / f"tf-{name}-{r}", args.steps, args.micro_batch, max_len)
                    print(f"| {name} | {r} | {peer['tokens_per_s']:.1f} | {ours['tokens_per_s']:.1f} | "
                          f"{ours['tokens_per_s'] / peer['tokens_per_s']:.2f}x | {peer['step_s']:.2f} | "
                          f"{ours['step_s']:.2f} | {rate:.0f} |", flush=True)
    finally:
        if busy is not None:
            busy.kill()


if __name__ == "__main__":
    main()
