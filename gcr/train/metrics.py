"""Recall@K and MRR@10 over ranked target lists, kept per query.

Recall@K follows the cross-modal retrieval convention: a query counts as a hit when *any* relevant target
is among the first K (a hit rate). This matters for image-to-text, where an image has five relevant
captions. The scorer keeps each query's id and the rank of its first relevant target, and computes every
metric from those ranks (:func:`gcr.reporting.intervals.metrics_from_ranks`), so the per-query record stored in
``results.json`` reproduces the reported metrics exactly and bootstrap intervals need no retraining.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gcr.reporting.intervals import first_relevant_rank, metrics_from_ranks


class RetrievalScorer:
    """Accumulates ranked lists per query; :meth:`compute` gives ``{"R@1": ..., "MRR@10": ...}``.

    In a multi-process run each process scores its shard; :meth:`compute` and :meth:`per_query` gather the
    shards (every process must call them), so every process sees all queries, ordered by query id.
    """

    def __init__(self, ks: Sequence[int] = (1, 5, 10), mrr_k: int = 10, rank: int = 0, world_size: int = 1):
        self.names = [f"R@{k}" for k in ks] + [f"MRR@{mrr_k}"]
        self.rank, self.world_size = rank, world_size
        self.reset()

    def update(self, ranked: Sequence[Sequence[str]], relevant: Sequence[Sequence[str]],
               query_ids: Sequence[str] | None = None) -> None:
        """``ranked[i]``: target ids best first for query i; ``relevant[i]``: its hits; ``query_ids[i]``: its id.

        Without ids, queries are numbered in the order they arrive (per process).
        """
        if query_ids is None:
            query_ids = [f"{self.rank}:{len(self._ids) + i}" for i in range(len(ranked))]
        if not len(ranked) == len(relevant) == len(query_ids):
            raise ValueError("ranked, relevant and query_ids must have one entry per query")
        for qid, ranking, hits in zip(query_ids, ranked, relevant):
            self._ids.append(str(qid))
            self._ranks.append(first_relevant_rank(ranking, hits))
            self._depth = max(self._depth, len(ranking))
        self._gathered = None

    def _gather(self) -> tuple[list[str], list[int], int]:
        if self._gathered is None:
            local = list(zip(self._ids, self._ranks))
            depth = self._depth
            if self.world_size > 1:
                import torch.distributed as dist

                if dist.is_available() and dist.is_initialized():
                    shards: list[Any] = [None] * dist.get_world_size()
                    dist.all_gather_object(shards, (local, depth))
                    local = [pair for shard, _ in shards for pair in shard]
                    depth = max(d for _, d in shards)
            local.sort(key=lambda pair: pair[0])  # one order however the queries were sharded
            self._gathered = ([q for q, _ in local], [r for _, r in local], depth)
        return self._gathered

    def compute(self) -> dict[str, float]:
        _, ranks, _ = self._gather()
        return metrics_from_ranks(ranks, self.names)

    def per_query(self) -> dict[str, Any]:
        """``{"ids": [...], "ranks": [...], "depth": D}``: each query's first relevant rank (0: not retrieved)."""
        ids, ranks, depth = self._gather()
        return {"ids": list(ids), "ranks": list(ranks), "depth": depth}

    def reset(self) -> None:
        self._ids: list[str] = []
        self._ranks: list[int] = []
        self._depth = 0
        self._gathered: tuple[list[str], list[int], int] | None = None
