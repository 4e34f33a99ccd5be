"""The in-memory corpus: images (or other items) with captions, split train/val/test.

A :class:`Corpus` is what every loader returns (Karpathy JSON, the generated
shapes data, precomputed feature items). :func:`retrieval_task` turns it into the
targets and queries of one retrieval direction:

* ``t2i`` -- targets are images, queries are captions (hit: the caption's image);
* ``i2t`` -- targets are captions, queries are images (hit: any of the image's captions).

An item need not be an image file: a record whose ``modality`` is not ``"image"`` (``"audio"``,
``"video"``, ...) is a precomputed embedding (:mod:`gcr.data.feature_items`) and its content is a
``feature`` :class:`Content`; ``t2i``/``i2t`` then mean text-to-item and item-to-text.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Split = Literal["train", "val", "test"]
SPLITS: tuple[str, ...] = ("train", "val", "test")
Direction = Literal["t2i", "i2t"]
DIRECTIONS: tuple[str, ...] = ("t2i", "i2t")
Modality = Literal["text", "image", "feature"]


@dataclass(frozen=True)
class Caption:
    """One caption of an image. ``caption_id`` is unique over the corpus."""

    caption_id: str
    text: str
    image_id: str


@dataclass(frozen=True)
class ImageRecord:
    """One item with its captions and split: an image file, or a precomputed embedding.

    ``modality`` is ``"image"`` for an image file at ``path``. Any other value (``"audio"``, ``"video"``,
    ...) marks a precomputed feature vector: the ``.npy`` file at ``path``, or its row ``feature_row``.
    """

    image_id: str
    path: Path
    split: str
    captions: tuple[Caption, ...]
    modality: str = "image"
    feature_row: int | None = None

    def content(self) -> Content:
        """What a model reads for this item: ``Content.image(path)`` or ``Content.feature(path, row)``."""
        if self.modality == "image":
            return Content.image(self.path)
        return Content.feature(self.path, self.feature_row)


@dataclass
class Corpus:
    """Images with captions. ``name`` identifies the corpus in caches and results."""

    name: str
    images: list[ImageRecord]
    meta: dict = field(default_factory=dict)
    _fingerprint: str | None = field(default=None, init=False, repr=False, compare=False)

    def split(self, name: str) -> list[ImageRecord]:
        """Images of one split (``train``, ``val`` or ``test``)."""
        return [im for im in self.images if im.split == name]

    def captions(self, split: str | None = None) -> list[Caption]:
        return [c for im in self.images if split is None or im.split == split for c in im.captions]

    def fingerprint(self) -> str:
        """A short hash of everything a cache built from this corpus depends on.

        It covers ids, splits and caption texts, and each item's file: its resolved path, size and
        modification time (image files and ``.npy`` feature files alike; the row too for feature items).
        So pointing the same JSON at another image folder, or rewriting an image in place, changes the
        fingerprint, and every cache keyed by it (features, dense baseline, captions, identifier index,
        trie) is rebuilt rather than served stale. Computed once per corpus object.
        """
        if self._fingerprint is None:
            h = hashlib.sha256()
            signatures: dict[Path, str] = {}
            for im in self.images:
                h.update(f"{im.image_id}\t{im.split}\t{im.modality}\t{im.feature_row}\n".encode())
                if im.path not in signatures:
                    signatures[im.path] = file_signature(im.path)
                h.update(signatures[im.path].encode())
                for c in im.captions:
                    h.update(f"{c.caption_id}\t{c.text}\n".encode())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint


def file_signature(path: Path | str) -> str:
    """``resolved path, size, mtime`` of a file (``missing`` if absent): what changes when the file does.

    Stat-based rather than a content hash: hashing the 4 GB of a Flickr30K image folder at every run
    would cost minutes, a ``stat`` of 31k files costs milliseconds.
    """
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        return f"{p}\tmissing\n"
    return f"{p.resolve()}\t{st.st_size}\t{st.st_mtime_ns}\n"


@dataclass(frozen=True)
class Content:
    """What a model reads: a caption's text, an image file, or a precomputed feature vector.

    A ``feature`` value is ``"<path>"`` (a (D,) ``.npy`` file) or ``"<path>#<row>"`` (row ``row`` of an
    (N, D) file); :func:`gcr.data.feature_items.load_feature_vector` reads it.
    """

    modality: str  # "text" | "image" | "feature"
    value: str  # the text, the image path, or the feature reference as a string

    @staticmethod
    def text(value: str) -> Content:
        return Content("text", value)

    @staticmethod
    def image(path: Path | str) -> Content:
        return Content("image", str(path))

    @staticmethod
    def feature(path: Path | str, row: int | None = None) -> Content:
        """A stored vector: the (D,) file ``path``, or row ``row`` of the (N, D) file ``path``."""
        return Content("feature", str(path) if row is None else f"{path}#{int(row)}")


@dataclass(frozen=True)
class Target:
    """A retrievable item; ``text`` is its ground-truth description (an image's captions).

    For a test image ``text`` contains its test queries: a scheme must never build identifiers
    from it for test targets (the leakage rule); use a held-out or generated description instead.
    """

    target_id: str
    split: str
    content: Content
    text: str


@dataclass(frozen=True)
class Query:
    """A query with the ids of the targets that count as hits."""

    query_id: str
    split: str
    content: Content
    relevant: tuple[str, ...]


@dataclass
class RetrievalTask:
    """Targets and queries of one direction. Targets cover every split (the index)."""

    direction: str
    targets: list[Target]
    queries: list[Query]

    @property
    def target_modality(self) -> str:
        """``"text"``, ``"image"`` or ``"feature"`` (precomputed items)."""
        if self.targets:
            return self.targets[0].content.modality
        return "image" if self.direction == "t2i" else "text"

    @property
    def query_modality(self) -> str:
        if self.queries:
            return self.queries[0].content.modality
        return "text" if self.direction == "t2i" else "image"

    def queries_of(self, split: str) -> list[Query]:
        return [q for q in self.queries if q.split == split]

    def targets_of(self, split: str) -> list[Target]:
        return [t for t in self.targets if t.split == split]


def retrieval_task(corpus: Corpus, direction: str) -> RetrievalTask:
    """Build the targets and queries of ``direction`` (``t2i`` or ``i2t``) from ``corpus``.

    Items are read through :meth:`ImageRecord.content`: image files, or precomputed feature vectors.
    """
    if direction not in DIRECTIONS:
        from gcr.errors import ConfigError

        raise ConfigError(f"unknown direction {direction!r}; choose one of {', '.join(DIRECTIONS)}")
    targets: list[Target] = []
    queries: list[Query] = []
    for im in corpus.images:
        if direction == "t2i":
            targets.append(
                Target(im.image_id, im.split, im.content(), " ".join(c.text for c in im.captions))
            )
            queries.extend(
                Query(c.caption_id, im.split, Content.text(c.text), (im.image_id,)) for c in im.captions
            )
        else:
            targets.extend(Target(c.caption_id, im.split, Content.text(c.text), c.text) for c in im.captions)
            queries.append(
                Query(im.image_id, im.split, im.content(), tuple(c.caption_id for c in im.captions))
            )
    return RetrievalTask(direction, targets, queries)
