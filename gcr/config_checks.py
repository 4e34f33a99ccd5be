"""Every check a composed config must pass before any work starts.

:func:`check_config` runs when a config is composed (``gcr fit``, ``gcr fit --cfg``, every run of a
``gcr bench``), so a bad value or an impossible combination fails in a second, before any data is
generated, any feature extracted or any model trained, and its message names the key the user sets and
the fix. Three layers:

* **values**: no mandatory value left unset (``data.json: ???``); every value has the type of its default
  in the config files (``scheme.k=abc`` where ``k: 10``); the root keys gcr itself reads are in range;
* **the scheme**: built once with its options, so an unknown option or a value it rejects (any
  ``ValueError``/``TypeError`` of its constructor, plugins included) becomes a :class:`ConfigError`
  naming the scheme;
* **combinations**: parts declare what they read and can do (a backbone's ``reads``, ``writes_text``,
  ``spells_words``; a scheme's ``requirements`` (features, words, rationales); a dataset
  loader's ``item_modality``), and each incompatible pair is refused with its fix. No check tests a
  part's name.

The core stays light: this module imports no Lightning and no W&B.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from gcr.errors import ConfigError, GcrError

DIRECTIONS = ("t2i", "i2t")
GSV_MODES = ("likelihood", "prompt")  # gcr.heads.verification.MODES (kept here: composing a config imports no torch)

#: Root keys gcr reads itself, with their allowed range: (low, high, low inclusive). Options of schemes
#: and backbones are checked by the schemes and backbones.
_RANGES: dict[str, tuple[float | None, float | None, bool]] = {
    "trainer.max_epochs": (1, None, True),
    "trainer.batch_size": (1, None, True),
    "trainer.lr": (0, None, False),
    "trainer.weight_decay": (0, None, True),
    "trainer.warmup_ratio": (0, 1, True),
    "trainer.devices": (1, None, True),
    "trainer.log_every_n_steps": (1, None, True),
    "trainer.check_val_every_n_epoch": (0, None, True),
    "dense.max_epochs": (1, None, True),
    "dense.batch_size": (1, None, True),
    "dense.lr": (0, None, False),
    "decoding.num_beams": (1, None, True),
    "eval.batch_size": (1, None, True),
    "features.batch_size": (1, None, True),
    "gsv.top_k": (1, None, True),
    "gsv.weight": (0, None, True),
    "gsv.loss_weight": (0, None, True),
    "gsv.pairs_per_step": (0, None, True),
    "rgs.weight": (0, None, True),
    "rgs.max_tokens": (1, None, True),
    "augment.pseudo_queries": (0, 20, True),
    "data.num_images": (10, None, True),
}


# -- entry point ------------------------------------------------------------------------------------
def check_config(cfg: DictConfig, defaults: DictConfig | None = None) -> None:
    """Refuse ``cfg`` (a :class:`ConfigError` naming the key and the fix) unless every check passes.

    ``defaults``: the same config composed without the user's ``key=value`` overrides (group choices
    kept); each value must have the type of its default there.
    """
    check_values(cfg, defaults)
    scheme = build_checked_scheme(cfg)
    check_combinations(cfg, scheme)


# -- values -------------------------------------------------------------------------------------------
def check_values(cfg: DictConfig, defaults: DictConfig | None = None) -> None:
    """Mandatory values set, types as in the config files, gcr's own keys in range."""
    _check_renamed_keys(cfg)  # first: an old config file may not even resolve (run_name reads data.dataset)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        group = missing[0].split(".")[0]
        node = cfg.get(group)
        # the option files of data are named after their dataset (data=coco: name karpathy, dataset coco)
        chosen = node.get("dataset" if group == "data" else "name") if isinstance(node, DictConfig) else None
        where = f"{group}={chosen} needs" if chosen else "the config needs"
        example = " ".join(f"{k}=VALUE" for k in missing)
        raise ConfigError(f"{where} {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not set; "
                          f"add {example} to the command line")
    if defaults is not None:
        for key, value, default in _paired_leaves(cfg, defaults):
            _check_type(key, value, default)
    for key, (low, high, inclusive) in _RANGES.items():
        value = OmegaConf.select(cfg, key)
        if value is None or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        too_low = low is not None and (value < low if inclusive else value <= low)
        if too_low or (high is not None and value > high):
            bound = f">= {low}" if inclusive else f"> {low}"
            allowed = f"{bound} and <= {high}" if high is not None else bound
            raise ConfigError(f"{key}={value} is out of range: it must be {allowed}")
    source = OmegaConf.select(cfg, "description.name")
    if source is not None:
        from gcr.descriptions.sources import check_source

        check_source(source)
    loader = OmegaConf.select(cfg, "data.name")
    if loader is not None:
        from gcr.registry import DATASETS

        if loader not in DATASETS:
            raise ConfigError(f"data.name={loader} is not a dataset loader; choose one of {', '.join(DATASETS.names())}. "
                              "data.name selects the loader (every config group selects its implementation with "
                              f"name); the dataset's label (run folder, corpus name) is data.dataset, e.g. "
                              f"data.dataset={loader}")
    directions = OmegaConf.select(cfg, "directions")
    if directions is not None:
        bad = [d for d in directions if d not in DIRECTIONS] if isinstance(directions, ListConfig) else [directions]
        if bad or not directions:
            raise ConfigError(f"directions={list(directions) if isinstance(directions, ListConfig) else directions} "
                              f"is not valid: give a non-empty list of {', '.join(DIRECTIONS)}, e.g. directions=[t2i]")
    mode = OmegaConf.select(cfg, "gsv.mode")
    if mode is not None and mode not in GSV_MODES:
        raise ConfigError(f"gsv.mode={mode} is not valid: use one of {', '.join(GSV_MODES)}")
    ks = OmegaConf.select(cfg, "eval.ks")
    if ks is not None and (not isinstance(ks, ListConfig) or not ks or any(not _is_int(k) or k < 1 for k in ks)):
        raise ConfigError(f"eval.ks={ks} is not valid: give a list of positive integers, e.g. eval.ks=[1,5,10]")


def _check_renamed_keys(cfg: DictConfig) -> None:
    """A config file of the old naming (``data.type``, ``dense.type``, ...) is refused with the new key's name."""
    from gcr.config import SELECTOR_RENAMES

    for old, new in SELECTOR_RENAMES.items():
        group, _, key = old.partition(".")
        node = cfg.get(group)
        if isinstance(node, DictConfig) and key in node:
            hint = " and its data.name (the label) to data.dataset" if old == "data.type" else ""
            raise ConfigError(f"{old} is not a key of gcr's configs any more: it was renamed {new}, because every "
                              f"config group selects its implementation with name; rename it in your config "
                              f"file{hint}")


def _paired_leaves(cfg: Any, defaults: Any, prefix: str = "") -> Iterator[tuple[str, Any, Any]]:
    if isinstance(cfg, DictConfig) and isinstance(defaults, DictConfig):
        for key in cfg:
            if key in defaults and not OmegaConf.is_missing(defaults, key) and not OmegaConf.is_missing(cfg, key):
                yield from _paired_leaves(cfg[key], defaults[key], f"{prefix}{key}.")
        return
    yield prefix.rstrip("."), cfg, defaults


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "true or false"
    if _is_int(value):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, ListConfig | list):
        return "a list, e.g. [a,b]"
    if isinstance(value, DictConfig | dict):
        return "a group of keys"
    return "text"


def _check_type(key: str, value: Any, default: Any) -> None:
    """``value`` must have the type of ``default`` (an int is accepted where a float is the default)."""
    if default is None or value is None or isinstance(default, str):
        return
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif _is_int(default):
        ok = _is_int(value)
    elif isinstance(default, float):
        ok = _is_int(value) or isinstance(value, float)
    elif isinstance(default, ListConfig):
        ok = isinstance(value, ListConfig)
    elif isinstance(default, DictConfig):
        ok = isinstance(value, DictConfig)
    else:
        return
    if not ok:
        shown = f"{value!r}" if isinstance(value, str) else str(value)
        raise ConfigError(f"{key}={shown} is not valid: {key} must be {_type_name(default)} "
                          f"(default {OmegaConf.to_yaml(default).strip() if isinstance(default, ListConfig | DictConfig) else default})")


# -- the scheme ---------------------------------------------------------------------------------------
def scheme_options(cfg: DictConfig) -> dict[str, Any]:
    """The scheme's constructor options: every ``scheme.*`` key but ``name``."""
    return {k: v for k, v in OmegaConf.to_container(cfg.scheme, resolve=True).items() if k != "name"}


def build_checked_scheme(cfg: DictConfig):
    """Build ``cfg.scheme`` with its options; any error of the scheme's own checks becomes a ConfigError."""
    from gcr.schemes import build_scheme

    name = cfg.scheme.name
    try:
        return build_scheme(name, seed=int(cfg.seed), **scheme_options(cfg))
    except ConfigError as exc:
        raise ConfigError(f"scheme={name}: {exc} (options are set as scheme.OPTION=VALUE)") from None
    except GcrError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"scheme {name!r} rejected its options: {exc}. "
                          f"Check the scheme.* values (gcr fit scheme={name} --cfg shows them)") from None


# -- combinations ------------------------------------------------------------------------------------
def check_combinations(cfg: DictConfig, scheme: Any) -> None:
    """Refuse every pair of choices that cannot work together, each with its fix."""
    from gcr.registry import BACKBONES, DATASETS

    backbone = BACKBONES.get(cfg.model.name)
    model = f"model={cfg.model.name}"
    reads = set(getattr(backbone, "reads", ("text", "image")))
    writes_text = bool(getattr(backbone, "writes_text", True))
    items = getattr(DATASETS.get(cfg.data.name), "item_modality", "image")

    if items not in reads:
        readers = ", ".join(f"model={n}" for n in _capable(BACKBONES, "reads", items))
        raise ConfigError(f"{model} cannot read the {items} items of data.dataset={cfg.data.dataset}; use a backbone that "
                          f"reads them ({readers or 'none is registered'})")
    dense_type = cfg.dense.get("name", "clip")
    vision_init = cfg.model.get("vision_init", "none")
    needs = scheme.requirements
    needs_dense = (bool(cfg.dense.enabled) or vision_init == "dense"
                   or (needs.features and cfg.features.name == "dense")
                   or bool(backbone.needs_dense(OmegaConf.to_container(cfg.model, resolve=True))))
    if needs_dense and items != "image" and dense_type == "clip":
        raise ConfigError(f"the CLIP-style dense baseline (dense=clip_tiny) reads image pixels, but data.dataset={cfg.data.dataset} "
                          f"holds {items} items; fix: dense=pretrained (frozen MiniLM + the stored vectors), "
                          "or dense.enabled=false")
    if vision_init == "dense":
        if not getattr(backbone, "starts_vision_from_dense", False):
            raise ConfigError(f"model.vision_init=dense: {model} cannot start its vision tower from the dense "
                              "baseline's; set model.vision_init=none")
        if dense_type != "clip":
            raise ConfigError(f"model.vision_init=dense starts the {model} vision tower from the dense baseline's CLIP "
                              f"tower, but dense={_dense_choice(cfg)} has no such tower (frozen pretrained towers); "
                              "fix: model.vision_init=random, or dense=clip_tiny")
    needs_codes = getattr(backbone, "needs_code_vectors", None)
    if needs_codes and needs_codes(OmegaConf.to_container(cfg.model, resolve=True)) and not needs.code_vectors:
        raise ConfigError(f"model.fusion=candidate fuses the query with what the candidate's code tokens mean, and "
                          f"scheme={scheme.name} offers no code vectors; use a scheme that does "
                          f"({_schemes_with_code_vectors()}), or a layer fusion (model.fusion=coarse_fine)")
    if needs.words and not getattr(backbone, "spells_words", True):
        raise ConfigError(f"scheme={scheme.name} writes identifiers in words, but {model} decodes new code tokens only; "
                          f"use a backbone whose tokenizer spells words ({_choices(BACKBONES, 'spells_words', ', ')})")
    if cfg.get("gsv") is not None and cfg.gsv.enabled and not writes_text:
        raise ConfigError(f"gsv.enabled=true verifies candidates by generating text, which {model} cannot do; "
                          f"use {_choices(BACKBONES, 'writes_text', ' or ')}, or gsv.enabled=false")
    if cfg.get("rgs") is not None and cfg.rgs.enabled:
        if not needs.rationales:
            raise ConfigError(f"rgs.enabled=true trains on the scheme's rationales, and scheme={scheme.name} writes none; "
                              "use scheme=ssi, or rgs.enabled=false")
        if not writes_text:
            raise ConfigError(f"rgs.enabled=true needs a backbone that writes text; {model} cannot; "
                              f"use {_choices(BACKBONES, 'writes_text', ' or ')}")
    if needs.text_generator and not writes_text:
        raise ConfigError(f"scheme.generator=mllm asks the run's backbone to write the identifiers, which {model} "
                          "cannot; use scheme.generator=parser, or a backbone that writes text "
                          f"({_choices(BACKBONES, 'writes_text', ', ')})")
    if cfg.get("augment") is not None and cfg.augment.pseudo_queries and "t2i" not in cfg.directions:
        raise ConfigError("augment.pseudo_queries adds generated captions as text-to-image queries (caption targets "
                          "get none), but directions has no t2i; add it (directions=[t2i,i2t]) or set "
                          "augment.pseudo_queries=0")


def _schemes_with_code_vectors() -> str:
    from gcr.registry import SCHEMES

    names = []
    for name in SCHEMES.names():
        try:
            declared = SCHEMES.get(name).requires
        except (GcrError, AttributeError):
            continue
        if getattr(declared, "code_vectors", False):
            names.append(f"scheme={name}")
    return ", ".join(names) or "none is registered"


def _dense_choice(cfg: DictConfig) -> str:
    return "pretrained" if cfg.dense.get("name") == "pretrained" else "clip_tiny"


def _choices(registry: Any, attribute: str, sep: str) -> str:
    return sep.join(f"model={n}" for n in _capable(registry, attribute)) or "none is registered"


def _capable(registry: Any, attribute: str, value: Any = None) -> list[str]:
    """Built-in and plugin entries of ``registry`` that declare ``attribute`` (true, or holding ``value``)."""
    names = []
    for name in registry.names():
        try:
            obj = registry.get(name)
        except GcrError:
            continue
        declared = getattr(obj, attribute, None)
        if value is None and declared:
            names.append(name)
        elif value is not None and declared is not None and value in declared:
            names.append(name)
    return names
