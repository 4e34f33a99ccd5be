"""Per-query metrics and bootstrap intervals (gcr.reporting.intervals, gcr.train.metrics) on hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest

from gcr.reporting.intervals import (
    first_relevant_rank,
    metrics_from_ranks,
    paired_difference,
    per_query_values,
    percentile_interval,
    resampled_statistics,
)


def _hits(pattern: str) -> np.ndarray:
    return np.array([c == "1" for c in pattern], dtype=float)


# -- per-query metrics ----------------------------------------------------------------------------
def test_ranks_and_per_query_values():
    assert first_relevant_rank(["a", "b", "c"], ["c", "b"]) == 2  # the first relevant one counts
    assert first_relevant_rank(["a", "b"], ["z"]) == 0 and first_relevant_rank([], ["a"]) == 0
    ranks = [1, 3, 0, 10, 11]
    assert per_query_values(ranks, "R@1").tolist() == [1, 0, 0, 0, 0]
    assert per_query_values(ranks, "R@10").tolist() == [1, 1, 0, 1, 0]
    assert per_query_values(ranks, "MRR@10").tolist() == pytest.approx([1, 1 / 3, 0, 0.1, 0])
    assert metrics_from_ranks(ranks, ["R@5", "MRR@3"]) == {"R@5": 0.4, "MRR@3": pytest.approx((1 + 1 / 3) / 5)}
    for bad in ("P@1", "R@0", "R@x"):
        with pytest.raises(ValueError, match="metric"):
            per_query_values(ranks, bad)
    with pytest.raises(ValueError, match=">= 0"):
        per_query_values([1, -1], "R@1")
    with pytest.raises(ValueError, match="no queries"):
        metrics_from_ranks([], ["R@1"])


def test_scorer_agrees_with_torchmetrics_on_random_rankings():
    """The scorer's rank-based metrics are torchmetrics' hit rate and MRR (the former implementation)."""
    torch = pytest.importorskip("torch")
    retrieval = pytest.importorskip("torchmetrics.retrieval")
    from gcr.train.metrics import RetrievalScorer

    rng = np.random.default_rng(0)
    targets = [f"t{i}" for i in range(30)]
    ranked, relevant, ids = [], [], []
    for q in range(200):
        depth = int(rng.integers(0, 12))  # some lists empty, some shorter than K
        ranked.append([targets[j] for j in rng.permutation(30)[:depth]])
        relevant.append([targets[j] for j in rng.choice(30, size=int(rng.integers(1, 6)), replace=False)])
        ids.append(f"q{q:03d}")
    scorer = RetrievalScorer((1, 5, 10))
    scorer.update(ranked[:120], relevant[:120], ids[:120])
    scorer.update(ranked[120:], relevant[120:], ids[120:])
    ours = scorer.compute()
    record = scorer.per_query()
    assert record["ids"] == ids and record["depth"] == max(len(r) for r in ranked)
    assert metrics_from_ranks(record["ranks"], list(ours)) == ours  # exactly: one computation

    preds, target, indexes = [], [], []
    for q, (ranking, hits) in enumerate(zip(ranked, relevant)):
        ranking = ranking or [None]
        preds += [float(len(ranking) - r) for r in range(len(ranking))]
        target += [t in hits for t in ranking]
        indexes += [q] * len(ranking)
    preds, target, indexes = torch.tensor(preds), torch.tensor(target), torch.tensor(indexes)
    for k in (1, 5, 10):
        expected = float(retrieval.RetrievalHitRate(top_k=k, empty_target_action="neg")(preds, target, indexes=indexes))
        assert ours[f"R@{k}"] == pytest.approx(expected, abs=1e-6)
    mrr = float(retrieval.RetrievalMRR(top_k=10, empty_target_action="neg")(preds, target, indexes=indexes))
    assert ours["MRR@10"] == pytest.approx(mrr, abs=1e-6)
    assert 0 < ours["R@1"] < ours["R@10"] < 1  # the case is not degenerate


# -- the bootstrap on hand-made cases -------------------------------------------------------------
def test_a_clear_difference_is_significant_and_its_interval_holds_the_difference():
    a = _hits("1" * 80 + "0" * 20)  # 80% hits
    b = _hits("1" * 20 + "0" * 80)  # 20% hits, on the same 100 queries
    diff = paired_difference([a], [b])
    assert diff.estimate == pytest.approx(0.6)
    assert diff.contains(0.6) and diff.significant
    assert 0.45 < diff.low < 0.6 < diff.high < 0.75
    reverse = paired_difference([b], [a])
    assert reverse.significant and reverse.high < 0


def test_a_small_difference_is_not_significant():
    # 200 queries: a alone hits 5 of them, b alone 4, both hit 60
    a = _hits("1" * 60 + "1" * 5 + "0" * 4 + "0" * 131)
    b = _hits("1" * 60 + "0" * 5 + "1" * 4 + "0" * 131)
    diff = paired_difference([a], [b])
    assert diff.estimate == pytest.approx(0.005)
    assert diff.contains(0.0) and not diff.significant and diff.contains(0.005)


def test_an_identical_pair_gives_exactly_zero():
    a = _hits("1100101" * 20)
    diff = paired_difference([a, a[::-1]], [a, a[::-1]])
    assert (diff.estimate, diff.low, diff.high) == (0.0, 0.0, 0.0)
    assert not diff.significant


def test_intervals_are_deterministic_for_a_seed_and_change_with_it():
    rng = np.random.default_rng(3)
    a, b = [rng.random(150) < 0.5], [rng.random(150) < 0.4]
    first = paired_difference(a, b, seed=7)
    assert paired_difference(a, b, seed=7) == first
    assert paired_difference(a, b, seed=8) != first
    own = percentile_interval(a, seed=7)
    assert own == percentile_interval(a, seed=7) and own.low < own.estimate < own.high


def test_pairing_cancels_what_both_methods_share():
    """Two methods that agree on most queries: the paired interval is far narrower than an unpaired one."""
    rng = np.random.default_rng(1)
    b = (rng.random(300) < 0.5).astype(float)
    a = b.copy()
    a[rng.choice(np.flatnonzero(b == 0), 30, replace=False)] = 1.0  # a fixes 30 of b's misses
    diff = paired_difference([a], [b])
    own_a, own_b = percentile_interval([a]), percentile_interval([b])
    assert diff.significant and diff.contains(0.1)
    unpaired_width = np.hypot(own_a.high - own_a.low, own_b.high - own_b.low)  # independent samples' widths add so
    assert diff.high - diff.low < 0.5 * unpaired_width
    assert own_a.low < own_b.high  # their own intervals overlap: pairing is what tells them apart


def test_seeds_are_pooled_by_averaging_per_seed_differences():
    rng = np.random.default_rng(2)
    a = [(rng.random(n) < p).astype(float) for n, p in ((200, 0.6), (200, 0.5), (180, 0.55))]
    b = [(rng.random(len(x)) < 0.45).astype(float) for x in a]
    pooled = paired_difference(a, b)
    assert pooled.estimate == pytest.approx(np.mean([x.mean() - y.mean() for x, y in zip(a, b)]))
    single = paired_difference(a[:1], b[:1])
    # three seeds' worth of queries: about sqrt(3) narrower than one seed's
    assert 1.3 < (single.high - single.low) / (pooled.high - pooled.low) < 2.3
    with pytest.raises(ValueError, match="same seeds and the same queries"):
        paired_difference(a, b[:2])
    with pytest.raises(ValueError, match="same seeds and the same queries"):
        paired_difference([a[0]], [a[2]])


def test_the_interval_covers_the_true_difference_about_95_percent_of_the_time():
    """Simulated test sets with a known true difference of 0.1 in hit rate (paired Bernoulli queries)."""
    rng = np.random.default_rng(0)
    covered = 0
    trials = 200
    for trial in range(trials):
        u, v, w = rng.random((3, 250))
        a = (u < 0.55).astype(float)
        b = np.where(w < 0.7, u < 0.45, v < 0.45).astype(float)  # correlated with a; true difference 0.10
        covered += paired_difference([a], [b], resamples=500, seed=trial).contains(0.55 - 0.45)
    assert 0.88 * trials <= covered <= trials


def test_resampling_is_chunked_without_changing_the_replicates():
    x = [np.arange(50, dtype=float), np.ones(7)]
    whole = resampled_statistics(x, resamples=300, seed=4)
    assert np.array_equal(resampled_statistics(x, resamples=300, seed=4, max_values=50 * 7), whole)  # 7 per chunk
    assert whole.shape == (300,) and np.all(whole >= 0.5)


def test_agrees_with_scipy_percentile_bootstrap():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(5)
    d = (rng.random(400) < 0.5).astype(float) - (rng.random(400) < 0.4).astype(float)
    ours = percentile_interval([d], resamples=4000, seed=1)
    theirs = stats.bootstrap((d,), np.mean, method="percentile", n_resamples=4000, vectorized=True,
                             random_state=np.random.default_rng(1)).confidence_interval
    assert ours.low == pytest.approx(theirs.low, abs=0.012)
    assert ours.high == pytest.approx(theirs.high, abs=0.012)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="no samples"):
        percentile_interval([])
    with pytest.raises(ValueError, match="non-empty"):
        percentile_interval([[]])
    with pytest.raises(ValueError, match="confidence"):
        percentile_interval([[1.0, 0.0]], confidence=95)
    with pytest.raises(ValueError, match="resamples"):
        percentile_interval([[1.0, 0.0]], resamples=0)
