"""tuneforge's from-scratch example against nanoGPT's CPU recipe: the same text, the same wall-time budget.

    git clone -q /work/.mirror/karpathy+nanoGPT/repo /work/nanogpt        # nanoGPT's own repository
    python bench/vs_nanogpt_cpu.py --nanogpt /work/nanogpt --rounds 2 --logs /tmp/vs-nanogpt-logs   # both at 2 threads
    python bench/vs_nanogpt_cpu.py --nanogpt /work/nanogpt --budget 30 --max-steps 20 --rounds 1   # a quick try

tuneforge runs stage 1 of examples/pretrain.yaml (its from-scratch pre-training stage: the file's keys without
`stages:`) as `tuneforge train` in a fresh process. nanoGPT runs the CPU recipe of its README
(config/train_shakespeare_char.py, 4 layers of 128, block 64, batch 12, dropout 0) with its own train.py,
from its checkout, in a fresh process. Both get `--threads` OpenMP threads.

The same text: the bench first builds tuneforge's tokenizer and token shards (cached, so the timed run reuses
them, as nanoGPT's timed run reuses its prepared .bin files), reads back from the shards the documents tuneforge
trains on and the ones it holds out (5% of the stories, drawn by the seed), and writes them as nanoGPT's
character-level dataset in a scratch folder the way its data/shakespeare_char/prepare.py does (sorted
characters of the text as the vocabulary, uint16 ids, meta.pkl with vocab_size/itos/stoi), except that the
split is tuneforge's instead of the last 10%: train.bin holds exactly tuneforge's training documents and
val.bin exactly its held-out ones, each joined by a blank line as in the corpus file.

The budget: nanoGPT gets the wall time of tuneforge's run in this invocation (or `--budget`). A short
calibration run of nanoGPT measures its start-up, evaluation and iteration times just before each run; from
them the bench picks max_iters (= lr_decay_iters) so that the run ends within the budget, and an eval_interval
near the recipe's 250 that divides it, so that nanoGPT's last evaluation is at its last iteration.

Measured, per tool: wall time of the whole process; tokens/s of training (each tool's own tokens: predicted
tokens per step / median step time, evaluation steps left out) and bytes of text/s (tokens/s x bytes per token
of the training text: the fair speed comparison, the tokenizers differ); parameters; validation bits per byte
before and after; the unigram baseline (tuneforge's over its tokens, from its run; nanoGPT's over characters,
add-one smoothed on the training text, computed here). nanoGPT's validation loss (nats per character) becomes
bits per byte as loss / ln 2 x characters / bytes of the held-out text.

How the scoring differs (the held-out documents are the same): tuneforge scores every held-out token once, in
blocks of 128 tokens (about 500 characters) with attention kept inside each document; nanoGPT's estimate is
the mean loss of 20 random batches of 12 windows of 64 characters (each character seen with 0 to 63 characters
of context, windows crossing documents), printed with 4 decimals. The rounds alternate the order (tuneforge
first in odd rounds), as the machine is shared; each row gives the load average before the run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from tuneforge.config import load_config
from tuneforge.data.dataset import prepare_raw
from tuneforge.data.shards import iter_documents
from tuneforge.models.init import model_folder, random_model, run_tokenizer

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "pretrain.yaml"
RECIPE = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=1",
          "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128", "--dropout=0.0"]
BLOCK, BATCH, N_LAYER, N_EMBD = 64, 12, 4, 128  # the recipe's sizes, for its parameter count and tokens per step
RECIPE_EVAL_INTERVAL, RECIPE_WARMUP = 250, 100  # from config/train_shakespeare_char.py
CALIBRATION_ITERS = 30
BUDGET_SHARE = 0.97  # planned to end a little early: a shared machine's iterations vary
SEPARATOR = "\n\n"  # between documents in nanoGPT's text, as in the corpus file

EVAL_LINE = re.compile(r"^step (\d+): train loss ([\d.]+), val loss ([\d.]+)", re.M)
ITER_LINE = re.compile(r"^iter (\d+): loss ([\d.]+), time ([\d.]+)ms", re.M)
PARAMS_LINE = re.compile(r"^number of parameters: ([\d.]+)M", re.M)


# ---- pure helpers (tests/test_vs_nanogpt.py) ----

def bits_per_byte(nats_per_char: float, chars: int, n_bytes: int) -> float:
    """A per-character loss in nats as bits per UTF-8 byte of the same text (1 char = 1 byte for ASCII)."""
    return nats_per_char / math.log(2) * chars / n_bytes


def parse_nanogpt_log(text: str) -> dict:
    """nanoGPT's train.py output: evaluations [(step, train loss, val loss)], iterations [(iter, loss, ms)],
    and the parameter count it prints (millions, without position embeddings)."""
    params = PARAMS_LINE.search(text)
    return {"evals": [(int(s), float(t), float(v)) for s, t, v in EVAL_LINE.findall(text)],
            "iters": [(int(i), float(loss), float(ms)) for i, loss, ms in ITER_LINE.findall(text)],
            "params_m": float(params.group(1)) if params else None}


def step_seconds(iters: list[tuple[int, float, float]], eval_interval: int) -> list[float]:
    """Seconds of each training iteration: one at an eval_interval multiple also timed its evaluation (and
    a checkpoint), so those are left out (unless there are no others)."""
    plain = [ms / 1000 for i, _, ms in iters if i % eval_interval]
    return plain or [ms / 1000 for _, _, ms in iters]


def nanogpt_parameters(vocab: int, n_layer: int = N_LAYER, n_embd: int = N_EMBD, block: int = BLOCK) -> int:
    """All of nanoGPT's parameters at bias=False (its default): per layer two LayerNorm weights, qkv, output,
    and a 4x MLP (12 n^2 + 2 n); a tied token embedding, position embeddings and the final LayerNorm."""
    return n_layer * (12 * n_embd * n_embd + 2 * n_embd) + vocab * n_embd + block * n_embd + n_embd


def iteration_plan(budget_s: float, fixed_s: float, eval_s: float, iter_s: float) -> tuple[int, int]:
    """(max_iters, eval_interval) for a run of about `budget_s`: start-up, then an evaluation at 0 and every
    eval_interval (near the recipe's 250, dividing max_iters so the last is at the end), max_iters + 1 steps."""
    room = BUDGET_SHARE * budget_s - fixed_s - eval_s - iter_s
    iters = max(1, int(room / (iter_s + eval_s / RECIPE_EVAL_INTERVAL)))
    evals = max(1, round(iters / RECIPE_EVAL_INTERVAL))
    interval = max(1, iters // evals)
    iters = interval * evals
    if iters == RECIPE_WARMUP:  # its cosine schedule divides by lr_decay_iters - warmup_iters
        iters, interval = iters - evals, interval - 1
    return iters, interval


def char_unigram_bpb(train: str, held: str) -> float:
    """Bits per byte of the held-out text under character frequencies of the training text, add-one smoothed
    over the characters of both: the baseline a character model must beat with context."""
    chars = sorted(set(train) | set(held))
    counts = {c: 1 for c in chars}
    for c in train:
        counts[c] += 1
    total = sum(counts.values())
    bits = -sum(held.count(c) * math.log2(counts[c] / total) for c in set(held))
    return bits / len(held.encode("utf-8"))


# ---- the shared text ----

def stage1_config(folder: Path, max_steps: int | None) -> Path:
    """examples/pretrain.yaml without its later stages (stage 1 is the top-level keys), paths made absolute,
    written as `folder`/stage1.yaml with output_dir `folder`/run."""
    raw = yaml.safe_load(EXAMPLE.read_text())
    raw.pop("stages", None)
    raw["datasets"] = [{**d, "path": str((EXAMPLE.parent / d["path"]).resolve())} for d in raw["datasets"]]
    raw["output_dir"] = str(folder / "run")
    if max_steps is not None:
        raw["max_steps"] = max_steps
        raw["eval_every"] = max(1, min(raw["eval_every"], max_steps))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "stage1.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def shared_text(config: Path, data_dir: Path) -> dict:
    """Build tuneforge's tokenizer and shards (cached for its run), read its train / held-out documents back
    from them, and write them as nanoGPT's char-level train.bin / val.bin / meta.pkl in `data_dir`."""
    cfg = load_config(config)
    tokenizer = run_tokenizer(cfg)
    data = prepare_raw(cfg, tokenizer)
    eos = tokenizer.eos_token_id

    def documents(blocks) -> list[str]:  # each document's tokens end with EOS
        ids = blocks.tokens_between(0, blocks.tokens)
        docs = np.split(ids, np.flatnonzero(ids == eos) + 1)
        return [tokenizer.decode(doc[:-1].tolist()) for doc in docs if len(doc)]

    train_docs, held_docs = documents(data.train), documents(data.validation)
    corpus = [d for ds in cfg.datasets for d in iter_documents(ds.path, lambda bad: None)]
    if sorted(train_docs + held_docs) != sorted(corpus):
        raise SystemExit("the documents read back from tuneforge's shards are not the corpus's documents")
    train, held = SEPARATOR.join(train_docs), SEPARATOR.join(held_docs)
    chars = sorted(set(train + held))  # as prepare.py: the sorted characters of the whole text
    stoi = {c: i for i, c in enumerate(chars)}
    data_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (("train", train), ("val", held)):
        np.array([stoi[c] for c in text], dtype=np.uint16).tofile(data_dir / f"{name}.bin")
    with open(data_dir / "meta.pkl", "wb") as f:  # nanoGPT's train.py reads vocab_size from it
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, f)
    params = sum(p.numel() for p in random_model(model_folder(cfg)[0]).parameters())
    return {"train_docs": len(train_docs), "held_docs": len(held_docs), "vocab_chars": len(chars),
            "held_chars": len(held), "held_bytes": len(held.encode("utf-8")),
            "train_bytes_per_char": len(train.encode("utf-8")) / len(train),
            "tf_bytes_per_token": data.train.text_bytes / data.train.tokens,
            "tf_params": params,
            "char_unigram_bpb": char_unigram_bpb(train, held)}


# ---- the runs ----

def load_average() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg()[:2])


def run_tuneforge(config: Path, env: dict, text: dict) -> dict:
    out = config.parent / "run"
    load = load_average()
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "tuneforge", "train", str(config)], env=env, capture_output=True,
                          text=True)
    wall = time.perf_counter() - t0
    if done.returncode:
        raise SystemExit(f"tuneforge failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = steps[2:] or steps  # the first two are warm-up
    tokens_per_s = statistics.median(s["trained_tokens"] for s in timed) / statistics.median(s["step_s"] for s in timed)
    before = json.loads((out / "eval_before.json").read_text())
    after = json.loads((out / "eval_after.json").read_text())
    return {"wall": wall, "load": load, "steps": steps[-1]["step"], "tokens_per_s": tokens_per_s,
            "bytes_per_s": tokens_per_s * text["tf_bytes_per_token"], "params": text["tf_params"],
            "text_mb": sum(s["trained_tokens"] for s in steps) * text["tf_bytes_per_token"] / 1e6,
            "bpb_before": before["val_bpb"], "bpb_after": after["val_bpb"], "unigram": after["unigram_bpb"],
            "log": done.stdout}


def nanogpt_process(checkout: Path, data_dir: Path, out: Path, max_iters: int, interval: int, env: dict,
                    extra: list[str]) -> tuple[float, str]:
    """(wall seconds, output) of nanoGPT's own train.py with the recipe, from its checkout."""
    cmd = [sys.executable, "-u", "train.py", *RECIPE, f"--max_iters={max_iters}", f"--lr_decay_iters={max_iters}",
           f"--eval_interval={interval}", f"--dataset={data_dir}", f"--out_dir={out}", *extra]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode:
        raise SystemExit(f"nanoGPT failed ({' '.join(cmd)}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return wall, done.stdout


def run_nanogpt(checkout: Path, data_dir: Path, tmp: Path, budget: float, env: dict, text: dict,
                extra: list[str]) -> dict:
    wall, out = nanogpt_process(checkout, data_dir, tmp / "calibration", CALIBRATION_ITERS, CALIBRATION_ITERS,
                                env, extra)
    log = parse_nanogpt_log(out)
    iter_s = statistics.mean(step_seconds(log["iters"], CALIBRATION_ITERS))  # the mean: wall time is a sum
    eval_s = max(0.0, log["iters"][-1][2] / 1000 - iter_s)  # the last iteration also timed an evaluation
    fixed_s = wall - sum(ms for _, _, ms in log["iters"]) / 1000
    max_iters, interval = iteration_plan(budget, fixed_s, eval_s, iter_s)
    load = load_average()
    wall, out = nanogpt_process(checkout, data_dir, tmp / "nanogpt", max_iters, interval, env, extra)
    log = parse_nanogpt_log(out)
    (first, *_), (last_step, _, last_val) = log["evals"], log["evals"][-1]
    if last_step != max_iters:
        raise SystemExit(f"nanoGPT's last evaluation is at step {last_step}, not at max_iters {max_iters}")
    tokens_per_s = BLOCK * BATCH / statistics.median(step_seconds(log["iters"], interval))  # a character a position
    counted = nanogpt_parameters(text["vocab_chars"])
    if log["params_m"] is not None and abs((counted - BLOCK * N_EMBD) / 1e6 - log["params_m"]) > 0.006:
        print(f"note: nanoGPT printed {log['params_m']}M parameters, the formula gives {counted}", file=sys.stderr)
    to_bpb = lambda nats: bits_per_byte(nats, text["held_chars"], text["held_bytes"])  # noqa: E731
    return {"wall": wall, "load": load, "steps": max_iters + 1, "tokens_per_s": tokens_per_s,
            "bytes_per_s": tokens_per_s * text["train_bytes_per_char"], "params": counted,
            "text_mb": (max_iters + 1) * BLOCK * BATCH * text["train_bytes_per_char"] / 1e6,
            "bpb_before": to_bpb(first[2]), "bpb_after": to_bpb(last_val), "unigram": text["char_unigram_bpb"],
            "log": out,
            "plan": f"calibrated {iter_s * 1000:.0f} ms/iter, {eval_s:.1f} s/eval, {fixed_s:.1f} s start-up: "
                    f"max_iters {max_iters}, eval_interval {interval}, budget {budget:.0f} s"}


def nanogpt_commit(checkout: Path) -> str:
    done = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or "(not a git checkout)"


def row(r: int, name: str, m: dict) -> str:
    return (f"| {r} | {name} | {m['wall']:.1f} | {m['steps']} | {m['text_mb']:.2f} | {m['tokens_per_s']:,.0f} | "
            f"{m['bytes_per_s']:,.0f} | "
            f"{m['params']:,} | {m['bpb_before']:.3f} | **{m['bpb_after']:.3f}** | {m['unigram']:.3f} | {m['load']} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nanogpt", type=Path, required=True, help="a checkout of nanoGPT (its train.py is run)")
    p.add_argument("--budget", type=float, help="nanoGPT's wall-time budget in seconds (default: tuneforge's "
                   "wall time measured in this invocation, the latest one before each nanoGPT run)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of both runs")
    p.add_argument("--max-steps", type=int, help="shorten tuneforge's run (the example's is 150), for a quick try")
    p.add_argument("--nanogpt-args", nargs="*", default=[], help="more --key=value for nanoGPT's train.py")
    p.add_argument("--logs", type=Path, help="a folder to keep each run's output in")
    args = p.parse_args()
    if not (args.nanogpt / "train.py").is_file():
        raise SystemExit(f"{args.nanogpt}: not a nanoGPT checkout (no train.py)")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    with tempfile.TemporaryDirectory(prefix="vs-nanogpt-") as tmp:
        tmp = Path(tmp)
        text = shared_text(stage1_config(tmp / "tuneforge-0", args.max_steps), tmp / "nanogpt-data")
        print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} CPUs, OMP_NUM_THREADS="
              f"{args.threads}; nanoGPT {nanogpt_commit(args.nanogpt)}")
        print(f"text: {text['train_docs']} training and {text['held_docs']} held-out documents (tuneforge's "
              f"split); held-out {text['held_chars']:,} characters, {text['held_bytes']:,} bytes; tuneforge "
              f"{text['tf_bytes_per_token']:.2f} bytes/token, nanoGPT {text['vocab_chars']} characters")
        header = ("| round | tool | wall s | steps | text trained (MB) | tokens/s | bytes/s | parameters "
                  "| val bpb before | val bpb after | unigram bpb | load avg before |\n" + "|---" * 12 + "|")
        budget, ratios, notes = args.budget, [], []
        print(header, flush=True)
        for r in range(1, args.rounds + 1):
            ours = theirs = None
            for tool in (("tuneforge", "nanogpt") if r % 2 else ("nanogpt", "tuneforge")):
                if tool == "tuneforge":
                    ours = run_tuneforge(stage1_config(tmp / f"tuneforge-{r}", args.max_steps), env, text)
                    budget = args.budget or ours["wall"]
                    print(row(r, "tuneforge", ours), flush=True)
                else:
                    if budget is None:  # round 2 and later always have one; round 1 runs tuneforge first
                        raise SystemExit("no budget: give --budget or start with tuneforge")
                    theirs = run_nanogpt(args.nanogpt, tmp / "nanogpt-data", tmp / f"nanogpt-{r}", budget, env, text,
                                         args.nanogpt_args)
                    print(row(r, "nanoGPT", theirs), flush=True)
                    notes.append(f"round {r} nanoGPT: {theirs['plan']}, ran {theirs['wall']:.0f} s")
                    if theirs["wall"] > 1.1 * budget:
                        notes.append(f"round {r}: nanoGPT ran {theirs['wall'] / budget - 1:.0%} past its budget: "
                                     "the machine slowed down after the calibration; rerun on a quiet machine")
                if args.logs:
                    args.logs.mkdir(parents=True, exist_ok=True)
                    (args.logs / f"round{r}-{tool}.log").write_text((ours if tool == "tuneforge" else theirs)["log"])
            ratios.append((r, *(ours[k] / theirs[k] for k in ("bytes_per_s", "tokens_per_s", "bpb_after", "wall"))))
        print("\n| round | bytes/s tuneforge / nanoGPT | tokens/s | final val bpb | wall |\n|---|---|---|---|---|")
        for r, b, t, q, w in ratios:
            print(f"| {r} | {b:.2f}x | {t:.2f}x | {q:.2f}x | {w:.2f}x |")
        print("\n" + "\n".join(notes))


if __name__ == "__main__":
    main()
