"""Time and peak memory of tokenizing raw text into token shards (method: pretrain), at several corpus sizes.

    python bench/tokenize_shards.py --mb 8 32

For each size: writes a synthetic .txt corpus (seeded; paragraphs of about 1 KB), then tokenizes it
into shards with the built-in tokenizer in a fresh process, and prints wall time, MB/s, peak RSS and
the peak before tokenizing began (Python, transformers and the tokenizer; run once beforehand so the
built-in model's one-time conversion into the cache is not counted).
Peak RSS should stay flat as the corpus grows: files are streamed and shards written as they fill.
"""

from __future__ import annotations

import argparse
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there been one all we their has would when if so no more out up said what its about "
         "than into them can only other time new some could these two may first then do any like my now").split()


def generate(path: Path, mb: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    target = mb << 20
    with open(path, "w") as f:
        while f.tell() < target:
            f.write(" ".join(rng.choice(WORDS) for _ in range(200)) + ".\n\n")


def tokenize(corpus: str, out: str) -> None:
    """In this process: tokenize `corpus` into shards under `out`; print seconds and peak RSS."""
    from tuneforge.data.shards import build_shards
    from tuneforge.models.load import load_tokenizer
    from tuneforge.models.resolve import resolve_base_model

    tokenizer = load_tokenizer(resolve_base_model("smollm2-135m-instruct")[0])
    settings = {"split": None, "seed": 0, "field": "text", "shard_tokens": 1 << 24}
    tokenizer(["warm up"])
    base_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    manifest = build_shards(Path(out), [(corpus, False)], tokenizer, {}, settings, "error")
    seconds = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{seconds:.2f} {peak_mb:.0f} {base_mb:.0f} {manifest['train']['tokens']} {len(manifest['train']['shards'])}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        tokenize(*args.child)
        return
    print("| corpus | tokens | shards | wall time | MB/s | peak RSS | of which before tokenizing |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for mb in args.mb:
            corpus = Path(tmp) / f"corpus-{mb}.txt"
            generate(corpus, mb)
            out = subprocess.run([sys.executable, __file__, "--child", str(corpus), str(Path(tmp) / f"shards-{mb}")],
                                 capture_output=True, text=True, check=True).stdout.split()
            seconds, peak, base, tokens, shards = float(out[0]), out[1], out[2], out[3], out[4]
            print(f"| {mb} MB | {tokens} | {shards} | {seconds:.1f} s | {mb / seconds:.2f} | {peak} MB | {base} MB |")


if __name__ == "__main__":
    main()
