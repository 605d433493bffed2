"""The evaluation suite's reference metrics on one model's greedy answers: each entry's mean, sample size,
95% interval and per-example scores (kept so that base and tuned can be compared example by example)."""

from __future__ import annotations

from pathlib import Path

from tuneforge.eval.intervals import summarise
from tuneforge.eval.metrics import METRICS, RATES, load_metric
from tuneforge.methods.rewards import score


def entry_name(entry) -> str:
    """The label a suite entry is reported under: the metric's name, or the function's for module:function."""
    return entry.metric.rpartition(":")[2] if ":" in entry.metric else entry.metric


def sample_fields(samples: list[dict]) -> dict[str, list]:
    """Columns for the metric functions: `reference`, and each of the records' other fields that all samples have."""
    fields = {"reference": [s["reference"] for s in samples]}
    common = set.intersection(*(set(s.get("fields") or {}) for s in samples)) if samples else set()
    fields.update({k: [s["fields"][k] for s in samples] for k in sorted(common - {"reference"})})
    return fields


def score_suite(entries: list, samples: list[dict], base: Path | None = None) -> dict[str, dict]:
    """{name: {value, n, ci95, interval, scores}} for each suite entry on these answers."""
    prompts, answers = [s["prompt"] for s in samples], [s["answer"] for s in samples]
    fields = sample_fields(samples)
    out = {}
    for entry in entries:
        scores = score(load_metric(entry.metric, entry.args, base), prompts, answers, fields) if samples else []
        rate = entry.metric in RATES if entry.metric in METRICS else None
        out[entry_name(entry)] = {**summarise(scores, rate), "scores": scores}
    return out
