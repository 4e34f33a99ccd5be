"""The ``hf`` backbone on a tiny random LLaVA checkpoint written to disk and loaded by path (no mocks)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from tokenizers.processors import TemplateProcessing
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    LogitsProcessorList,
)

from gcr.data.corpus import Content
from gcr.decoding import TokenTrie, TrieLogitsProcessor
from gcr.errors import ConfigError
from gcr.models.base import IGNORE_INDEX
from gcr.models.hf import HFBackbone
from gcr.models.tokenizer import train_corpus_tokenizer
from gcr.registry import BACKBONES

TEXTS = [
    "a red circle on the left",
    "two blue squares on the right",
    "a green triangle above a small circle",
    "user : assistant : identifier of the matching item :",
]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }} : "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    "\n{% endfor %}{% if add_generation_prompt %}assistant :{% endif %}"
)
IMAGE_SIZE, PATCH = 32, 8
IDS = ["<id_1>", "<id_2>", "<id_3>"]


def _write_checkpoint(directory: Path, *, chat_template: str | None, tied: bool = False) -> Path:
    tokenizer = train_corpus_tokenizer(TEXTS, vocab_size=200)
    # like Llama's tokenizer: BOS is added to every encoded text unless add_special_tokens=False
    bos = (tokenizer.bos_token, tokenizer.bos_token_id)
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[bos]
    )
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    # CLIP adds a CLS feature that the "default" strategy drops: 16 image tokens per image
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=chat_template,
    )  # fmt: skip
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=32,
    )  # fmt: skip
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=tied,
    )  # fmt: skip
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(IMAGE_SIZE // PATCH) ** 2, vision_feature_layer=-1,
        vision_feature_select_strategy="default", tie_word_embeddings=tied,
    )  # fmt: skip
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory



@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return _write_checkpoint(tmp_path_factory.mktemp("llava"), chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def plain_ckpt(tmp_path_factory) -> Path:
    return _write_checkpoint(tmp_path_factory.mktemp("llava-plain"), chat_template=None, tied=True)


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("images") / "red.png"
    Image.new("RGB", (40, 48), (200, 30, 30)).save(path)
    return str(path)


def _backbone(path: Path, **options) -> HFBackbone:
    torch.manual_seed(0)
    options.setdefault("lora", {"dropout": 0.0})
    backbone = HFBackbone.create(None, path=str(path), **options)
    backbone.add_identifier_tokens(IDS)
    return backbone


def _targets(backbone: HFBackbone) -> list[list[int]]:
    tok = backbone.tokenizer
    i1, i2, i3 = tok.convert_tokens_to_ids(IDS)
    return [[i1, tok.eos_token_id], [i2, i1, tok.eos_token_id], [i3, i2, tok.eos_token_id]]


def _logits(backbone: HFBackbone, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return backbone.model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def _train(backbone: HFBackbone, batch: dict, steps: int = 5) -> tuple[float, float]:
    backbone.eval()
    with torch.no_grad():
        before = backbone(batch).item()
    optimizer = torch.optim.AdamW([p for p in backbone.parameters() if p.requires_grad], lr=1e-2)
    backbone.train()
    for _ in range(steps):
        loss = backbone(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    backbone.eval()
    with torch.no_grad():
        after = backbone(batch).item()
    return before, after


# -- 1. loss and training, text and image queries ------------------------------------------------
@pytest.mark.parametrize("modality", ["text", "image"])
def test_loss_is_finite_and_training_lowers_it(ckpt, image, modality):
    backbone = _backbone(ckpt)
    targets = _targets(backbone)[:2]
    if modality == "text":
        contents = [Content.text("a red circle"), Content.text("two blue squares on the right")]
    else:
        contents = [Content.image(image), Content.image(image)]
    batch = backbone.batch(contents, targets)
    if modality == "image":
        assert batch["pixel_values"].shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
        image_id = backbone.tokenizer.convert_tokens_to_ids("<image>")
        assert ((batch["input_ids"] == image_id).sum(1) == (IMAGE_SIZE // PATCH) ** 2).all()
    # only the identifier tokens (with EOS) are supervised, at the end of each row
    for row, target in zip(batch["labels"], targets):
        supervised = row[row != IGNORE_INDEX].tolist()
        assert supervised == target and row[-len(target) :].tolist() == target
    bos = backbone.tokenizer.bos_token_id
    for row, mask in zip(batch["input_ids"], batch["attention_mask"]):  # BOS once: the chat template wrote it
        assert row[mask.bool()][0] == bos and (row == bos).sum() == 1
    before, after = _train(backbone, batch)
    assert torch.isfinite(torch.tensor(before)) and after < before


def test_plain_template_without_chat_template(plain_ckpt, image):
    backbone = _backbone(plain_ckpt)
    assert (
        backbone.prompt_text(Content.text("a red circle")) == "a red circle\nIdentifier of the matching item:"
    )
    assert backbone.prompt_text(Content.image(image)).startswith("<image>\n")
    batch = backbone.batch([Content.image(image)], _targets(backbone)[:1])
    image_id = backbone.tokenizer.convert_tokens_to_ids("<image>")
    assert (batch["input_ids"] == image_id).sum() == (IMAGE_SIZE // PATCH) ** 2
    assert batch["input_ids"][0, 0] == backbone.tokenizer.bos_token_id  # the processor added BOS
    before, after = _train(backbone, batch)
    assert after < before


def test_a_mixed_batch_matches_each_row_alone(ckpt, image):
    """Training batches mix images (indexing) and captions (retrieval): each row must see its own input."""
    backbone = _backbone(ckpt)
    contents = [Content.text("a red circle"), Content.image(image), Content.text("two blue squares")]
    targets = _targets(backbone)[:3]
    together = _logits(backbone, backbone.batch(contents, targets))
    for i, (content, target) in enumerate(zip(contents, targets)):
        alone = _logits(backbone, backbone.batch([content], [target]))
        n = len(target)
        torch.testing.assert_close(together[i, -n - 1 :], alone[0, -n - 1 :], atol=1e-4, rtol=1e-4)


# -- 2. left padding -------------------------------------------------------------------------------
def test_left_padding_gives_the_same_logits(ckpt):
    backbone = _backbone(ckpt)
    _train(
        backbone, backbone.batch([Content.text("a red circle")], _targets(backbone)[:1]), steps=2
    )  # LoRA != 0
    short, long = (
        Content.text("a red circle"),
        Content.text("a green triangle above a small circle on the left"),
    )
    alone = backbone.batch([short])
    padded = backbone.batch([long, short])
    assert padded["attention_mask"][1, 0] == 0  # the short prompt is left-padded
    # positions count real tokens only, as generate() computes them (RoPE alone would not notice a shift)
    real = padded["attention_mask"][1].bool()
    assert padded["position_ids"][1][real].tolist() == list(range(int(real.sum())))
    assert torch.allclose(_logits(backbone, padded)[1, -1], _logits(backbone, alone)[0, -1], atol=1e-4)
    # with targets: the logits at every supervised position match too
    t = _targets(backbone)
    alone = backbone.batch([short], [t[2]])
    padded = backbone.batch([long, short], [t[0], t[2]])
    n = len(t[2])
    assert torch.allclose(_logits(backbone, padded)[1, -n:], _logits(backbone, alone)[0, -n:], atol=1e-4)


# -- 3. identifier tokens --------------------------------------------------------------------------
def test_add_identifier_tokens_mean_resizes(ckpt):
    torch.manual_seed(0)
    backbone = HFBackbone.create(None, path=str(ckpt), lora={"enabled": False})
    old_size = len(backbone.tokenizer)
    old_in = backbone.model.get_input_embeddings().weight.detach().clone()
    old_out = backbone.model.get_output_embeddings().weight.detach().clone()
    assert backbone.add_identifier_tokens([*IDS, "circle", IDS[0]]) == 3  # "circle" is known; no duplicates
    assert len(backbone.tokenizer) == old_size + 3
    assert backbone.add_identifier_tokens(IDS) == 0
    assert backbone.add_identifier_tokens([]) == 0
    new_in = backbone.model.get_input_embeddings().weight.detach()
    new_out = backbone.model.get_output_embeddings().weight.detach()
    assert new_in.shape[0] == new_out.shape[0] == old_size + 3
    assert backbone.model.config.get_text_config().vocab_size == old_size + 3
    for old, new in ((old_in, new_in), (old_out, new_out)):
        assert torch.equal(new[:old_size], old)
        spread = (old - old.mean(0)).norm(dim=1).mean()  # a random row's distance to the mean
        assert ((new[old_size:] - old.mean(0)).norm(dim=1) < 0.05 * spread).all()
    ids = backbone.tokenizer.convert_tokens_to_ids(IDS)
    assert ids == list(range(old_size, old_size + 3))
    assert backbone.tokenizer("<id_2> circle", add_special_tokens=False)["input_ids"][0] == ids[1]


def test_adding_tokens_again_keeps_what_was_trained(ckpt):
    backbone = _backbone(ckpt)
    batch = backbone.batch([Content.text("a red circle")], _targets(backbone)[:1])
    _train(backbone, batch, steps=2)
    before = _logits(backbone, batch)
    assert backbone.add_identifier_tokens(["<id_4>"]) == 1
    after = _logits(backbone, batch)
    assert after.shape[-1] == before.shape[-1] + 1
    assert torch.allclose(after[..., :-1], before, atol=1e-6)
    new_id = backbone.tokenizer.convert_tokens_to_ids("<id_4>")
    assert new_id in backbone.new_token_ids


# -- 4. constrained generation ----------------------------------------------------------------------
@pytest.mark.parametrize("modality", ["text", "image"])
def test_generate_under_the_trie_returns_identifiers(ckpt, image, modality):
    backbone = _backbone(ckpt)
    tok = backbone.tokenizer
    identifiers = _targets(backbone)
    if modality == "text":
        contents = [Content.text("a red circle"), Content.text("two blue squares on the right of a circle")]
    else:
        contents = [Content.image(image), Content.image(image)]
    _train(backbone, backbone.batch(contents, identifiers[:2]), steps=3)
    trie = TokenTrie.build(identifiers, vocab_size=len(tok), eos_token_id=tok.eos_token_id)
    batch = backbone.batch(contents)
    num_beams = 3
    processor = TrieLogitsProcessor(
        trie, prompt_length=batch["input_ids"].shape[1], eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, num_beams=num_beams,
    )  # fmt: skip
    tokens, scores = backbone.generate(
        batch,
        logits_processor=LogitsProcessorList([processor]),
        num_beams=num_beams,
        max_new_tokens=trie.max_length,
    )
    processor.check()
    assert tokens.shape[0] == scores.shape[0] == len(contents) * num_beams
    rows = []
    for row in tokens.tolist():
        row = row[: row.index(tok.eos_token_id) + 1]
        assert row in identifiers
        rows.append(row)
    for i in range(len(contents)):  # the beams of one query are distinct identifiers, best first
        group = rows[i * num_beams : (i + 1) * num_beams]
        assert len({tuple(r) for r in group}) == num_beams
        assert scores[i * num_beams : (i + 1) * num_beams].diff().le(1e-6).all()
    # scores are summed log-probs: teacher forcing each returned identifier gives the same sum
    forced = backbone.batch([c for c in contents for _ in range(num_beams)], rows)
    logprobs = _logits(backbone, forced).log_softmax(-1)[:, :-1]
    labels = forced["labels"][:, 1:]
    picked = logprobs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    assert torch.allclose((picked * (labels != IGNORE_INDEX)).sum(-1), scores, atol=1e-4)


# -- 5. LoRA and persistence ----------------------------------------------------------------------
def test_lora_trains_only_adapters_and_new_rows(ckpt):
    backbone = _backbone(ckpt)
    trainable = [n for n, p in backbone.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "trainable_tokens_delta" in n for n in trainable)
    assert any("embed_tokens" in n and "trainable_tokens_delta" in n for n in trainable)
    assert any("lm_head" in n and "trainable_tokens_delta" in n for n in trainable)
    assert not any("vision_tower" in n or "multi_modal_projector" in n for n in trainable)
    lora_modules = {n.split(".lora_")[0] for n in trainable if "lora_" in n}
    assert lora_modules and all(
        "language_model" in n and n.endswith(("q_proj", "v_proj")) for n in lora_modules
    )
    delta = next(p for n, p in backbone.named_parameters() if "embed_tokens" in n and "trainable_tokens" in n)
    assert delta.shape[0] == len(IDS)


def test_lora_all_linear_stays_in_the_language_model(ckpt):
    backbone = _backbone(ckpt, lora={"target_modules": "all-linear"})
    lora_modules = {
        n.split(".lora_")[0].rsplit(".", 1)[-1] for n, _ in backbone.named_parameters() if "lora_" in n
    }
    assert lora_modules == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not any("vision" in n for n, _ in backbone.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("lora", [{"dropout": 0.0}, {"enabled": False}], ids=["lora", "full"])
def test_save_and_reload_gives_identical_logits(ckpt, image, tmp_path, lora):
    backbone = _backbone(ckpt, lora=lora)
    if not lora.get("enabled", True):
        assert all(p.requires_grad for p in backbone.parameters())
    text = backbone.batch(
        [Content.text("a red circle"), Content.text("a small green triangle")], _targets(backbone)[:2]
    )
    images = backbone.batch([Content.image(image)], _targets(backbone)[:1])
    _train(backbone, text, steps=2)
    _train(backbone, images, steps=2)
    saved = backbone.save(tmp_path / "backbone")
    names = {p.name for p in saved.iterdir()}
    assert "backbone.json" in names and "tokenizer.json" in names
    if lora.get("enabled", True):
        assert {"adapter_config.json", "adapter_model.safetensors"} <= names
        assert "model.safetensors" not in names  # only the adapter, not the base model
    else:
        assert "model.safetensors" in names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]

    reloaded = HFBackbone.from_pretrained(saved)
    reloaded.eval()
    assert len(reloaded.tokenizer) == len(backbone.tokenizer)
    assert reloaded.options() == backbone.options()
    for batch in (text, images):
        assert torch.allclose(_logits(reloaded, batch), _logits(backbone, batch), atol=1e-5)
        assert torch.equal(reloaded.batch([Content.text("a red circle")])["input_ids"],
                           backbone.batch([Content.text("a red circle")])["input_ids"])  # fmt: skip


def test_tied_embeddings_train_and_reload(plain_ckpt, tmp_path):
    backbone = _backbone(plain_ckpt)
    trainable = [n for n, p in backbone.named_parameters() if p.requires_grad and "lora_" not in n]
    assert len(trainable) == 1 and "embed_tokens" in trainable[0]  # PEFT ties the lm_head rows to these
    batch = backbone.batch([Content.text("a red circle")], _targets(backbone)[:1])
    before, after = _train(backbone, batch)
    assert after < before
    reloaded = HFBackbone.from_pretrained(backbone.save(tmp_path / "tied"))
    reloaded.eval()
    assert torch.allclose(_logits(reloaded, batch), _logits(backbone, batch), atol=1e-5)


# -- 6. configuration errors --------------------------------------------------------------------------
def test_config_errors(ckpt):
    with pytest.raises(ConfigError, match="model.path=<hub name or folder>"):
        HFBackbone.create(None)
    with pytest.raises(ConfigError, match="model.path=<hub name or folder>"):
        HFBackbone.create(None, path="???")
    with pytest.raises(ConfigError, match="not a folder"):
        HFBackbone.create(None, path="/nonexistent/model")
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['hidden_size'\]"):
        HFBackbone.create(None, path=str(ckpt), hidden_size=8)
    with pytest.raises(ConfigError, match=r"model.lora option\(s\) \['rank'\]"):
        HFBackbone.create(None, path=str(ckpt), lora={"rank": 4})
    with pytest.raises(ConfigError, match="query"):
        HFBackbone.create(None, path=str(ckpt), prompt="no placeholder")
    with pytest.raises(ConfigError, match="dtype"):
        HFBackbone.create(None, path=str(ckpt), dtype="int8")
    with pytest.raises(ConfigError, match="match no module"):
        HFBackbone.create(None, path=str(ckpt), lora={"target_modules": ["qkv"]})


def test_registered_as_hf(ckpt):
    assert BACKBONES.get("hf") is HFBackbone
    backbone = BACKBONES.get("hf").create(None, path=str(ckpt), lora={"r": 4}, max_text_tokens=3)
    assert backbone.lora["r"] == 4 and backbone.lora["alpha"] == 16
    # captions are cut to max_text_tokens before the prompt is built
    assert backbone.prompt_text(Content.text("a red circle on the left")).count("circle") == 1
    assert "on the left" not in backbone.prompt_text(Content.text("a red circle on the left"))


# -- multimodal RoPE (Qwen2-VL): image_grid_thw, mm_token_type_ids, 3D positions --------------------------
def _write_qwen2_vl(directory: Path) -> Path:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = train_corpus_tokenizer(TEXTS, vocab_size=200)
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<|vision_start|>", "<|vision_end|>", "<|video_pad|>"]}
    )
    # dynamic resolution: 8 px patches merged 2x2, images of 256 to 1024 pixels -> 1 to 4 image tokens
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": 256, "longest_edge": 1024}, patch_size=8, merge_size=2, temporal_patch_size=2
    )
    template = CHAT_TEMPLATE.replace("<image>", "<|vision_start|><image><|vision_end|>")
    Qwen2VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=template
    ).save_pretrained(directory)
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=8,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids("<image>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(config).save_pretrained(directory)
    return directory


def test_qwen2_vl_multimodal_rope(tmp_path, monkeypatch):
    from transformers import Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    # Qwen2VLProcessor insists on a video processor, which needs torchvision (not installed here): build and load
    # it with the image processor and tokenizer only; the image path under test is the real one.
    monkeypatch.setattr(
        Qwen2VLProcessor, "get_attributes", classmethod(lambda cls: ["image_processor", "tokenizer"])
    )
    monkeypatch.setattr(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: type(arg))
    path = _write_qwen2_vl(tmp_path / "qwen2-vl")
    small, large = tmp_path / "small.png", tmp_path / "large.png"
    Image.new("RGB", (16, 16), (20, 30, 200)).save(small)
    Image.new("RGB", (40, 48), (200, 30, 30)).save(large)

    backbone = _backbone(path, lora={"dropout": 0.0, "target_modules": "all-linear"})
    assert backbone.uses_mrope
    assert not any("visual" in n for n, _ in backbone.named_parameters() if "lora_" in n)
    tok, identifiers = backbone.tokenizer, _targets(backbone)
    for contents in (
        [Content.image(str(large)), Content.image(str(small))],
        [Content.text("a red circle"), Content.text("two blue squares on the right")],
    ):
        batch = backbone.batch(contents, identifiers[:2])
        assert batch["mm_token_type_ids"].shape == batch["input_ids"].shape
        if contents[0].modality == "image":
            assert batch["image_grid_thw"].tolist() == [[1, 4, 2], [1, 2, 2]]  # 2 and 1 image tokens
            assert "position_ids" not in batch  # the model computes 3D positions from the mask and the grid
            assert (batch["mm_token_type_ids"] == 1).sum() == 3
        else:
            assert "position_ids" in batch
        before, after = _train(backbone, batch, steps=3)
        assert after < before
        trie = TokenTrie.build(identifiers, vocab_size=len(tok), eos_token_id=tok.eos_token_id)
        queries = backbone.batch(contents)
        processor = TrieLogitsProcessor(
            trie, prompt_length=queries["input_ids"].shape[1], eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id, num_beams=3,
        )  # fmt: skip
        tokens, scores = backbone.generate(
            queries,
            logits_processor=LogitsProcessorList([processor]),
            num_beams=3,
            max_new_tokens=trie.max_length,
        )
        processor.check()
        rows = [r[: r.index(tok.eos_token_id) + 1] for r in tokens.tolist()]
        assert all(r in identifiers for r in rows)
        # training positions (left-padded, 3D for images) agree with generate()'s: same summed log-probs
        forced = backbone.batch([c for c in contents for _ in range(3)], rows)
        logprobs = _logits(backbone, forced).log_softmax(-1)[:, :-1]
        labels = forced["labels"][:, 1:]
        picked = logprobs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        assert torch.allclose((picked * (labels != IGNORE_INDEX)).sum(-1), scores, atol=1e-4)
    reloaded = HFBackbone.from_pretrained(backbone.save(tmp_path / "saved"))
    reloaded.eval()
    batch = backbone.batch([Content.image(str(large)), Content.image(str(small))])
    assert torch.allclose(_logits(reloaded, batch), _logits(backbone, batch), atol=1e-5)


def test_gcr_fit_with_model_hf_trains_and_eval_reproduces(ckpt, tmp_path):
    """The whole pipeline through `model=hf model.path=<folder>`: train, decode valid identifiers, reload."""
    from gcr.cli import compose, config_dir
    from gcr.train.pipeline import evaluate, fit

    cfg = compose(
        [
            f"output_dir={tmp_path / 'runs'}",
            f"data.root={tmp_path / 'data'}",
            "data.num_images=60",
            "model=hf",
            f"model.path={ckpt}",
            "scheme=atomic",
            "directions=[t2i]",
            "dense.enabled=false",
            "trainer.max_epochs=1",
            "trainer.batch_size=16",
            "decoding.num_beams=3",
        ],
        config_dir(),
    )
    results = fit(cfg)
    (row,) = results["rows"]
    assert row["method"] == "atomic" and 0.0 <= row["metrics"]["R@1"] <= row["metrics"]["R@10"] <= 1.0
    run_dir = Path(cfg.output_dir) / cfg.run_name
    saved = run_dir / "t2i" / "backbone"
    assert (saved / "adapter_model.safetensors").is_file() and not list(saved.glob("*.bin"))
    again = evaluate(run_dir)
    assert again["rows"][0]["metrics"]["R@10"] == row["metrics"]["R@10"]
    # the Lightning checkpoint keeps only what trains: the frozen base model is rebuilt from model.path
    last = run_dir / "t2i" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True, map_location="cpu")
    assert saved["gcr_frozen_keys"] and not set(saved["gcr_frozen_keys"]) & set(saved["state_dict"])
    assert any("lora_" in k for k in saved["state_dict"])
    from_ckpt = evaluate(last)
    assert from_ckpt["rows"][0]["metrics"]["R@10"] == row["metrics"]["R@10"]
