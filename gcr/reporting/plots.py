"""Figures of a results document: Recall@K curves, and throughput against corpus size.

matplotlib is imported only when a figure is drawn, and never through ``pyplot``: each figure gets its own
Agg canvas, so drawing changes no global backend and needs no display.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from gcr.artifacts import atomic_write
from gcr.reporting.results import aggregate, direction_order

_RECALL = re.compile(r"^R@(\d+)$")


def _figure(ncols: int, *, width: float = 4.6, height: float = 3.6):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    with atomic_write(path, "wb") as fh:
        fig.savefig(fh, format=path.suffix.lstrip(".") or "png", dpi=120)
    return path


def recall_curves(results: Mapping[str, Any], path: str | Path) -> Path:
    """Recall@K (percent) against K, one line per method, one panel per direction.

    Only the K that were evaluated (``eval.ks``, by default 1, 5, 10) are known, so each line joins those
    points. With several seeds a point is the mean over the seeds. Its error bar is the 95% bootstrap interval
    over test queries when the document has one for that method (``intervals``, see
    :func:`gcr.reporting.results.compute_intervals`), else the sample std over the seeds (none for a single seed).
    """
    stats = aggregate(list(results["rows"]))
    intervals = {(e["method"], e["direction"]): e["metrics"] for e in (results.get("intervals") or {}).get("rows", [])}
    directions = sorted({d for _, d in stats}, key=direction_order)
    if not directions:
        raise ValueError("the results hold no rows to plot")
    fig, axes = _figure(len(directions))
    for ax, direction in zip(axes, directions):
        all_ks: set[int] = set()
        for (method, d), agg in stats.items():
            if d != direction:
                continue
            ks = sorted(int(m.group(1)) for name in agg["metrics"] if (m := _RECALL.match(name)))
            if not ks:
                continue
            all_ks.update(ks)
            means = [100 * agg["metrics"][f"R@{k}"][0] for k in ks]
            yerr = [100 * agg["metrics"][f"R@{k}"][1] for k in ks] if agg["n"] > 1 else None
            ci = intervals.get((method, d), {})
            if all(f"R@{k}" in ci for k in ks):  # asymmetric bars: mean - low, high - mean
                yerr = [[max(0.0, m - 100 * ci[f"R@{k}"]["low"]) for m, k in zip(means, ks)],
                        [max(0.0, 100 * ci[f"R@{k}"]["high"] - m) for m, k in zip(means, ks)]]
            label = method if agg["n"] == 1 else f"{method} (n={agg['n']})"
            ax.errorbar(ks, means, yerr=yerr, marker="o", capsize=3, label=label)
        ax.set_xticks(sorted(all_ks))
        ax.set_xlabel("K")
        ax.set_ylabel("Recall@K (%)")
        ax.set_ylim(0, 102)
        ax.set_title(direction.upper())
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    corpus = results.get("corpus", {}).get("name")
    bars = "bars: 95% bootstrap CI over test queries" if intervals else "bars: std over seeds"
    if corpus:
        fig.suptitle(f"Recall@K on {corpus} (test split)\n{bars}", fontsize="medium")
    return _save(fig, path)


def _point(p: Mapping[str, Any] | tuple) -> tuple[str, str | None, float, float]:
    if isinstance(p, Mapping):
        return str(p["method"]), p.get("direction"), float(p["size"]), float(p["queries_per_s"])
    if len(p) == 3:
        method, size, qps = p
        return str(method), None, float(size), float(qps)
    method, direction, size, qps = p
    return str(method), direction, float(size), float(qps)


def throughput_vs_size(points: Iterable[Mapping[str, Any] | tuple], path: str | Path) -> Path:
    """Retrieval throughput (queries/s) against corpus size (targets), log-log, one line per method.

    ``points``: mappings with ``method``, ``size``, ``queries_per_s`` and optionally ``direction`` (one panel
    per direction), or tuples ``(method, size, queries_per_s)`` / ``(method, direction, size, queries_per_s)``.
    Several points of one method at one size (seeds, repeats) are averaged.
    """
    series: dict[str | None, dict[str, dict[float, list[float]]]] = {}
    for p in points:
        method, direction, size, qps = _point(p)
        if size <= 0 or qps <= 0:
            raise ValueError(f"corpus size and queries/s must be positive, got {size} and {qps} for {method}")
        series.setdefault(direction, {}).setdefault(method, {}).setdefault(size, []).append(qps)
    if not series:
        raise ValueError("no throughput points to plot")
    directions = sorted(series, key=lambda d: (0, "") if d is None else (1, *direction_order(d)))
    fig, axes = _figure(len(directions))
    for ax, direction in zip(axes, directions):
        for method, by_size in series[direction].items():
            sizes = sorted(by_size)
            ax.plot(sizes, [sum(by_size[s]) / len(by_size[s]) for s in sizes], marker="o", label=method)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("corpus size (targets)")
        ax.set_ylabel("queries / s")
        if direction is not None:
            ax.set_title(str(direction).upper())
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize="small")
    return _save(fig, path)
