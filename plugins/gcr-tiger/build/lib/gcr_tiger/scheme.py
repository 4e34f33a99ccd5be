"""TIGER-style semantic IDs (Rajput et al., 2023), with residual K-Means standing in for the RQ-VAE.

Each target's feature vector is quantized level by level: K-Means on the vectors, then K-Means on what
the first centroids leave unexplained, and so on (``levels`` codebooks of ``codebook_size`` codes). The
codes become new tokens ``<t{level}_{code}>``; targets that share every code get a last *collision
digit* ``<t_dup{i}>``, so every identifier is unique. Options are set with ``+scheme.OPTION=value``.

This file only uses gcr's public plugin interface (:class:`gcr.schemes.IdentifierScheme`); gcr finds it
through the ``gcr.schemes`` entry point in this package's ``pyproject.toml``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.cluster import KMeans

from gcr.errors import ConfigError
from gcr.schemes import IdentifierScheme


class TigerScheme(IdentifierScheme):
    """TIGER semantic ID: residual K-Means codes per level + a collision digit (plugin `gcr-tiger`)."""

    name = "tiger"
    needs_features = True

    def __init__(self, seed: int = 0, levels: int = 3, codebook_size: int = 16, max_duplicates: int = 64, **options: Any):
        if levels < 1 or codebook_size < 2 or max_duplicates < 1:
            raise ConfigError("tiger needs levels >= 1, codebook_size >= 2 and max_duplicates >= 1")
        self.levels, self.codebook_size, self.max_duplicates = int(levels), int(codebook_size), int(max_duplicates)
        super().__init__(seed=seed, **options)
        self._codebooks: list[np.ndarray] = []
        self._taken: Counter = Counter()

    def fit(self, targets: Sequence[Any], features: np.ndarray | None = None) -> list[str]:
        x = self._require_features(targets, features)
        self._codebooks, residual = [], x.astype(np.float64)
        for level in range(self.levels):
            k = min(self.codebook_size, len(residual))
            km = KMeans(n_clusters=k, random_state=self.seed + level, n_init=3).fit(residual)
            self._codebooks.append(km.cluster_centers_.astype(np.float32))
            residual = residual - km.cluster_centers_[km.labels_]
        self._taken = Counter()
        return self._identifiers(x)

    def assign(self, targets: Sequence[Any], features: np.ndarray | None = None) -> list[str]:
        if not self._codebooks:
            raise ConfigError("tiger.assign needs a fitted scheme; call fit (or load the index) first")
        return self._identifiers(self._require_features(targets, features))

    def codes(self, x: np.ndarray) -> np.ndarray:
        """``(N, levels)`` code of each vector: the nearest centroid of each level's residual."""
        residual, out = np.asarray(x, dtype=np.float32), []
        for centroids in self._codebooks:
            d = (residual**2).sum(1, keepdims=True) - 2 * residual @ centroids.T + (centroids**2).sum(1)
            code = d.argmin(1)
            out.append(code)
            residual = residual - centroids[code]
        return np.stack(out, 1)

    def _identifiers(self, x: np.ndarray) -> list[str]:
        out = []
        for row in self.codes(x).tolist():
            prefix = "".join(f"<t{level}_{code}>" for level, code in enumerate(row))
            n = self._taken[prefix]
            if n >= self.max_duplicates:
                raise ConfigError(
                    f"tiger: more than {self.max_duplicates} targets share the codes {prefix}; raise "
                    "+scheme.max_duplicates or +scheme.codebook_size"
                )
            self._taken[prefix] += 1
            out.append(f"{prefix}<t_dup{n}>")
        return out

    def new_tokens(self) -> list[str]:
        codes = [f"<t{level}_{code}>" for level in range(self.levels) for code in range(self.codebook_size)]
        return codes + [f"<t_dup{i}>" for i in range(self.max_duplicates)]

    def token_vectors(self) -> dict[str, dict[str, np.ndarray]]:
        """Each level's code tokens start at their centroids (gcr projects them to the model's width)."""
        return {f"level{level}": {f"<t{level}_{c}>": v for c, v in enumerate(centroids)}
                for level, centroids in enumerate(self._codebooks)}

    def stats(self) -> dict[str, Any]:
        if not self._taken:
            return {}
        shared = sum(n for n in self._taken.values() if n > 1)
        return {"collision_rate_before_digit": shared / sum(self._taken.values()), "max_duplicates_used": max(self._taken.values())}

    def config(self) -> dict[str, Any]:
        return {"seed": self.seed, "levels": self.levels, "codebook_size": self.codebook_size,
                "max_duplicates": self.max_duplicates}

    def state_dict(self) -> dict[str, Any]:
        return {"codebooks": [c.tolist() for c in self._codebooks], "taken": dict(self._taken)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._codebooks = [np.asarray(c, dtype=np.float32) for c in state.get("codebooks", [])]
        self._taken = Counter(state.get("taken", {}))
