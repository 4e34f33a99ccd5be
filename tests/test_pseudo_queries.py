"""Pseudo-queries (augment.pseudo_queries): generated captions for every image target, and no test text leaks.

The leakage test plants canary words in every val/test caption of a real generated dataset, runs the real
pipeline with pseudo-queries on, and checks that no canary reaches the captioner's training pairs, the
generated queries, or any training example.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gcr.config import compose, config_dir
from gcr.data.corpus import retrieval_task
from gcr.data.sources import load_dataset

pytestmark = pytest.mark.integration  # a real fit

CANARY = "zqxcanary"
TINY = [
    "data.num_images=40",
    "trainer.max_epochs=1",
    "dense.max_epochs=1",
    "model.hidden_size=64",
    "model.num_layers=1",
    "decoding.num_beams=3",
    "description.max_epochs=1",
    "scheme=hkmeans",
    "scheme.k=4",
    "augment.pseudo_queries=2",
]


def _plant_canaries(data_root: Path) -> int:
    """Rewrite every val/test caption of the dataset JSON to start with a unique canary word."""
    path = next(data_root.glob("dataset_*.json"))
    dataset = json.loads(path.read_text())
    planted = 0
    for image in dataset["images"]:
        if image["split"] in ("val", "test"):
            for sentence in image["sentences"]:
                sentence["raw"] = f"{CANARY}{planted} " + sentence["raw"]
                sentence["tokens"] = sentence["raw"].split()
                planted += 1
    path.write_text(json.dumps(dataset, separators=(",", ":")))  # the generator reads its header this way
    return planted


@pytest.fixture(scope="module")
def canary_run(tmp_path_factory):
    from gcr.train.pipeline import fit

    tmp = tmp_path_factory.mktemp("pseudo")
    overrides = [f"output_dir={tmp / 'runs'}", f"data.root={tmp / 'data'}", *TINY]
    cfg = compose(overrides, config_dir())
    load_dataset(cfg.data)  # generate the data, then plant the canaries before anything trains
    assert _plant_canaries(Path(cfg.data.root)) > 0
    corpus = load_dataset(cfg.data)
    assert any(CANARY in c.text for c in corpus.captions("test"))
    return cfg, corpus, fit(cfg)


def test_no_val_or_test_caption_reaches_training(canary_run):
    from gcr.descriptions.captioners import train_caption_pairs
    from gcr.index import IdentifierIndex
    from gcr.train.datamodule import training_examples
    from gcr.train.pseudo_queries import pseudo_queries

    cfg, corpus, _ = canary_run
    assert all(CANARY not in text for _, text in train_caption_pairs(corpus)), "the captioner reads train only"
    run_dir = Path(cfg.output_dir) / cfg.run_name / "t2i"
    saved = json.loads((run_dir / "pseudo_queries.json").read_text())["queries"]
    assert CANARY not in json.dumps(saved)
    for cache in Path(cfg.cache_dir).glob("captions-*.json"):
        assert CANARY not in cache.read_text(), cache
    task = retrieval_task(corpus, "t2i")
    index = IdentifierIndex.load(run_dir)
    generated = pseudo_queries(cfg, corpus, task, index, captioner_factory=None)  # from the caches
    examples = training_examples(task, index) + generated.examples
    texts = [e.content.value for e in examples if e.content.modality == "text"]
    assert texts and all(CANARY not in t for t in texts)


def test_every_image_target_gets_its_beams_as_queries(canary_run):
    cfg, corpus, results = canary_run
    run_dir = Path(cfg.output_dir) / cfg.run_name / "t2i"
    saved = json.loads((run_dir / "pseudo_queries.json").read_text())
    task = retrieval_task(corpus, "t2i")
    assert set(saved["queries"]) == {t.target_id for t in task.targets}  # test targets included
    assert all(1 <= len(q) <= 2 and len(set(q)) == len(q) for q in saved["queries"].values())
    ranks = sorted(Path(cfg.cache_dir).glob("captions-*.json"))
    assert len(ranks) == 2 and any("-rank1" in p.name for p in ranks), "each beam rank is cached on its own"
    row = next(r for r in results["rows"] if r["method"] == "hkmeans" and r["direction"] == "t2i")
    record = row["index"]["pseudo_queries"]
    assert record["per_target"] == 2 and record["added"] == sum(len(q) for q in saved["queries"].values())
    assert record["added"] + record["duplicate_beams_dropped"] == 2 * len(task.targets)


def test_caption_targets_get_none_and_say_why(canary_run):
    cfg, _, results = canary_run
    row = next(r for r in results["rows"] if r["method"] == "hkmeans" and r["direction"] == "i2t")
    assert row["index"]["pseudo_queries"]["per_target"] == 0
    assert "generates no images" in row["index"]["pseudo_queries"]["source"]
    assert not (Path(cfg.output_dir) / cfg.run_name / "i2t" / "pseudo_queries.json").exists()


def test_second_beam_differs_from_the_first_per_image(tmp_path):
    """The captioner's rank-1 caption of an image is its second-best beam, not a copy of the best."""
    import torch

    from gcr.models.tiny import TinyBackbone
    from gcr.train.captioner import train_backbone_captioner

    cfg = compose([f"data.root={tmp_path / 'data'}", "data.num_images=20"], config_dir())
    corpus = load_dataset(cfg.data)
    torch.manual_seed(0)
    captioner = train_backbone_captioner(
        corpus, lambda c: TinyBackbone.create(c, hidden_size=32, num_layers=1), max_epochs=1, batch_size=16,
        max_caption_tokens=8, num_beams=3,
    )
    from gcr.data.corpus import Content

    images = [Content.image(im.path) for im in corpus.images[:6]]
    best, second = captioner.caption(images, rank=0), captioner.caption(images, rank=1)
    assert len(best) == len(second) == 6
    assert all(a != b for a, b in zip(best, second))
    with pytest.raises(ValueError, match="rank"):
        captioner.caption(images, rank=-1)
