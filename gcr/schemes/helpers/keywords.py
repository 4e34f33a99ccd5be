"""Keyword extraction with KeyBERT over the packaged MiniLM (offline).

One batched call per description set: KeyBERT embeds every candidate word once, and the description
embeddings gcr already computed (for the global clusters) are passed in rather than recomputed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.feature_extraction.text import CountVectorizer

from gcr.errors import ConfigError
from gcr.schemes.helpers.words import Spellable

DIVERSITY_METHODS = ("cosine", "mmr", "maxsum")


class KeywordExtractor:
    """KeyBERT keywords (single words) of many documents at once.

    ``method``: ``cosine`` (plain similarity to the document), ``mmr`` (Maximal Marginal Relevance,
    trading relevance for ``diversity``) or ``maxsum`` (Max Sum Distance over ``nr_candidates``).
    ``model`` is a loaded ``SentenceTransformer`` (the MiniLM encoder's ``.model``).
    """

    def __init__(self, model: Any, *, method: str = "mmr", diversity: float = 0.5, nr_candidates: int = 20):
        if method not in DIVERSITY_METHODS:
            raise ConfigError(f"unknown keyword method {method!r}; choose one of {', '.join(DIVERSITY_METHODS)}")
        from gcr.encoders import require

        require("keybert", "keybert", "SemCORE's lexical identifiers")
        from keybert import KeyBERT

        self.keybert = KeyBERT(model=model)
        self.method, self.diversity, self.nr_candidates = method, float(diversity), int(nr_candidates)

    def extract(
        self,
        documents: Sequence[str],
        top_n: int,
        *,
        document_embeddings: np.ndarray | None = None,
        spellable: Spellable | None = None,
    ) -> list[list[str]]:
        """The ``top_n`` keywords of each document, most relevant first (fewer for short documents)."""
        documents = list(documents)
        if not documents:
            return []
        try:
            vocabulary = CountVectorizer(stop_words="english").fit(documents).get_feature_names_out()
        except ValueError:  # no document has a single non-stop word
            return [[] for _ in documents]
        candidates = [w for w in vocabulary if spellable is None or spellable(w)]
        if not candidates:
            return [[] for _ in documents]
        found = self.keybert.extract_keywords(
            documents,
            candidates=candidates,
            top_n=top_n,
            use_mmr=self.method == "mmr",
            use_maxsum=self.method == "maxsum",
            diversity=self.diversity,
            nr_candidates=max(self.nr_candidates, top_n),
            doc_embeddings=document_embeddings,
        )
        if len(documents) == 1:  # KeyBERT returns a flat list for one document
            found = [found]
        return [[word for word, _ in keywords] for keywords in found]
