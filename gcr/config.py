"""Config composition: the root config, its groups and the user's ``key=value`` overrides, checked.

:func:`compose` is the one way a config comes to life (``gcr fit``, ``gcr fit --cfg``, every run of a
``gcr bench``): Hydra composes it, Hydra's errors become one clear :class:`ConfigError`, and
:func:`gcr.config_checks.check_config` refuses bad values and impossible combinations before any work.
"""

from __future__ import annotations

import copy
import itertools
import os
import re
from pathlib import Path
from typing import Any

import yaml

from gcr.errors import ConfigError

#: One naming rule: every config group selects its implementation with ``name`` (``model.name``,
#: ``scheme.name``, ``data.name``, ``dense.name``, ``description.name``, ``features.name``). These keys said
#: the same thing under other names before (old -> new); ``data.name`` was the dataset's label then, now
#: ``data.dataset``. Stored configs (results.json, a run's config.yaml) are read through :func:`upgrade_config`.
SELECTOR_RENAMES = {
    "data.type": "data.name",
    "dense.type": "dense.name",
    "description.source": "description.name",
    "features.encoder": "features.name",
}
_RULE = "every config group selects its implementation with name"


def config_dir(explicit: str | None = None) -> Path:
    """``--config-dir``, else ``$GCR_CONFIG_DIR``, else the repository's ``configs/``, else ``./configs``."""
    for candidate in (explicit, os.environ.get("GCR_CONFIG_DIR"), Path(__file__).resolve().parent.parent / "configs",
                      Path.cwd() / "configs"):
        if candidate and (Path(candidate) / "config.yaml").is_file():
            return Path(candidate).resolve()
    raise ConfigError("no gcr configs found: pass --config-dir DIR (a folder with config.yaml) or set GCR_CONFIG_DIR")


def _plugin_scheme_overrides(overrides: list[str], cdir: Path) -> list[str]:
    """``scheme=NAME`` for a registered scheme without a YAML file uses the generic plugin config."""
    from gcr.registry import SCHEMES

    out = []
    for o in overrides:
        key, _, value = o.partition("=")
        if key == "scheme" and value and not (cdir / "scheme" / f"{value}.yaml").exists():
            if value not in SCHEMES:
                raise ConfigError(SCHEMES.unknown_message(value))
            out += ["scheme=_plugin", f"scheme.name={value}"]
        else:
            out.append(o)
    return out


def compose(overrides: list[str], cdir: Path, *, check: bool = True):
    """Compose the root config with Hydra and check it (:func:`gcr.config_checks.check_config`).

    Hydra's errors become one clear :class:`ConfigError` naming the key and the fix.
    """
    overrides = _plugin_scheme_overrides(overrides, cdir)
    cfg = _hydra_compose(overrides, cdir)
    from gcr.registry import SCHEMES

    if cfg.scheme.name not in SCHEMES:
        raise ConfigError(SCHEMES.unknown_message(cfg.scheme.name))
    if check:
        from gcr.config_checks import check_config

        groups = _groups(cdir)
        choices = [o for o in overrides if o.partition("=")[0].lstrip("+~") in groups or o.startswith("scheme.name=")]
        check_config(cfg, _hydra_compose(choices, cdir))
    return cfg


def _hydra_compose(overrides: list[str], cdir: Path):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(cdir), version_base=None):
            return hydra_compose("config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(_explain_config_error(str(exc), cdir)) from None


def _groups(cdir: Path) -> list[str]:
    return sorted(p.name for p in cdir.iterdir() if p.is_dir() and p.name != "bench")


#: keys gcr used to have -> what to write now (said when an old command line or script uses them)
RENAMED_KEYS: dict[str, str] = {
    "augment.caption_queries": "augment.pseudo_queries=N (N generated captions per image target; true was N=1)",
    **{old: f"{new}=VALUE ({_RULE})" for old, new in SELECTOR_RENAMES.items() if old != "data.type"},
    "data.type": f"data.name=VALUE ({_RULE}); the dataset's label, which data.name was before, is data.dataset",
}


def _explain_config_error(message: str, cdir: Path) -> str:
    groups = _groups(cdir)
    first = message.strip().splitlines()[0]
    key = re.search(r"override '([^']+)'", message) or re.search(r"full_key: (\S+)", message)
    if key and ("not in struct" in message or "Could not override" in message):
        key_name = key.group(1).lstrip("+~")
        if key_name in RENAMED_KEYS:
            return f"{key_name} was renamed; write {RENAMED_KEYS[key_name]}"
        owners = _options_defining(key_name, cdir)
        if owners:
            group = key_name.split(".")[0]
            shown = ", ".join(f"{group}={o}" for o in owners)
            return (f"{key_name} is not a key of the {group} config chosen now; it belongs to {shown}. "
                    f"Select one first, e.g. gcr fit {group}={owners[0]} {key_name}=VALUE")
        return (f"{key_name} is not a config key (see `gcr fit --cfg` for every key); "
                f"add a new key with +{key_name}=VALUE")
    if "Could not find" in message or "Could not load" in message:
        return f"{message.strip()}\nConfig groups: {', '.join(groups)}."
    return first if "Could not override" in message else message.strip()


def _options_defining(key: str, cdir: Path) -> list[str]:
    """The options of the key's group (``data`` for ``data.json``) whose YAML file holds the key."""
    group, _, rest = key.partition(".")
    folder = cdir / group
    if not rest or not folder.is_dir():
        return []
    owners = []
    for path in sorted(folder.glob("*.yaml")):
        node = yaml.safe_load(path.read_text()) or {}
        for part in rest.split("."):
            node = node.get(part, _ABSENT) if isinstance(node, dict) else _ABSENT
        if node is not _ABSENT and not path.stem.startswith("_"):
            owners.append(path.stem)
    return owners


_ABSENT = object()


def upgrade_config(config: dict[str, Any]) -> dict[str, Any]:
    """A stored config (plain dict) with the keys of :data:`SELECTOR_RENAMES` under their new names.

    A config written before the rename has ``data.type`` (the loader) and ``data.name`` (the label): they
    become ``data.name`` and ``data.dataset``. ``augment.caption_queries`` (true/false) becomes
    ``augment.pseudo_queries`` (1/0). A current config comes back equal. The input is not changed.
    """
    out = copy.deepcopy(config)
    data = out.get("data")
    if isinstance(data, dict) and "type" in data:
        if "name" in data:
            data["dataset"] = data.pop("name")
        data["name"] = data.pop("type")
    for old, new in SELECTOR_RENAMES.items():
        group, _, key = old.partition(".")
        node = out.get(group)
        if group != "data" and isinstance(node, dict) and key in node:
            node[new.partition(".")[2]] = node.pop(key)
    augment = out.get("augment")
    if isinstance(augment, dict) and "caption_queries" in augment:
        augment["pseudo_queries"] = int(bool(augment.pop("caption_queries")))
    return out


def load_run_config(path: str | Path):
    """A run folder's ``config.yaml`` as a ``DictConfig``, written by any gcr version (see :func:`upgrade_config`)."""
    from omegaconf import OmegaConf

    return OmegaConf.create(upgrade_config(OmegaConf.to_container(OmegaConf.load(path))))


def sweep(overrides: list[str]) -> list[list[str]]:
    """Expand ``key=a,b`` sweep overrides (Hydra syntax) into one override list per run."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    axes = []
    for o in parsed:
        key = o.get_key_element()
        if o.is_sweep_override():
            axes.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            axes.append([f"{key}={o.get_value_element_as_str()}"])
    return [list(combo) for combo in itertools.product(*axes)]
