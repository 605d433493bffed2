"""lm-eval's scores of the quickstart's base and tuned model through `tuneforge serve` (the `lm_eval:` suite
entry of `tuneforge train`), beside the same task run by lm-eval directly with `--model hf` (CPU).

    python bench/lm_eval_quickstart_cpu.py [--steps 10] [--limit 30]

The task is a local multiple-choice file made from the quickstart's 60 held-out people: the right JSON answer
against the same answer with the age or the city changed (nothing downloaded). The quickstart is trained for
`--steps` steps with the suite's lm_eval entry, which scores base and tuned through the server; lm-eval's `hf`
model then scores the base folder and base + final/ adapter (`peft=`). The two must agree.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import lm_eval
from lm_eval.tasks import TaskManager

from tuneforge.config import EvaluationSpec, LmEvalSpec, load_config
from tuneforge.serve.harness import harness_before_after, serving
from tuneforge.serve.server import make_server
from tuneforge.track.console import Reporter
from tuneforge.train.loop import train

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TASK = """task: quickstart_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Extract the person's name, age and city as JSON.\\nText: {{{{text}}}}\\nJSON:"
doc_to_target: "{{{{answer}}}}"
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
"""


def write_task(folder: Path, test_file: Path) -> Path:
    rows = [json.loads(line)["messages"] for line in test_file.read_text().splitlines() if line.strip()]
    docs = []
    for i, messages in enumerate(rows):
        right = json.loads(messages[-1]["content"])
        other_city = json.loads(rows[(i + 1) % len(rows)][-1]["content"])["city"]
        wrong = [{**right, "age": right["age"] + 1 + i % 5}, {**right, "city": other_city}]
        answer = i % 3
        choices = wrong[:answer] + [right] + wrong[answer:]
        docs.append({"text": messages[-2]["content"], "choices": [" " + json.dumps(c) for c in choices],
                     "answer": answer})
    data = folder / "quickstart_mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "quickstart_mc.yaml").write_text(TASK.format(data=data))
    return folder


def scored(tasks: Path, model: str, args: dict, limit: int) -> tuple[float, list[float]]:
    """(acc, every choice's log-likelihood in document order) of one lm-eval run."""
    out = lm_eval.simple_evaluate(model=model, model_args=args, tasks=["quickstart_mc"], batch_size=1, limit=limit,
                                  log_samples=True, task_manager=TaskManager(include_path=str(tasks),
                                                                             include_defaults=False))
    samples = sorted(out["samples"]["quickstart_mc"], key=lambda s: s["doc_id"])
    return out["results"]["quickstart_mc"]["acc,none"], [ll for s in samples for (ll, _), in s["resps"]]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--limit", type=int, default=30)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lm-eval-quickstart-"))
    tasks = write_task(tmp, EXAMPLES / "data" / "quickstart_test.jsonl")
    cfg = load_config(EXAMPLES / "quickstart.yaml", [f"output_dir={tmp / 'run'}", f"max_steps={args.steps}"])
    cfg.evaluation = EvaluationSpec(max_examples=8, lm_eval=LmEvalSpec(tasks=["quickstart_mc"], limit=args.limit,
                                                                       include_path=str(tasks)))
    t0 = time.perf_counter()
    manifest = train(cfg, reporter=Reporter(), benchmark=harness_before_after)
    suite = manifest["evaluation"]["lm_eval"]
    took = time.perf_counter() - t0
    base, final = Path(manifest["base_model"]["folder"]), tmp / "run" / "final"
    t1 = time.perf_counter()
    hf = {"before": scored(tasks, "hf", {"pretrained": str(base), "device": "cpu", "dtype": "float32"}, args.limit),
          "after": scored(tasks, "hf", {"pretrained": str(base), "peft": str(final), "device": "cpu",
                                        "dtype": "float32"}, args.limit)}
    hf_s = time.perf_counter() - t1
    with serving(make_server(tmp / "run", port=0, device="cpu", quiet=True)) as server:
        served = {when: scored(tasks, "local-completions", {
            "base_url": server.url + "/completions", "model": model, "tokenizer_backend": "huggingface",
            "tokenizer": str(final), "max_retries": 1}, args.limit)
            for when, model in (("before", server.engine.base_id), ("after", server.engine.default_id))}
    print(f"\ntrain with the lm_eval entry ({args.steps} steps, {args.limit} documents): {took:.0f} s; "
          f"lm-eval --model hf on base and tuned: {hf_s:.0f} s")
    print("| model | acc, lm_eval entry of train | acc, local-completions | acc, --model hf | "
          "log-likelihoods | largest difference |")
    print("|---|---|---|---|---|---|")
    for when, name in (("before", "base"), ("after", "tuned")):
        (acc_s, ll_s), (acc_h, ll_h) = served[when], hf[when]
        worst = max(abs(a - b) for a, b in zip(ll_s, ll_h))
        print(f"| {name} | {suite[when]['quickstart_mc']['acc']:.4f} | {acc_s:.4f} | {acc_h:.4f} | {len(ll_s)} | "
              f"{worst:.2e} |")


if __name__ == "__main__":
    main()
