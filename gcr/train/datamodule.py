"""Training and evaluation data for one retrieval direction.

Follows the standard generative-retrieval protocol:

* *indexing* examples: target content -> identifier, for every target in the index
  (train, val and test targets alike: the model must know every identifier);
* *retrieval* examples: query -> identifier of each relevant target, train queries only;
* evaluation: val/test queries, searched among the val/test targets.

Under DDP/FSDP the evaluation queries are split into shards of equal length (so every rank runs the same
number of ``generate()`` calls, which sharded models need); the few queries repeated to even out the shards
are decoded but not scored, so metrics are those of one process.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import lightning as L
from torch.utils.data import DataLoader, DistributedSampler

from gcr.data.corpus import Content, Query, RetrievalTask
from gcr.heads.rationales import rationale_mask
from gcr.index import IdentifierIndex
from gcr.train.reproducible import EpochShuffleSampler


@dataclass(frozen=True)
class Example:
    content: Content
    target: tuple[int, ...]  # identifier token ids, ending with EOS (or the RGS separator)
    rationale: tuple[int, ...] = ()  # RGS: the target's rationale tokens + EOS, trained after the identifier
    anchor: Content | None = None  # a query example's target content (model.interpolation mixes the two)


def training_examples(
    task: RetrievalTask, index: IdentifierIndex, *, indexing: bool = True,
    rationales: Mapping[str, Sequence[int]] | None = None,
) -> list[Example]:
    """Indexing examples for all targets plus retrieval examples for the train queries.

    With ``rationales`` (target id -> token ids), every example also carries its target's rationale.
    """
    ids = index.token_ids
    rationales = rationales or {}

    contents = {t.target_id: t.content for t in task.targets}

    def example(content: Content, target_id: str, anchor: Content | None = None) -> Example:
        return Example(content, tuple(ids[index.identifier_of(target_id)]), tuple(rationales.get(target_id, ())),
                       anchor)

    examples = []
    if indexing:
        examples += [example(t.content, t.target_id) for t in task.targets]
    for q in task.queries_of("train"):
        examples += [example(q.content, r, contents.get(r)) for r in q.relevant]
    return examples


class EvalBatch(list):
    """A batch of :class:`Query`; ``counted[i]`` is False for a query repeated only to even out shards."""

    def __init__(self, queries: list[Query], counted: list[bool]):
        super().__init__(queries)
        self.counted = counted


class EvenShardSampler(DistributedSampler):
    """Deals indices round-robin to ranks, padding the last round so all shards have the same length.

    Yields ``(index, counted)``: a padding entry repeats an early index with ``counted=False``. It subclasses
    DistributedSampler so that Lightning keeps it as it is.
    """

    def __init__(self, size: int, num_replicas: int, rank: int):
        self.size, self.num_replicas, self.rank = size, num_replicas, rank
        self.num_samples = math.ceil(size / num_replicas)

    def __iter__(self) -> Iterator[tuple[int, bool]]:
        for position in range(self.rank, self.num_samples * self.num_replicas, self.num_replicas):
            yield position % self.size, position < self.size

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:  # evaluation order is fixed
        pass


class _Queries:
    """Map-style dataset over queries that also accepts ``(index, counted)`` keys."""

    def __init__(self, queries: list[Query]):
        self.queries = queries

    def __len__(self) -> int:
        return len(self.queries)

    def __getitem__(self, key: int | tuple[int, bool]) -> tuple[Query, bool]:
        index, counted = key if isinstance(key, tuple) else (key, True)
        return self.queries[index], counted


class GenerativeDataModule(L.LightningDataModule):
    """Batches built by the backbone (prompt + identifier labels, left-padded)."""

    def __init__(
        self,
        task: RetrievalTask,
        index: IdentifierIndex,
        backbone,
        *,
        batch_size: int = 64,
        eval_batch_size: int = 64,
        indexing: bool = True,
        num_workers: int = 0,
        verifier=None,
        verification_pairs: list | None = None,
        pairs_per_step: int = 16,
        seed: int = 0,
        extra_examples: list[Example] | None = None,
        rationales: Mapping[str, Sequence[int]] | None = None,
    ):
        super().__init__()
        self.task, self.index, self.backbone = task, index, backbone
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.indexing, self.num_workers = indexing, num_workers
        # extra_examples: e.g. caption-enhanced pseudo-queries (a generated caption -> its image's identifier)
        self.examples = training_examples(task, index, indexing=indexing, rationales=rationales) + list(extra_examples or [])
        # GSV: every training batch also carries `pairs_per_step` (image, positive, hard negative) triples
        self.verifier, self.verification_pairs = verifier, list(verification_pairs or [])
        self.pairs_per_step = int(pairs_per_step)
        self.seed = int(seed)
        self._rng = random.Random(seed)

    def setup(self, stage: str) -> None:
        # every DDP rank draws its own GSV triples (the same draws on every rank would waste the extra data)
        trainer = getattr(self, "trainer", None)
        rank = trainer.global_rank if trainer is not None else 0
        self._rng = random.Random(self.seed * 1_000_003 + rank)

    def _collate_train(self, batch: list[Example]):
        contents, targets = [e.content for e in batch], [e.target + e.rationale for e in batch]
        if getattr(self.backbone, "interpolation", 0.0) > 0:  # model.interpolation (GENIUS): query-target mixes
            ids = self.backbone.batch(contents, targets, anchors=[e.anchor for e in batch])
        else:
            ids = self.backbone.batch(contents, targets)
        if any(e.rationale for e in batch):  # RGS: the module weighs these label positions separately
            ids["rationale_mask"] = rationale_mask(ids["input_ids"].shape[1], [len(e.rationale) for e in batch])
        if self.verifier is None or not self.verification_pairs:
            return ids
        pairs = self._rng.sample(self.verification_pairs, min(self.pairs_per_step, len(self.verification_pairs)))
        images = [p.image for p in pairs]
        return {
            "ids": ids,
            "gsv_pos": self.verifier.batch(images, [p.positive for p in pairs]),
            "gsv_neg": self.verifier.batch(images, [p.negative for p in pairs]),
        }

    @staticmethod
    def _collate_eval(batch: list[tuple[Query, bool]]) -> EvalBatch:
        return EvalBatch([q for q, _ in batch], [c for _, c in batch])  # the retriever builds model inputs itself

    def train_dataloader(self) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.world_size > 1:
            order = {"shuffle": True}  # Lightning's DistributedSampler: already a function of (seed, epoch)
        else:
            order = {"sampler": EpochShuffleSampler(len(self.examples), self.seed)}  # resumable order
        return DataLoader(
            self.examples,
            batch_size=self.batch_size,
            **order,
            collate_fn=self._collate_train,
            num_workers=self.num_workers,
        )

    def _eval_loader(self, split: str) -> DataLoader:
        queries = _Queries(self.task.queries_of(split))
        trainer = getattr(self, "trainer", None)
        sampler = None
        if trainer is not None and trainer.world_size > 1:
            sampler = EvenShardSampler(len(queries), trainer.world_size, trainer.global_rank)
        return DataLoader(
            queries,
            batch_size=self.eval_batch_size,
            shuffle=False,
            sampler=sampler,
            collate_fn=self._collate_eval,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
