"""The identifier-scheme interface.

A scheme maps targets (and optionally their feature vectors) to identifier
strings. It knows nothing of Lightning or the model: the
:class:`~gcr.index.IdentifierIndex` turns identifiers into token ids under the
model's tokenizer. Schemes whose identifiers use tokens the model does not know
declare them in :meth:`IdentifierScheme.new_tokens`.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np

from gcr.data.corpus import Target
from gcr.errors import ConfigError
from gcr.schemes.helpers.options import SchemeOptions, SchemeRequirements

#: the old per-scheme flags, now fields of :class:`SchemeRequirements`
_FLAGS = {
    "needs_features": "features",
    "uses_descriptions": "descriptions",
    "spells_words": "words",
    "writes_rationales": "rationales",
    "shares_identifiers": "shares_identifiers",
}


@dataclass
class SchemeContext:
    """What the run hands a scheme before :meth:`IdentifierScheme.fit` (built once, in this order).

    - ``tokenizer``: the backbone's tokenizer (the backbone owns it; identifiers must tokenize under it);
    - ``features``: the targets' feature vectors (``requirements.features``), float32 ``(N, D)``, else ``None``;
    - ``generator``: ``(targets, prompts) -> answers``, a model that writes text
      (``requirements.text_generator``), else ``None``;
    - ``cache_dir``: the run's cache folder (``cache_dir``), for what a scheme computes at length (e.g. the
      answers of ``ssi``'s own identifier writer), else ``None``.
    """

    tokenizer: Any
    features: np.ndarray | None = None
    generator: Callable[[Sequence[Target], Sequence[str]], list[str]] | None = None
    cache_dir: str | None = None


class IdentifierScheme(ABC):
    """Base class of every identifier scheme (built-in or plugin).

    A subclass sets ``name``, a one-line docstring (shown by ``gcr schemes``), ``Options`` (a dataclass
    subclass of :class:`~gcr.schemes.helpers.options.SchemeOptions`, one field per option) and ``requires`` (a
    :class:`~gcr.schemes.helpers.options.SchemeRequirements`; override the :attr:`requirements` property when it
    depends on the options). It is built as ``SchemeClass(seed=..., **options)``; options are read as
    ``self.options.NAME`` (or ``self.NAME``). :func:`gcr.testing.check_scheme` checks the whole contract.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type[SchemeOptions]] = SchemeOptions
    requires: ClassVar[SchemeRequirements] = SchemeRequirements()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # a subclass written before ``requires`` may still set the old flags as class attributes
        legacy = {field: bool(cls.__dict__[flag]) for flag, field in _FLAGS.items()
                  if flag in cls.__dict__ and not isinstance(cls.__dict__[flag], property)}
        if legacy:
            cls.requires = replace(cls.requires, **legacy)

    def __init__(self, seed: int = 0, **options: Any):
        self.seed = seed
        unknown = sorted(set(options) - set(self.Options.names()))
        if unknown:
            raise ConfigError(
                f"unknown option(s) {unknown} for scheme {self.name!r}; valid: {self._valid_options()}"
            )
        self.options = self.Options(**options)

    def __getattr__(self, name: str) -> Any:
        # only called when normal lookup fails: ``scheme.k`` reads ``scheme.options.k``
        if name != "options" and not name.startswith("__") and "options" in self.__dict__:
            opts = self.__dict__["options"]
            if name in type(opts).names():
                return getattr(opts, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def _valid_options(self) -> list[str]:
        """``seed`` and the ``Options`` fields (and the constructor's own keywords, for older subclasses)."""
        params = inspect.signature(type(self).__init__).parameters.values()
        own = {p.name for p in params if p.name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD}
        return sorted({"seed", *self.Options.names(), *own})

    # -- requirements ---------------------------------------------------------------------------
    @property
    def requirements(self) -> SchemeRequirements:
        """What this scheme needs from the run; the class's ``requires`` unless the options change it."""
        return self.requires

    @property
    def needs_features(self) -> bool:
        """Read-only alias of ``requirements.features``."""
        return self.requirements.features

    @property
    def uses_descriptions(self) -> bool:
        """Read-only alias of ``requirements.descriptions``."""
        return self.requirements.descriptions

    @property
    def spells_words(self) -> bool:
        """Read-only alias of ``requirements.words``."""
        return self.requirements.words

    @property
    def writes_rationales(self) -> bool:
        """Read-only alias of ``requirements.rationales``."""
        return self.requirements.rationales

    @property
    def shares_identifiers(self) -> bool:
        """Read-only alias of ``requirements.shares_identifiers``."""
        return self.requirements.shares_identifiers

    @abstractmethod
    def fit(self, targets: Sequence[Target], features: np.ndarray | None = None) -> list[str]:
        """Assign an identifier to every target (same order). Called once per index."""

    def assign(self, targets: Sequence[Target], features: np.ndarray | None = None) -> list[str]:
        """Identifiers for *new* targets after :meth:`fit` (incremental indexing)."""
        raise NotImplementedError(f"scheme {self.name!r} does not support incremental indexing")

    def prepare(self, context: SchemeContext) -> None:
        """Called once before :meth:`fit` with what the run built for the scheme (see :class:`SchemeContext`).

        The default binds the tokenizer (:meth:`bind_tokenizer`); a scheme that asks for a generator
        (``requirements.text_generator``) takes ``context.generator`` here.
        """
        self.bind_tokenizer(context.tokenizer)

    def bind_tokenizer(self, tokenizer: Any) -> None:
        """Called before :meth:`fit` with the model's tokenizer.

        Natural-language schemes use it to keep to words the tokenizer can spell (a word-level tokenizer
        maps unknown words to ``<unk>``, which no identifier may contain). The default ignores it.
        """

    def reserved_words(self) -> list[str]:
        """Words the identifiers use as structure (e.g. field names); a tokenizer built from the corpus
        (the ``tiny`` backbone's) always holds them. Not new tokens: pretrained tokenizers spell them."""
        return []

    def new_tokens(self) -> list[str]:
        """Tokens the model's vocabulary must gain; empty for natural-language identifiers."""
        return []

    def token_vectors(self) -> dict[str, dict[str, np.ndarray]]:
        """Initial vectors for :meth:`new_tokens`, by group (each group in one space, e.g. codebook vectors).

        Backbones project each group to their embedding width (:meth:`init_token_embeddings`), so new tokens
        start where the scheme's geometry puts them rather than at random. Empty: no preference.
        """
        return {}

    def code_vectors(self) -> dict[str, list[dict[str, np.ndarray]]]:
        """What each code token means, for decoders that fuse with the candidate (``model.fusion=candidate``).

        ``{"coarse": [level, ...], "fine": [level, ...]}``, each level ``{token: 1-D vector}`` (one width per
        group); after :meth:`fit`. A scheme that offers it declares ``requirements.code_vectors``.
        """
        raise ConfigError(f"scheme {self.name!r} has no code vectors (requirements.code_vectors is false)")

    def rationales(self) -> list[str]:
        """One sentence per target of the last :meth:`fit` explaining its identifier (Rationale-Guided
        Supervision trains on them, ``rgs.enabled``). Empty: the scheme has none."""
        return []

    def stats(self) -> dict[str, Any]:
        """Statistics of the last :meth:`fit` (e.g. codebook usage) recorded with the results."""
        return {}

    def config(self) -> dict[str, Any]:
        """The scheme's options (``seed`` and every ``Options`` field), recorded with the index."""
        return {"seed": self.seed, **self.options.to_dict()}

    def state_dict(self) -> dict[str, Any]:
        """Fitted state needed by :meth:`assign` after reload: plain JSON values (arrays as ``.tolist()``);
        it is saved inside ``index.json``."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def _require_features(self, targets: Sequence[Target], features: np.ndarray | None) -> np.ndarray:
        if features is None:
            raise ConfigError(f"scheme {self.name!r} needs target features; set features.name in the config")
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2 or features.shape[0] != len(targets):
            raise ConfigError(
                f"scheme {self.name!r} got features of shape {features.shape} for {len(targets)} targets; "
                "expected (num_targets, dim)"
            )
        return features
