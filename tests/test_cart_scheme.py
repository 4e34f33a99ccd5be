"""Tests of the CART scheme: K-Means coarse token + RQ-VAE fine tokens (real vector-quantize-pytorch) + unique token."""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from gcr.data.corpus import Content, Target
from gcr.errors import ConfigError
from gcr.index import IdentifierIndex
from gcr.models.tokenizer import train_corpus_tokenizer
from gcr.registry import SCHEMES
from gcr.schemes import build_scheme
from gcr.schemes.cart import CartScheme

TOKEN = re.compile(r"<[^>]+>")
STEPS = 200
BLOBS, PER_BLOB, DIM = 12, 50, 32
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "scheme" / "cart.yaml"


def _targets(n: int, prefix: str = "t") -> list[Target]:
    return [
        Target(f"{prefix}{i}", "train", Content.image(f"{prefix}{i}.png"), f"image {i}") for i in range(n)
    ]


def _prefix(identifier: str) -> str:
    """Everything before the unique token."""
    return identifier.rsplit("<u_", 1)[0]


@pytest.fixture(scope="module")
def blobs() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(BLOBS, DIM)) * 4
    labels = np.repeat(np.arange(BLOBS), PER_BLOB)
    return (centers[labels] + rng.normal(size=(len(labels), DIM))).astype(np.float32), labels


@pytest.fixture(scope="module")
def fitted(blobs):
    x, _ = blobs
    rng_before = torch.get_rng_state()
    scheme = CartScheme(seed=0, coarse_k=BLOBS, steps=STEPS)
    ids = scheme.fit(_targets(len(x)), x)
    assert torch.equal(torch.get_rng_state(), rng_before), "fit must not touch the global torch RNG"
    return scheme, ids


def test_every_target_gets_a_unique_identifier_that_tokenizes(fitted, blobs):
    scheme, ids = fitted
    assert len(ids) == len(blobs[0]) and len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"<a_\d+><b0_\d+><b1_\d+><b2_\d+><u_\d+>", i) for i in ids), ids[:3]
    tokens = set(scheme.new_tokens())
    assert {t for i in ids for t in TOKEN.findall(i)} <= tokens
    assert len(tokens) == BLOBS + 3 * 32 + scheme.max_unique()
    tok = train_corpus_tokenizer(["a red circle", "a blue square left of a circle"], vocab_size=50)
    tok.add_tokens(scheme.new_tokens())
    index = IdentifierIndex.build(
        scheme, [f"t{i}" for i in range(len(ids))], ids, direction="t2i", corpus_fingerprint="fp"
    ).tokenize(tok)
    assert all(len(t) == 6 for t in index.token_ids)  # 5 identifier tokens + EOS
    assert index.stats()["collision_rate"] == 0.0


def test_codebooks_do_not_collapse_and_stats_are_reported(fitted):
    scheme, _ = fitted
    stats = scheme.stats()
    for level in range(3):
        assert stats[f"fine{level}_used_share"] >= 0.5, stats
        assert stats[f"fine{level}_perplexity"] > 8, stats
    assert stats["coarse_used_share"] == 1.0 and stats["coarse_perplexity"] > BLOBS - 1
    assert 0.0 <= stats["collision_rate_before_unique"] <= 1.0
    assert 0.0 < stats["reconstruction_mse"] < 1.0  # better than predicting zero on unit-RMS residuals
    assert stats["max_unique"] >= 1


def test_coarse_tokens_follow_the_kmeans_structure(fitted, blobs):
    _, ids = fitted
    _, labels = blobs
    coarse = np.array([int(re.match(r"<a_(\d+)>", i).group(1)) for i in ids])
    majority = [Counter(coarse[labels == b]).most_common(1)[0][1] / PER_BLOB for b in range(BLOBS)]
    assert np.mean(majority) >= 0.9, majority
    assert len(set(coarse)) == BLOBS


def test_state_round_trip_gives_the_same_codes(fitted, blobs, tmp_path):
    scheme, ids = fitted
    x, _ = blobs
    state = json.loads(json.dumps(scheme.state_dict(), allow_nan=False))  # strict JSON
    direct = CartScheme(**scheme.config())
    direct.load_state_dict(state)
    before = CartScheme(**scheme.config())
    before.load_state_dict(state)
    reference = [_prefix(i) for i in before.assign(_targets(len(x), "n"), x)]
    assert reference == [_prefix(i) for i in ids]  # assign on the fit features reproduces the fitted prefixes
    assert [_prefix(i) for i in direct.assign(_targets(len(x), "n"), x)] == reference

    IdentifierIndex.build(
        scheme, [f"t{i}" for i in range(len(ids))], ids, direction="t2i", corpus_fingerprint="fp"
    ).save(tmp_path)
    index = IdentifierIndex.load(tmp_path, scheme="cart")
    loaded = CartScheme(**index.scheme_config)
    loaded.load_state_dict(index.scheme_state)
    new = loaded.assign(_targets(len(x), "n"), x)
    assert [_prefix(i) for i in new] == reference
    assert not set(new) & set(ids)  # the unique counters continue after the fitted targets
    assert np.allclose(loaded.codebooks(), scheme.codebooks())


def test_assign_continues_unique_counters_and_new_tokens(blobs):
    x, _ = blobs
    scheme = CartScheme(seed=0, coarse_k=4, steps=20, levels=1, codebook_size=2)
    ids = scheme.fit(_targets(len(x)), x)
    new = scheme.assign(_targets(5, "n"), x[:5])
    assert scheme.assign([], np.zeros((0, DIM), dtype=np.float32)) == []
    assert len(set(ids + new)) == len(ids) + 5
    assert {t for i in ids + new for t in TOKEN.findall(i)} <= set(scheme.new_tokens())
    groups = scheme.token_vectors()
    assert set(groups) == {"coarse", "fine", "unique"}
    assert set(groups["coarse"]) | set(groups["fine"]) | set(groups["unique"]) == set(scheme.new_tokens())
    assert all(v.shape == (DIM,) for v in groups["coarse"].values())  # feature space
    assert all(v.shape == (scheme.latent_dim,) for v in groups["fine"].values())  # RQ-VAE latent space
    assert all(np.abs(v).max() < 0.01 for v in groups["unique"].values())
    assert np.array_equal(groups["unique"]["<u_0>"], scheme.token_vectors()["unique"]["<u_0>"])


def test_ablations_have_the_expected_shapes_and_stay_unique(blobs):
    x, _ = blobs
    no_kmeans = CartScheme(seed=0, coarse=False, steps=50, levels=2)
    ids = no_kmeans.fit(_targets(len(x)), x)
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"<b0_\d+><b1_\d+><u_\d+>", i) for i in ids), ids[:3]
    assert not any(t.startswith("<a_") for t in no_kmeans.new_tokens())
    assert "coarse_used_share" not in no_kmeans.stats()

    no_rqvae = CartScheme(seed=0, fine=False, coarse_k=BLOBS)
    ids = no_rqvae.fit(_targets(len(x)), x)
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"<a_\d+><u_\d+>", i) for i in ids), ids[:3]
    stats = no_rqvae.stats()
    assert stats["collision_rate_before_unique"] == 1.0 and stats["max_unique"] >= PER_BLOB * 0.8
    assert no_rqvae.token_vectors()["fine"] == {}
    assert "reconstruction_mse" not in stats
    state = json.loads(json.dumps(no_rqvae.state_dict(), allow_nan=False))
    again = CartScheme(seed=0, fine=False, coarse_k=BLOBS)
    again.load_state_dict(state)
    assert [_prefix(i) for i in again.assign(_targets(len(x), "n"), x)] == [_prefix(i) for i in ids]


def test_same_seed_same_identifiers_other_seed_other_codes(blobs):
    x, _ = blobs
    options = dict(coarse_k=BLOBS, steps=40)
    a = CartScheme(seed=3, **options).fit(_targets(len(x)), x)
    b = CartScheme(seed=3, **options).fit(_targets(len(x)), x)
    c = CartScheme(seed=4, **options).fit(_targets(len(x)), x)
    assert a == b
    assert a != c


def test_collapse_is_reported_and_unique_token_keeps_ids_distinct(caplog):
    # 12 distinct points, each repeated 20 times: every residual is zero, so the RQ-VAE has one code to give
    x = np.repeat(np.random.default_rng(1).normal(size=(12, 8)), 20, axis=0).astype(np.float32)
    scheme = CartScheme(seed=0, coarse_k=12, steps=10, levels=2, codebook_size=16)
    with caplog.at_level(logging.WARNING, logger="gcr.schemes.cart"):
        ids = scheme.fit(_targets(len(x)), x)
    assert "collapse" in caplog.text
    assert len(set(ids)) == len(ids)
    stats = scheme.stats()
    assert stats["collision_rate_before_unique"] == 1.0 and stats["max_unique"] == 20


def test_tiny_corpora_fit():
    x = np.random.default_rng(2).normal(size=(3, 6)).astype(np.float32)
    ids = CartScheme(seed=0, steps=5).fit(_targets(3), x)
    assert len(set(ids)) == 3


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"coarse_k": 1}, "coarse_k >= 2"),
        ({"levels": 0}, "levels >= 1"),
        ({"codebook_size": 1}, "codebook_size >= 2"),
        ({"steps": 0}, "steps >= 1"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"lr": 0}, "lr > 0"),
        ({"lr": "fast"}, "lr > 0"),
        ({"commitment_weight": -1}, "commitment_weight >= 0"),
        ({"coarse": "yes"}, "true or false"),
        ({"coarse": False, "fine": False}, "scheme=atomic"),
        ({"device": "tpu:x"}, "scheme.device"),
        ({"codebook": 8}, "unknown option"),
    ],
)
def test_bad_options_raise_config_error(options, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        CartScheme(**options)


def test_bad_features_and_unfitted_use_raise_config_error(fitted, blobs):
    x, _ = blobs
    fresh = CartScheme(steps=5)
    with pytest.raises(ConfigError, match="needs target features"):
        fresh.fit(_targets(3), None)
    with pytest.raises(ConfigError, match="expected"):
        fresh.fit(_targets(3), np.zeros((4, 6), dtype=np.float32))
    with pytest.raises(ConfigError, match="expected"):
        fresh.fit(_targets(3), np.zeros(3, dtype=np.float32))
    with pytest.raises(ConfigError, match="NaN"):
        fresh.fit(_targets(2), np.array([[0.0, np.nan], [1.0, 2.0]], dtype=np.float32))
    with pytest.raises(ConfigError, match="fitted"):
        fresh.assign(_targets(2), x[:2])
    with pytest.raises(ConfigError, match="fitted"):
        fresh.stats()
    scheme, _ = fitted
    with pytest.raises(ConfigError, match="32-d"):
        scheme.assign(_targets(2), x[:2, :10])
    with pytest.raises(ConfigError, match="levels=3"):
        CartScheme(levels=2).load_state_dict(scheme.state_dict())


def test_registered_and_buildable_from_its_config_file():
    assert SCHEMES.get("cart") is CartScheme
    options = {k: v for k, v in yaml.safe_load(CONFIG.read_text()).items() if k != "name"}
    scheme = build_scheme("cart", seed=5, **options)
    assert scheme.config() == {"seed": 5, **options}
    assert CartScheme.requires.features and CartScheme().needs_features
