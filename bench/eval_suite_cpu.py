"""What the quickstart's evaluation suite adds to `make demo`, on CPU.

    python bench/eval_suite_cpu.py

The suite runs twice in the demo (base, then tuned) on the greedy answers that the before/after evaluation
generates anyway, so its cost is the metrics on 60 answers plus the forgetting check's forward passes. This
times both with the built-in model on the quickstart's own files (answers: the references, every other one
with its JSON broken) and prints the wall and CPU seconds each takes (the CPU seconds are the steadier number on
a shared machine) and the wall time the demo gains (twice their sum).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from tuneforge.config import load_config
from tuneforge.eval.forgetting import general_perplexity
from tuneforge.eval.suite import score_suite
from tuneforge.models.load import load_model, load_tokenizer
from tuneforge.models.resolve import resolve_base_model

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def main() -> None:
    cfg = load_config(EXAMPLES / "quickstart.yaml")
    rows = [json.loads(line) for line in Path(cfg.validation.path).read_text().splitlines() if line.strip()]
    refs = [r["messages"][-1]["content"] for r in rows]
    samples = [{"prompt": r["messages"][-2]["content"], "reference": ref, "answer": ref if i % 2 else ref[:-3]}
               for i, (r, ref) in enumerate(zip(rows, refs))]
    t0, c0 = time.perf_counter(), time.process_time()
    suite = score_suite(cfg.evaluation.suite, samples)
    metrics_s, metrics_cpu = time.perf_counter() - t0, time.process_time() - c0
    folder, _ = resolve_base_model(cfg.base_model)
    tokenizer = load_tokenizer(folder)
    model = load_model(folder, torch.device("cpu"), dtype=torch.float32)
    spec = cfg.evaluation.forgetting
    t0, c0 = time.perf_counter(), time.process_time()
    ppl = general_perplexity(model, tokenizer, spec.path, spec.max_tokens, cfg.max_seq_len, torch.device("cpu"),
                             torch.float32)
    forgetting_s, forgetting_cpu = time.perf_counter() - t0, time.process_time() - c0
    print(json.dumps({
        "threads": torch.get_num_threads(), "answers": len(samples),
        "suite": {k: {"value": round(v["value"], 4), "ci95": [round(x, 4) for x in v["ci95"]]} for k, v in suite.items()},
        "metrics_s": round(metrics_s, 3), "metrics_cpu_s": round(metrics_cpu, 3), "forgetting_s": round(forgetting_s, 3),
        "forgetting_cpu_s": round(forgetting_cpu, 3), **ppl,
        "added_to_demo_s": round(2 * (metrics_s + forgetting_s), 2),
    }, indent=2))


if __name__ == "__main__":
    main()
