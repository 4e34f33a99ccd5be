"""gcr-tiger's own tests: the scheme on real feature vectors, and its registration through the entry point.

Run them after installing the package: ``pip install ./plugins/gcr-tiger && pytest plugins/gcr-tiger/tests``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from gcr.data.corpus import Content, Target
from gcr.errors import ConfigError
from gcr.index import IdentifierIndex
from gcr.registry import SCHEMES
from gcr.schemes import build_scheme


def _data(n=300, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(6, dim))
    x = centers[rng.integers(0, 6, n)] + 0.1 * rng.normal(size=(n, dim))
    targets = [Target(f"t{i}", "train", Content.text(f"item {i}"), f"item {i}") for i in range(n)]
    return targets, x.astype(np.float32)


def test_the_entry_point_registers_the_scheme():
    assert "tiger" in SCHEMES
    from gcr_tiger import TigerScheme

    assert SCHEMES.get("tiger") is TigerScheme


def test_every_target_gets_a_unique_identifier_of_new_tokens():
    targets, x = _data()
    scheme = build_scheme("tiger", levels=2, codebook_size=8)
    ids = scheme.fit(targets, x)
    assert len(set(ids)) == len(ids) == len(targets)
    vocabulary = set(scheme.new_tokens())
    for ident in ids:
        tokens = ["<" + t for t in ident.split("<") if t]
        assert len(tokens) == 3 and set(tokens) <= vocabulary
    index = IdentifierIndex.build(scheme, [t.target_id for t in targets], ids, direction="t2i", corpus_fingerprint="f")
    assert len(index) == len(targets)
    assert 0 < scheme.stats()["collision_rate_before_digit"] <= 1


def test_residual_levels_reduce_the_quantization_error():
    targets, x = _data()
    one, two = build_scheme("tiger", levels=1, codebook_size=8), build_scheme("tiger", levels=2, codebook_size=8)
    one.fit(targets, x)
    two.fit(targets, x)

    def error(scheme):
        codes = scheme.codes(x)
        approx = sum(scheme._codebooks[level][codes[:, level]] for level in range(scheme.levels))
        return float(((x - approx) ** 2).sum(1).mean())

    assert error(two) < error(one)


def test_codes_survive_a_json_round_trip_of_the_state():
    targets, x = _data()
    scheme = build_scheme("tiger", levels=2, codebook_size=8)
    scheme.fit(targets, x)
    reloaded = build_scheme("tiger", **scheme.config())
    reloaded.load_state_dict(json.loads(json.dumps(scheme.state_dict())))
    np.testing.assert_array_equal(reloaded.codes(x), scheme.codes(x))
    new_targets, new_x = _data(n=5, seed=1)
    assert reloaded.assign(new_targets, new_x) == scheme.assign(new_targets, new_x)


def test_bad_options_and_inputs_give_clear_errors():
    with pytest.raises(ConfigError, match="levels >= 1"):
        build_scheme("tiger", levels=0)
    with pytest.raises(ConfigError, match="unknown option"):
        build_scheme("tiger", depth=3)
    targets, x = _data(n=40)
    with pytest.raises(ConfigError, match="needs target features"):
        build_scheme("tiger").fit(targets, None)
    with pytest.raises(ConfigError, match="max_duplicates"):
        build_scheme("tiger", levels=1, codebook_size=2, max_duplicates=2).fit(targets, x)
