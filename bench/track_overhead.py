"""What tracking and live diagnosis cost per step: the built-in model, LoRA, on CPU.

    python bench/track_overhead.py --steps 16

Trains the built-in SmolLM2-135M-Instruct on the quickstart data twice, each in a fresh process:
"without" (metrics.jsonl only, diagnosis off) and "with" (jsonl, TensorBoard, MLflow's SQLite store,
W&B offline, and every diagnosis check). Prints the median step time of each (steps after the
first two), and for the "with" run the time spent inside the trackers and the diagnosis as a share
of the training time: run.json's overhead_s, measured by the run itself. The A/B step times move
by more than the overhead on a shared machine; the in-run share is the precise number.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ONE_RUN = """
import json, sys
from tuneforge.config import config_from_dict
from tuneforge.track.console import Reporter
from tuneforge.train.loop import train
cfg = config_from_dict(json.loads(sys.argv[1]))
manifest = train(cfg, reporter=Reporter(quiet=True))
print(json.dumps(manifest["overhead_s"]))
"""


def config(out: Path, steps: int, tracked: bool) -> dict:
    return {
        "base_model": "smollm2-135m-instruct", "adapter": "lora", "device": "cpu", "precision": "fp32",
        "datasets": [{"path": str(EXAMPLES / "data" / "quickstart_train.jsonl")}],
        "max_seq_len": 256, "micro_batch_size": 8, "max_steps": steps, "learning_rate": 1e-3, "warmup_steps": 2,
        "output_dir": str(out), "evaluation": {"before_after": False},
        "track": {"to": ["jsonl", "tensorboard", "mlflow", "wandb"], "wandb_mode": "offline"} if tracked else ["jsonl"],
        "diagnose": {"enabled": tracked},
    }


def run(out: Path, steps: int, tracked: bool) -> dict:
    env_cfg = json.dumps(config(out, steps, tracked))
    done = subprocess.run([sys.executable, "-c", ONE_RUN, env_cfg], capture_output=True, text=True, check=True)
    overhead = json.loads(done.stdout.strip().splitlines()[-1])
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    step_s = [m["step_s"] for m in records]
    return {"median_step_s": statistics.median(step_s[2:]), "train_s": sum(step_s), **overhead}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=16)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        without = run(Path(tmp) / "without", args.steps, tracked=False)
        with_ = run(Path(tmp) / "with", args.steps, tracked=True)
    share = (with_["tracking"] + with_["diagnosis"]) / with_["train_s"]
    print(f"without: median step {without['median_step_s']:.3f} s; tracking {without['tracking']:.3f} s and "
          f"diagnosis {without['diagnosis']:.3f} s in {without['train_s']:.1f} s of training")
    print(f"with:    median step {with_['median_step_s']:.3f} s; tracking {with_['tracking']:.3f} s and "
          f"diagnosis {with_['diagnosis']:.3f} s in {with_['train_s']:.1f} s of training")
    print(f"tracking + diagnosis: {100 * share:.2f}% of the training time (in-run measurement); "
          f"median step {100 * (with_['median_step_s'] / without['median_step_s'] - 1):+.1f}% (A/B, noisy)")


if __name__ == "__main__":
    main()
