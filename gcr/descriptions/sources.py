"""Leakage-free target descriptions for schemes that build identifiers from text (SemCORE, SSI).

A test image's ground-truth captions *are* its test queries, so an identifier built from them leaks the
answer. ``description.name`` picks what describes an image target instead:

* ``generated`` -- a caption written by a captioner that never saw a val/test caption (the run's
  backbone trained to caption the train split, or a pretrained HF MLLM zero-shot). The queries are
  unchanged, so results stay comparable with every other method.
* ``heldout`` -- one caption of each image (``heldout_caption``, default the last) describes it and is
  removed from the val/test *queries*, for every method of the run (dense baseline included), so all
  rows are scored on the same queries.
* ``ground_truth`` -- all captions of the image: leaky, for ablations only.

Caption targets (image-to-text) are described by their own text, whatever the source: their queries are
images, so there is nothing to leak.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from gcr.data.corpus import Corpus, RetrievalTask, retrieval_task
from gcr.errors import ConfigError, DataError

SOURCES = ("generated", "heldout", "ground_truth")
log = logging.getLogger("gcr")


def check_source(source: str) -> str:
    if source not in SOURCES:
        raise ConfigError(f"unknown description.name={source!r}; choose one of {', '.join(SOURCES)} (description=NAME)")
    return source


def heldout_captions(corpus: Corpus, position: int = -1) -> dict[str, str]:
    """The caption id held out of each image (``position`` in its caption list)."""
    held = {}
    for im in corpus.images:
        if len(im.captions) < 2:
            raise DataError(
                f"image {im.image_id!r} has {len(im.captions)} caption(s); description=heldout needs at least two "
                "(one describes the image, the others are its queries); use description=generated"
            )
        if not -len(im.captions) <= position < len(im.captions):
            raise ConfigError(
                f"description.heldout_caption={position} does not exist for image {im.image_id!r}, which has "
                f"{len(im.captions)} captions; use -1 (the last caption) or 0 (the first)"
            )
        held[im.image_id] = im.captions[position].caption_id
    return held


def evaluation_task(task: RetrievalTask, corpus: Corpus, source: str, *, heldout_caption: int = -1) -> RetrievalTask:
    """The task every method of a run is scored on: with ``heldout``, the held-out captions are no val/test queries."""
    if check_source(source) != "heldout":
        return task
    held = set(heldout_captions(corpus, heldout_caption).values())
    if task.direction == "t2i":
        queries = [q for q in task.queries if q.split == "train" or q.query_id not in held]
        return RetrievalTask(task.direction, task.targets, queries)
    # image-to-text: a held-out caption stays a target (it is what the image should retrieve)
    return task


def scored_task(cfg: Any, corpus: Corpus, direction: str) -> RetrievalTask:
    """The ``direction`` task as every method of a run (``cfg``) is scored on it.

    ``description=heldout`` drops the held-out captions from the val/test queries; a config without a
    ``description`` group (runs made before gcr had descriptions) scores every query.
    """
    d = cfg.get("description")
    task = retrieval_task(corpus, direction)
    if d is None:
        return task
    return evaluation_task(task, corpus, d.name, heldout_caption=int(d.heldout_caption))


def describe_targets(
    task: RetrievalTask,
    corpus: Corpus,
    source: str,
    *,
    heldout_caption: int = -1,
    captions: Mapping[str, str] | None = None,
) -> RetrievalTask:
    """``task`` with each image target's ``text`` replaced by its description (caption targets keep theirs)."""
    check_source(source)
    if task.direction != "t2i":
        return task
    if source == "ground_truth":
        log.warning(
            "description=ground_truth: identifiers of test images are built from their own test queries (leaky); "
            "use it for ablations only"
        )
        return task
    if source == "heldout":
        held = heldout_captions(corpus, heldout_caption)
        text = {c.caption_id: c.text for c in corpus.captions()}
        described = {image_id: text[caption_id] for image_id, caption_id in held.items()}
    else:
        if captions is None:
            raise ConfigError("description=generated needs the captioner's captions")
        missing = [t.target_id for t in task.targets if not str(captions.get(t.target_id, "")).strip()]
        if missing:
            raise DataError(
                f"the captioner gave no caption for {len(missing)} images (e.g. {missing[:3]}); "
                "train it longer (description.max_epochs) or use description=heldout"
            )
        described = dict(captions)
    return RetrievalTask(task.direction, [replace(t, text=described[t.target_id]) for t in task.targets], task.queries)
