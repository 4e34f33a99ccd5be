"""Leakage-free pseudo-queries: generated training queries for every target, test targets included.

Test targets are otherwise learned only through the indexing example (the target itself -> its identifier),
so a model sees no query-shaped input for them. The standard remedy (DSI-QG; CART's caption-enhanced
queries) adds generated queries for every target, made by a model that saw the train split only.

``augment.pseudo_queries=N`` per direction:

* **t2i (image targets):** the ``N`` best beams of the ``description`` captioner for each image (trained
  on the train split's captions only, or a pretrained checkpoint zero-shot), each -> the image's identifier.
  Beams that decode to the same text as a better beam of the same image are dropped (counted).
* **i2t (caption targets):** none. The query is an image and gcr generates no images; the indexing example
  (the caption -> its identifier) is what a query encoder with one aligned text/image space transfers from.

What was added is recorded in every result row (``index.pseudo_queries``) and written to
``<run>/<direction>/pseudo_queries.json``, so a reader can see the generated text.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from gcr.artifacts import write_json
from gcr.data.corpus import Content, Corpus, RetrievalTask
from gcr.index import IdentifierIndex
from gcr.train.datamodule import Example

log = logging.getLogger("gcr")

FILE = "pseudo_queries.json"
NO_IMAGE_GENERATION = "none: caption targets are queried by images, and gcr generates no images"


@dataclass
class PseudoQueries:
    """The generated queries of one direction and the record that goes into the results."""

    examples: list[Example] = field(default_factory=list)
    texts: dict[str, list[str]] = field(default_factory=dict)  # target id -> its generated queries
    record: dict[str, Any] = field(default_factory=dict)

    def save(self, directory: str | Path) -> None:
        """``pseudo_queries.json``: the record and every generated query by target id (atomic)."""
        write_json(Path(directory) / FILE, {**self.record, "queries": self.texts})


def requested(cfg: DictConfig) -> int:
    """``augment.pseudo_queries`` (0 when the config predates it)."""
    augment = cfg.get("augment") or {}
    return int(augment.get("pseudo_queries", 0) or 0)


def pseudo_queries(
    cfg: DictConfig, corpus: Corpus, task: RetrievalTask, index: IdentifierIndex, captioner_factory: Callable
) -> PseudoQueries:
    """The ``augment.pseudo_queries`` generated queries per target of ``task`` (see the module docstring)."""
    count = requested(cfg)
    if count == 0:
        return PseudoQueries(record={"per_target": 0, "source": "none"})
    if task.direction != "t2i":
        log.info("pseudo-queries: %s", NO_IMAGE_GENERATION)
        return PseudoQueries(record={"per_target": 0, "requested": count, "source": NO_IMAGE_GENERATION})
    from gcr.train.captioner import generated_caption_ranks

    ranks = generated_caption_ranks(cfg, corpus, captioner_factory, count=count)
    texts: dict[str, list[str]] = {}
    examples: list[Example] = []
    duplicates = 0
    for target in task.targets:
        seen: list[str] = []
        for captions in ranks:
            text = captions.get(target.target_id, "").strip()
            if not text:
                continue
            if text in seen:
                duplicates += 1
                continue
            seen.append(text)
        texts[target.target_id] = seen
        identifier = tuple(index.token_ids[index.identifier_of(target.target_id)])
        examples.extend(Example(Content.text(text), identifier, anchor=target.content) for text in seen)
    d = cfg.description
    source = f"description captioner ({d.captioner}{': ' + str(d.path) if d.captioner == 'hf' else ''}), " \
             f"{'zero-shot' if d.captioner == 'hf' else 'trained on the train split only'}"
    record = {
        "per_target": count, "added": len(examples), "duplicate_beams_dropped": duplicates,
        "targets": len(task.targets), "source": source,
    }
    log.info("pseudo-queries: %d generated captions for %d image targets (%d duplicate beams dropped)",
             len(examples), len(task.targets), duplicates)
    return PseudoQueries(examples=examples, texts=texts, record=record)
