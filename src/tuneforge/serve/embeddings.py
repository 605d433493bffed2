"""The served encoder of an embedding run (or a sentence-transformers folder): POST /v1/embeddings.

Vectors are pooled exactly as in training and evaluation (models/encoder.py), so a served vector
equals the one `sentence_transformers.SentenceTransformer(final/)` computes.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from tuneforge.errors import ModelError
from tuneforge.methods.facts import method_facts
from tuneforge.models.encoder import Pooling, embed, read_pooling, tokenize
from tuneforge.models.load import load_model, load_tokenizer, pick_device
from tuneforge.models.run import inference_dtype, load_tuned, open_run
from tuneforge.serve.heads import SERVED
from tuneforge.serve.protocol import ApiError
from tuneforge.serve.targets import is_run_folder
from tuneforge.serve.turns import Turns

BATCH = 64  # texts encoded together: bounds the memory one request takes


@dataclass
class EmbeddingEngine:
    model: object
    tokenizer: object
    pooling: Pooling
    device: torch.device
    default_id: str
    head: ClassVar[str] = "encoder"
    routes: ClassVar[dict[str, str]] = SERVED["encoder"].routes
    turns: Turns = field(default_factory=Turns)  # one model call at a time, in arrival order
    closing: threading.Event = field(default_factory=threading.Event)

    def model_ids(self) -> list[str]:
        return [self.default_id]

    def resolve(self, model_id: str | None) -> str:
        if model_id not in (None, self.default_id):
            raise ApiError(404, f"model: {model_id!r} is not served here; this server has {self.default_id!r}",
                           param="model", code="model_not_found")
        return self.default_id

    @torch.no_grad()
    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """(vectors, tokens read) of texts."""
        vectors, tokens = [], 0
        for i in range(0, len(texts), BATCH):
            with self.turns.turn():
                batch = {k: v.to(self.device) for k, v in tokenize(self.tokenizer, texts[i:i + BATCH], self.pooling).items()}
                vectors += embed(self.model, batch, self.pooling).cpu().tolist()
            tokens += int(batch["attention_mask"].sum())
        return vectors, tokens


def serves_embeddings(target: Path) -> bool:
    """A run of task: embedding, or a sentence-transformers folder (modules.json)."""
    target = Path(target)
    if is_run_folder(target):
        return method_facts(open_run(target).config).model_head == "encoder"
    return (target / "modules.json").is_file()


def load_embedding_engine(target: Path, device: str = "auto", trust_remote_code: bool = False,
                          adapters=None) -> EmbeddingEngine:
    target = Path(target)
    if adapters:
        raise ModelError(f"--adapter: {target} is an embedding model; it is served alone (export a merged folder "
                         "per adapter instead)")
    dev = pick_device(device)
    if is_run_folder(target):
        run = open_run(target, trust_remote_code)
        model, tokenizer = load_tuned(run, dev, inference_dtype(dev))
        pooling = read_pooling(run.final)
    else:
        tokenizer = load_tokenizer(target, trust_remote_code=trust_remote_code)
        model = load_model(target, dev, trust_remote_code, inference_dtype(dev), head="encoder").eval()
        pooling = read_pooling(target)
    return EmbeddingEngine(model, tokenizer, pooling, dev, target.name)
