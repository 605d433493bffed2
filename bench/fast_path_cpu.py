"""The fast path against the plain path on CPU: the built-in model, LoRA, real tokens/s and peak memory.

    python bench/fast_path_cpu.py --steps 12 --repeats 2
    python bench/fast_path_cpu.py --modes auto selective full --data variable-length   # checkpointing
    python bench/fast_path_cpu.py --data variable-length --modes padding_free_masked padding_free auto_masked auto
    python bench/fast_path_cpu.py --data quickstart --steps 6 --repeats 2 --modes off fused_lora auto auto_fused_lora

Two datasets: the quickstart data (lengths 64-96 tokens, little padding) and a variable-length set
whose answer lengths follow an instruction-tuning distribution (log-normal, median about 120 tokens,
capped at 512). Each (dataset, mode) runs in a fresh process, alternating modes, `repeats` times;
the best median step time of each is kept (a shared machine only ever slows a run down). Peak
memory is the process's peak RSS during the training steps (the model and data included, the
loading peak not). Modes: off (padded batches, full
logits), padding_free (with per-example attention, fast/varlen.py), chunked_loss, auto (all three,
no activation checkpointing on a CPU); selective and full are auto with every second decoder layer,
or every layer, checkpointed; padding_free_masked and auto_masked are padding_free and auto without
per-example attention: the row's attention over all its T^2 pairs under transformers'
block-diagonal mask, as before fast/varlen.py. fused_lora and auto_fused_lora are off and auto with
`performance.fused_lora: true` (fast/fused_lora.py), against off and auto with it set false.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
MODES = {
    "off": {"mode": "off"},
    "padding_free": {"mode": "off", "padding_free": True},
    "chunked_loss": {"mode": "off", "chunked_loss": True},
    "auto": {"mode": "auto"},
    "selective": {"mode": "auto", "activation_checkpointing": "selective"},
    "full": {"mode": "auto", "activation_checkpointing": "full"},
    "padding_free_masked": {"mode": "off", "padding_free": True, "varlen_attention": False},
    "auto_masked": {"mode": "auto", "varlen_attention": False},
    "fused_lora": {"mode": "off", "fused_lora": True},
    "auto_fused_lora": {"mode": "auto", "fused_lora": True},
}
DEFAULT_MODES = ("off", "padding_free", "chunked_loss", "auto")
# Peak memory of the training steps alone: the kernel's high-water mark (VmHWM) is reset when the
# loop starts, after the model was loaded (reading the GGUF peaks higher than a training step).
ONE_RUN = """
import json, sys
from tuneforge.config import config_from_dict
from tuneforge.track.console import Reporter
from tuneforge.train.loop import train

class StepsOnly(Reporter):
    def start(self, total, step):
        open("/proc/self/clear_refs", "w").write("5")
        super().start(total, step)

train(config_from_dict(json.loads(sys.argv[1])), reporter=StepsOnly(quiet=True))
print(next(ln.split()[1] for ln in open("/proc/self/status") if ln.startswith("VmHWM:")))  # KiB
"""
WORDS = ("the model reads every token of the answer and learns the format of the data while the loss "
         "falls step by step until the held out set agrees").split()


def variable_length_data(path: Path, n: int = 256, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            words = min(400, max(4, int(rng.lognormvariate(4.5, 0.8))))  # median e^4.5 = 90 words
            answer = " ".join(rng.choice(WORDS) for _ in range(words))
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Write note {i}."},
                                             {"role": "assistant", "content": answer}]}) + "\n")
    return path


def config(data: Path, out: Path, steps: int, mode: str, micro_batch: int) -> dict:
    return {
        "base_model": "smollm2-135m-instruct", "adapter": "lora", "device": "cpu", "precision": "fp32",
        "datasets": [{"path": str(data)}], "max_seq_len": 512, "micro_batch_size": micro_batch, "max_steps": steps,
        "learning_rate": 1e-3, "warmup_steps": 2, "output_dir": str(out), "evaluation": {"before_after": False},
        "diagnose": {"enabled": False}, "performance": MODES[mode],
    }


def run(data: Path, out: Path, steps: int, mode: str, micro_batch: int) -> dict:
    done = subprocess.run([sys.executable, "-c", ONE_RUN, json.dumps(config(data, out, steps, mode, micro_batch))],
                          capture_output=True, text=True, check=True)
    peak_kib = int(done.stdout.strip().splitlines()[-1])
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    timed = records[2:]  # the first steps pay for warm-up
    step_s = statistics.median(m["step_s"] for m in timed)
    tokens = statistics.median(m["tokens"] for m in timed)
    return {"step_s": step_s, "tokens_per_s": tokens / step_s, "peak_rss_gib": peak_kib / 1024**2,
            "losses": [m["loss"] for m in records]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=list(DEFAULT_MODES))
    p.add_argument("--data", nargs="+", choices=["quickstart", "variable-length"],
                   default=["quickstart", "variable-length"])
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sets = {"quickstart": EXAMPLES / "data" / "quickstart_train.jsonl",
                "variable-length": variable_length_data(tmp / "variable.jsonl")}
        sets = {name: sets[name] for name in args.data}
        print(f"| data | mode | real tokens/s | median step s | peak RSS GiB | loss at step {args.steps} |")
        print("|---|---|---|---|---|---|")
        for name, data in sets.items():
            best: dict[str, dict] = {}
            for r in range(args.repeats):
                for mode in args.modes:
                    result = run(data, tmp / f"{name}-{mode}-{r}", args.steps, mode, args.micro_batch)
                    if mode not in best or result["step_s"] < best[mode]["step_s"]:
                        best[mode] = result
            for mode, b in best.items():
                print(f"| {name} | {mode} | {b['tokens_per_s']:.0f} | {b['step_s']:.3f} | {b['peak_rss_gib']:.2f} | "
                      f"{b['losses'][-1]:.4f} |")


if __name__ == "__main__":
    main()
