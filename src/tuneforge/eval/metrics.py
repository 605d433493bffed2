"""Reference metrics on generated answers: one row per metric name, each a function with GRPO's reward signature.

`fn(prompts, completions, reference=..., **fields) -> list[float]`: one score per answer, so every metric gets
the same paired interval (eval/intervals.py). The scores come from the libraries the field uses (rouge-score,
sacrebleu, bert-score), not from re-implementations. User metrics are `module:function` with that signature.
"""

from __future__ import annotations

import functools
import json
import re
import string
from pathlib import Path
from typing import Callable

from tuneforge.errors import ConfigError
from tuneforge.eval.needs import need
from tuneforge.methods.rewards import load_reward
from tuneforge.models.resolve import resolve_base_model

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalise(text: str) -> str:
    """SQuAD-style normalisation: lower case, punctuation and articles dropped, spaces collapsed."""
    text = _PUNCT.sub(" ", str(text).casefold())
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def exact_match(prompts: list[str], completions: list[str], reference: list[str], **_) -> list[float]:
    """1.0 when the answer equals the reference (surrounding spaces aside)."""
    return [float(c.strip() == str(r).strip()) for c, r in zip(completions, reference)]


def normalized_match(prompts: list[str], completions: list[str], reference: list[str], **_) -> list[float]:
    """1.0 when the answers are equal once case, punctuation, articles and spacing are set aside."""
    return [float(normalise(c) == normalise(r)) for c, r in zip(completions, reference)]


def rouge_l(prompts: list[str], completions: list[str], reference: list[str], stemmer: bool = False,
            **_) -> list[float]:
    """ROUGE-L F1 (rouge-score's own tokenizer)."""
    scorer = need("rouge_score.rouge_scorer", "rouge_l").RougeScorer(["rougeL"], use_stemmer=stemmer)
    return [scorer.score(str(r), c)["rougeL"].fmeasure for c, r in zip(completions, reference)]


def bleu(prompts: list[str], completions: list[str], reference: list[str], **_) -> list[float]:
    """Sentence BLEU (sacrebleu, 0-100, smoothed with exp as sacrebleu does for single sentences)."""
    sb = need("sacrebleu", "bleu")
    return [sb.sentence_bleu(c, [str(r)]).score for c, r in zip(completions, reference)]


def chrf(prompts: list[str], completions: list[str], reference: list[str], **_) -> list[float]:
    """Sentence chrF (sacrebleu, 0-100)."""
    sb = need("sacrebleu", "chrf")
    return [sb.sentence_chrf(c, [str(r)]).score for c, r in zip(completions, reference)]


def _parse(text: str):
    try:
        return json.loads(text)
    except (ValueError, TypeError):
        return None


def json_valid(prompts: list[str], completions: list[str], **_) -> list[float]:
    """1.0 when the answer parses as JSON."""
    return [float(_parse(c) is not None or c.strip() == "null") for c in completions]


def json_fields(prompts: list[str], completions: list[str], reference: list[str], fields: list[str] | None = None,
                **_) -> list[float]:
    """Share of the reference object's fields (or `fields`) that the answer's object has with equal values;
    0.0 when the answer is not a JSON object."""
    out = []
    for c, r in zip(completions, reference):
        want, got = _parse(r) if isinstance(r, str) else r, _parse(c)
        if not isinstance(want, dict):
            raise ConfigError(f"evaluation.suite: json_fields needs references that are JSON objects; got {r!r}")
        keys = fields or list(want)
        out.append(sum(isinstance(got, dict) and k in got and got[k] == want.get(k) for k in keys) / max(len(keys), 1))
    return out


def bertscore(prompts: list[str], completions: list[str], reference: list[str], model: str = "minilm-l6",
              num_layers: int = 6, batch_size: int = 32, **_) -> list[float]:
    """BERTScore F1 with a local encoder folder (a built-in name such as minilm-l6, or a path); never downloads."""
    scorer = need("bert_score", "bertscore")
    folder = _local_model(model)
    _, _, f1 = scorer.score(list(completions), [str(r) for r in reference], model_type=str(folder),
                            num_layers=num_layers, batch_size=batch_size, device="cpu")
    return [float(x) for x in f1]


def _local_model(name: str) -> Path:
    from_disk = Path(name).expanduser()
    return from_disk if from_disk.is_dir() else resolve_base_model(name)[0]


METRICS: dict[str, Callable] = {
    "exact_match": exact_match, "normalized_match": normalized_match, "rouge_l": rouge_l, "bleu": bleu,
    "chrf": chrf, "json_valid": json_valid, "json_fields": json_fields, "bertscore": bertscore,
}
# Metrics whose every score is 0 or 1 (their mean is a rate, with Wilson's interval); the others are means.
RATES = ("exact_match", "normalized_match", "json_valid")


def load_metric(name: str, args: dict, base: Path | None = None) -> Callable:
    """A built-in metric by name, or `module:function` (GRPO's reward signature), with `args` bound."""
    if name in METRICS:
        fn = functools.partial(METRICS[name], **args) if args else METRICS[name]
        return functools.update_wrapper(fn, METRICS[name]) if args else fn
    if ":" not in name:
        raise ConfigError(f"evaluation.suite: unknown metric {name!r}; built-ins are {', '.join(METRICS)}, "
                          "or give module:function")
    try:
        return load_reward(name, args, base)
    except ConfigError as err:
        raise ConfigError(str(err).replace("grpo:", "evaluation.suite:", 1)) from None
