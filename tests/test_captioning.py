"""Captioners that describe every image without reading val/test captions, and the caption cache (no mocks)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import normalizers, pre_tokenizers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from gcr.data.corpus import Content
from gcr.data.sources import load_shapes
from gcr.descriptions.cache import cached_captions, captions_cache_path
from gcr.descriptions.captioners import BackboneCaptioner, HFZeroShotCaptioner, train_caption_pairs
from gcr.errors import DataError
from gcr.models.tiny import TinyBackbone
from gcr.models.tokenizer import train_corpus_tokenizer
from gcr.train.captioner import train_backbone_captioner

TINY = dict(
    vocab_size=200, hidden_size=64, num_layers=1, num_heads=2, vision_hidden_size=32, vision_layers=1,
    image_size=32, patch_size=8,
)  # fmt: skip



@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return load_shapes(str(tmp_path_factory.mktemp("shapes")), num_images=100, image_size=32)


@pytest.fixture(scope="module")
def captioner(corpus) -> BackboneCaptioner:
    return train_backbone_captioner(
        corpus, lambda c: TinyBackbone.create(c, **TINY), max_epochs=6, batch_size=32, lr=5e-3, seed=0
    )


def _held_out(corpus) -> list:
    return [im for im in corpus.images if im.split != "train"]


# -- the leakage rule ---------------------------------------------------------------------------------
def test_training_pairs_come_from_the_train_split_only(corpus, captioner):
    pairs = train_caption_pairs(corpus)
    train, held_out = corpus.split("train"), _held_out(corpus)
    assert held_out and {im.split for im in held_out} == {"val", "test"}
    # exactly the train (image, caption) pairs, each once: no val/test image, no val/test caption
    expected = [(str(im.path), c.text) for im in train for c in im.captions]
    assert sorted((c.value, text) for c, text in pairs) == sorted(expected)
    held_out_paths = {str(im.path) for im in held_out}
    assert not {c.value for c, _ in pairs} & held_out_paths
    only_held_out = {c.text for im in held_out for c in im.captions} - {text for _, text in expected}
    assert only_held_out and not only_held_out & {text for _, text in pairs}
    # what the convenience function really trained on
    assert captioner.trained_images == {str(im.path) for im in train}
    assert not captioner.trained_images & held_out_paths


# -- a tiny backbone trained as a captioner -----------------------------------------------------------
def test_loss_decreases(captioner):
    history = captioner.history
    assert len(history) == 6
    assert history[-1] < 0.7 * history[0]


def test_captions_are_train_vocabulary_sentences(corpus, captioner):
    normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    pre = pre_tokenizers.BertPreTokenizer()
    vocab = {
        w for c in corpus.captions("train") for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(c.text))
    }
    images = [Content.image(im.path) for im in _held_out(corpus)]
    captions = captioner.caption(images, batch_size=8)
    assert len(captions) == len(images)
    for text in captions:
        assert isinstance(text, str) and text.strip() == text and text
        assert set(text.split()) <= vocab, text
    assert len(set(captions)) > 1  # the captioner looks at the image, it is not one fixed sentence


def test_empty_captions_are_an_error(corpus):
    torch.manual_seed(0)
    untrained = BackboneCaptioner(TinyBackbone.create(corpus, **TINY), max_caption_tokens=4)
    eos = untrained.backbone.tokenizer.eos_token_id
    with torch.no_grad():  # an untrained model that always ends at once: every caption is empty
        untrained.backbone.model.lm_head.weight.zero_()
        untrained.backbone.model.lm_head.weight[eos] = 1.0
    images = [Content.image(im.path) for im in corpus.split("test")[:3]]
    with pytest.raises(DataError, match=r"3 of 3 images got an empty caption.*more epochs"):
        untrained.caption(images)
    with pytest.raises(DataError, match="reads images only"):
        untrained.caption([Content.text("a red circle")])


# -- the cache ----------------------------------------------------------------------------------------
class CountingCaptioner:
    """A real caption function that records which images it was asked about; may fail on a given call."""

    def __init__(self, fail_on_call: int | None = None):
        self.calls: list[list[str]] = []
        self.fail_on_call = fail_on_call

    def __call__(self, images):
        self.calls.append([c.value for c in images])
        if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
            raise RuntimeError("interrupted")
        return [f"a picture of {Path(c.value).stem}" for c in images]

    @property
    def captioned(self) -> list[str]:
        return [v for call in self.calls for v in call]


def _inputs(n: int):
    ids = [f"img{i}" for i in range(n)]
    return ids, [Content.image(f"/data/{i}.png") for i in ids]


def test_cache_is_reused_and_only_missing_images_are_captioned(tmp_path):
    ids, images = _inputs(5)
    first = CountingCaptioner()
    got = cached_captions("k1", ids[:3], images[:3], first, cache_dir=tmp_path, corpus_fingerprint="fp")
    assert got == {i: f"a picture of {i}" for i in ids[:3]} and len(first.calls) == 1
    path = captions_cache_path(tmp_path, "fp", "k1")
    assert path.name == "captions-fp-k1.json"
    saved = json.loads(path.read_text())
    assert {k: saved[k] for k in ("kind", "format_version", "corpus_fingerprint", "captioner")} == {
        "kind": "gcr-captions", "format_version": 1, "corpus_fingerprint": "fp", "captioner": "k1",
    }  # fmt: skip

    again = CountingCaptioner()
    assert (
        cached_captions("k1", ids[:3], images[:3], again, cache_dir=tmp_path, corpus_fingerprint="fp") == got
    )
    assert again.calls == []
    more = CountingCaptioner()
    got = cached_captions("k1", ids, images, more, cache_dir=tmp_path, corpus_fingerprint="fp")
    assert more.captioned == ["/data/img3.png", "/data/img4.png"] and list(got) == ids


def test_foreign_or_corrupt_cache_is_recomputed_with_a_warning(tmp_path):
    ids, images = _inputs(3)
    cached_captions("k1", ids, images, CountingCaptioner(), cache_dir=tmp_path, corpus_fingerprint="fp")
    path = captions_cache_path(tmp_path, "fp", "k1")
    # a file of another corpus (or another captioner) under this name is never trusted
    for change in (
        {"corpus_fingerprint": "other"},
        {"captioner": "k2"},
        {"format_version": 99},
        {"kind": "x"},
    ):
        payload = json.loads(path.read_text())
        payload.update(change)
        payload["captions"] = {i: "stale" for i in ids}
        path.write_text(json.dumps(payload))
        fresh = CountingCaptioner()
        with pytest.warns(UserWarning, match="recomputing"):
            got = cached_captions("k1", ids, images, fresh, cache_dir=tmp_path, corpus_fingerprint="fp")
        assert len(fresh.captioned) == 3 and "stale" not in got.values()
        assert json.loads(path.read_text())["corpus_fingerprint"] == "fp"
    path.write_text('{"kind": "gcr-captions", "capt')
    fresh = CountingCaptioner()
    with pytest.warns(UserWarning, match="not valid JSON"):
        cached_captions("k1", ids, images, fresh, cache_dir=tmp_path, corpus_fingerprint="fp")
    assert len(fresh.captioned) == 3


def test_interrupted_captioning_leaves_valid_json_and_resumes(tmp_path):
    ids, images = _inputs(7)
    failing = CountingCaptioner(fail_on_call=2)
    with pytest.raises(RuntimeError, match="interrupted"):
        cached_captions("k", ids, images, failing, cache_dir=tmp_path, corpus_fingerprint="fp", chunk_size=3)
    files = list(tmp_path.iterdir())
    assert [p.name for p in files] == ["captions-fp-k.json"]  # no temp file left behind
    saved = json.loads(files[0].read_text())
    assert set(saved["captions"]) <= set(ids)
    resumed = CountingCaptioner()
    got = cached_captions(
        "k", ids, images, resumed, cache_dir=tmp_path, corpus_fingerprint="fp", chunk_size=3
    )
    assert list(got) == ids
    assert set(resumed.captioned) == {f"/data/{i}.png" for i in ids if i not in saved["captions"]}
    assert len(resumed.captioned) == 4  # the first chunk survived the interruption


def test_cache_with_a_trained_captioner(corpus, captioner, tmp_path):
    images = corpus.split("test")[:4]
    ids, contents = [im.image_id for im in images], [Content.image(im.path) for im in images]
    got = cached_captions("tiny", ids, contents, captioner.caption, cache_dir=tmp_path,
                          corpus_fingerprint=corpus.fingerprint())  # fmt: skip
    assert list(got) == ids and all(isinstance(t, str) and t for t in got.values())


# -- a pretrained checkpoint, zero-shot ---------------------------------------------------------------
def _write_llava(directory: Path) -> Path:
    """A tiny random LLaVA checkpoint with a processor and a chat template, saved like a hub download."""
    texts = ["describe the image in one sentence .", "a red circle on the left", "two blue squares"]
    tokenizer = train_corpus_tokenizer(texts, vocab_size=100)
    template = (
        "{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant :{% endif %}"
    )
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=template,
    )  # fmt: skip
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=32, patch_size=8, projection_dim=32),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), image_seq_length=16,
        vision_feature_layer=-1, vision_feature_select_strategy="default",
    )  # fmt: skip
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def test_hf_zero_shot_captioner_describes_each_image(corpus, tmp_path):
    path = _write_llava(tmp_path / "llava")
    captioner = HFZeroShotCaptioner(str(path), max_new_tokens=6, num_beams=2)
    backbone = captioner.backbone
    assert not any("lora_" in n for n, _ in backbone.named_parameters())  # used as is, no adapter
    images = [Content.image(im.path) for im in corpus.split("test")[:3]]
    prompt = backbone.prompt_text(images[0])
    assert "<image>" in prompt and "Describe the image in one sentence." in prompt
    captions = captioner.caption(images, batch_size=2)
    assert len(captions) == len(images) and all(isinstance(t, str) and t for t in captions)
    # generate_text was what ran: decoded text, the same as calling it directly
    assert captions == backbone.generate_text(backbone.batch(images), num_beams=2, max_new_tokens=6)
    assert (
        captioner.key.startswith("hf-")
        and captioner.key
        != HFZeroShotCaptioner(str(path), prompt="Say what you see.", max_new_tokens=6, num_beams=2).key
    )
