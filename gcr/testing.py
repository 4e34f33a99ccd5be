"""The scheme test kit: :func:`check_scheme` is the conformance suite every identifier scheme must pass.

A scheme author runs one call in a test::

    from gcr.testing import check_scheme

    def test_my_scheme_keeps_the_contract(tmp_path):
        check_scheme(MyScheme, workdir=tmp_path, levels=2)   # the scheme's options as keywords

It builds the scheme from its declared ``Options`` and ``requirements`` and checks, on real small data (the
generated shapes corpus) with a real word-level tokenizer:

* **options**: the given options build; an unknown option, a value of the wrong type and a value out of a
  declared range are refused with :class:`~gcr.errors.ConfigError`; ``config()`` is plain JSON and rebuilds
  an equal scheme;
* **fit**: one non-empty identifier per target, unique unless ``requirements.shares_identifiers``; features
  are passed only when ``requirements.features`` (and refused when missing); empty descriptions are refused
  when ``requirements.descriptions``;
* **determinism**: a fresh scheme with the same seed gives the same identifiers;
* **tokens**: every identifier token is either spelled by the tokenizer or in ``new_tokens()`` (the real
  :class:`~gcr.index.IdentifierIndex` tokenizes them); word schemes add no tokens;
* **state**: ``state_dict()`` is plain JSON, and a scheme rebuilt from ``config()`` + ``load_state_dict``
  assigns the same identifiers to new targets as the original (when :meth:`assign` is supported), which
  are new, well formed and covered by ``new_tokens()``;
* **rationales**: one sentence per target exactly when ``requirements.rationales``;
* **CLI** (``cli=True``, when the scheme is registered): a tiny ``gcr fit scheme=NAME`` and ``gcr eval`` in
  subprocesses.

This module imports no Lightning and no W&B (the CLI step runs them in a subprocess).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from gcr.data.corpus import Content, Target
from gcr.errors import ConfigError, IdentifierError
from gcr.schemes.base import IdentifierScheme
from gcr.schemes.helpers.options import SchemeRequirements

#: the CLI budget: seconds, not a result worth reading
CLI_BUDGET = (
    "data.num_images=40", "trainer.max_epochs=1", "dense.max_epochs=1", "model.hidden_size=32",
    "model.num_layers=1", "decoding.num_beams=3", "directions=[t2i]", "description=heldout",
)
#: targets held back from ``fit`` to test ``assign``
HELD_OUT = 5


class SchemeContractError(AssertionError):
    """A scheme broke its contract; the message names the check and what was seen."""


def _expect(condition: bool, check: str, message: str) -> None:
    if not condition:
        raise SchemeContractError(f"{check}: {message}")


@dataclasses.dataclass
class ShapesSample:
    """Real small data for the checks: shapes targets (text = one caption), pixel features, the captions."""

    targets: list[Target]
    features: np.ndarray
    captions: list[str]
    fingerprint: str


def shapes_sample(root: str | Path, num_images: int = 40) -> ShapesSample:
    """Generate (once) the shapes corpus under ``root``; each image target is described by its last caption
    (as ``description=heldout`` does) and featurised by its 8x8 RGB thumbnail (unit rows)."""
    from PIL import Image

    from gcr.data.sources import load_shapes

    corpus = load_shapes(str(root), num_images=num_images)
    targets = [Target(im.image_id, im.split, Content.image(im.path), im.captions[-1].text) for im in corpus.images]
    rows = []
    for im in corpus.images:
        with Image.open(im.path) as img:
            rows.append(np.asarray(img.convert("RGB").resize((8, 8), Image.BILINEAR), dtype=np.float32).ravel())
    x = np.stack(rows)
    x -= x.mean(0)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6)
    captions = [c.text for im in corpus.images for c in im.captions]
    return ShapesSample(targets, x.astype(np.float32), captions, corpus.fingerprint())


def check_scheme(
    scheme_class: type[IdentifierScheme],
    *,
    workdir: str | Path | None = None,
    cli: bool = True,
    seed: int = 0,
    num_images: int = 40,
    **options: Any,
) -> dict[str, str]:
    """Run the conformance suite on ``scheme_class`` built with ``options``; raise
    :class:`SchemeContractError` (an ``AssertionError``) at the first broken rule.

    ``workdir``: where the shapes corpus and CLI runs go (a temporary folder when None). ``cli``: also run a
    tiny ``gcr fit`` + ``gcr eval`` in subprocesses when the scheme is registered (needs the training
    extras). Returns ``{check: outcome}`` for every check, e.g. to print.
    """
    _expect(isinstance(scheme_class, type) and issubclass(scheme_class, IdentifierScheme), "class",
            f"{scheme_class!r} is not an IdentifierScheme subclass")
    _expect(bool(scheme_class.name), "class", "set the class attribute `name` (what users type: scheme=NAME)")
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="gcr-check-") as tmp:
            return check_scheme(scheme_class, workdir=tmp, cli=cli, seed=seed, num_images=num_images, **options)
    workdir = Path(workdir)
    report: dict[str, str] = {}
    report["options"] = check_options(scheme_class, seed=seed, **options)
    data = shapes_sample(workdir / "shapes", num_images=num_images)
    report.update(check_fit(scheme_class, data, seed=seed, **options))
    if cli:
        report["cli"] = check_cli(scheme_class, workdir / "cli", seed=seed, **options)
    return report


# -- options ----------------------------------------------------------------------------------------
def check_options(scheme_class: type[IdentifierScheme], *, seed: int = 0, **options: Any) -> str:
    """Options build; unknown, mistyped and out-of-range values are refused with ConfigError; ``config()``
    is plain JSON and rebuilds an equal scheme."""
    scheme = _build(scheme_class, seed, options)
    req = scheme.requirements
    _expect(isinstance(req, SchemeRequirements), "requirements",
            f"`requirements` must be a SchemeRequirements, got {req!r}")
    config = scheme.config()
    _expect(config.get("seed") == seed, "config", f"config() must hold seed={seed}, got {config!r}")
    _expect(json.loads(json.dumps(config)) == config, "config", f"config() must be plain JSON, got {config!r}")
    rebuilt = scheme_class(**config)
    _expect(rebuilt.config() == config, "config", "a scheme rebuilt from config() has another config()")
    _refused(scheme_class, seed, {**options, "no_such_option": 1}, "an unknown option", must_name="no_such_option")
    tried = 1
    hints = typing.get_type_hints(scheme_class.Options)
    for f in dataclasses.fields(scheme_class.Options):
        for bad, what in _bad_values(f, hints[f.name]):
            _refused(scheme_class, seed, {**options, f.name: bad}, f"{f.name}={bad!r} ({what})", must_name=f.name)
            tried += 1
    return f"ok: built, config() round trip, {tried} bad values refused"


def _bad_values(f: dataclasses.Field, hint: Any) -> list[tuple[Any, str]]:
    if typing.get_origin(hint) is Literal:
        return [("__not_a_choice__", "not one of the choices")]
    if hint is bool:
        return [("maybe", "not true or false")]
    out: list[tuple[Any, str]] = []
    if hint in (int, float):
        out.append(("abc", "not a number"))
        ge, gt = f.metadata.get("ge"), f.metadata.get("gt")
        if ge is not None:
            out.append((ge - 1 if hint is int else ge - 0.5, f"below the declared range >= {ge}"))
        if gt is not None:
            out.append((gt, f"outside the declared range > {gt}"))
    return out


def _refused(scheme_class: type[IdentifierScheme], seed: int, options: dict[str, Any], what: str,
             must_name: str) -> None:
    try:
        scheme_class(seed=seed, **options)
    except ConfigError as exc:
        _expect(must_name in str(exc), "options", f"the error for {what} must name {must_name!r}: {exc}")
        return
    except Exception as exc:  # noqa: BLE001 -- any other exception is the contract broken
        raise SchemeContractError(f"options: {what} must raise ConfigError, raised {type(exc).__name__}: {exc}") from exc
    raise SchemeContractError(f"options: {what} was accepted; it must raise ConfigError")


def _build(scheme_class: type[IdentifierScheme], seed: int, options: dict[str, Any]) -> IdentifierScheme:
    try:
        return scheme_class(seed=seed, **options)
    except ConfigError as exc:
        raise SchemeContractError(f"options: the options {options!r} were refused: {exc}") from exc


# -- fit, tokens, state --------------------------------------------------------------------------------
def check_fit(scheme_class: type[IdentifierScheme], data: ShapesSample, *, seed: int = 0,
              **options: Any) -> dict[str, str]:
    """Fit, determinism, tokens, state round trip, assign and rationales on ``data``."""
    from gcr.index import IdentifierIndex
    from gcr.models.tokenizer import train_corpus_tokenizer

    report: dict[str, str] = {}
    probe = _build(scheme_class, seed, options)
    req = probe.requirements
    tokenizer = train_corpus_tokenizer(data.captions, 1000, reserved_words=probe.reserved_words())
    targets, fitted, held = data.targets, data.targets[:-HELD_OUT], data.targets[-HELD_OUT:]
    x = data.features if req.features else None
    x_fit = None if x is None else x[:-HELD_OUT]
    x_held = None if x is None else x[-HELD_OUT:]

    def fresh() -> IdentifierScheme:
        scheme = _build(scheme_class, seed, options)
        scheme.bind_tokenizer(tokenizer)
        return scheme

    if req.features:
        _expect_config_error(lambda: fresh().fit(targets, None), "requirements",
                             "requirements.features is declared, so fit without features must raise ConfigError")
    if req.descriptions:
        blank = [dataclasses.replace(t, text="") for t in targets]
        _expect_config_error(lambda: fresh().fit(blank, x), "requirements",
                             "requirements.descriptions is declared, so empty descriptions must raise ConfigError")

    scheme = fresh()
    ids = scheme.fit(targets, x)
    _well_formed(ids, len(targets), "fit")
    if not req.shares_identifiers:
        dupes = len(ids) - len(set(ids))
        _expect(dupes == 0, "unique", f"{dupes} identifiers are shared, and requirements.shares_identifiers is "
                                      "false (add a suffix, or declare it)")
    report["fit"] = f"ok: {len(ids)} identifiers, {len(set(ids))} distinct"

    again = fresh().fit(targets, x)
    _expect(again == ids, "deterministic", f"a second fit with seed={seed} gave other identifiers "
                                           f"(e.g. {_first_difference(ids, again)})")
    report["deterministic"] = "ok"

    new_tokens = scheme.new_tokens()
    if req.words:
        _expect(not new_tokens, "tokens", f"requirements.words is declared but new_tokens() gives {new_tokens[:5]}")
    tok = _with_tokens(tokenizer, new_tokens)
    index = IdentifierIndex.build(scheme, [t.target_id for t in targets], ids, direction="t2i",
                                  corpus_fingerprint=data.fingerprint)
    try:
        index.tokenize(tok)
    except IdentifierError as exc:
        raise SchemeContractError(f"tokens: every identifier token must be spelled by the tokenizer or be in "
                                  f"new_tokens(): {exc}") from exc
    report["tokens"] = f"ok: {len(new_tokens)} new tokens cover every identifier"

    rationales = scheme.rationales()
    if req.rationales:
        _expect(len(rationales) == len(targets) and all(isinstance(r, str) and r for r in rationales),
                "rationales", f"requirements.rationales is declared: give one sentence per target "
                              f"({len(targets)}), got {len(rationales)}")
    else:
        _expect(rationales == [], "rationales", "rationales() returns sentences but requirements.rationales is false")
    report["rationales"] = "ok"

    state = scheme.state_dict()
    _expect(json.loads(json.dumps(state)) == state, "state", "state_dict() must be plain JSON (arrays as .tolist())")
    report.update(_check_assign(scheme_class, fresh, seed, options, tokenizer, fitted, held, x_fit, x_held))
    return report


def _check_assign(scheme_class, fresh, seed, options, tokenizer, fitted, held, x_fit, x_held) -> dict[str, str]:
    scheme = fresh()
    ids = scheme.fit(fitted, x_fit)
    state = json.loads(json.dumps(scheme.state_dict()))
    reloaded = scheme_class(**scheme.config())
    reloaded.bind_tokenizer(tokenizer)
    reloaded.load_state_dict(state)
    try:
        new = scheme.assign(held, x_held)
    except NotImplementedError:
        return {"state": "ok: plain JSON", "assign": "not supported (assign raises NotImplementedError)"}
    _well_formed(new, len(held), "assign")
    if not scheme.requirements.shares_identifiers:
        clash = (set(new) & set(ids)) or (len(set(new)) != len(new))
        _expect(not clash, "assign", "assign gave identifiers already in use; they must be new (or declare "
                                     "requirements.shares_identifiers)")
    again = reloaded.assign(held, x_held)
    _expect(again == new, "state", "a scheme rebuilt from config() + load_state_dict(state_dict()) assigns other "
                                   f"identifiers than the original (e.g. {_first_difference(new, again)})")
    tokens = set(scheme.new_tokens())
    tok = _with_tokens(tokenizer, sorted(tokens))
    unk = tok.unk_token_id
    for ident in new:
        ids_ = tok(ident, add_special_tokens=False)["input_ids"]
        _expect(bool(ids_) and unk not in ids_, "assign", f"the assigned identifier {ident!r} has a token neither "
                                                          "spelled by the tokenizer nor in new_tokens()")
    return {"state": "ok: plain JSON, rebuilt scheme assigns the same", "assign": f"ok: {len(new)} new identifiers"}


def _with_tokens(tokenizer: Any, tokens: Sequence[str]) -> Any:
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.add_tokens(list(tokens), special_tokens=False)
    return tok


def _well_formed(ids: Any, n: int, check: str) -> None:
    _expect(isinstance(ids, list) and len(ids) == n, check, f"must return a list of {n} identifiers, got "
                                                            f"{type(ids).__name__} of {len(ids) if hasattr(ids, '__len__') else '?'}")
    bad = [i for i in ids if not isinstance(i, str) or not i.strip()]
    _expect(not bad, check, f"identifiers must be non-empty strings, got {bad[:3]!r}")


def _expect_config_error(call, check: str, message: str) -> None:
    try:
        call()
    except ConfigError:
        return
    except Exception as exc:  # noqa: BLE001
        raise SchemeContractError(f"{check}: {message}; it raised {type(exc).__name__}: {exc}") from exc
    raise SchemeContractError(f"{check}: {message}; it returned normally")


def _first_difference(a: Sequence[str], b: Sequence[str]) -> str:
    for i, (u, v) in enumerate(zip(a, b)):
        if u != v:
            return f"target {i}: {u!r} vs {v!r}"
    return f"{len(a)} vs {len(b)} identifiers"


# -- the CLI ---------------------------------------------------------------------------------------------
def check_cli(scheme_class: type[IdentifierScheme], workdir: str | Path, *, seed: int = 0, timeout: int = 900,
              **options: Any) -> str:
    """A tiny ``gcr fit scheme=NAME`` and ``gcr eval`` of its run, in subprocesses; skipped (said so in the
    returned outcome) when ``scheme_class`` is not what ``scheme=NAME`` resolves to."""
    from gcr.registry import SCHEMES

    name = scheme_class.name
    try:
        registered = SCHEMES.get(name) is scheme_class
    except Exception:  # noqa: BLE001 -- an unknown name is a RegistryError
        registered = False
    if not registered:
        return f"skipped: scheme={name} does not resolve to {scheme_class.__qualname__} (register it to run the CLI)"
    workdir = Path(workdir)
    from gcr.config import config_dir

    has_yaml = (config_dir() / "scheme" / f"{name}.yaml").exists()
    overrides = [f"{'' if has_yaml else '+'}scheme.{k}={_hydra_value(v)}" for k, v in options.items()]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")]))
    fit = _gcr(["fit", f"scheme={name}", f"seed={seed}", f"output_dir={workdir / 'runs'}",
                f"data.root={workdir / 'data'}", *CLI_BUDGET, *overrides], env, timeout)
    _expect(fit.returncode == 0, "cli", f"gcr fit scheme={name} failed:\n{fit.stderr[-3000:]}")
    (results_path,) = list((workdir / "runs").glob("*/results.json"))
    rows = [r for r in json.loads(results_path.read_text())["rows"] if r["method"] == name]
    _expect(len(rows) == 1 and 0.0 <= rows[0]["metrics"]["R@1"] <= 1.0, "cli",
            f"results.json must hold one {name} row with R@1 in [0, 1], got {rows}")
    ev = _gcr(["eval", f"ckpt={results_path.parent}"], env, timeout)
    _expect(ev.returncode == 0, "cli", f"gcr eval ckpt={results_path.parent} failed:\n{ev.stderr[-3000:]}")
    return f"ok: gcr fit + gcr eval, R@1={rows[0]['metrics']['R@1']:.3f} (a tiny budget; not a result)"


def _hydra_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ",".join(_hydra_value(v) for v in value) + "]"
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(value)


def _gcr(args: list[str], env: dict[str, str], timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gcr.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
