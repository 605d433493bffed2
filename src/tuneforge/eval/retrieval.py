"""Retrieval metrics of an embedding model: rank a corpus for each query, then recall@k, MRR@10 and NDCG@10.

Binary relevance, as in sentence-transformers' InformationRetrievalEvaluator: recall@k is the share
of a query's relevant documents found in its top k, MRR@10 the reciprocal rank of the first one
within the top 10 (0 beyond), NDCG@10 the discounted gain of the top 10 over the ideal ordering's.
"""

from __future__ import annotations

import math

import torch

RECALL_AT = (1, 5, 10)
CUTOFF = 10


def top_k(queries: torch.Tensor, docs: torch.Tensor, k: int) -> list[list[int]]:
    """Indices of each query's k most cosine-similar documents, best first (ties: lower index first)."""
    q = torch.nn.functional.normalize(queries.float(), dim=1)
    d = torch.nn.functional.normalize(docs.float(), dim=1)
    scores = q @ d.T
    k = min(k, docs.size(0))
    # A stable sort, so equal scores keep corpus order and the ranking is reproducible.
    return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k].tolist()


def retrieval_metrics(ranked: list[list[int]], relevant: list[set[int]], recall_at=RECALL_AT,
                      cutoff: int = CUTOFF) -> dict[str, float]:
    """Mean recall@k, MRR@cutoff and NDCG@cutoff over queries, from each query's ranked documents."""
    if not ranked:
        return {}
    sums = dict.fromkeys([f"recall@{k}" for k in recall_at] + [f"mrr@{cutoff}", f"ndcg@{cutoff}"], 0.0)
    for docs, rel in zip(ranked, relevant):
        for k in recall_at:
            sums[f"recall@{k}"] += len(rel.intersection(docs[:k])) / len(rel)
        first = next((i for i, d in enumerate(docs[:cutoff]) if d in rel), None)
        sums[f"mrr@{cutoff}"] += 0.0 if first is None else 1.0 / (first + 1)
        dcg = sum(1.0 / math.log2(i + 2) for i, d in enumerate(docs[:cutoff]) if d in rel)
        ideal = sum(1.0 / math.log2(i + 2) for i in range(min(len(rel), cutoff)))
        sums[f"ndcg@{cutoff}"] += dcg / ideal
    return {name: total / len(ranked) for name, total in sums.items()}
