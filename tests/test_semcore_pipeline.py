"""SemCORE through the whole pipeline: generated descriptions, GSV rows, caption-enhanced queries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gcr.cli import compose, config_dir
from gcr.data.corpus import retrieval_task
from gcr.data.sources import load_dataset

pytestmark = pytest.mark.integration  # real subprocesses / full fits: deselect with -m 'not integration'

TINY = [
    "data.num_images=60",
    "trainer.max_epochs=1",
    "dense.max_epochs=1",
    "model.hidden_size=64",
    "model.num_layers=1",
    "decoding.num_beams=4",
    "description.max_epochs=1",
    "scheme.num_clusters=4",
    "directions=[t2i]",
]


@pytest.fixture(scope="module")
def semcore_run(tmp_path_factory):
    from gcr.train.pipeline import fit

    tmp = tmp_path_factory.mktemp("semcore")
    overrides = [f"output_dir={tmp / 'runs'}", f"data.root={tmp / 'data'}", *TINY,
                 "scheme=semcore", "gsv.enabled=true", "augment.pseudo_queries=1"]
    cfg = compose(overrides, config_dir())
    return cfg, fit(cfg)


def test_semcore_run_reports_plain_and_verified_rows(semcore_run):
    cfg, results = semcore_run
    rows = {(r["method"], r["direction"]): r for r in results["rows"]}
    assert set(rows) == {("dense", "t2i"), ("semcore", "t2i"), ("semcore+gsv", "t2i")}
    plain, verified = rows[("semcore", "t2i")], rows[("semcore+gsv", "t2i")]
    assert plain["index"]["description"] == "generated"
    # GSV re-ranks within the top 10 (top_k >= num_beams here): recall at the beam width cannot change
    assert plain["metrics"]["R@5"] == verified["metrics"]["R@5"]
    assert verified["metrics"]["queries_per_s"] < plain["metrics"]["queries_per_s"]


def test_identifiers_are_words_from_the_generated_captions(semcore_run):
    cfg, _ = semcore_run
    run_dir = Path(cfg.output_dir) / cfg.run_name
    index = json.loads((run_dir / "t2i" / "index.json").read_text())
    caches = list(Path(cfg.cache_dir).glob("captions-*.json"))
    assert len(caches) == 1, "the captioner's captions are cached once"
    captions = json.loads(caches[0].read_text())["captions"]
    corpus = load_dataset(cfg.data)
    assert set(captions) == {im.image_id for im in corpus.images}
    vocabulary = {w for text in captions.values() for w in text.lower().split()}
    assert len(set(index["identifiers"])) == len(index["identifiers"]) == len(corpus.images)
    for identifier in index["identifiers"]:
        # a captioner trained for one epoch may write only stop words: those SIDs are bare numbers
        words = [w for w in identifier.split() if w != ";" and not w.isdigit()]
        assert set(words) <= vocabulary, f"{identifier!r} uses words no caption has"


def test_pseudo_queries_add_one_generated_caption_per_image(semcore_run):
    from gcr.index import IdentifierIndex
    from gcr.train.pseudo_queries import pseudo_queries

    cfg, results = semcore_run
    corpus = load_dataset(cfg.data)
    task = retrieval_task(corpus, "t2i")
    index = IdentifierIndex.load(Path(cfg.output_dir) / cfg.run_name / "t2i")
    generated = pseudo_queries(cfg, corpus, task, index, captioner_factory=None)  # captions come from the cache
    assert len(generated.examples) == len(task.targets)
    captions = json.loads(next(Path(cfg.cache_dir).glob("captions-*.json")).read_text())["captions"]
    for example, target in zip(generated.examples, task.targets):
        assert example.content.modality == "text" and example.content.value == captions[target.target_id]
        assert list(example.target) == index.token_ids[index.identifier_of(target.target_id)]
    row = next(r for r in results["rows"] if r["method"] == "semcore")
    assert row["index"]["pseudo_queries"]["added"] == len(task.targets)
    assert "train split only" in row["index"]["pseudo_queries"]["source"]
    cfg.augment.pseudo_queries = 0
    assert pseudo_queries(cfg, corpus, task, index, captioner_factory=None).examples == []
