"""`POST /v1/classify` for classifier runs: texts in, labels with scores out, in transformers' pipeline shape.

Body: {"input": "a text" | ["text", ...], "top_k": 1 (default) | n | null (every class), "model": optional}.
The answer's "data" is what `pipeline("text-classification")(input, top_k=...)` returns: for one text with
top_k 1 a list of one {"label", "score"}; for a list of texts, one entry per text (a dict with top_k 1, else a
list of dicts). Scores are softmax probabilities, or per-class sigmoids for a multi-label model.
"""

from __future__ import annotations

import torch

from tuneforge.serve.protocol import ApiError

MAX_TEXTS = 256  # texts in one request: a bigger batch is a client that should page


def parse_classify(body: dict) -> tuple[str | None, list[str], bool, int | None]:
    """(model, texts, one text given, top_k) of a request body; ApiError 400 naming the field otherwise."""
    texts = body.get("input")
    single = isinstance(texts, str)
    texts = [texts] if single else texts
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
        raise ApiError(400, "input: give a non-empty string or a list of non-empty strings", param="input")
    if len(texts) > MAX_TEXTS:
        raise ApiError(400, f"input: {len(texts)} texts; send at most {MAX_TEXTS} per request", param="input")
    top_k = body.get("top_k", 1)
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ApiError(400, "top_k: give a positive integer, or null for every class", param="top_k")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, "model: must be a string", param="model")
    return model, texts, single, top_k


@torch.no_grad()
def class_scores(model, tokenizer, texts: list[str], device) -> torch.Tensor:
    """Probabilities of every class for each text (fp32, on the CPU), truncated to what the model reads."""
    limit = getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length
    batch = tokenizer(texts, padding=True, truncation=True, max_length=min(limit, tokenizer.model_max_length),
                      return_tensors="pt")
    logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
    multi = model.config.problem_type == "multi_label_classification"
    return torch.sigmoid(logits) if multi else torch.softmax(logits, -1)


def pipeline_shape(probs: torch.Tensor, id2label: dict, single: bool, top_k: int | None) -> list:
    """Labels with scores, best first, shaped as transformers' text-classification pipeline returns them."""
    k = probs.size(-1) if top_k is None else min(top_k, probs.size(-1))
    rows = []
    for row in probs:
        scores, idx = row.topk(k)
        rows.append([{"label": id2label[int(i)], "score": float(s)} for s, i in zip(scores, idx)])
    if single:
        return rows[0]
    return [r[0] for r in rows] if top_k == 1 else rows
