"""Wall time of `tuneforge plan` for Llama-3.1-8B LoRA, each run a fresh process (CPU).

    python bench/plan_startup.py --records 100000 --runs 3

Three cases: a 100k-record chat file with the tuneforge cache as a used machine has it (warm), the
same with an empty cache (a fresh machine: the stand-in tokenizer is built from the built-in GGUF),
and no data at all (`--seq-len 1024 --examples N`).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_prepare import generate  # noqa: E402

CONFIG = "base_model: meta-llama/Llama-3.1-8B-Instruct\nmax_seq_len: 2048\nmicro_batch_size: 4\n"


def timed(args: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "tuneforge", "plan", *args], env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--records", type=int, default=100_000)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate(root / "train.jsonl", args.records)
        (root / "data.yaml").write_text(CONFIG + "datasets:\n  - path: train.jsonl\n")
        (root / "no_data.yaml").write_text(CONFIG)
        env = dict(os.environ)
        timed([str(root / "data.yaml")], env)  # fills the user's cache, as any earlier plan would have
        cases = {"100k records, warm cache": ([str(root / "data.yaml")], False),
                 "100k records, empty cache": ([str(root / "data.yaml")], True),
                 "no data, --seq-len 1024 --examples N": ([str(root / "no_data.yaml"), "--seq-len", "1024",
                                                          "--examples", str(args.records)], False)}
        print(f"| case | {' | '.join(f'run {i + 1} (s)' for i in range(args.runs))} |")
        print("|---|" + "---|" * args.runs)
        for name, (plan_args, fresh) in cases.items():
            times = []
            for i in range(args.runs):
                run_env = {**env, "TUNEFORGE_CACHE": str(root / f"cache-{name[:3]}-{i}")} if fresh else env
                times.append(timed(plan_args, run_env))
            print(f"| {name} | {' | '.join(f'{t:.2f}' for t in times)} |")


if __name__ == "__main__":
    main()
