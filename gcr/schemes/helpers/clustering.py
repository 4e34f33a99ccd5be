"""K-Means for the schemes (hkmeans, semcore, cart): one seeded fit, and the nearest centroid."""

from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans, MiniBatchKMeans
from threadpoolctl import threadpool_limits

#: below this many points one BLAS thread is much faster (thread start-up dominates small fits)
_ONE_THREAD_BELOW = 5000


def kmeans(x: np.ndarray, k: int, seed: int, minibatch_above: int) -> tuple[np.ndarray, np.ndarray]:
    """Cluster the rows of ``x`` into ``min(k, len(x))`` groups: ``(labels int64, centroids float32)``.

    MiniBatchKMeans above ``minibatch_above`` rows, else KMeans; ``n_init=3``, ``random_state=seed``.
    """
    k = min(int(k), len(x))
    algo = MiniBatchKMeans if len(x) > minibatch_above else KMeans
    with threadpool_limits(1 if len(x) < _ONE_THREAD_BELOW else None):
        km = algo(n_clusters=k, random_state=seed, n_init=3).fit(x)
    return km.labels_.astype(np.int64), km.cluster_centers_.astype(np.float32)


def nearest_centroid(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid (squared Euclidean) for each row of ``x``, as int64."""
    d = (x * x).sum(1, keepdims=True) - 2 * x @ centroids.T + (centroids * centroids).sum(1)
    return d.argmin(1).astype(np.int64)
