"""Recall@K and MRR@10 over ranked target lists, with torchmetrics.

Recall@K follows the cross-modal retrieval convention: a query counts as a hit
when *any* relevant target is among the first K (torchmetrics' hit rate). This
matters for image-to-text, where an image has five relevant captions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.retrieval import RetrievalHitRate, RetrievalMRR


class RetrievalScorer(nn.Module):
    """Accumulates ranked lists per query; :meth:`compute` gives ``{"R@1": ..., "MRR@10": ...}``."""

    def __init__(self, ks: Sequence[int] = (1, 5, 10), mrr_k: int = 10, rank: int = 0, world_size: int = 1):
        super().__init__()
        # query numbers interleave across ranks so that gathered states never merge two queries
        self.rank, self.world_size = rank, world_size
        metrics = {f"R@{k}": RetrievalHitRate(top_k=k, empty_target_action="neg") for k in ks}
        metrics[f"MRR@{mrr_k}"] = RetrievalMRR(top_k=mrr_k, empty_target_action="neg")
        self.metrics = MetricCollection(metrics)
        self._next_query = 0

    def update(self, ranked: Sequence[Sequence[str]], relevant: Sequence[Sequence[str]]) -> None:
        """``ranked[i]``: target ids best first for query i; ``relevant[i]``: its hits."""
        preds, target, indexes = [], [], []
        for ranking, hits in zip(ranked, relevant):
            hits = set(hits)
            # a query with an empty ranking still counts (as a miss): give it one dummy negative
            ranking = list(ranking) or [None]
            n = len(ranking)
            preds.extend(float(n - r) for r in range(n))
            target.extend(t in hits for t in ranking)
            indexes.extend([self._next_query * self.world_size + self.rank] * n)
            self._next_query += 1
        device = next(iter(self.metrics.values())).device
        self.metrics.update(
            torch.tensor(preds, device=device),
            torch.tensor(target, device=device),
            indexes=torch.tensor(indexes, device=device, dtype=torch.long),
        )

    def compute(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.metrics.compute().items()}

    def reset(self) -> None:
        self.metrics.reset()
        self._next_query = 0
