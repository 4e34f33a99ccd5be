"""A small synthetic corpus in the feature-items format (:mod:`gcr.data.feature_items`): a worked example.

:func:`write_feature_items_fixture` writes sound-scene "recordings" as embedding files plus their
captions, so examples and tests run on a real corpus on disk without downloading one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from gcr.errors import ConfigError

_SOURCES = (
    ("a dog", "barks"), ("rain", "falls"), ("a car engine", "idles"), ("birds", "chirp"),
    ("people", "talk"), ("a door", "creaks"), ("water", "runs"), ("church bells", "ring"),
    ("the wind", "howls"), ("a train", "rumbles"),
)
_PLACES = (
    "in a park", "on a busy street", "inside a kitchen", "in a forest",
    "at a train station", "near the sea", "in a small room", "under a bridge",
)
_MANNERS = ("loudly", "softly", "far away", "close to the microphone", "again and again")


def _fixture_captions(source: tuple[str, str], place: str, manner: str, count: int) -> list[str]:
    noun, verb = source
    cap = noun[0].upper() + noun[1:]
    templates = [
        f"{cap} {verb} {place}.",
        f"{cap} {verb} {manner}.",
        f"{place[0].upper() + place[1:]}, {noun} {verb} {manner}.",
        f"A recording of {noun} {place}.",
        f"{cap} {verb} {manner} {place}.",
    ]
    return [templates[k % len(templates)] for k in range(count)]


def write_feature_items_fixture(
    root: str | os.PathLike[str],
    num_items: int = 60,
    dim: int = 32,
    seed: int = 0,
    *,
    layout: str = "files",
    modality: str = "audio",
    captions_per_item: int = 5,
    embed: Callable[[list[str]], np.ndarray] | None = None,
    noise: float = 0.1,
) -> Path:
    """Write a small synthetic text-to-``modality`` corpus in the feature-items format; returns the JSON path.

    Each item is a sound scene (source, place, manner) with ``captions_per_item`` captions. Its vector is a
    fixed random linear map of the mean embedding of its captions, plus Gaussian noise of relative scale
    ``noise``: ``embed(texts) -> (n, E)`` (e.g. MiniLM), or by default a one-hot of the scene's facts. So a
    model that aligns text with these vectors can retrieve them. ``layout="files"`` writes one (D,) file
    per item (``feats/<id>.npy``); ``"matrix"`` writes one (N, D) ``all.npy`` and ``feature_index``.
    Splits: 60% train, 10% val, 30% test. The features root is ``root``.
    """
    if layout not in ("files", "matrix"):
        raise ConfigError(f"unknown layout {layout!r}; choose files or matrix")
    scenes = [(s, p, m) for s in range(len(_SOURCES)) for p in range(len(_PLACES)) for m in range(len(_MANNERS))]
    if not 3 <= num_items <= len(scenes):
        raise ConfigError(f"num_items must be between 3 and {len(scenes)}, got {num_items}")
    rng = np.random.default_rng(seed)
    chosen = [scenes[i] for i in rng.permutation(len(scenes))[:num_items]]
    captions = [_fixture_captions(_SOURCES[s], _PLACES[p], _MANNERS[m], captions_per_item) for s, p, m in chosen]
    if embed is None:
        width = len(_SOURCES) + len(_PLACES) + len(_MANNERS)
        base = np.zeros((num_items, width), dtype=np.float64)
        for i, (s, p, m) in enumerate(chosen):
            base[i, [s, len(_SOURCES) + p, len(_SOURCES) + len(_PLACES) + m]] = 1.0
    else:
        flat = np.asarray(embed([c for caps in captions for c in caps]), dtype=np.float64)
        base = flat.reshape(num_items, captions_per_item, -1).mean(axis=1)
    mapping = rng.normal(size=(base.shape[1], dim)) / np.sqrt(base.shape[1])
    clean = base @ mapping
    vectors = (clean + noise * clean.std() * rng.normal(size=clean.shape)).astype(np.float32)

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    n_train, n_val = max(1, round(0.6 * num_items)), max(1, round(0.1 * num_items))
    items = []
    if layout == "matrix":
        np.save(root / "all.npy", vectors)
    for i in range(num_items):
        item_id = f"{modality[0]}{i:04d}"
        split = "train" if i < n_train else "val" if i < n_train + n_val else "test"
        item: dict[str, Any] = {"id": item_id, "split": split}
        if layout == "matrix":
            item.update(feature="all.npy", feature_index=i)
        else:
            (root / "feats").mkdir(exist_ok=True)
            np.save(root / "feats" / f"{item_id}.npy", vectors[i])
            item["feature"] = f"feats/{item_id}.npy"
        item["sentences"] = [
            {"raw": text, "sentid": i * captions_per_item + k} for k, text in enumerate(captions[i])
        ]
        items.append(item)
    json_path = root / "items.json"
    payload = {"dataset": f"synthetic-{modality}", "modality": modality, "items": items}
    json_path.write_text(json.dumps(payload, indent=1), encoding="utf-8")
    return json_path
