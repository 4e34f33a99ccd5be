"""Training and evaluation data for one retrieval direction.

Follows the standard generative-retrieval protocol:

* *indexing* examples: target content -> identifier, for every target in the index
  (train, val and test targets alike: the model must know every identifier);
* *retrieval* examples: query -> identifier of each relevant target, train queries only;
* evaluation: val/test queries, searched among the val/test targets.
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
from torch.utils.data import DataLoader

from gcr.data.corpus import Content, Query, RetrievalTask
from gcr.index import IdentifierIndex


@dataclass(frozen=True)
class Example:
    content: Content
    target: tuple[int, ...]  # identifier token ids, ending with EOS


def training_examples(task: RetrievalTask, index: IdentifierIndex, *, indexing: bool = True) -> list[Example]:
    """Indexing examples for all targets plus retrieval examples for the train queries."""
    ids = index.token_ids
    examples = []
    if indexing:
        examples += [Example(t.content, tuple(ids[index.identifier_of(t.target_id)])) for t in task.targets]
    for q in task.queries_of("train"):
        examples += [Example(q.content, tuple(ids[index.identifier_of(r)])) for r in q.relevant]
    return examples


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
    ):
        super().__init__()
        self.task, self.index, self.backbone = task, index, backbone
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.indexing, self.num_workers = indexing, num_workers
        self.examples = training_examples(task, index, indexing=indexing)

    def _collate_train(self, batch: list[Example]):
        return self.backbone.batch([e.content for e in batch], [e.target for e in batch])

    @staticmethod
    def _collate_eval(batch: list[Query]) -> list[Query]:
        return batch  # the retriever builds model inputs itself

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.examples,
            batch_size=self.batch_size,
            shuffle=True,
            collate_fn=self._collate_train,
            num_workers=self.num_workers,
        )

    def _eval_loader(self, split: str) -> DataLoader:
        return DataLoader(
            self.task.queries_of(split),
            batch_size=self.eval_batch_size,
            shuffle=False,
            collate_fn=self._collate_eval,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
