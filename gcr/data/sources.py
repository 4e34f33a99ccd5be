"""Dataset sources by the data config's ``name`` (the loader): the generated shapes data, or a Karpathy JSON.

Items given as precomputed embeddings (audio, video, ...) load through
:func:`gcr.data.feature_items.load_feature_items` (``name: feature_items``). A loader is called with the data
config's other keys; ``data.dataset`` (the corpus label) reaches it as ``name``.
"""

from __future__ import annotations

from pathlib import Path

from gcr.data.corpus import Corpus


def load_shapes(
    root: str, num_images: int = 1000, seed: int = 0, image_size: int = 64, check_images: str = "open", **_: object
) -> Corpus:
    """Generate the shapes corpus under ``root`` (once; reused after) and load it."""
    from gcr.data.karpathy import load_karpathy
    from gcr.data.shapes import caption_ambiguity, generate_shapes

    json_path = generate_shapes(Path(root), num_images, seed=seed, image_size=image_size)
    corpus = load_karpathy(json_path, json_path.parent, name="shapes", check_images=check_images)
    ambiguity = caption_ambiguity(json_path, split="test")
    # recorded in every results JSON: how often a test caption fits more than one test image
    corpus.meta["test_caption_ambiguity"] = {k: ambiguity[k] for k in ("ambiguous_share", "mean_matches")}
    return corpus


def load_karpathy_source(
    json: str, images: str, name: str | None = None, restval_as: str = "train", check_images: str = "open", **_: object
) -> Corpus:
    """Flickr30K / MS-COCO in Karpathy-split JSON, images read from ``images``."""
    from gcr.data.karpathy import load_karpathy

    return load_karpathy(Path(json), Path(images), name=name, restval_as=restval_as, check_images=check_images)


def load_dataset(cfg) -> Corpus:
    """Load the corpus a ``data`` config describes, dispatching on its ``name`` (the loader).

    The loader gets the config's other keys as keyword arguments, ``dataset`` (the corpus label) as ``name``.
    """
    from gcr.registry import DATASETS

    options = {k: v for k, v in dict(cfg).items() if k not in ("name", "dataset")}
    if cfg.get("dataset") is not None:
        options["name"] = cfg["dataset"]
    return DATASETS.get(cfg["name"])(**options)
