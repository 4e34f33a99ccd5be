"""TIGER-style semantic IDs (Rajput et al., 2023), with residual K-Means standing in for the RQ-VAE.

Each target's feature vector is quantized level by level: K-Means on the vectors, then K-Means on what
the first centroids leave unexplained, and so on (``levels`` codebooks of ``codebook_size`` codes). The
codes become new tokens ``<t{level}_{code}>``; targets that share every code get a last *collision
digit* ``<t_dup{i}>``, so every identifier is unique. Options are set with ``+scheme.OPTION=value``.

This file only uses gcr's public plugin interface (:mod:`gcr.schemes`: the base class, the options and
requirements declarations, the prefix counter); gcr finds it through the ``gcr.schemes`` entry point in this
package's ``pyproject.toml``. ``gcr.testing.check_scheme(TigerScheme, ...)`` checks the whole contract.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.cluster import KMeans

from gcr.errors import ConfigError
from gcr.schemes import IdentifierScheme, PrefixCounter, SchemeOptions, SchemeRequirements, option


class TigerScheme(IdentifierScheme):
    """TIGER semantic ID: residual K-Means codes per level + a collision digit (plugin `gcr-tiger`)."""

    name = "tiger"
    requires = SchemeRequirements(features=True)

    @dataclass
    class Options(SchemeOptions):
        """Each option once: type, default, allowed range (gcr checks them and derives ``config()``)."""

        levels: int = option(3, ge=1, doc="residual K-Means levels (code tokens per identifier)")
        codebook_size: int = option(16, ge=2, doc="codes per level")
        max_duplicates: int = option(64, ge=1, doc="targets that may share every code")

    def __init__(self, seed: int = 0, **options: Any):
        super().__init__(seed=seed, **options)  # builds and checks self.options
        self._codebooks: list[np.ndarray] = []
        self._taken = PrefixCounter()

    def fit(self, targets: Sequence[Any], features: np.ndarray | None = None) -> list[str]:
        x = self._require_features(targets, features)
        self._codebooks, residual = [], x.astype(np.float64)
        for level in range(self.options.levels):
            k = min(self.options.codebook_size, len(residual))
            km = KMeans(n_clusters=k, random_state=self.seed + level, n_init=3).fit(residual)
            self._codebooks.append(km.cluster_centers_.astype(np.float32))
            residual = residual - km.cluster_centers_[km.labels_]
        self._taken = PrefixCounter()
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
            if self._taken[prefix] >= self.options.max_duplicates:
                raise ConfigError(
                    f"tiger: more than {self.options.max_duplicates} targets share the codes {prefix}; raise "
                    "+scheme.max_duplicates or +scheme.codebook_size"
                )
            out.append(f"{prefix}<t_dup{self._taken.next(prefix)}>")
        return out

    def new_tokens(self) -> list[str]:
        o = self.options
        codes = [f"<t{level}_{code}>" for level in range(o.levels) for code in range(o.codebook_size)]
        return codes + [f"<t_dup{i}>" for i in range(o.max_duplicates)]

    def token_vectors(self) -> dict[str, dict[str, np.ndarray]]:
        """Each level's code tokens start at their centroids (gcr projects them to the model's width)."""
        return {f"level{level}": {f"<t{level}_{c}>": v for c, v in enumerate(centroids)}
                for level, centroids in enumerate(self._codebooks)}

    def stats(self) -> dict[str, Any]:
        if not self._taken:
            return {}
        counts = self._taken.counts.values()
        shared = sum(n for n in counts if n > 1)
        return {"collision_rate_before_digit": shared / sum(counts), "max_duplicates_used": self._taken.most()}

    def state_dict(self) -> dict[str, Any]:
        return {"codebooks": [c.tolist() for c in self._codebooks], "taken": dict(self._taken.counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._codebooks = [np.asarray(c, dtype=np.float32) for c in state.get("codebooks", [])]
        self._taken = PrefixCounter(state.get("taken", {}))
