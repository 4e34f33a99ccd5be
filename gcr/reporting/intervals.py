"""Per-query retrieval metrics and bootstrap confidence intervals over test queries (numpy only).

A run's evaluation keeps, for every test query, the rank (1-based) of the first relevant target in the
retrieved list, or 0 when none was retrieved. Everything here starts from those ranks:

* :func:`per_query_values` turns ranks into one value per query: a hit (0/1) for ``R@K`` (any relevant target
  among the first K, the cross-modal retrieval convention), the reciprocal rank for ``MRR@K`` (0 beyond K);
* :func:`metrics_from_ranks` averages them: the same numbers the evaluation reports;
* :func:`percentile_interval` and :func:`paired_difference` are percentile bootstrap intervals of a metric
  averaged over seeds, and of the difference between two methods on the same queries.

The bootstrap. A result over several seeds is a list of per-seed samples (one value per test query). The
statistic is the mean over seeds of each seed's mean over queries. One resample draws every seed's queries
with replacement, independently per seed, and recomputes the statistic; the interval is the ``(1-c)/2`` and
``(1+c)/2`` quantiles of ``resamples`` such statistics. For a difference the samples are the per-query
differences ``a - b`` of two methods on the *same* queries of the same seed (the pairing), so the variation
both methods share (hard and easy queries) cancels. The interval describes the uncertainty from the finite
test set, given the trained models; the spread over training seeds is the ``± std`` the tables report beside it.

Determinism: the resample indices come from ``numpy.random.default_rng(seed)`` and depend only on ``seed``,
``resamples`` and the sample sizes, so every metric and every row compared with the same settings sees the
same resampled queries (common random numbers), and an identical pair gives exactly ``[0, 0]``.

Why hand-written numpy and not ``scipy.stats.bootstrap``: the pooled statistic needs several samples of
different sizes resampled independently (scipy's multi-sample mode), and scipy's keyword for the random
generator changed (``random_state`` became ``rng`` in 1.15) while gcr accepts whatever scipy scikit-learn
brings. The percentile bootstrap itself is a dozen lines here, runs in bounded memory (resamples are drawn
in chunks), and shares its resample indices across metrics. The test suite checks it against
``scipy.stats.bootstrap`` where scipy is installed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

#: Resamples drawn by default; the Monte Carlo error of a 95% percentile bound is then well under 0.5 points
#: of recall for a few hundred queries.
RESAMPLES = 2000
CONFIDENCE = 0.95
_METRIC = re.compile(r"^(R|MRR)@(\d+)$")
#: At most this many resampled values are held in memory at once (default of ``max_values``).
CHUNK_VALUES = 1 << 22


@dataclass(frozen=True)
class Interval:
    """A point estimate and its bootstrap interval ``[low, high]``."""

    estimate: float
    low: float
    high: float

    def contains(self, value: float = 0.0) -> bool:
        return self.low <= value <= self.high

    @property
    def significant(self) -> bool:
        """For a difference: the interval excludes 0 (otherwise the difference is *not significant*)."""
        return not self.contains(0.0)


# -- per-query metrics ----------------------------------------------------------------------------
def first_relevant_rank(ranking: Sequence[str], relevant: Iterable[str]) -> int:
    """1-based position of the first target of ``relevant`` in ``ranking``; 0 when none is in it."""
    hits = set(relevant)
    for position, target in enumerate(ranking, start=1):
        if target in hits:
            return position
    return 0


def parse_metric(name: str) -> tuple[str, int]:
    """``"R@10"`` -> ``("R", 10)``, ``"MRR@10"`` -> ``("MRR", 10)``; anything else is a ValueError."""
    m = _METRIC.match(name)
    if not m or int(m.group(2)) < 1:
        raise ValueError(f"unknown retrieval metric {name!r}: expected R@K or MRR@K with K >= 1")
    return m.group(1), int(m.group(2))


def per_query_values(ranks: Sequence[int] | np.ndarray, metric: str) -> np.ndarray:
    """One value per query: 1.0/0.0 for ``R@K`` (first relevant within K), ``1/rank`` (0 beyond K) for ``MRR@K``.

    A rank of 0 means no relevant target was retrieved: a miss for every K. K beyond the retrieval depth is
    allowed and counts what was retrieved, as the evaluation does.
    """
    kind, k = parse_metric(metric)
    r = np.asarray(ranks, dtype=np.int64)
    if r.ndim != 1 or (r < 0).any():
        raise ValueError("ranks must be a flat sequence of integers >= 0 (0: not retrieved)")
    within = (r >= 1) & (r <= k)
    if kind == "R":
        return within.astype(np.float64)
    return np.where(within, 1.0 / np.maximum(r, 1), 0.0)


def metrics_from_ranks(ranks: Sequence[int] | np.ndarray, names: Iterable[str]) -> dict[str, float]:
    """``{name: mean over queries}`` for each ``R@K`` / ``MRR@K`` in ``names``; an empty query list is a ValueError."""
    if len(ranks) == 0:
        raise ValueError("no queries: metrics need at least one per-query rank")
    return {name: float(per_query_values(ranks, name).mean()) for name in names}


# -- the bootstrap --------------------------------------------------------------------------------
def _samples(samples: Sequence[Sequence[float] | np.ndarray]) -> list[np.ndarray]:
    out = [np.asarray(s, dtype=np.float64) for s in samples]
    if not out:
        raise ValueError("no samples: pass one array of per-query values per seed")
    if any(s.ndim != 1 or s.size == 0 for s in out):
        raise ValueError("every sample must be a non-empty flat array of per-query values")
    return out


def resampled_statistics(samples: Sequence[Sequence[float] | np.ndarray], *, resamples: int = RESAMPLES,
                         seed: int = 0, max_values: int = CHUNK_VALUES) -> np.ndarray:
    """``resamples`` bootstrap replicates of the mean over samples of each sample's mean (shape ``(resamples,)``).

    Each sample (one seed's per-query values) is resampled with replacement on its own; the replicate is the
    mean of the resampled samples' means. The replicates are drawn in chunks of at most ``max_values``
    resampled values (a memory bound); the chunk size does not change them.
    """
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    rng = np.random.default_rng(seed)
    total = np.zeros(resamples)
    for values in _samples(samples):
        n = values.size
        chunk = max(1, max_values // n)
        for start in range(0, resamples, chunk):
            stop = min(resamples, start + chunk)
            total[start:stop] += values[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    return total / len(samples)


def _interval(samples: list[np.ndarray], confidence: float, resamples: int, seed: int) -> Interval:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}")
    estimate = float(np.mean([s.mean() for s in samples]))
    replicates = resampled_statistics(samples, resamples=resamples, seed=seed)
    low, high = np.quantile(replicates, [(1 - confidence) / 2, (1 + confidence) / 2])
    return Interval(estimate, float(low), float(high))


def percentile_interval(samples: Sequence[Sequence[float] | np.ndarray], *, confidence: float = CONFIDENCE,
                        resamples: int = RESAMPLES, seed: int = 0) -> Interval:
    """Percentile bootstrap interval of the mean over seeds of a per-query metric (one sample per seed)."""
    return _interval(_samples(samples), confidence, resamples, seed)


def paired_difference(a: Sequence[Sequence[float] | np.ndarray], b: Sequence[Sequence[float] | np.ndarray], *,
                      confidence: float = CONFIDENCE, resamples: int = RESAMPLES, seed: int = 0) -> Interval:
    """Paired bootstrap interval of ``mean(a) - mean(b)``, both averaged over seeds.

    ``a[s]`` and ``b[s]`` are the per-query values of two methods for seed ``s``, on the same queries in the
    same order. The per-query differences are resampled (the same queries for both methods), independently
    per seed, and averaged over seeds.
    """
    a, b = _samples(a), _samples(b)
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        raise ValueError("a paired difference needs the same seeds and the same queries on both sides "
                         f"(sizes {[x.size for x in a]} vs {[y.size for y in b]})")
    return _interval([x - y for x, y in zip(a, b)], confidence, resamples, seed)
