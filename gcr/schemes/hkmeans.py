"""Hierarchical K-Means identifiers (DSI / GRACE "structured" numeric IDs).

Targets are clustered into ``k`` groups by K-Means over their features; every
group larger than ``leaf_size`` is clustered again. A target's identifier is its
path of cluster numbers followed by its position inside the leaf, so targets
with similar features share identifier prefixes. Each level has its own tokens
(``<c0_3>`` is cluster 3 at depth 0; ``<p_5>`` is leaf position 5).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.cluster import KMeans, MiniBatchKMeans
from threadpoolctl import threadpool_limits

from gcr.data.corpus import Target
from gcr.errors import ConfigError
from gcr.schemes.base import IdentifierScheme

Path_ = tuple[int, ...]


class HierarchicalKMeansScheme(IdentifierScheme):
    """Hierarchical K-Means ID: cluster path + leaf position (DSI/GRACE structured ID)."""

    name = "hkmeans"
    needs_features = True

    def __init__(self, seed: int = 0, k: int = 10, leaf_size: int = 10, minibatch_above: int = 20000, **options):
        if k < 2:
            raise ConfigError(f"hkmeans needs k >= 2 clusters per level, got k={k}")
        if leaf_size < 1:
            raise ConfigError(f"hkmeans needs leaf_size >= 1, got {leaf_size}")
        self.k, self.leaf_size, self.minibatch_above = int(k), int(leaf_size), int(minibatch_above)
        super().__init__(seed=seed, **options)
        self._centroids: dict[Path_, np.ndarray] = {}
        self._leaf_count: dict[Path_, int] = {}

    # -- fitting ------------------------------------------------------------------------------
    def fit(self, targets: Sequence[Target], features: np.ndarray | None = None) -> list[str]:
        x = self._require_features(targets, features)
        self._centroids, self._leaf_count = {}, {}
        paths: list[Path_ | None] = [None] * len(targets)
        positions = np.zeros(len(targets), dtype=np.int64)
        stack: list[tuple[np.ndarray, Path_]] = [(np.arange(len(targets)), ())]
        while stack:
            members, path = stack.pop()
            if len(members) <= self.leaf_size:
                for pos, i in enumerate(members):
                    paths[i], positions[i] = path, pos
                self._leaf_count[path] = len(members)
                continue
            labels, centroids = self._cluster(x[members], depth=len(path))
            self._centroids[path] = centroids
            for c in range(len(centroids)):
                sub = members[labels == c]
                if len(sub):
                    stack.append((sub, path + (c,)))
        return [self._identifier(p, int(pos)) for p, pos in zip(paths, positions)]  # type: ignore[arg-type]

    def _cluster(self, x: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(self.k, len(x))
        algo = MiniBatchKMeans if len(x) > self.minibatch_above else KMeans
        # small fits are dominated by thread start-up: one thread is ~10x faster below a few thousand points
        with threadpool_limits(1 if len(x) < 5000 else None):
            km = algo(n_clusters=k, random_state=self.seed + depth, n_init=3).fit(x)
        labels = km.labels_
        if len(np.unique(labels)) == 1:
            # identical features cannot be split by distance; split evenly so recursion ends
            labels = np.arange(len(x)) % k
        return labels, km.cluster_centers_.astype(np.float32)

    # -- incremental --------------------------------------------------------------------------
    def assign(self, targets: Sequence[Target], features: np.ndarray | None = None) -> list[str]:
        if not self._leaf_count:
            raise ConfigError("hkmeans.assign needs a fitted scheme; call fit (or load the index) first")
        x = self._require_features(targets, features)
        out = []
        for vec in x:
            path: Path_ = ()
            while path in self._centroids:
                path = path + (int(np.argmin(((self._centroids[path] - vec) ** 2).sum(1))),)
            pos = self._leaf_count.get(path, 0)
            self._leaf_count[path] = pos + 1
            out.append(self._identifier(path, pos))
        return out

    # -- tokens and state ---------------------------------------------------------------------
    @staticmethod
    def _identifier(path: Path_, position: int) -> str:
        return "".join(f"<c{d}_{c}>" for d, c in enumerate(path)) + f"<p_{position}>"

    def new_tokens(self) -> list[str]:
        depth = max((len(p) for p in self._leaf_count), default=0)
        width = max((len(c) for c in self._centroids.values()), default=0)
        positions = max(self._leaf_count.values(), default=0)
        return [f"<c{d}_{c}>" for d in range(depth) for c in range(width)] + [f"<p_{i}>" for i in range(positions)]

    def config(self) -> dict[str, Any]:
        return {"seed": self.seed, "k": self.k, "leaf_size": self.leaf_size}

    def state_dict(self) -> dict[str, Any]:
        key = lambda p: ".".join(map(str, p))  # noqa: E731
        return {
            "centroids": {key(p): c.tolist() for p, c in self._centroids.items()},
            "leaf_count": {key(p): n for p, n in self._leaf_count.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        path = lambda s: tuple(int(v) for v in s.split(".")) if s else ()  # noqa: E731
        self._centroids = {path(s): np.asarray(c, dtype=np.float32) for s, c in state["centroids"].items()}
        self._leaf_count = {path(s): int(n) for s, n in state["leaf_count"].items()}
