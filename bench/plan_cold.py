"""`tuneforge plan` from a cold process: median wall and user CPU seconds over N fresh processes.

    python bench/plan_cold.py --records 100000 --runs 5 [--src other/checkout/src] [--empty-cache] [--no-data]

Writes a 100k-example chat JSONL and a config for Llama-3.1-8B LoRA (a shape from plan's table, not
on the machine: the built-in tokenizer stands in) into a temp folder, runs `python -m tuneforge plan`
in a new process each time, and prints each run and the medians. --src times another checkout (a
"before"); --empty-cache points TUNEFORGE_CACHE at a new empty folder for every run (a fresh machine);
--no-data plans the config without `datasets:`, sized by `--seq-len 1024 --examples RECORDS` (no file read).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_prepare import generate  # noqa: E402

CONFIG = """base_model: meta-llama/Llama-3.1-8B-Instruct
adapter: lora
lora:
  r: 16
  alpha: 32
  target_modules: all-linear
max_seq_len: 2048
micro_batch_size: 4
"""
DATASETS = "datasets:\n  - path: train.jsonl\n"


def run_once(plan_args: list[str], env: dict) -> tuple[float, float]:
    """(wall, user CPU) seconds of one plan in a fresh process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "tuneforge", "plan", *plan_args], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime - before


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--records", type=int, default=100_000)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--src", default=str(Path(__file__).resolve().parent.parent / "src"),
                   help="the tuneforge source folder to time (default: this checkout's)")
    p.add_argument("--empty-cache", action="store_true", help="a new empty TUNEFORGE_CACHE for every run")
    p.add_argument("--no-data", action="store_true",
                   help="no datasets: plan sized by --seq-len 1024 --examples RECORDS instead of a file")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = root / "plan.yaml"
        if args.no_data:
            config.write_text(CONFIG)
            plan_args = [str(config), "--seq-len", "1024", "--examples", str(args.records)]
        else:
            generate(root / "train.jsonl", args.records)
            config.write_text(CONFIG + DATASETS)
            plan_args = [str(config)]
        env = {**os.environ, "PYTHONPATH": args.src, "OMP_NUM_THREADS": "1"}
        if not args.empty_cache:
            run_once(plan_args, env)  # the cache as any earlier plan or training run on this machine left it
        walls, users = [], []
        for i in range(args.runs):
            run_env = {**env, "TUNEFORGE_CACHE": str(root / f"cache-{i}")} if args.empty_cache else env
            wall, user = run_once(plan_args, run_env)
            walls.append(wall)
            users.append(user)
            print(f"run {i + 1}: {wall:.2f} s wall, {user:.2f} s user")
        print(f"median: {statistics.median(walls):.2f} s wall, {statistics.median(users):.2f} s user "
              f"({args.records:,} {'examples assumed' if args.no_data else 'records'}, "
              f"{'empty' if args.empty_cache else 'warm'} cache, {args.src})")


if __name__ == "__main__":
    main()
