"""Every built-in scheme keeps the scheme contract (gcr.testing.check_scheme), its YAML cannot drift from its
options dataclass, and the kit itself catches schemes that break the contract."""

from __future__ import annotations

import dataclasses
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from threadpoolctl import threadpool_limits

from gcr.errors import ConfigError
from gcr.registry import SCHEMES
from gcr.schemes import SchemeRequirements, option
from gcr.schemes.atomic import AtomicScheme
from gcr.testing import SchemeContractError, check_cli, check_scheme

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "scheme"
BUILT_IN = ("atomic", "hkmeans", "cart", "semcore", "ssi")
#: small options so each check runs in seconds
SMALL = {
    "atomic": {},
    "hkmeans": {"k": 3, "leaf_size": 5},
    "cart": {"coarse_k": 4, "levels": 2, "codebook_size": 8, "steps": 30, "hidden_dim": 16, "latent_dim": 8},
    "semcore": {"num_clusters": 4},
    "ssi": {"parser": "lexicon"},
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One shapes corpus for the whole module (check_scheme generates it once under workdir/shapes)."""
    return tmp_path_factory.mktemp("contract")


@pytest.fixture(autouse=True)
def _one_blas_thread():
    with threadpool_limits(limits=1):
        yield


@pytest.mark.parametrize(
    ("name", "options"),
    [(n, SMALL[n]) for n in BUILT_IN] + [("semcore", {"num_clusters": 4, "collisions": "verify"})],
)
def test_every_built_in_scheme_keeps_the_contract(name, options, workdir):
    report = check_scheme(SCHEMES.get(name), workdir=workdir, cli=False, **options)
    assert set(report) >= {"options", "fit", "deterministic", "tokens", "rationales", "state", "assign"}
    assert report["assign"].startswith("ok"), report  # every built-in supports incremental indexing
    assert "bad values refused" in report["options"]


@pytest.mark.parametrize("name", BUILT_IN)
def test_the_yaml_holds_exactly_the_options_and_their_defaults(name):
    """configs/scheme/NAME.yaml is the user-facing copy of the Options dataclass: same keys, same defaults."""
    cls = SCHEMES.get(name)
    yaml_options = {k: v for k, v in yaml.safe_load((CONFIGS / f"{name}.yaml").read_text()).items() if k != "name"}
    defaults = cls.Options().to_dict()
    assert list(yaml_options) == list(defaults), "same options, in the same order"
    assert yaml_options == defaults
    assert cls().config() == {"seed": 0, **defaults}


def test_requirements_follow_the_options():
    semcore = SCHEMES.get("semcore")
    assert semcore().requirements == SchemeRequirements(descriptions=True, words=True)
    assert semcore(collisions="verify").shares_identifiers
    assert semcore(global_features="target").needs_features
    assert not semcore(global_features="target", parts="lexical").needs_features
    assert SCHEMES.get("ssi").requires == SchemeRequirements(descriptions=True, words=True, rationales=True)


def test_option_errors_name_the_option_and_its_range():
    with pytest.raises(ConfigError, match=r"scheme\.k=1 is not valid: it must be k >= 2"):
        SCHEMES.get("hkmeans")(k=1)
    with pytest.raises(ConfigError, match=r"scheme\.parts='all'.*one of both, global, lexical"):
        SCHEMES.get("semcore")(parts="all")
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['kk'\].*valid: \['k', 'leaf_size', 'minibatch_above'"):
        SCHEMES.get("hkmeans")(kk=3)


# --------------------------------------------------------------------------- the kit catches broken schemes


class _RandomIds(AtomicScheme):
    """Identifiers that change from run to run."""

    name = "random_ids"

    def fit(self, targets, features=None):
        ids = super().fit(targets, features)
        random.Random().shuffle(ids)
        return ids


class _ForgetsTokens(AtomicScheme):
    name = "forgets_tokens"

    def new_tokens(self):
        return super().new_tokens()[:-1]


class _SharesSilently(AtomicScheme):
    name = "shares_silently"

    def fit(self, targets, features=None):
        ids = super().fit(targets, features)
        return [ids[0], *ids[1:-1], ids[0]]


class _LaxOptions(AtomicScheme):
    name = "lax_options"

    @dataclasses.dataclass
    class Options(AtomicScheme.Options):
        width: int = option(3, ge=1)

        def __post_init__(self) -> None:
            if isinstance(self.width, int) and self.width < 1:
                raise ValueError("width must be positive")  # not a ConfigError: the kit refuses it
            super().__post_init__()


@pytest.mark.parametrize(
    ("scheme", "check"),
    [(_RandomIds, "deterministic"), (_ForgetsTokens, "tokens"), (_SharesSilently, "unique")],
)
def test_the_kit_catches_a_broken_scheme(scheme, check, workdir):
    with pytest.raises(SchemeContractError, match=f"^{check}:"):
        check_scheme(scheme, workdir=workdir, cli=False)


def test_the_kit_refuses_options_that_fail_without_a_config_error():
    with pytest.raises(SchemeContractError, match="width=0.*must raise ConfigError"):
        check_scheme(_LaxOptions, cli=False)


def test_the_cli_step_is_skipped_for_an_unregistered_scheme(tmp_path):
    assert check_cli(_RandomIds, tmp_path).startswith("skipped")


@pytest.mark.integration
@pytest.mark.parametrize("name", BUILT_IN)
def test_every_built_in_scheme_fits_and_evaluates_through_the_cli(name, tmp_path):
    outcome = check_cli(SCHEMES.get(name), tmp_path, **SMALL[name])
    assert outcome.startswith("ok: gcr fit + gcr eval"), outcome


def test_the_kit_imports_without_lightning_or_wandb():
    code = ("import sys, gcr.testing; heavy = [m for m in ('lightning', 'pytorch_lightning', 'wandb') if m in sys.modules]; "
            "print(heavy); sys.exit(bool(heavy))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
