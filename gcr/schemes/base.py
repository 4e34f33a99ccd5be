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
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from gcr.data.corpus import Target
from gcr.errors import ConfigError


class IdentifierScheme(ABC):
    """Base class of every identifier scheme (built-in or plugin).

    Subclasses set ``name``, a one-line docstring (shown by ``gcr schemes``), and
    ``needs_features`` when :meth:`fit` requires target feature vectors.
    """

    name: ClassVar[str] = ""
    needs_features: ClassVar[bool] = False
    #: True when several targets may share one identifier (resolved by a suffix or by verification).
    shares_identifiers: ClassVar[bool] = False
    #: True when identifiers are built from ``Target.text``: the pipeline then replaces it with a
    #: leakage-free *description* (``description=heldout|generated``) before :meth:`fit`.
    uses_descriptions: ClassVar[bool] = False
    #: True when identifiers are words (not new tokens): the backbone's tokenizer must spell them.
    spells_words: ClassVar[bool] = False
    #: True when :meth:`rationales` returns one sentence per target (Rationale-Guided Supervision).
    writes_rationales: ClassVar[bool] = False

    def __init__(self, seed: int = 0, **options: Any):
        self.seed = seed  # set first: the error below lists config(), which reads it
        if options:
            raise ConfigError(
                f"unknown option(s) {sorted(options)} for scheme {self.name!r}; valid: {self._valid_options()}"
            )

    def _valid_options(self) -> list[str]:
        """Option names for error messages; a subclass may set its attributes after ``super().__init__``."""
        try:
            return sorted(self.config())
        except AttributeError:
            params = inspect.signature(type(self).__init__).parameters.values()
            return sorted(p.name for p in params if p.name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD)

    @abstractmethod
    def fit(self, targets: Sequence[Target], features: np.ndarray | None = None) -> list[str]:
        """Assign an identifier to every target (same order). Called once per index."""

    def assign(self, targets: Sequence[Target], features: np.ndarray | None = None) -> list[str]:
        """Identifiers for *new* targets after :meth:`fit` (incremental indexing)."""
        raise NotImplementedError(f"scheme {self.name!r} does not support incremental indexing")

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

    def rationales(self) -> list[str]:
        """One sentence per target of the last :meth:`fit` explaining its identifier (Rationale-Guided
        Supervision trains on them, ``rgs.enabled``). Empty: the scheme has none."""
        return []

    def stats(self) -> dict[str, Any]:
        """Statistics of the last :meth:`fit` (e.g. codebook usage) recorded with the results."""
        return {}

    def config(self) -> dict[str, Any]:
        """The scheme's options, recorded with the index so artifacts can be validated."""
        return {"seed": self.seed}

    def state_dict(self) -> dict[str, Any]:
        """Fitted state needed by :meth:`assign` after reload: plain JSON values (arrays as ``.tolist()``);
        it is saved inside ``index.json``."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def _require_features(self, targets: Sequence[Target], features: np.ndarray | None) -> np.ndarray:
        if features is None:
            raise ConfigError(f"scheme {self.name!r} needs target features; set features.encoder in the config")
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2 or features.shape[0] != len(targets):
            raise ConfigError(
                f"scheme {self.name!r} got features of shape {features.shape} for {len(targets)} targets; "
                "expected (num_targets, dim)"
            )
        return features
