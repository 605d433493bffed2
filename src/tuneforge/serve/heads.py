"""What a served model answers, by its head (the run's row, methods/facts.py `model_head`): its routes, and
what it is in a user's words, so a request to a route it cannot answer is told which one to use."""

from __future__ import annotations

from dataclasses import dataclass

from tuneforge.serve.protocol import ApiError

GENERATION_ROUTES = {"/v1/chat/completions": "POST", "/v1/completions": "POST"}
CLASSIFY = {"/v1/classify": "POST"}


@dataclass(frozen=True)
class Head:
    kind: str  # what the model is, as an error message names it
    routes: dict[str, str]  # the POST routes it answers
    # Whether the base model without the run's adapter answers these routes too: not where the run trained a
    # new head (a LoRA classifier's or reward model's base has only an untrained, randomly initialised one).
    base_servable: bool = False


SERVED = {
    "causal_lm": Head("a text generator", GENERATION_ROUTES, base_servable=True),
    "classifier": Head("a text classifier", CLASSIFY),
    "image_classifier": Head("an image classifier", CLASSIFY),
    "score": Head("a reward model (one score per text or conversation)", CLASSIFY),
    "encoder": Head("an embedding model", {"/v1/embeddings": "POST"}),
}


def folder_head(config: dict) -> str:
    """The head of a model folder, from its config.json: an exported classifier, image classifier or reward model
    (one output, as `export --to hf` writes a reward run) is served as such, not loaded as a language model."""
    architectures = config.get("architectures") or []
    if any(name.endswith("ForImageClassification") for name in architectures):
        return "image_classifier"
    if not any(name.endswith("ForSequenceClassification") for name in architectures):
        return "causal_lm"
    return "score" if len(config.get("id2label") or {}) == 1 else "classifier"


def wrong_route(head: str, path: str) -> ApiError | None:
    """400 for a generation route on a model that does not generate, naming what it is and where to go (an
    OpenAI client or chat UI sends chat requests to whatever it is pointed at); None for any other path.
    Asked before the API key is checked, as a 404 is, so it names no model id."""
    served = SERVED[head]
    if path not in GENERATION_ROUTES or path in served.routes:
        return None
    use = " or ".join(f"POST {route}" for route in served.routes)
    return ApiError(400, f"{path}: this server's model is {served.kind}; it does not generate text, so it has no "
                    f"chat or completion routes; use {use}", code="unsupported_route")
