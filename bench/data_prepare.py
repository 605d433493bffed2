"""Time and memory of data preparation on a synthetic chat set (CPU).

    python bench/data_prepare.py --records 100000

Generates N single-turn chats of about 300 tokens (seeded), then, each in a fresh process:
prepare with the cache off (cold), prepare filling the cache, and a cached start.
Prints wall time and peak RSS per phase, and how many lines of progress each phase wrote to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there been one all we their has would when if so no more out up said what its about "
         "than into them can only other time new some could these two may first then do any like my now over such "
         "our man me even most made after also did many before must through back years where much your way well "
         "down should because each just those people how too").split()


def generate(path: Path, n: int, scale: float = 1.0, seed: int = 0) -> None:
    """n chats; scale 1 gives about 300 tokens each, 0.1 about 60."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            user = " ".join(rng.choice(WORDS) for _ in range(max(1, int(scale * rng.randint(40, 120)))))
            answer = " ".join(rng.choice(WORDS) for _ in range(max(1, int(scale * rng.randint(120, 260)))))
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Q{i}: {user}"},
                                             {"role": "assistant", "content": answer}]}) + "\n")


def phase(data: Path, cache_dir: Path, use_cache: bool) -> dict:
    """Run in a child process so that its peak memory is its own."""
    os.environ["TUNEFORGE_CACHE"] = str(cache_dir)
    from tuneforge.config import config_from_dict
    from tuneforge.data.dataset import prepare_data
    from tuneforge.models.load import load_tokenizer
    from tuneforge.models.resolve import resolve_base_model

    t0 = time.perf_counter()
    tokenizer = load_tokenizer(resolve_base_model("smollm2-135m-instruct")[0])
    cfg = config_from_dict({"datasets": [{"path": str(data)}], "max_seq_len": 2048,
                            "prepare": {"cache": use_cache}})
    prepared = prepare_data(cfg, tokenizer)
    seconds = time.perf_counter() - t0
    return {"seconds": round(seconds, 2), "examples": len(prepared.train), "tokens": int(len(prepared.train.ids)),
            "from_cache": prepared.from_cache,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--scale", type=float, default=1.0, help="record length: 1 is about 300 tokens")
    ap.add_argument("--only", choices=["cold", "all"], default="all", help="cold: one uncached run only")
    ap.add_argument("--phase", nargs=3, metavar=("DATA", "CACHE", "USE_CACHE"))
    args = ap.parse_args()
    if args.phase:
        data, cache, use = args.phase
        print(json.dumps(phase(Path(data), Path(cache), use == "1")))
        return
    with tempfile.TemporaryDirectory() as tmp:
        data, cache = Path(tmp) / "chat.jsonl", Path(tmp) / "cache"
        generate(data, args.records, args.scale)
        print(f"{args.records} records, {data.stat().st_size / 1e6:.0f} MB")
        # The built-in model's folder is made once beforehand, so no phase pays for it.
        env = {**os.environ, "TUNEFORGE_CACHE": str(cache)}
        subprocess.run([sys.executable, "-c", "from tuneforge.models.resolve import resolve_base_model as r; "
                        "r('smollm2-135m-instruct')"], check=True, env=env, capture_output=True)
        phases = (("cold, no cache", "0"), ("cold, filling the cache", "1"), ("cached start", "1"))
        for name, use in phases[:1] if args.only == "cold" else phases:
            out = subprocess.run([sys.executable, __file__, "--phase", str(data), str(cache), use],
                                 capture_output=True, text=True, check=True)
            print(f"{name:>24}: {out.stdout.strip()}")
            shown = out.stderr.splitlines()  # a pipe, as the studio's training log: the line form of progress
            if shown:
                print(f"{'':>24}  stderr: {len(shown)} lines, the last: {shown[-1]}")


if __name__ == "__main__":
    main()
