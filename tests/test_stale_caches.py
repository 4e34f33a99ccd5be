"""No stale cache: a rewritten image changes the corpus fingerprint, so every cache built from it is rebuilt.

Real parts: the shapes corpus on disk, a real two-stage fit (dense baseline, features, hkmeans index, tiny
model), real PNG files rewritten in place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from gcr.cli import compose, config_dir
from gcr.data.sources import load_dataset

pytestmark = pytest.mark.integration

TINY = ["data.num_images=40", "trainer.max_epochs=1", "dense.max_epochs=1", "model.hidden_size=32",
        "model.num_layers=1", "decoding.num_beams=3", "directions=[t2i]", "scheme=hkmeans", "scheme.k=3",
        "scheme.leaf_size=4"]


def _caches(cache_dir: Path) -> set[str]:
    return {p.name for p in cache_dir.iterdir()}


def test_fingerprint_covers_file_path_size_and_mtime(tmp_path):
    cfg = compose([f"data.root={tmp_path / 'data'}", "data.num_images=20"], config_dir())
    corpus = load_dataset(cfg.data)
    before = corpus.fingerprint()
    assert load_dataset(cfg.data).fingerprint() == before  # deterministic
    path = corpus.images[0].path
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # same bytes, new mtime
    assert load_dataset(cfg.data).fingerprint() != before
    # the same JSON read against a copy of the image folder elsewhere is another corpus
    moved = tmp_path / "copy"
    os.rename(path.parent, moved)
    os.symlink(moved, path.parent)  # same relative paths in the JSON, other files behind them
    assert load_dataset(cfg.data).fingerprint() != before


def test_rewritten_image_rebuilds_features_dense_and_index(tmp_path):
    from gcr.train.pipeline import fit

    overrides = [f"output_dir={tmp_path / 'runs'}", f"data.root={tmp_path / 'data'}", *TINY]
    cfg = compose(overrides, config_dir())
    fit(cfg)
    cache = Path(cfg.cache_dir)
    first_caches = _caches(cache)
    run_dir = Path(cfg.output_dir) / cfg.run_name
    first_index = json.loads((run_dir / "t2i" / "index.json").read_text())

    corpus = load_dataset(cfg.data)
    target = corpus.split("test")[0].path
    with Image.open(target) as im:
        Image.new(im.mode, im.size, "white").save(target)  # new pixels, same path

    fit(compose([*overrides, "run_name=after-rewrite"], config_dir()))
    new = _caches(cache) - first_caches
    assert any(name.startswith("dense-") for name in new), new  # the dense baseline retrained
    assert any(name.endswith(".pt") for name in new), new  # target features re-extracted
    index = json.loads((Path(cfg.output_dir) / "after-rewrite" / "t2i" / "index.json").read_text())
    assert index["corpus_fingerprint"] != first_index["corpus_fingerprint"]
    assert load_dataset(cfg.data).fingerprint() == index["corpus_fingerprint"]
