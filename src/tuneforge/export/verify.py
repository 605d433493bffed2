"""Check an export as its users will load it: in a fresh process, with plain transformers only.

The held-out perplexity of the exported model must be within (1 + delta) of the tuned model's
(the run's after-training evaluation), so an export that lost the adapter, the template or
precision is caught before anyone serves it.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tuneforge.errors import TuneforgeError
from tuneforge.methods.facts import method_facts
from tuneforge.models.run import Run

# Allowed perplexity growth per kind of weights.
DELTAS = {"float32": 1e-3, "f32": 1e-3, "float16": 0.01, "f16": 0.01, "bfloat16": 0.02, "bf16": 0.02,
          "q8_0": 0.05, "q4_k_m": 0.25}

_SCRIPT = r"""
import json, sys, torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM
folder, gguf_file, data_path = sys.argv[1], sys.argv[2] or None, sys.argv[3]
kwargs = {"gguf_file": gguf_file} if gguf_file else {}
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()
total, count = 0.0, 0
with torch.no_grad():
    for ex in json.load(open(data_path)):
        ids = torch.tensor([ex["ids"]])
        labels = torch.tensor(ex["labels"][1:])
        logits = model(input_ids=ids).logits[0, :-1].float()
        total += F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum").item()
        count += int((labels != -100).sum())
print(json.dumps({"val_loss": total / max(count, 1), "tokens": count}))
"""


def _fresh_process(script: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if out.returncode != 0:
        raise TuneforgeError(f"the export at {args[0]} does not load in plain transformers:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def fresh_process_loss(folder: Path, examples: list[tuple[list[int], list[int]]], gguf_file: str | None = None) -> dict:
    """Held-out loss of a model folder (or a GGUF file in it), computed by plain transformers in a new process."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump([{"ids": i, "labels": lab} for i, lab in examples], f)
    try:
        return _fresh_process(_SCRIPT, str(folder), gguf_file or "", f.name)
    finally:
        Path(f.name).unlink(missing_ok=True)


_PIPELINE_SCRIPT = r"""
import json, sys
from transformers import pipeline
folder, data_path = sys.argv[1], sys.argv[2]
items, threshold = json.load(open(data_path))
classify = pipeline("image-classification", model=folder)

def predicted(image):
    scores = classify(image, top_k=None)
    return {p["label"] for p in scores if p["score"] >= threshold} if threshold else {scores[0]["label"]}

right = sum(predicted(x["image"]) == set(x["labels"]) for x in items)
print(json.dumps({"accuracy": right / max(len(items), 1), "examples": len(items)}))
"""


def verify_image_classifier(run: Run, path: Path, weights: str, after: dict) -> dict:
    """Validation accuracy of an image classifier export through transformers.pipeline, in a fresh process:
    at most one image or DELTAS[weights] of them below the tuned model's."""
    from tuneforge.data.images import prepare_images

    data = prepare_images(run.config)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        threshold = run.config.image_classification.threshold if data.multi_label else None
        json.dump([[{"image": e.record.image, "labels": [data.labels[c] for c in e.targets]} for e in data.validation],
                   threshold], f)
    try:
        got = _fresh_process(_PIPELINE_SCRIPT, str(path), f.name)
    finally:
        Path(f.name).unlink(missing_ok=True)
    allowed = after["accuracy"] - max(DELTAS.get(weights, 0.05), 1 / max(got["examples"], 1))
    if got["accuracy"] < allowed - 1e-9:
        raise TuneforgeError(f"the export at {path} classifies {got['accuracy']:.1%} of the validation images right "
                             f"through transformers.pipeline, below the tuned model's {after['accuracy']:.1%}: it does "
                             "not behave like the model that was evaluated")
    return {**got, "tuned_accuracy": after["accuracy"],
            "summary": f"pipeline accuracy {got['accuracy']:.1%} on {got['examples']} validation images "
                       f"(tuned model {after['accuracy']:.1%})"}


def verify_export(run: Run, path: Path, weights: str) -> dict:
    """Fresh-process held-out perplexity of an export against the tuned model's (an image classifier: its
    pipeline accuracy); raises when it is worse than allowed."""
    from tuneforge.data.dataset import prepare_data
    from tuneforge.models.load import load_tokenizer

    after = run.manifest.get("eval_after") or {}
    if "val_loss" not in after:
        raise TuneforgeError(f"{run.dir}: the run has no held-out evaluation to compare the export with")
    if method_facts(run.config).model_head == "image_classifier":
        return verify_image_classifier(run, path, weights, after)
    data = prepare_data(run.config, load_tokenizer(run.final))
    examples = [(e.input_ids, e.labels) for e in data.validation]
    gguf_file = path.name if path.suffix == ".gguf" else None
    got = fresh_process_loss(path.parent if gguf_file else path, examples, gguf_file)
    delta = DELTAS.get(weights, 0.05)
    ppl, ref = math.exp(got["val_loss"]), math.exp(after["val_loss"])
    report = {"perplexity": ppl, "tuned_perplexity": ref, "allowed": (1 + delta) * ref, "tokens": got["tokens"],
              "summary": f"held-out perplexity {ppl:.4f} (tuned model {ref:.4f}, allowed {(1 + delta) * ref:.4f})"}
    if ppl > (1 + delta) * ref:
        raise TuneforgeError(
            f"the export at {path} has held-out perplexity {ppl:.4f}, more than {1 + delta:g} x the tuned model's "
            f"{ref:.4f}: it does not behave like the model that was evaluated"
        )
    return report


# Lowest cosine allowed between an export's sentence vectors and the tuned model's, per kind of weights.
COSINES = {"float32": 0.9999, "fp32": 0.9999}
_VECTORS_SCRIPT = r"""
import json, sys
from sentence_transformers import SentenceTransformer
texts = json.load(open(sys.argv[2]))
print(json.dumps(SentenceTransformer(sys.argv[1], device="cpu").encode(texts).tolist()))
"""


def verify_sentence_vectors(run: Run, path: Path, weights: str) -> dict:
    """An embedding export loaded by sentence-transformers in a fresh process must give the tuned model's
    vectors for the validation queries (cosine >= 0.9999 in fp32, 0.99 in 16 bits)."""
    import torch

    from tuneforge.data.pairs_text import prepare_pairs
    from tuneforge.models.encoder import encode_texts, read_pooling
    from tuneforge.models.run import load_tuned

    model, tokenizer = load_tuned(run, torch.device("cpu"))
    texts = [r.query for r in prepare_pairs(run.config, tokenizer).validation.records][:64] or ["a test sentence"]
    ours = encode_texts(model, tokenizer, texts, read_pooling(run.final), torch.device("cpu"))
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(texts, f)
    try:
        out = subprocess.run([sys.executable, "-c", _VECTORS_SCRIPT, str(path), f.name], capture_output=True,
                             text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    finally:
        Path(f.name).unlink(missing_ok=True)
    if out.returncode != 0:
        raise TuneforgeError(f"the export at {path} does not load in sentence-transformers:\n{out.stderr[-2000:]}")
    theirs = torch.tensor(json.loads(out.stdout.strip().splitlines()[-1]))
    worst = torch.nn.functional.cosine_similarity(ours, theirs).min().item()
    allowed = COSINES.get(weights, 0.99)
    if worst < allowed:
        raise TuneforgeError(f"the export at {path} gives sentence vectors with cosine {worst:.5f} to the tuned "
                             f"model's (allowed {allowed}): it does not behave like the model that was evaluated")
    return {"cosine": worst, "allowed": allowed, "texts": len(texts),
            "summary": f"sentence vectors of {len(texts)} validation queries at cosine >= {worst:.5f} to the tuned "
                       f"model's (allowed {allowed})"}
