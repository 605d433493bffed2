"""task: embedding: an encoder trained to place a query near its positive text.

Contrastive loss with in-batch negatives, as sentence-transformers' MultipleNegativesRankingLoss: each
query's candidates are every positive of the micro-batch plus every hard negative given; the loss
is the cross-entropy of the scaled cosine similarities with the query's own positive as the class.
Scored pairs train the cosine-similarity loss (squared error of the cosine against the score).

A micro-batch never holds two copies of the same text among its candidates (a repeated positive
would be a false negative for both queries): collate drops a later example whose positive or
negative is already there and counts it (`duplicates_dropped`). Collate is a pure function of the
example indices, which come from the seeded epoch order, so a resumed run drops exactly the
examples the uninterrupted run drops and stays bit-exact.

Vectors are pooled as the model folder says (models/encoder.py), and before the first step they are
checked against sentence-transformers' own on fixed strings: a mismatch stops the run.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from tuneforge.errors import ConfigError, ModelError
from tuneforge.eval.retrieval import CUTOFF, retrieval_metrics, top_k
from tuneforge.methods.objective import Runtime
from tuneforge.methods.run import as_validation, run_objective
from tuneforge.models.encoder import (
    Pooling,
    embed,
    encode_texts,
    read_pooling,
    tokenize,
    write_sentence_transformers,
)
from tuneforge.models.layers import transformers_model
from tuneforge.models.resolve import resolve_base_model
from tuneforge.train.outputs import write_final as write_weights

PARITY_TEXTS = (
    "The cat sits on the mat.",
    "A fast fine-tuning toolkit for open models",
    "Wie spät ist es?",
    "SKU-4471: stainless steel bolt, 12 mm, pack of 50",
    "short",
    "The quick brown fox jumps over the lazy dog, again and again, until the dog finally wakes up and chases it.",
)

Stats = dict[str, tuple[float, float]]


def contrastive_losses(queries: torch.Tensor, docs: torch.Tensor, scale: float) -> torch.Tensor:
    """Per-query cross-entropy over scaled cosine similarities; query i's positive is docs[i], the other
    rows of docs (other positives, then hard negatives) are its negatives."""
    scores = F.normalize(queries, dim=-1) @ F.normalize(docs, dim=-1).T * scale
    return F.cross_entropy(scores, torch.arange(queries.size(0), device=scores.device), reduction="none")


def cosine_losses(first: torch.Tensor, second: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Squared error of each pair's cosine against its score (sentence-transformers' CosineSimilarityLoss)."""
    return (F.cosine_similarity(first, second) - scores.float()) ** 2


def distinct(records: list, indices: list[int]) -> tuple[list[int], int]:
    """The indices whose candidate texts (positive, negatives) appear nowhere earlier in the batch, and
    how many were left out: in-batch negatives must not hold a second copy of a positive."""
    seen: set[str] = set()
    kept = []
    for i in indices:
        rec = records[i]
        texts = [rec.positive, *rec.negative]
        if any(t in seen for t in texts):
            continue
        seen.update(texts)
        kept.append(i)
    return kept, len(indices) - len(kept)


class Embedding:
    name = "embedding"
    notes = ()

    def __init__(self, spec, data, tokenizer, pooling: Pooling, loss: str, run: Runtime, base):
        self.spec, self.data, self.tokenizer, self.pooling = spec, data, tokenizer, pooling
        self.kind, self.run, self.base = loss, run, base
        self.records = data.train.records
        self.max_len = run.cfg.max_seq_len if run.cfg is not None else None

    @classmethod
    def build(cls, spec, data, pad_id: int, reference, run: Runtime) -> "Embedding":
        base, _ = resolve_base_model(run.cfg.base_model)
        loss = spec.loss if spec.loss != "auto" else "cosine" if data.scored else "contrastive"
        if (loss == "cosine") != data.scored:
            raise ConfigError(f"embedding.loss: {loss} needs {'scored pairs' if loss == 'cosine' else 'query/positive records'}, "
                              f"but the data holds {'scored pairs' if data.scored else 'query/positive records'}; "
                              "set embedding.loss: auto")
        return cls(spec, data, run.tokenizer, read_pooling(base), loss, run, base)

    def describe(self) -> dict:
        loss = ("in-batch negatives (MultipleNegativesRankingLoss), cosine x scale" if self.kind == "contrastive"
                else "cosine similarity vs score, squared error")
        return {"task": "embedding", "loss": loss, "scale": self.spec.scale, "pooling": self.pooling.mode,
                "normalize": self.pooling.normalize, "normalised_by": "pairs of the accumulated batch"}

    def collate(self, indices: list[int], place: tuple[int, int] = (0, 0)) -> dict:
        dropped = 0
        if self.kind == "contrastive":
            indices, dropped = distinct(self.records, indices)
        recs = [self.records[i] for i in indices]
        query = tokenize(self.tokenizer, [r.query for r in recs], self.pooling, self.max_len)
        docs = tokenize(self.tokenizer, [r.positive for r in recs] + [t for r in recs for t in r.negative],
                        self.pooling, self.max_len)
        batch = {**query, "doc_ids": docs["input_ids"], "doc_mask": docs["attention_mask"],
                 "dropped": torch.tensor(dropped)}
        if self.kind == "cosine":
            batch["scores"] = torch.tensor([r.fields["score"] for r in recs])
        return batch

    def prepare(self, model, batch: dict) -> dict:
        return batch

    def units(self, batch: dict) -> dict[str, int]:
        # Every token of every text trains the vectors: "tokens" is what throughput and the loop's checks count.
        return {"pairs": batch["input_ids"].size(0),
                "tokens": int(batch["attention_mask"].sum()) + int(batch["doc_mask"].sum())}

    def loss(self, model, batch: dict, totals: dict[str, int]) -> tuple[torch.Tensor, Stats]:
        queries = embed(model, batch, self.pooling)
        docs = embed(model, {"input_ids": batch["doc_ids"], "attention_mask": batch["doc_mask"]}, self.pooling)
        n = float(queries.size(0))
        stats = {"duplicates_dropped": (float(batch["dropped"]), 1.0)}
        if self.kind == "cosine":
            losses = cosine_losses(queries, docs, batch["scores"])
        else:
            losses = contrastive_losses(queries, docs, self.spec.scale)
            with torch.no_grad():
                scores = F.normalize(queries, dim=-1) @ F.normalize(docs, dim=-1).T
                right = (scores.argmax(-1) == torch.arange(queries.size(0), device=scores.device)).sum().item()
            stats["in_batch_accuracy"] = (float(right), n)
        return losses.sum() / totals["pairs"], stats

    def _on(self, split) -> "Embedding":
        view = copy.copy(self)
        view.records = split.records
        return view

    @torch.no_grad()
    def held_out(self, model, data, final: bool = False, reference=None) -> dict:
        """val_loss (and in-batch accuracy) on the validation split; when `final`, also retrieval over the
        validation queries against the validation positives plus embedding.corpus."""
        run, view = self.run, self._on(data.validation)
        size, n = run.cfg.micro_batch_size, len(data.validation)
        was_training = model.training
        model.eval()
        batches = [view.collate(list(range(i, min(n, i + size)))) for i in range(0, n, size)]
        loss, _, stats = run_objective(view, model, batches, run.device, run.dtype, backward=False)
        model.train(was_training)
        out = {"val_loss": loss, **{f"val_{k}": v for k, v in stats.items() if k != "duplicates_dropped"}}
        if not final:
            return as_validation(out)
        if self.kind == "contrastive":
            out.update(self.retrieval(model, data.validation.records, data.corpus))
        return out

    def retrieval(self, model, records: list, corpus: list[str]) -> dict:
        """recall@1/5/10, MRR@10 and NDCG@10 of the validation queries; a query's relevant document is its positive."""
        docs = list(dict.fromkeys([r.positive for r in records] + list(corpus)))
        where = {text: i for i, text in enumerate(docs)}
        encode = lambda texts: encode_texts(model, self.tokenizer, texts, self.pooling, self.run.device,  # noqa: E731
                                            max_len=self.max_len)
        ranked = top_k(encode([r.query for r in records]), encode(docs), CUTOFF)
        metrics = retrieval_metrics(ranked, [{where[r.positive]} for r in records])
        return {**metrics, "queries": len(records), "corpus_size": len(docs)}

    def preflight(self, model) -> None:
        check_parity(model, self.tokenizer, self.base, self.pooling, self.run.device, self.spec.parity_tolerance)


def check_parity(model, tokenizer, folder, pooling: Pooling, device, tolerance: float = 0.999) -> float:
    """The lowest cosine between tuneforge's vectors and sentence-transformers' own for the base folder on
    fixed strings; a ModelError below `tolerance` (the pooling or the tokenizer would be wrong)."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise ModelError("task: embedding checks its vectors against sentence-transformers before training; "
                         "install it (pip install 'tuneforge[embedding]')") from None
    reference = SentenceTransformer(str(folder), device=str(device), local_files_only=True)
    theirs = reference.encode(list(PARITY_TEXTS), convert_to_tensor=True).float().cpu()
    ours = encode_texts(model, tokenizer, list(PARITY_TEXTS), pooling, device)
    worst = F.cosine_similarity(ours, theirs).min().item()
    if worst < tolerance:
        raise ModelError(f"base_model {folder}: tuneforge's sentence vectors differ from sentence-transformers' "
                         f"(lowest cosine {worst:.4f} < embedding.parity_tolerance {tolerance}; pooling read as "
                         f"{pooling}); check modules.json and 1_Pooling/config.json in that folder")
    return worst


def write_final(model, tokenizer, folder, stop_ids, initial_adapter=None, state_dict=None) -> None:
    """final/ as a sentence-transformers folder: weights (or a LoRA adapter), tokenizer, modules and pooling."""
    write_weights(model, tokenizer, folder, stop_ids, initial_adapter, state_dict)
    inner = transformers_model(model)
    write_sentence_transformers(folder, read_pooling(inner.name_or_path), inner.config.hidden_size)
