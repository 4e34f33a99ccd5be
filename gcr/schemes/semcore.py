"""SemCORE structured natural-language identifiers (SID): global ID + lexical ID, in plain words.

* **Global ID** -- K-Means over the targets' description embeddings (MiniLM; or the pipeline's target
  features with ``global_features=target``); every cluster is *named* by its ``global_words``
  highest-weight words, ``w(x, c) = tf(x, c) * log(1 + A / f_x)``
  (:func:`gcr.schemes.helpers.words.cluster_word_weights`).
* **Lexical ID** -- KeyBERT keywords of the target's description (``keywords=mmr|maxsum|cosine``),
  without the words already in its global ID: the same string (``dedup=exact``), or also any word whose
  MiniLM embedding has cosine similarity >= ``dedup_threshold`` with a global word (``dedup=semantic``).

``"{global words} ; {lexical words}"``, e.g. ``"triangle yellow ; checkered diamond green"``. The words
are the model's own vocabulary: no new tokens. SIDs may collide; ``collisions=suffix`` appends the
target's next keyword (then a number), ``collisions=verify`` keeps the shared SID and lets Generative
Semantic Verification pick among the targets that share it.

The scheme reads each target's ``text``: the pipeline replaces it with a leakage-free description
(``description=heldout|generated``) before :meth:`SemcoreScheme.fit`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from gcr.data.corpus import Target
from gcr.errors import ConfigError
from gcr.schemes.base import IdentifierScheme
from gcr.schemes.helpers.clustering import kmeans, nearest_centroid
from gcr.schemes.helpers.options import SchemeOptions, SchemeRequirements, invalid, option
from gcr.schemes.helpers.suffixes import PrefixCounter
from gcr.schemes.helpers.words import (
    Spellable,
    name_clusters,
    require_descriptions,
    spelled_number,
    tokenizer_spelling,
    word_analyzer,
)

SPARE_KEYWORDS = 4
log = logging.getLogger("gcr")  # extra keywords kept per target for collision suffixes


class SemcoreScheme(IdentifierScheme):
    """SemCORE SID: K-Means cluster named in words + KeyBERT keywords; natural language, no new tokens."""

    name = "semcore"

    @dataclass
    class Options(SchemeOptions):
        num_clusters: int = option(20, ge=1, doc="K-Means clusters of the global ID")
        global_words: int = option(2, ge=1, doc="words naming each cluster")
        lexical_words: int = option(3, ge=0, doc="KeyBERT keywords per target")
        parts: Literal["both", "global", "lexical"] = "both"
        global_features: Literal["description", "target"] = "description"
        keywords: Literal["mmr", "maxsum", "cosine"] = "mmr"
        diversity: float = option(0.5, ge=0, doc="KeyBERT diversity")
        collisions: Literal["suffix", "verify"] = "suffix"
        separator: str = ";"
        minibatch_above: int = option(20000, ge=1, doc="MiniBatchKMeans above this many targets")
        dedup: Literal["exact", "semantic"] = "exact"
        dedup_threshold: float = option(0.8, ge=-1, doc="dedup=semantic: cosine at which a keyword repeats a global word")

        def check(self) -> None:
            if self.parts == "lexical" and self.lexical_words < 1:
                raise invalid("lexical_words", self.lexical_words, "lexical_words >= 1 with parts=lexical")
            if self.dedup_threshold > 1:
                raise invalid("dedup_threshold", self.dedup_threshold, "a cosine similarity in [-1, 1]")

    def __init__(self, seed: int = 0, **options: Any):
        super().__init__(seed=seed, **options)
        self.spellable: Spellable = lambda word: True
        self.text_encoder: Any = None  # a MiniLMTextEncoder, loaded on first use (tests may inject one)
        self._centroids: np.ndarray | None = None
        self._names: dict[int, tuple[str, ...]] = {}
        self._taken = PrefixCounter()

    @property
    def requirements(self) -> SchemeRequirements:
        """Words from descriptions; target features only with global_features=target; shared SIDs with
        collisions=verify."""
        o = self.options
        return SchemeRequirements(
            descriptions=True, words=True,
            features=o.global_features == "target" and o.parts != "lexical",
            shares_identifiers=o.collisions == "verify",
        )

    # -- setup --------------------------------------------------------------------------------
    def bind_tokenizer(self, tokenizer: Any) -> None:
        self.spellable = tokenizer_spelling(tokenizer)
        if self.parts == "both" and not self.spellable(self.separator):
            raise ConfigError(
                f"the model's tokenizer cannot spell semcore.separator={self.separator!r}; choose another separator"
            )

    def _encoder(self):
        if self.text_encoder is None:
            from gcr.encoders import MiniLMTextEncoder

            self.text_encoder = MiniLMTextEncoder()
        return self.text_encoder

    # -- fitting ------------------------------------------------------------------------------
    def fit(self, targets: Sequence[Target], features: np.ndarray | None = None) -> list[str]:
        descriptions = self._descriptions(targets)
        embeddings = self._encoder().encode_text(descriptions).numpy()
        clustered = self._require_features(targets, features) if self.needs_features else embeddings
        words = self._words(descriptions)
        if self.parts == "lexical":
            self._centroids, self._names, labels = None, {}, np.zeros(len(targets), dtype=np.int64)
        else:
            labels, self._centroids = self._cluster(clustered)
            self._names = name_clusters(words, labels, self.global_words)
        self._taken = PrefixCounter()
        return self._identifiers(descriptions, embeddings, labels)

    def assign(self, targets: Sequence[Target], features: np.ndarray | None = None) -> list[str]:
        if self.parts != "lexical" and self._centroids is None:
            raise ConfigError("semcore.assign needs a fitted scheme; call fit (or load the index) first")
        descriptions = self._descriptions(targets)
        embeddings = self._encoder().encode_text(descriptions).numpy()
        if self.parts == "lexical":
            labels = np.zeros(len(targets), dtype=np.int64)
        else:
            clustered = self._require_features(targets, features) if self.needs_features else embeddings
            labels = nearest_centroid(clustered.astype(np.float32), self._centroids)
        return self._identifiers(descriptions, embeddings, labels)

    def _descriptions(self, targets: Sequence[Target]) -> list[str]:
        return require_descriptions(targets, "semcore")

    def _words(self, descriptions: Sequence[str]) -> list[list[str]]:
        analyze = word_analyzer()
        return [[w for w in analyze(d) if self.spellable(w)] for d in descriptions]

    def _cluster(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return kmeans(x, self.num_clusters, self.seed, self.minibatch_above)

    def _identifiers(self, descriptions: list[str], embeddings: np.ndarray, labels: np.ndarray) -> list[str]:
        keywords = self._lexical(descriptions, embeddings, labels)
        sids = []
        for label, (lexical, spare) in zip(labels.tolist(), keywords):
            sids.append((self._names.get(label, ()), lexical, spare))
        return self._resolve([(g, lex) for g, lex, _ in sids], [s for _, _, s in sids])

    def _lexical(self, descriptions, embeddings, labels) -> list[tuple[list[str], list[str]]]:
        """Per target: its lexical words and spare keywords (for suffixes), global words removed."""
        if self.lexical_words == 0 and self.collisions == "verify":
            return [([], []) for _ in descriptions]
        from gcr.schemes.helpers.keywords import KeywordExtractor

        extractor = KeywordExtractor(self._encoder().model, method=self.keywords, diversity=self.diversity)
        top_n = self.lexical_words + (self.global_words if self.parts != "lexical" else 0) + SPARE_KEYWORDS
        found = extractor.extract(descriptions, top_n, document_embeddings=embeddings, spellable=self.spellable)
        repeats = self._repeats_global(found)
        out = []
        for label, words in zip(labels.tolist(), found):
            name = self._names.get(label, ())
            kept = [w for w in words if not repeats(w, name)]
            lexical = kept[: self.lexical_words] if self.parts != "global" else []
            spare = kept[len(lexical):]
            out.append((lexical, spare))
        return out

    def _repeats_global(self, found: list[list[str]]):
        """``(word, global words) -> bool``: does the keyword repeat the global ID (``dedup``)?"""
        if self.dedup == "exact":
            return lambda word, name: word in name
        vocab = sorted({w for words in found for w in words} | {w for name in self._names.values() for w in name})
        vectors = dict(zip(vocab, self._encoder().encode_text(vocab).numpy())) if vocab else {}  # unit vectors

        def repeats(word: str, name: Sequence[str]) -> bool:
            return word in name or any(float(vectors[word] @ vectors[n]) >= self.dedup_threshold for n in name)

        return repeats

    # -- collisions ---------------------------------------------------------------------------
    def _join(self, global_id: Sequence[str], lexical: Sequence[str]) -> str:
        parts = [" ".join(global_id)] if self.parts != "lexical" else []
        if self.parts != "global" or lexical:
            parts.append(" ".join(lexical))
        parts = [p for p in parts if p]
        return f" {self.separator} ".join(parts) if len(parts) > 1 else (parts[0] if parts else "")

    def _resolve(self, pieces: list[tuple[tuple[str, ...], list[str]]], spares: list[list[str]]) -> list[str]:
        """Join the parts into SIDs and apply the collision policy (against earlier SIDs too)."""
        sids = [self._join(g, lex) for g, lex in pieces]
        wordless = sum(not sid for sid in sids)
        if wordless > 0.1 * len(sids):
            log.warning(
                "semcore: %d of %d descriptions gave no usable word (only stop words, or words the tokenizer cannot "
                "spell); their identifiers are bare numbers. Check the descriptions (a captioner trained too briefly "
                "repeats one word: raise description.max_epochs)", wordless, len(sids),
            )
        if self.collisions == "verify":
            for i, sid in enumerate(sids):
                sids[i] = sid or self._number_suffix("", 0)
            for sid in sids:
                self._taken.take(sid)
            return sids
        out = []
        for (global_id, lexical), spare, sid in zip(pieces, spares, sids):
            if sid and not self._taken[sid]:
                out.append(sid)
                self._taken.take(sid)
                continue
            words = list(lexical)
            for extra in spare:  # the target's own next keywords first: a suffix that still means something
                words.append(extra)
                candidate = self._join(global_id, words)
                if not self._taken[candidate]:
                    sid = candidate
                    break
            else:
                sid = self._taken.numbered(self._join(global_id, words), self._number_suffix)
            out.append(sid)
            self._taken.take(sid)
        return out

    def _number_suffix(self, base: str, n: int) -> str:
        """``base`` plus the number ``n``: one token where the tokenizer spells it, else digit by digit."""
        return f"{base} {spelled_number(n, self.spellable)}".strip()

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "centroids": None if self._centroids is None else self._centroids.tolist(),
            "names": {str(c): list(n) for c, n in self._names.items()},
            "taken": dict(self._taken.counts),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        centroids = state.get("centroids")
        self._centroids = None if centroids is None else np.asarray(centroids, dtype=np.float32)
        self._names = {int(c): tuple(n) for c, n in state.get("names", {}).items()}
        self._taken = PrefixCounter(state.get("taken", {}))

    def cluster_names(self) -> dict[int, tuple[str, ...]]:
        """The global ID (words) of every cluster, e.g. to print or plot."""
        return dict(self._names)
