"""Callbacks: install constrained decoding, and score retrieval with Recall@K / MRR."""

from __future__ import annotations

import lightning as L

from gcr.data.corpus import RetrievalTask
from gcr.index import IdentifierIndex
from gcr.retrieval import ConstrainedRetriever
from gcr.train.metrics import RetrievalScorer


class ConstrainedDecoding(L.Callback):
    """Builds one trie per evaluation split (its targets only) and gives the module a retriever."""

    def __init__(self, task: RetrievalTask, index: IdentifierIndex, *, num_beams: int = 10):
        self.task, self.index, self.num_beams = task, index, num_beams

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for split in ("val", "test"):
            if split in pl_module.retrievers:
                continue
            target_ids = [t.target_id for t in self.task.targets_of(split)]
            if target_ids:
                pl_module.retrievers[split] = ConstrainedRetriever(
                    pl_module.backbone, self.index, target_ids, num_beams=self.num_beams,
                    synced_gpus=trainer.world_size > 1 and _shards_parameters(trainer),
                )


def _shards_parameters(trainer: L.Trainer) -> bool:
    """FSDP/DeepSpeed shard the weights: every rank must then run every generate() step together."""
    name = type(trainer.strategy).__name__.lower()
    return "fsdp" in name or "deepspeed" in name


#: Suffix of the metrics computed after Generative Semantic Verification (``test+gsv``).
VERIFIED = "+gsv"


class RetrievalEvaluation(L.Callback):
    """Accumulates ranked targets per query and logs ``{split}/R@K`` and ``{split}/MRR@10``.

    When the module verifies (GSV), the re-ranked lists are scored too, as ``{split}+gsv``. ``per_query[key]``
    keeps each query's id and the rank of its first relevant target (see :class:`RetrievalScorer`).
    """

    def __init__(self, ks: tuple[int, ...] = (1, 5, 10)):
        self.ks = tuple(ks)
        self.results: dict[str, dict[str, float]] = {}
        self.per_query: dict[str, dict] = {}
        self._scorers: dict[str, RetrievalScorer] = {}

    def _scorer(self, trainer: L.Trainer, split: str) -> RetrievalScorer:
        if split not in self._scorers:
            self._scorers[split] = RetrievalScorer(self.ks, rank=trainer.global_rank, world_size=trainer.world_size)
        return self._scorers[split]

    def _update(self, trainer, split, outputs, batch) -> None:
        counted = getattr(batch, "counted", [True] * len(batch))
        kept = [i for i, c in enumerate(counted) if c]  # drop queries repeated only to even out DDP shards
        relevant = [batch[i].relevant for i in kept]
        ids = [batch[i].query_id for i in kept]
        self._scorer(trainer, split).update([outputs.targets[i] for i in kept], relevant, ids)
        if outputs.verified is not None:  # the same queries after Generative Semantic Verification
            self._scorer(trainer, split + VERIFIED).update([outputs.verified.targets[i] for i in kept], relevant, ids)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._update(trainer, "val", outputs, batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._update(trainer, "test", outputs, batch)

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        pl_module.retrieval_seconds, pl_module.retrieval_queries = 0.0, 0
        pl_module.verification_seconds = 0.0

    def _finish(self, trainer, pl_module, split: str) -> None:
        for key in (split, split + VERIFIED):
            scorer = self._scorers.pop(key, None)
            if scorer is None or trainer.sanity_checking:
                continue
            metrics = scorer.compute()
            seconds = pl_module.retrieval_seconds + (pl_module.verification_seconds if key != split else 0.0)
            if split == "test" and seconds > 0:
                metrics["queries_per_s"] = pl_module.retrieval_queries / seconds
            self.results[key] = metrics
            self.per_query[key] = scorer.per_query()
            for name, value in metrics.items():
                pl_module.log(f"{key}/{name}", value, sync_dist=False, prog_bar=name == "R@1")

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._finish(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._finish(trainer, pl_module, "test")
