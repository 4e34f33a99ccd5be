"""Tests of the Karpathy-split loader and the generated shapes dataset."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from gcr.data.corpus import Corpus
from gcr.data.karpathy import load_image, load_karpathy
from gcr.data.shapes import (
    CAPTIONS_PER_IMAGE,
    JSON_NAME,
    generate_shapes,
    read_header,
    relations,
)
from gcr.data.shapes import caption_ambiguity as shapes_ambiguity
from gcr.errors import ConfigError, DataError

# --------------------------------------------------------------------------- Karpathy fixture


def _png(color: tuple[int, int, int] = (200, 30, 30), size: int = 16) -> bytes:
    # Noise so the PNG has a real IDAT to truncate.
    rng = np.random.default_rng(sum(color))
    pixels = (rng.integers(0, 255, (size, size, 3)) // 2 + np.array(color) // 2).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def _jpeg(size: int = 64) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 255, (size, size, 3)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG")
    return buf.getvalue()


def _sentence(sentid: int, raw: str) -> dict[str, Any]:
    return {"raw": raw, "tokens": raw.lower().strip(" .").split(), "sentid": sentid}


def _karpathy_data() -> dict[str, Any]:
    return {
        "dataset": "minitest",
        "images": [
            {
                "filename": "a.png",
                "imgid": 0,
                "split": "train",
                "sentids": [0, 1],
                "sentences": [_sentence(0, "  A red square.  "), _sentence(1, "A red box on grey.")],
            },
            {
                "filename": "b.png",
                "imgid": 1,
                "split": "val",
                "sentids": [2],
                "sentences": [_sentence(2, "A green thing.")],
            },
            {
                "filename": "c.png",
                "imgid": 2,
                "split": "test",
                "sentids": [3, 4],
                # no raw: the tokens are the text; no sentid: the id falls back to image#k
                "sentences": [{"tokens": ["a", "blue", "dot"]}, _sentence(4, "Blue dot.")],
            },
            {  # COCO style: subfolder, cocoid, restval
                "filepath": "val2014",
                "filename": "COCO_val2014_000000391895.png",
                "imgid": 3,
                "cocoid": 391895,
                "split": "restval",
                "sentids": [5],
                "sentences": [_sentence(5, "A man riding a bike.")],
            },
        ],
    }


def _write_dataset(root: Path, data: dict[str, Any] | None = None) -> Path:
    data = _karpathy_data() if data is None else data
    for entry in data["images"]:
        if "filename" not in entry:
            continue
        path = root / entry.get("filepath", "") / entry["filename"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_png())
    json_path = root / "dataset.json"
    json_path.write_text(json.dumps(data), encoding="utf-8")
    return json_path


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return _write_dataset(tmp_path)


def _load_modified(tmp_path: Path, change, **kwargs) -> Corpus:
    data = _karpathy_data()
    change(data["images"])
    return load_karpathy(_write_dataset(tmp_path, data), tmp_path, **kwargs)


# --------------------------------------------------------------------------- loader: good input


def test_load_karpathy_reads_ids_texts_paths_and_splits(dataset: Path) -> None:
    corpus = load_karpathy(dataset, dataset.parent)
    assert corpus.name == "minitest"
    assert [im.image_id for im in corpus.images] == ["0", "1", "2", "391895"]
    assert [im.split for im in corpus.images] == ["train", "val", "test", "train"]  # restval -> train
    first = corpus.images[0]
    assert first.path == dataset.parent / "a.png"
    assert [(c.caption_id, c.text, c.image_id) for c in first.captions] == [
        ("0", "A red square.", "0"),
        ("1", "A red box on grey.", "0"),
    ]
    third = corpus.images[2]
    assert [(c.caption_id, c.text) for c in third.captions] == [("2#0", "a blue dot"), ("4", "Blue dot.")]
    coco = corpus.images[3]
    assert coco.path == dataset.parent / "val2014" / "COCO_val2014_000000391895.png"
    assert [c.image_id for c in coco.captions] == ["391895"]
    assert corpus.meta["split_counts"] == {"train": 2, "val": 1, "test": 1}
    assert len(corpus.captions("train")) == 3


def test_load_karpathy_options(dataset: Path) -> None:
    corpus = load_karpathy(dataset, dataset.parent, name="mine", restval_as="val", check_images="full")
    assert corpus.name == "mine"
    assert corpus.images[3].split == "val"
    with pytest.raises(ConfigError, match="check_images"):
        load_karpathy(dataset, dataset.parent, check_images="sometimes")
    with pytest.raises(ConfigError, match="restval_as"):
        load_karpathy(dataset, dataset.parent, restval_as="holdout")


def test_load_image_returns_rgb(dataset: Path) -> None:
    img = load_image(dataset.parent / "a.png")
    assert img.mode == "RGB" and img.size == (16, 16)


# --------------------------------------------------------------------------- loader: bad input


def test_missing_json_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found") as err:
        load_karpathy(tmp_path / "nope.json", tmp_path)
    assert "nope.json" in str(err.value) and "fix" in str(err.value)


def test_invalid_json(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"images": [', encoding="utf-8")
    with pytest.raises(DataError, match="not valid JSON") as err:
        load_karpathy(path, tmp_path)
    assert "line 1" in str(err.value)


def test_non_utf8_json(tmp_path: Path) -> None:
    path = tmp_path / "latin1.json"
    path.write_bytes('{"images": [], "dataset": "caf\u00e9"}'.encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8") as err:
        load_karpathy(path, tmp_path)
    assert "re-encode" in str(err.value)


def test_missing_images_key(tmp_path: Path) -> None:
    path = tmp_path / "other.json"
    path.write_text('{"annotations": []}', encoding="utf-8")
    with pytest.raises(DataError, match="no top-level 'images'"):
        load_karpathy(path, tmp_path)


def test_missing_image_file(dataset: Path) -> None:
    (dataset.parent / "val2014" / "COCO_val2014_000000391895.png").unlink()
    with pytest.raises(DataError, match="missing image file") as err:
        load_karpathy(dataset, dataset.parent, check_images="exists")
    assert "COCO_val2014_000000391895.png" in str(err.value) and "391895" in str(err.value)
    assert "fix" in str(err.value)


def test_corrupt_image_bytes(dataset: Path) -> None:
    (dataset.parent / "b.png").write_bytes(b"this is not an image at all")
    # "exists" does not look inside the file; "open" does.
    assert len(load_karpathy(dataset, dataset.parent, check_images="exists").images) == 4
    with pytest.raises(DataError, match="corrupt or truncated") as err:
        load_karpathy(dataset, dataset.parent, check_images="open")
    assert "b.png" in str(err.value) and "image id 1" in str(err.value)


def test_truncated_png_full_check(dataset: Path) -> None:
    path = dataset.parent / "c.png"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated") as err:
        load_karpathy(dataset, dataset.parent, check_images="full")
    assert "c.png" in str(err.value)


def test_truncated_jpeg_is_caught_by_the_default_check(tmp_path: Path) -> None:
    data = _karpathy_data()
    data["images"][0]["filename"] = "a.jpg"
    json_path = _write_dataset(tmp_path, data)
    jpeg = _jpeg()
    (tmp_path / "a.jpg").write_bytes(jpeg[: len(jpeg) // 2])  # headers intact, scan data cut
    assert len(load_karpathy(json_path, tmp_path, check_images="exists").images) == 4
    for mode in ("open", "full"):  # open (the default) reads the end-of-image marker; full decodes
        with pytest.raises(DataError, match="truncated") as err:
            load_karpathy(json_path, tmp_path, check_images=mode)
        assert "a.jpg" in str(err.value)


def test_image_broken_inside_is_named_by_id_and_json_entry_in_training(tmp_path: Path) -> None:
    data = _karpathy_data()
    data["images"][0]["filename"] = "a.jpg"
    json_path = _write_dataset(tmp_path, data)
    jpeg = bytearray(_jpeg())
    table = jpeg.index(b"\xff\xc4")  # garble a Huffman table: header and end marker stay intact
    jpeg[table + 5 : table + 25] = b"\xff" * 20
    (tmp_path / "a.jpg").write_bytes(bytes(jpeg))
    corpus = load_karpathy(json_path, tmp_path, check_images="open")  # passes the cheap check
    record = next(im for im in corpus.images if im.path.name == "a.jpg")
    with pytest.raises(DataError, match="corrupt or truncated") as err:
        load_image(record.path)  # what a backbone calls when training reads the image
    message = str(err.value)
    assert f"image id {record.image_id}" in message and "entry 0 of" in message and str(json_path) in message
    with pytest.raises(DataError, match="a.jpg"):
        load_karpathy(json_path, tmp_path, check_images="full")


def test_load_image_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="missing image file"):
        load_image(tmp_path / "gone.png")
    (tmp_path / "junk.png").write_bytes(b"\x89PNG junk")
    with pytest.raises(DataError, match="corrupt or truncated") as err:
        load_image(tmp_path / "junk.png")
    assert "junk.png" in str(err.value)
    (tmp_path / "half.png").write_bytes(_png()[:300])
    with pytest.raises(DataError, match="corrupt or truncated"):
        load_image(tmp_path / "half.png")


def test_empty_caption(tmp_path: Path) -> None:
    def change(images):
        images[1]["sentences"][0]["raw"] = "   "

    with pytest.raises(DataError, match="empty caption") as err:
        _load_modified(tmp_path, change)
    assert "sentid '2'" in str(err.value) and "image entry 1" in str(err.value)


def test_overlong_caption_loads_whole_and_every_model_input_is_capped(tmp_path: Path) -> None:
    """A 20,000-word caption is kept as written (it is data); the backbone's prompt cuts it to max_text_tokens."""
    from gcr.data.corpus import Content
    from gcr.models.tiny import TinyBackbone

    long = " ".join(["red"] * 20_000)

    def change(images):
        images[1]["sentences"][0]["raw"] = long

    corpus = _load_modified(tmp_path, change)
    assert long in {c.text for c in corpus.captions()}
    backbone = TinyBackbone.create(corpus, hidden_size=32, num_layers=1, num_heads=2, vision_hidden_size=32,
                                   vision_layers=1, image_size=32, patch_size=8)
    prompt = backbone.prompt_ids(Content.text(long))
    assert len(prompt) == backbone.max_text_tokens + 2  # BOS + capped caption + separator


def test_duplicate_image_id(tmp_path: Path) -> None:
    def change(images):
        images[2]["imgid"] = 0

    with pytest.raises(DataError, match="duplicate image id '0'") as err:
        _load_modified(tmp_path, change)
    assert "entries 0 and 2" in str(err.value)


def test_duplicate_caption_id(tmp_path: Path) -> None:
    def change(images):
        images[1]["sentences"][0]["sentid"] = 1

    with pytest.raises(DataError, match=r"duplicate caption id \(sentid\) '1'") as err:
        _load_modified(tmp_path, change)
    assert "'0'" in str(err.value) and "'1'" in str(err.value)


def test_missing_split(tmp_path: Path) -> None:
    def change(images):
        images[2]["split"] = "val"

    with pytest.raises(DataError, match="missing split 'test'") as err:
        _load_modified(tmp_path, change)
    assert "test=0" in str(err.value)
    # Not asking for a test split makes the same data load.
    assert len(_load_modified(tmp_path, change, require_splits=("train",)).split("test")) == 0


def test_unknown_split(tmp_path: Path) -> None:
    def change(images):
        images[1]["split"] = "dev"

    with pytest.raises(DataError, match="unknown split 'dev'") as err:
        _load_modified(tmp_path, change)
    assert "image entry 1 (b.png)" in str(err.value)


@pytest.mark.parametrize("field", ["filename", "split", "sentences", "imgid"])
def test_missing_field(tmp_path: Path, field: str) -> None:
    def change(images):
        del images[2][field]

    with pytest.raises(DataError, match=f"image entry 2.*missing field '{field}'") as err:
        _load_modified(tmp_path, change)
    assert "fix" in str(err.value)


def test_sentence_without_text(tmp_path: Path) -> None:
    def change(images):
        images[0]["sentences"][1] = {"sentid": 1}

    with pytest.raises(DataError, match="sentence 1 is missing field 'raw'"):
        _load_modified(tmp_path, change)


# --------------------------------------------------------------------------- shapes generator


@pytest.fixture(scope="module")
def shapes_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_shapes(tmp_path_factory.mktemp("shapes"), 200, seed=0)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_shapes_deterministic(shapes_json: Path, tmp_path: Path) -> None:
    again = generate_shapes(tmp_path / "again", 200, seed=0)
    assert _tree(again.parent) == _tree(shapes_json.parent)  # JSON and every image, byte for byte
    other = generate_shapes(tmp_path / "other", 200, seed=1)
    assert other.read_bytes() != shapes_json.read_bytes()
    first_image = "images/0000/0000000.png"
    assert (other.parent / first_image).read_bytes() != (shapes_json.parent / first_image).read_bytes()


def test_shapes_same_output_with_workers(tmp_path: Path) -> None:
    one = generate_shapes(tmp_path / "one", 600, seed=4, image_size=32)
    two = generate_shapes(tmp_path / "two", 600, seed=4, image_size=32, workers=2)
    assert _tree(one.parent) == _tree(two.parent)


def test_shapes_layout_splits_and_captions(shapes_json: Path) -> None:
    data = json.loads(shapes_json.read_text(encoding="utf-8"))
    images = data["images"]
    assert len(images) == 200
    assert [sum(e["split"] == s for e in images) for s in ("train", "val", "test")] == [160, 20, 20]
    texts = []
    for e in images:
        assert e["filepath"] == "images/0000"
        assert len(e["sentences"]) == CAPTIONS_PER_IMAGE
        raws = [s["raw"] for s in e["sentences"]]
        assert len(set(raws)) == CAPTIONS_PER_IMAGE
        texts += raws
        assert 1 <= len(e["gcr_scene"]["objects"]) <= 3
    assert all(re.fullmatch(r"[a-z]+( [a-z]+|,| ?:)*", t) for t in texts), [
        t for t in texts if not re.fullmatch(r"[a-z]+( [a-z]+|,| ?:)*", t)
    ][:3]
    assert len(set(texts)) > 0.9 * len(texts)
    with Image.open(shapes_json.parent / "images/0000/0000007.png") as img:
        assert img.size == (64, 64) and img.mode == "RGB"
    assert read_header(shapes_json)["params"]["n_images"] == 200


def test_shapes_load_with_karpathy_loader(shapes_json: Path) -> None:
    corpus = load_karpathy(shapes_json, shapes_json.parent, check_images="full")
    assert corpus.name == "shapes"
    assert (len(corpus.split("train")), len(corpus.split("val")), len(corpus.split("test"))) == (160, 20, 20)
    assert len(corpus.captions()) == 1000
    assert load_image(corpus.images[0].path).size == (64, 64)


def test_shapes_folders_hold_at_most_1000_files(tmp_path: Path) -> None:
    generate_shapes(tmp_path, 1001, seed=2, image_size=32)
    folders = sorted((tmp_path / "images").iterdir())
    assert [f.name for f in folders] == ["0000", "0001"]
    assert [len(list(f.iterdir())) for f in folders] == [1000, 1]


def _brute_force_matches(claims: dict[str, Any], scene: dict[str, Any], margin: float) -> bool:
    """A plain re-statement of the claim semantics, to check the vectorized evaluator."""
    from itertools import permutations

    objs = scene["objects"]
    if "count" in claims and len(objs) != claims["count"]:
        return False
    if "background" in claims and scene["background"] != claims["background"]:
        return False
    if "texture" in claims and scene["texture"] != claims["texture"]:
        return False
    described = claims.get("objects", [])
    for chosen in permutations(objs, len(described)):
        if all(all(o[k] == v for k, v in d.items()) for o, d in zip(chosen, described, strict=True)) and all(
            rel in relations(chosen[i], chosen[j], margin) for i, rel, j in claims.get("relations", [])
        ):
            return True
    return False


def test_caption_ambiguity_matches_brute_force(shapes_json: Path) -> None:
    report = shapes_ambiguity(shapes_json, split="test")
    assert report["images"] == 20 and report["captions"] == 100
    assert 0 < report["ambiguous_share"] < 1
    assert report["mean_matches"] >= 1 and report["self_mismatches"] == 0

    data = json.loads(shapes_json.read_text(encoding="utf-8"))
    margin = data["gcr"]["relation_margin_px"]
    scenes = [e["gcr_scene"] for e in data["images"] if e["split"] == "test"]
    counts = [
        sum(_brute_force_matches(s["gcr_claims"], scene, margin) for scene in scenes)
        for e in data["images"]
        if e["split"] == "test"
        for s in e["sentences"]
    ]
    assert min(counts) >= 1  # every caption is true of its own image
    assert report["ambiguous_share"] == pytest.approx(np.mean(np.array(counts) > 1))
    assert report["mean_matches"] == pytest.approx(np.mean(counts))
    # More images to tell apart: more ambiguous.
    assert shapes_ambiguity(shapes_json, split="train")["ambiguous_share"] > report["ambiguous_share"]


def test_caption_ambiguity_rejects_foreign_json(dataset: Path) -> None:
    with pytest.raises(DataError, match="not written by gcr.data.shapes"):
        shapes_ambiguity(dataset)


def test_shapes_not_regenerated_when_present(tmp_path: Path) -> None:
    json_path = generate_shapes(tmp_path, 120, seed=5)
    image = tmp_path / "images/0000/0000003.png"
    stamps = (json_path.stat().st_mtime_ns, image.stat().st_mtime_ns)
    assert generate_shapes(tmp_path, 120, seed=5, workers=2) == json_path
    assert (json_path.stat().st_mtime_ns, image.stat().st_mtime_ns) == stamps
    assert not list(tmp_path.glob(f".{JSON_NAME}*"))  # no temp file left behind
    # Other parameters: regenerated in place.
    generate_shapes(tmp_path, 130, seed=5)
    assert read_header(json_path)["params"]["n_images"] == 130
    assert len(json.loads(json_path.read_text(encoding="utf-8"))["images"]) == 130


def test_shapes_rejects_bad_parameters(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="split_fractions"):
        generate_shapes(tmp_path, 100, split_fractions=(0.5, 0.2, 0.2))
    with pytest.raises(ConfigError, match="no train or no test"):
        generate_shapes(tmp_path, 3, split_fractions=(0.1, 0.0, 0.9))
    with pytest.raises(ConfigError, match="image_size"):
        generate_shapes(tmp_path, 100, image_size=8)
    assert not (tmp_path / JSON_NAME).exists()
