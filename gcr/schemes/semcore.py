"""SemCORE structured natural-language identifiers (SID): global ID + lexical ID, in plain words.

* **Global ID** -- K-Means over the targets' description embeddings (MiniLM; or the pipeline's target
  features with ``global_features=target``); every cluster is *named* by its ``global_words``
  highest-weight words, ``w(x, c) = tf(x, c) * log(1 + A / f_x)``
  (:func:`gcr.schemes.words.cluster_word_weights`).
* **Lexical ID** -- KeyBERT keywords of the target's description (``keywords=mmr|maxsum|cosine``),
  without the words already in its global ID.

``"{global words} ; {lexical words}"``, e.g. ``"triangle yellow ; checkered diamond green"``. The words
are the model's own vocabulary: no new tokens. SIDs may collide; ``collisions=suffix`` appends the
target's next keyword (then a number), ``collisions=verify`` keeps the shared SID and lets Generative
Semantic Verification pick among the targets that share it.

The scheme reads each target's ``text``: the pipeline replaces it with a leakage-free description
(``description=heldout|generated``) before :meth:`SemcoreScheme.fit`.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.cluster import KMeans, MiniBatchKMeans
from threadpoolctl import threadpool_limits

from gcr.data.corpus import Target
from gcr.errors import ConfigError
from gcr.schemes.base import IdentifierScheme
from gcr.schemes.words import (
    Spellable,
    name_clusters,
    nearest_centroid,
    require_descriptions,
    spelled_number,
    tokenizer_spelling,
    word_analyzer,
)

PARTS = ("both", "global", "lexical")
COLLISIONS = ("suffix", "verify")
GLOBAL_FEATURES = ("description", "target")
SPARE_KEYWORDS = 4
log = logging.getLogger("gcr")  # extra keywords kept per target for collision suffixes


class SemcoreScheme(IdentifierScheme):
    """SemCORE SID: K-Means cluster named in words + KeyBERT keywords; natural language, no new tokens."""

    name = "semcore"
    uses_descriptions = True
    spells_words = True

    def __init__(
        self,
        seed: int = 0,
        num_clusters: int = 20,
        global_words: int = 2,
        lexical_words: int = 3,
        parts: str = "both",
        global_features: str = "description",
        keywords: str = "mmr",
        diversity: float = 0.5,
        collisions: str = "suffix",
        separator: str = ";",
        minibatch_above: int = 20000,
        **options: Any,
    ):
        for option, value, allowed in (
            ("parts", parts, PARTS), ("collisions", collisions, COLLISIONS), ("global_features", global_features, GLOBAL_FEATURES),
        ):
            if value not in allowed:
                raise ConfigError(f"semcore.{option}={value!r} is not one of {', '.join(allowed)}")
        if num_clusters < 1 or global_words < 1 or lexical_words < 0:
            raise ConfigError("semcore needs num_clusters >= 1, global_words >= 1 and lexical_words >= 0")
        if parts == "lexical" and lexical_words < 1:
            raise ConfigError("semcore.parts=lexical needs lexical_words >= 1")
        self.num_clusters, self.global_words, self.lexical_words = int(num_clusters), int(global_words), int(lexical_words)
        self.parts, self.global_features, self.collisions = parts, global_features, collisions
        self.keywords, self.diversity, self.separator = keywords, float(diversity), str(separator)
        self.minibatch_above = int(minibatch_above)
        super().__init__(seed=seed, **options)
        # instance values of the class-level flags: they depend on the options
        self.needs_features = global_features == "target" and parts != "lexical"
        self.shares_identifiers = collisions == "verify"
        self.spellable: Spellable = lambda word: True
        self.text_encoder: Any = None  # a MiniLMTextEncoder, loaded on first use (tests may inject one)
        self._centroids: np.ndarray | None = None
        self._names: dict[int, tuple[str, ...]] = {}
        self._taken: Counter = Counter()

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
        self._taken = Counter()
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
        k = min(self.num_clusters, len(x))
        algo = MiniBatchKMeans if len(x) > self.minibatch_above else KMeans
        with threadpool_limits(1 if len(x) < 5000 else None):
            km = algo(n_clusters=k, random_state=self.seed, n_init=3).fit(x)
        return km.labels_.astype(np.int64), km.cluster_centers_.astype(np.float32)

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
        from gcr.schemes.keywords import KeywordExtractor

        extractor = KeywordExtractor(self._encoder().model, method=self.keywords, diversity=self.diversity)
        top_n = self.lexical_words + (self.global_words if self.parts != "lexical" else 0) + SPARE_KEYWORDS
        found = extractor.extract(descriptions, top_n, document_embeddings=embeddings, spellable=self.spellable)
        out = []
        for label, words in zip(labels.tolist(), found):
            name = set(self._names.get(label, ()))
            kept = [w for w in words if w not in name]
            lexical = kept[: self.lexical_words] if self.parts != "global" else []
            spare = kept[len(lexical):]
            out.append((lexical, spare))
        return out

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
            self._taken.update(sids)
            return sids
        out = []
        for (global_id, lexical), spare, sid in zip(pieces, spares, sids):
            if sid and not self._taken[sid]:
                out.append(sid)
                self._taken[sid] += 1
                continue
            words = list(lexical)
            for extra in spare:  # the target's own next keywords first: a suffix that still means something
                words.append(extra)
                candidate = self._join(global_id, words)
                if not self._taken[candidate]:
                    sid = candidate
                    break
            else:
                base = self._join(global_id, words)
                n = max(1, self._taken[base])
                while self._taken[candidate := self._number_suffix(base, n)]:
                    n += 1
                self._taken[base] += 1
                sid = candidate
            out.append(sid)
            self._taken[sid] += 1
        return out

    def _number_suffix(self, base: str, n: int) -> str:
        """``base`` plus the number ``n``: one token where the tokenizer spells it, else digit by digit."""
        return f"{base} {spelled_number(n, self.spellable)}".strip()

    # -- state --------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {
            "seed": self.seed, "num_clusters": self.num_clusters, "global_words": self.global_words,
            "lexical_words": self.lexical_words, "parts": self.parts, "global_features": self.global_features,
            "keywords": self.keywords, "diversity": self.diversity, "collisions": self.collisions,
            "separator": self.separator,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "centroids": None if self._centroids is None else self._centroids.tolist(),
            "names": {str(c): list(n) for c, n in self._names.items()},
            "taken": dict(self._taken),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        centroids = state.get("centroids")
        self._centroids = None if centroids is None else np.asarray(centroids, dtype=np.float32)
        self._names = {int(c): tuple(n) for c, n in state.get("names", {}).items()}
        self._taken = Counter(state.get("taken", {}))

    def cluster_names(self) -> dict[int, tuple[str, ...]]:
        """The global ID (words) of every cluster, e.g. to print or plot."""
        return dict(self._names)
