"""Hierarchical K-Means identifiers (DSI / GRACE "structured" numeric IDs).

Targets are clustered into ``k`` groups by K-Means over their features; every
group larger than ``leaf_size`` is clustered again. A target's identifier is its
path of cluster numbers followed by its position inside the leaf, so targets
with similar features share identifier prefixes. Each level has its own tokens
(``<c0_3>`` is cluster 3 at depth 0; ``<p_5>`` is leaf position 5).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gcr.data.corpus import Target
from gcr.errors import ConfigError
from gcr.schemes.base import IdentifierScheme
from gcr.schemes.helpers.clustering import kmeans
from gcr.schemes.helpers.options import SchemeOptions, SchemeRequirements, option
from gcr.schemes.helpers.suffixes import PrefixCounter

Path_ = tuple[int, ...]


class HierarchicalKMeansScheme(IdentifierScheme):
    """Hierarchical K-Means ID: cluster path + leaf position (DSI/GRACE structured ID)."""

    name = "hkmeans"
    requires = SchemeRequirements(features=True)

    @dataclass
    class Options(SchemeOptions):
        k: int = option(10, ge=2, doc="clusters per level")
        leaf_size: int = option(10, ge=1, doc="a cluster this small becomes a leaf")
        minibatch_above: int = option(20000, ge=1, doc="MiniBatchKMeans above this many points")

    def __init__(self, seed: int = 0, **options: Any):
        super().__init__(seed=seed, **options)
        self._centroids: dict[Path_, np.ndarray] = {}
        self._leaf_count = PrefixCounter()  # targets per leaf: the next leaf position

    # -- fitting ------------------------------------------------------------------------------
    def fit(self, targets: Sequence[Target], features: np.ndarray | None = None) -> list[str]:
        x = self._require_features(targets, features)
        self._centroids, self._leaf_count = {}, PrefixCounter()
        paths: list[Path_ | None] = [None] * len(targets)
        positions = np.zeros(len(targets), dtype=np.int64)
        stack: list[tuple[np.ndarray, Path_]] = [(np.arange(len(targets)), ())]
        while stack:
            members, path = stack.pop()
            if len(members) <= self.options.leaf_size:
                for i in members:
                    paths[i], positions[i] = path, self._leaf_count.next(path)
                continue
            labels, centroids = self._cluster(x[members], depth=len(path))
            self._centroids[path] = centroids
            for c in range(len(centroids)):
                sub = members[labels == c]
                if len(sub):
                    stack.append((sub, path + (c,)))
        return [self._identifier(p, int(pos)) for p, pos in zip(paths, positions)]  # type: ignore[arg-type]

    def _cluster(self, x: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
        labels, centroids = kmeans(x, self.options.k, self.seed + depth, self.options.minibatch_above)
        if len(np.unique(labels)) == 1:
            # identical features cannot be split by distance; split evenly so recursion ends
            labels = np.arange(len(x)) % len(centroids)
        return labels, centroids

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
            out.append(self._identifier(path, self._leaf_count.next(path)))
        return out

    # -- tokens and state ---------------------------------------------------------------------
    @staticmethod
    def _identifier(path: Path_, position: int) -> str:
        return "".join(f"<c{d}_{c}>" for d, c in enumerate(path)) + f"<p_{position}>"

    def new_tokens(self) -> list[str]:
        depth = max((len(p) for p in self._leaf_count), default=0)
        width = max((len(c) for c in self._centroids.values()), default=0)
        positions = self._leaf_count.most()
        return [f"<c{d}_{c}>" for d in range(depth) for c in range(width)] + [f"<p_{i}>" for i in range(positions)]

    def state_dict(self) -> dict[str, Any]:
        key = lambda p: ".".join(map(str, p))  # noqa: E731
        return {
            "centroids": {key(p): c.tolist() for p, c in self._centroids.items()},
            "leaf_count": self._leaf_count.int_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        path = lambda s: tuple(int(v) for v in s.split(".")) if s else ()  # noqa: E731
        self._centroids = {path(s): np.asarray(c, dtype=np.float32) for s, c in state["centroids"].items()}
        self._leaf_count = PrefixCounter.from_int_state(state["leaf_count"])
