"""Prefix-aware label smoothing (``model.sibling_smoothing``): the smoothed mass goes to trie siblings only."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from gcr.decoding import TokenTrie
from gcr.errors import ConfigError
from gcr.models.sibling_smoothing import sibling_smoothed_cross_entropy, sibling_targets

EOS, IGNORE, V = 1, -100, 8
A, B, C, D = 4, 5, 6, 7
IDENTIFIERS = [[A, B, EOS], [A, C, EOS], [D, EOS]]


@pytest.fixture()
def trie():
    return TokenTrie.build(IDENTIFIERS, vocab_size=V, eos_token_id=EOS)


def test_siblings_are_the_other_children_of_the_gold_prefix(trie):
    labels = torch.tensor([[A, B, EOS], [D, EOS, IGNORE]])
    siblings = sibling_targets(labels, trie, V, IGNORE)
    as_sets = [[set(torch.nonzero(siblings[n, t]).flatten().tolist()) for t in range(3)] for n in range(2)]
    assert as_sets[0] == [{D}, {C}, set()]  # first token: the other root child; then the other child of A
    assert as_sets[1] == [{A}, set(), set()]  # after D only EOS exists; an ignored position has none


def test_a_prefix_that_leaves_the_trie_gets_no_siblings(trie):
    labels = torch.tensor([[B, A, EOS]])  # B is no root child: nothing after it is on the trie
    assert not sibling_targets(labels, trie, V, IGNORE).any()


def test_the_loss_moves_epsilon_to_the_siblings_and_is_plain_cross_entropy_at_zero(trie):
    torch.manual_seed(0)
    labels = torch.tensor([[A, B, EOS], [D, EOS, IGNORE]])
    logits = torch.randn(2, 3, V)
    plain = F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), ignore_index=IGNORE)
    assert torch.allclose(sibling_smoothed_cross_entropy(logits, labels, trie, 0.0, IGNORE), plain)
    lp = logits.log_softmax(-1)
    eps = 0.2
    by_hand = -(
        (1 - eps) * lp[0, 0, A] + eps * lp[0, 0, D]      # sibling D
        + (1 - eps) * lp[0, 1, B] + eps * lp[0, 1, C]    # sibling C
        + lp[0, 2, EOS]                                  # no sibling: one-hot
        + (1 - eps) * lp[1, 0, D] + eps * lp[1, 0, A]
        + lp[1, 1, EOS]
    ) / 5
    assert math.isclose(float(sibling_smoothed_cross_entropy(logits, labels, trie, eps, IGNORE)), float(by_hand),
                        rel_tol=1e-6)


def test_the_compact_backbone_smooths_over_siblings_in_training_only(corpus, dense):
    from gcr.models.compact import CompactBackbone
    from gcr.models.query_encoders import EncodingCache

    small = {"d_model": 16, "num_layers": 1, "num_heads": 2, "ffn_dim": 32, "dropout": 0.0}
    with pytest.raises(ConfigError, match="sibling_smoothing"):
        CompactBackbone.create(corpus, dense=dense, cache=EncodingCache(), sibling_smoothing=1.5, **small)
    backbone = CompactBackbone.create(corpus, dense=dense, cache=EncodingCache(), sibling_smoothing=0.3, **small)
    backbone.add_identifier_tokens(["<x_0>", "<x_1>", "<x_2>"])
    x0, x1, x2 = backbone.tokenizer.convert_tokens_to_ids(["<x_0>", "<x_1>", "<x_2>"])
    eos = backbone.tokenizer.eos_token_id
    identifiers = [[x0, x1, eos], [x0, x2, eos], [x1, eos]]
    contents = [im.content() for im in corpus.split("train")[:3]]
    batch = backbone.batch(contents, identifiers)
    backbone.train()
    with pytest.raises(ConfigError, match="set_identifier_trie"):
        backbone(batch)
    backbone.set_identifier_trie(TokenTrie.build(identifiers, vocab_size=len(backbone.tokenizer), eos_token_id=eos))
    backbone.sibling_smoothing = 0.0  # first learn the pairs, so each gold token beats its siblings
    optimizer = torch.optim.AdamW(backbone.parameters(), lr=1e-2)
    for _ in range(60):
        optimizer.zero_grad()
        backbone(batch).backward()
        optimizer.step()
    plain = backbone(batch)
    backbone.sibling_smoothing = 0.3
    smoothed = backbone(batch)
    # -[(1 - e) log p(gold) + e log p(sibling)] = plain + e (log p(gold) - log p(sibling)) per position: larger
    assert smoothed > plain + 1e-3
    backbone.eval()  # evaluation scores the plain likelihood
    assert torch.allclose(backbone(batch), plain)


def test_gcr_fit_hands_the_trie_of_every_target_to_the_backbone(tmp_path):
    """Without the trie, training would refuse (above): a finished fit shows the pipeline set it. The same fit
    mixes query and target vectors (model.interpolation: the datamodule hands the backbone each anchor)."""
    import json

    from gcr.cli import compose, config_dir
    from gcr.train.pipeline import fit

    cfg = compose([
        f"output_dir={tmp_path / 'runs'}", f"data.root={tmp_path / 'data'}", "data.num_images=40",
        "data.image_size=32", "model=compact", "scheme=hkmeans", "scheme.k=4", "scheme.leaf_size=4",
        "model.sibling_smoothing=0.1", "model.interpolation=0.5", "directions=[t2i]", "dense.max_epochs=1", "dense.image_size=32",
        "trainer.max_epochs=1", "decoding.num_beams=3", "model.d_model=32", "model.num_layers=1",
        "model.ffn_dim=64", "model.num_heads=2",
    ], config_dir())
    rows = {r["method"]: r for r in fit(cfg)["rows"]}
    assert 0.0 <= rows["hkmeans"]["metrics"]["R@1"] <= 1.0
    saved = json.loads((tmp_path / "runs" / cfg.run_name / "t2i" / "backbone" / "backbone.json").read_text())
    assert saved["sibling_smoothing"] == 0.1 and saved["interpolation"] == 0.5
