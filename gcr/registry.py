"""One generic registry for swappable parts: schemes, backbones, datasets.

Built-ins are registered lazily as ``"module:attr"`` strings so that listing them
imports nothing heavy. Third-party packages add entries through the entry-point
group named after the registry (``gcr.schemes``, ``gcr.backbones``, ``gcr.datasets``);
they are discovered on first use. A plugin that fails to import is reported by
name (:meth:`Registry.broken`) and never breaks the others.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from gcr.errors import ConfigError, GcrError

log = logging.getLogger(__name__)
T = TypeVar("T")


class RegistryError(GcrError, KeyError):
    """An unknown, duplicate or broken registry entry."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass
class _Entry:
    name: str
    target: Any  # an object, or a "module:attr" string resolved on first use
    origin: str  # "builtin" or the distribution that provides the plugin
    description: str = ""


class Registry(Generic[T]):
    """Name -> object mapping with lazy built-ins and entry-point plugins.

    >>> schemes = Registry("schemes")
    >>> schemes.register_lazy("atomic", "gcr.schemes.atomic:AtomicScheme", "one new token per target")
    >>> schemes.get("atomic")  # doctest: +SKIP
    <class 'gcr.schemes.atomic.AtomicScheme'>
    """

    def __init__(self, kind: str, entry_point_group: str | None = None):
        self.kind = kind
        self.group = entry_point_group or f"gcr.{kind}"
        self._entries: dict[str, _Entry] = {}
        self._broken: dict[str, str] = {}
        self._plugins_loaded = False

    # -- registration -------------------------------------------------------------------------
    def register(self, name: str, obj: T | None = None, *, description: str = "", origin: str = "builtin"):
        """Register ``obj`` under ``name``; without ``obj``, return a class decorator."""
        if obj is None:

            def decorator(o: T) -> T:
                self.register(name, o, description=description, origin=origin)
                return o

            return decorator
        self._add(_Entry(name, obj, origin, description or _first_doc_line(obj)))
        return obj

    def register_lazy(self, name: str, target: str, description: str = "", origin: str = "builtin") -> None:
        """Register ``"module:attr"`` to be imported only when ``name`` is first used."""
        if ":" not in target:
            raise ValueError(f"lazy target must look like 'module:attr', got {target!r}")
        self._add(_Entry(name, target, origin, description))

    def unregister(self, name: str) -> None:
        """Remove ``name`` (no error if absent): a test that registered a part for its duration removes it."""
        self._entries.pop(name, None)

    def _add(self, entry: _Entry) -> None:
        existing = self._entries.get(entry.name)
        if existing is not None and existing.target is not entry.target and existing.target != entry.target:
            raise RegistryError(
                f"duplicate {self.kind} name {entry.name!r}: already registered by {existing.origin}, "
                f"registered again by {entry.origin}. Rename one of them."
            )
        self._entries[entry.name] = entry

    @property
    def singular(self) -> str:
        """``scheme`` for the ``schemes`` registry: how one entry is named in messages."""
        return self.kind[:-1] if self.kind.endswith("s") else self.kind

    # -- discovery ----------------------------------------------------------------------------
    def _load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for ep in importlib.metadata.entry_points(group=self.group):
            origin = f"plugin {ep.dist.name if ep.dist else ep.value}"
            try:
                obj = ep.load()
            except Exception as exc:  # a broken plugin must never break gcr
                self._broken[ep.name] = (
                    f"{self.singular} {ep.name!r} comes from {origin}, which is installed but failed to import "
                    f"({type(exc).__name__}: {exc}); fix the plugin or reinstall it (pip uninstall removes it)"
                )
                log.warning("%s", self._broken[ep.name])
                continue
            try:
                self._add(_Entry(ep.name, obj, origin, _first_doc_line(obj)))
            except RegistryError as exc:
                self._broken[ep.name] = str(exc)
                log.warning("%s", exc)

    def broken(self) -> dict[str, str]:
        """Plugins that were found but could not be loaded, with the reason."""
        self._load_plugins()
        return dict(self._broken)

    # -- lookup -------------------------------------------------------------------------------
    def names(self) -> list[str]:
        self._load_plugins()
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        self._load_plugins()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def get(self, name: str) -> T:
        """The object registered as ``name``; unknown names get close-match suggestions."""
        self._load_plugins()
        entry = self._entries.get(name)
        if entry is None:
            if name in self._broken:
                raise RegistryError(self._broken[name])
            raise RegistryError(self.unknown_message(name))
        if isinstance(entry.target, str):
            module, _, attr = entry.target.partition(":")
            try:
                entry.target = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as exc:
                raise RegistryError(
                    f"{self.singular} {name!r} ({entry.origin}) could not be loaded from {entry.target}: "
                    f"{type(exc).__name__}: {exc}. Install its dependencies or reinstall the package."
                ) from exc
            entry.description = entry.description or _first_doc_line(entry.target)
        return entry.target

    def describe(self) -> list[tuple[str, str, str]]:
        """``(name, origin, one-line description)`` for every entry, sorted by name."""
        self._load_plugins()
        return [(e.name, e.origin, e.description) for _, e in sorted(self._entries.items())]

    def unknown_message(self, name: str) -> str:
        """Why ``name`` is not usable: a broken plugin's import error, else close matches and every name."""
        choices = self.names()
        close = difflib.get_close_matches(name, choices, n=3)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        if name in self._broken:
            return self._broken[name]
        return f"unknown {self.singular} {name!r}.{hint} Available: {', '.join(choices) or '(none)'}."

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Instantiate the registered class/factory ``name`` with the given arguments."""
        factory: Callable[..., Any] = self.get(name)  # type: ignore[assignment]
        try:
            return factory(*args, **kwargs)
        except TypeError as exc:
            raise ConfigError(f"cannot build {self.kind} {name!r} with {sorted(kwargs)}: {exc}") from exc


def _first_doc_line(obj: Any) -> str:
    doc = getattr(obj, "__doc__", None) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


SCHEMES: Registry = Registry("schemes")
BACKBONES: Registry = Registry("backbones")
DATASETS: Registry = Registry("datasets")

SCHEMES.register_lazy("atomic", "gcr.schemes.atomic:AtomicScheme", "GRACE atomic ID: one new token per target")
SCHEMES.register_lazy(
    "hkmeans",
    "gcr.schemes.hkmeans:HierarchicalKMeansScheme",
    "DSI/GRACE structured ID: hierarchical K-Means path over target features",
)
SCHEMES.register_lazy(
    "semcore", "gcr.schemes.semcore:SemcoreScheme", "SemCORE SID: K-Means cluster named in words + KeyBERT keywords"
)
SCHEMES.register_lazy(
    "cart", "gcr.schemes.cart:CartScheme", "CART coarse-to-fine ID: K-Means coarse token + RQ-VAE fine tokens + unique token"
)
SCHEMES.register_lazy(
    "ssi", "gcr.schemes.ssi:SsiScheme", "SSI structured semantic ID: concept words in fields (objects | action | ...)"
)
BACKBONES.register_lazy("tiny", "gcr.models.tiny:TinyBackbone", "LLaVA-style HF model from config, random init")
BACKBONES.register_lazy("hf", "gcr.models.hf:HFBackbone", "any HF image-text-to-text checkpoint (hub name or folder), LoRA")
BACKBONES.register_lazy("smol", "gcr.models.smol:SmolBackbone", "SmolLM2-135M + frozen EfficientNet-Lite0 + projector, offline, LoRA")
BACKBONES.register_lazy("cart", "gcr.models.cart:CartBackbone", "CART: frozen MiniLM/EfficientNet-Lite0 layers, coarse-to-fine fusion, compact decoder")
BACKBONES.register_lazy("compact", "gcr.models.compact:CompactBackbone", "frozen cached query encoder (aligned dense towers | pretrained layers | features) + small identifier decoder")
DATASETS.register_lazy("shapes", "gcr.data.sources:load_shapes", "procedurally drawn scenes, generated locally")
DATASETS.register_lazy("karpathy", "gcr.data.sources:load_karpathy_source", "Flickr30K / MS-COCO Karpathy JSON")
DATASETS.register_lazy("feature_items", "gcr.data.feature_items:load_feature_items", "items as precomputed embeddings (audio, video, ...) + captions")
