"""`tuneforge merge RUN --report`: how closely each merge target reproduces the model that was trained.

The reference is the adapter on the base exactly as training loaded it (quantized for QLoRA). For
each target the report gives the mean KL divergence of the next-token distribution at the end of
held-out prompts, and the share of prompts whose greedy continuation is identical (R-MRG-1/2).
"""

from __future__ import annotations

import torch

from tuneforge.data.template import generation_prompt
from tuneforge.errors import TuneforgeError
from tuneforge.eval.evaluate import greedy_generate, reference_pair
from tuneforge.export.merge import MERGE_TARGETS, default_target, merged_model
from tuneforge.models.load import load_tokenizer
from tuneforge.models.run import Run, load_tuned

# A merge "matches" when the mean KL is at most this and at least this share of greedy outputs agree.
KL_EPSILON = 1e-3
MIN_IDENTICAL = 0.95
CPU = torch.device("cpu")

# Used when the run's validation data is not there: varied everyday requests.
BUNDLED_PROMPTS = (
    "What is the capital of France?", "Write a haiku about autumn.", "Explain recursion to a child.",
    "List three prime numbers.", "Translate 'good morning' into Spanish.", "What does HTTP stand for?",
    "Give me a synonym for 'happy'.", "How many legs does a spider have?", "Summarise the plot of Hamlet.",
    "Write a Python function that adds two numbers.", "What is 17 times 3?", "Name a famous painter.",
    "Why is the sky blue?", "Suggest a name for a cat.", "What is photosynthesis?", "Tell me a short joke.",
    "Convert 100 degrees Fahrenheit to Celsius.", "What year did the Berlin Wall fall?",
    "Describe the colour green without naming it.", "What is a noun?", "Write one sentence about the sea.",
    "How do I boil an egg?", "What is the largest planet?", "Spell 'necessary' backwards.",
    "Give an example of a metaphor.", "What is the square root of 81?", "Who wrote 'Pride and Prejudice'?",
    "Explain what a database index is.", "Recommend a book for a long flight.", "What is the boiling point of water?",
    "Write a polite email opening line.", "What are the primary colours?",
)


def report_prompts(run: Run, tokenizer, limit: int = 32) -> tuple[list[list[int]], str]:
    """Up to `limit` prompt token lists: the run's validation prompts, or the bundled list when it has none."""
    from tuneforge.data.dataset import prepare_data

    end_of_turn = run.manifest.get("end_of_turn")
    try:
        examples = prepare_data(run.config, tokenizer).validation
    except (TuneforgeError, OSError):
        examples = []
    pairs = [reference_pair(tokenizer, ex, end_of_turn) for ex in examples[:limit]]
    prompts = [p for p, _ in filter(None, pairs)]
    if prompts:
        return prompts, "validation set"
    return [generation_prompt(tokenizer, [{"role": "user", "content": text}], end_of_turn)
            for text in BUNDLED_PROMPTS[:limit]], "bundled prompts"


@torch.no_grad()
def next_token_logprobs(model, prompts: list[list[int]]) -> list[torch.Tensor]:
    """log p(next token | prompt) at the end of each prompt, in fp64 so that a KL near 0 is not rounding noise."""
    model.eval()
    return [model(input_ids=torch.tensor([p])).logits[0, -1].double().log_softmax(-1).cpu() for p in prompts]


def compare(ref_lp: list[torch.Tensor], ref_gen: list, lp: list[torch.Tensor], gen: list) -> dict:
    """KL(reference || merged) per prompt and greedy agreement."""
    kls = [max(0.0, float((r.exp() * (r - m)).sum())) for r, m in zip(ref_lp, lp)]
    identical = sum(a[0] == b[0] for a, b in zip(ref_gen, gen)) / len(gen)
    mean_kl = sum(kls) / len(kls)
    return {"mean_kl": mean_kl, "max_kl": max(kls), "greedy_identical": identical,
            "matches": mean_kl <= KL_EPSILON and identical >= MIN_IDENTICAL}


def merge_report(run: Run, dtype: torch.dtype = torch.float32, limit: int = 32, max_new_tokens: int = 32) -> dict:
    """For each merge target, how the merged model (cast to `dtype`) compares with the adapter on the trained base."""
    tokenizer = load_tokenizer(run.final, "auto", run.config.trust_remote_code)
    prompts, source = report_prompts(run, tokenizer, limit)
    stops, pad = run.stop_ids, tokenizer.pad_token_id

    def outputs(model):
        return next_token_logprobs(model, prompts), greedy_generate(model, prompts, stops, pad, max_new_tokens, CPU)

    reference, _ = load_tuned(run, CPU)
    ref_lp, ref_gen = outputs(reference)
    del reference  # one model in memory at a time
    targets = MERGE_TARGETS if run.config.quantization is not None else ("original",)
    result = {"prompts": len(prompts), "source": source, "dtype": str(dtype).removeprefix("torch."),
              "default": default_target(run), "targets": {}}
    for target in targets:
        merged = merged_model(run, target).to(dtype)
        result["targets"][target] = compare(ref_lp, ref_gen, *outputs(merged))
        del merged
    return result


def describe_report(report: dict, base: str) -> str:
    """The report as terminal lines."""
    lines = [f"Merged model vs the adapter on the {base} it was trained on, over {report['prompts']} prompts "
             f"({report['source']}), merged weights in {report['dtype']}:"]
    for target, r in report["targets"].items():
        tag = " (default)" if target == report["default"] else ""
        verdict = "matches" if r["matches"] else f"does not match (needs mean KL <= {KL_EPSILON:g}, >= {MIN_IDENTICAL:.0%} identical)"
        lines.append(f"  {target + tag:<24} mean KL {r['mean_kl']:.3g} (max {r['max_kl']:.3g}), "
                     f"greedy outputs identical {r['greedy_identical']:.0%}: {verdict}")
    return "\n".join(lines)
