"""Versioned results JSON and the results table printed at the end of every run.

Version 2 (``gcr_results_version``) adds ``per_query`` to every row: ``{"ids": [...], "ranks": [...],
"depth": D}``, each test query's id (the caption id for ``t2i``, the image id for ``i2t``) and the 1-based rank
of its first relevant target in the retrieved list (0: not retrieved), so R@K and MRR@K can be recomputed
(:func:`row_metrics_from_ranks`) and bootstrap intervals drawn (:func:`compute_intervals`) without retraining.
A ``gcr bench`` document also holds an ``intervals`` section. Version 1 files still read: their rows simply
have no per-query record and get no interval.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gcr import __version__
from gcr.artifacts import atomic_write
from gcr.errors import ConfigError
from gcr.reporting.intervals import (
    CONFIDENCE,
    RESAMPLES,
    metrics_from_ranks,
    paired_difference,
    parse_metric,
    per_query_values,
    percentile_interval,
)

RESULTS_VERSION = 2
METRICS = ("R@1", "R@5", "R@10", "MRR@10")
#: The metric whose difference to the reference the main table shows (every metric's is in the intervals table).
HEADLINE = "R@1"


@dataclass
class ResultRow:
    """One method in one direction: metrics, training time, identifier statistics."""

    method: str
    kind: str  # "generative" | "dense"
    direction: str
    metrics: dict[str, float]
    train_seconds: float | None
    index: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None  # set by `gcr bench`: rows of one method and direction from several seeds are averaged
    per_query: dict[str, Any] | None = None  # {"ids", "ranks", "depth"}: see the module docstring


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _device() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()})"


def build_results(cfg: Any, corpus: Any, rows: list[ResultRow]) -> dict[str, Any]:
    """The results document: versions, config, corpus, and one entry per row."""
    from omegaconf import OmegaConf

    return {
        "gcr_results_version": RESULTS_VERSION,
        "gcr_version": __version__,
        "git_commit": _git_commit(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": _device(),
        "seed": int(cfg.seed),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "corpus": {"name": corpus.name, "fingerprint": corpus.fingerprint(), **_split_sizes(corpus), **corpus.meta},
        "rows": [asdict(r) for r in rows],
    }


def _split_sizes(corpus: Any) -> dict[str, int]:
    return {f"{s}_images": len(corpus.split(s)) for s in ("train", "val", "test")}


def direction_order(direction: str) -> tuple[int, str]:
    return (("t2i", "i2t").index(direction) if direction in ("t2i", "i2t") else 2, direction)


def group_rows(rows: list[dict[str, Any]]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """``{method: {direction: [one row per seed]}}``, methods in the order they first appear.

    Rows of one method and direction with the same ``seed`` (``None`` included) replace each other (the last
    one wins), so a results document without seeds groups exactly one row per method and direction.
    """
    grouped: dict[str, dict[str, dict[Any, dict[str, Any]]]] = {}
    for r in rows:
        grouped.setdefault(r["method"], {}).setdefault(r["direction"], {})[r.get("seed")] = r
    return {m: {d: list(by_seed.values()) for d, by_seed in per_dir.items()} for m, per_dir in grouped.items()}


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and the *sample* standard deviation (ddof=1) over seeds; the std is 0.0 for a single value."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5


def aggregate(rows: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Per (method, direction): ``{"n": seeds, "seeds": [...], "metrics": {name: (mean, std)}}`` over its seeds."""
    out = {}
    for method, per_dir in group_rows(rows).items():
        for direction, group in per_dir.items():
            names = [k for k in group[0]["metrics"] if all(k in r["metrics"] for r in group)]
            out[(method, direction)] = {
                "n": len(group),
                "seeds": [r.get("seed") for r in group],
                "metrics": {k: mean_std([float(r["metrics"][k]) for r in group]) for k in names},
            }
    return out


# -- per-query records and intervals ---------------------------------------------------------------
def row_metrics_from_ranks(row: dict[str, Any], names: list[str] | None = None) -> dict[str, float]:
    """R@K / MRR@K of a row recomputed from its ``per_query`` ranks (by default, every such metric it reports).

    Equal to the row's ``metrics`` exactly: the evaluation computes them from the same ranks.
    """
    per_query = row.get("per_query")
    if not per_query:
        raise ValueError(f"row {row.get('method')}/{row.get('direction')} has no per-query record "
                         "(written by gcr before results version 2); re-evaluate it with `gcr eval`")
    if names is None:
        names = [k for k in row["metrics"] if _is_rank_metric(k)]
    return metrics_from_ranks(per_query["ranks"], names)


def _is_rank_metric(name: str) -> bool:
    try:
        parse_metric(name)
    except ValueError:
        return False
    return True


def default_reference(results: dict[str, Any]) -> str:
    """The dense baseline's method if the document has one, else the first method."""
    rows = results["rows"]
    if not rows:
        raise ValueError("the results hold no rows")
    return next((r["method"] for r in rows if r.get("kind") == "dense"), rows[0]["method"])


def _by_id(row: dict[str, Any]) -> dict[str, int]:
    pq = row["per_query"]
    return dict(zip(pq["ids"], pq["ranks"]))


def compute_intervals(results: dict[str, Any], reference: str | None = None, *, confidence: float | None = None,
                      resamples: int | None = None, seed: int = 0) -> dict[str, Any]:
    """The ``intervals`` section: for each (method, direction), bootstrap intervals from the per-query ranks.

    ``metrics[name]`` holds ``mean``, ``low``, ``high`` (the percentile interval of the row's mean over seeds)
    and, for every row but the reference, ``diff``, ``diff_low``, ``diff_high`` and ``significant`` (the paired
    interval of its difference to ``reference``, which is False, "n.s.", when it contains 0). Pairs are
    the same direction, the same seed and the same query ids; queries are resampled within each seed and
    the per-seed differences averaged (:func:`gcr.reporting.intervals.paired_difference`). A (method, direction)
    without per-query records is listed under ``missing`` with the reason; values are fractions (not %).
    """
    confidence = CONFIDENCE if confidence is None else confidence
    resamples = RESAMPLES if resamples is None else resamples
    grouped = group_rows(results["rows"])
    reference = reference or default_reference(results)
    if reference not in grouped:
        raise ConfigError(f"reference {reference!r} is not a method of these results; "
                          f"choose one of {', '.join(grouped)}")
    section: dict[str, Any] = {
        "reference": reference, "confidence": confidence, "resamples": resamples, "seed": seed,
        "method": "percentile bootstrap over test queries; pairs: same direction, seed and query id; "
                  "queries resampled within each seed, statistics averaged over seeds",
        "rows": [], "missing": [],
    }
    for method, per_dir in grouped.items():
        for direction, group in sorted(per_dir.items(), key=lambda item: direction_order(item[0])):
            with_ranks = {r.get("seed"): r for r in group if r.get("per_query")}
            if not with_ranks:
                section["missing"].append({"method": method, "direction": direction,
                                           "why": "no per-query ranks (results written before version 2)"})
                continue
            names = [k for k in group[0]["metrics"] if _is_rank_metric(k) and all(k in r["metrics"] for r in group)]
            seeds = sorted(with_ranks, key=lambda s: (s is None, s))
            entry: dict[str, Any] = {"method": method, "direction": direction, "seeds": seeds,
                                     "queries": [len(with_ranks[s]["per_query"]["ranks"]) for s in seeds],
                                     "metrics": {}}
            ranks = [np.asarray(with_ranks[s]["per_query"]["ranks"]) for s in seeds]
            for name in names:
                own = percentile_interval([per_query_values(r, name) for r in ranks], confidence=confidence,
                                          resamples=resamples, seed=seed)
                entry["metrics"][name] = {"mean": own.estimate, "low": own.low, "high": own.high}
            ref = {r.get("seed"): r for r in grouped[reference].get(direction, []) if r.get("per_query")}
            paired = [s for s in seeds if s in ref]
            if method != reference and paired:
                mine = [_by_id(with_ranks[s]) for s in paired]
                theirs = [_by_id(ref[s]) for s in paired]
                common = [sorted(set(a) & set(b)) for a, b in zip(mine, theirs)]
                if all(common):
                    entry["paired_seeds"] = paired
                    entry["paired_queries"] = [len(c) for c in common]
                    for name in names:
                        if name not in ref[paired[0]]["metrics"]:
                            continue
                        a = [per_query_values([m[q] for q in c], name) for m, c in zip(mine, common)]
                        b = [per_query_values([t[q] for q in c], name) for t, c in zip(theirs, common)]
                        diff = paired_difference(a, b, confidence=confidence, resamples=resamples, seed=seed)
                        entry["metrics"][name].update(diff=diff.estimate, diff_low=diff.low, diff_high=diff.high,
                                                      significant=diff.significant)
                else:
                    section["missing"].append({"method": method, "direction": direction,
                                               "why": f"no test query in common with {reference!r}"})
            elif method != reference:
                section["missing"].append({"method": method, "direction": direction,
                                           "why": f"no seed in common with {reference!r} (with per-query ranks)"})
            section["rows"].append(entry)
    return section


def _interval_entry(results: dict[str, Any], method: str, direction: str) -> dict[str, Any] | None:
    for entry in (results.get("intervals") or {}).get("rows", []):
        if entry["method"] == method and entry["direction"] == direction:
            return entry
    return None


def _diff_cell(results: dict[str, Any], method: str, direction: str, name: str) -> str:
    if method == (results.get("intervals") or {}).get("reference"):
        return "ref"
    entry = _interval_entry(results, method, direction)
    m = (entry or {}).get("metrics", {}).get(name, {})
    if "diff" not in m:
        return "-"
    cell = f"{100 * m['diff']:+.1f} [{100 * m['diff_low']:+.1f}, {100 * m['diff_high']:+.1f}]"
    return cell if m["significant"] else cell + " n.s."


def _own_cell(results: dict[str, Any], method: str, direction: str, name: str) -> str:
    entry = _interval_entry(results, method, direction)
    m = (entry or {}).get("metrics", {}).get(name)
    if not m:
        return "-"
    return f"{100 * m['mean']:.1f} [{100 * m['low']:.1f}, {100 * m['high']:.1f}]"


def format_intervals(results: dict[str, Any]) -> str:
    """A Markdown table of the ``intervals`` section, with a one-line caption; ``""`` when there is none.

    One line per method and direction; for each metric, the mean over seeds with its 95% interval, and the
    difference to the reference with its paired interval (percentage points), ``n.s.`` when it contains 0.
    """
    section = results.get("intervals")
    if not section or not section.get("rows"):
        return ""
    names = [k for k in METRICS if any(k in e["metrics"] for e in section["rows"])]
    names += sorted({k for e in section["rows"] for k in e["metrics"]} - set(names))
    reference = section["reference"]
    level = f"{100 * section['confidence']:g}%"
    header = ["method", "dir"]
    for name in names:
        header += [f"{name} [{level} CI]", f"Δ{name} vs {reference}"]
    lines = [
        f"Intervals: {level} percentile bootstrap over test queries ({section['resamples']} resamples, "
        f"seeds averaged); Δ: paired difference to `{reference}` on the same seeds and queries, in points; "
        "n.s.: its interval contains 0.",
        "",
        "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
    ]
    for entry in section["rows"]:
        method, direction = entry["method"], entry["direction"]
        cells = [method, direction.upper()]
        for name in names:
            cells += [_own_cell(results, method, direction, name), _diff_cell(results, method, direction, name)]
        lines.append("| " + " | ".join(cells) + " |")
    for miss in section.get("missing", []):
        lines += ["", f"No interval for {miss['method']} {miss['direction'].upper()}: {miss['why']}."]
    return "\n".join(lines)


def _recall_cell(values: list[float]) -> str:
    mean, std = mean_std([100 * v for v in values])
    return f"{mean:.1f}" if len(values) == 1 else f"{mean:.1f} ± {std:.1f}"


def format_table(results: dict[str, Any]) -> str:
    """A Markdown table: one line per method, T2I and I2T metrics side by side.

    A method with rows from several seeds (``gcr bench`` with ``seeds: [0, 1, ...]``) shows ``mean ± std`` of
    Recall@K and MRR@10 over the seeds (sample std, ddof=1), the mean q/s and the mean training seconds per
    seed, and a ``seeds`` column is added. ``collision`` is the share of targets (percent) whose identifier
    is shared with another target, per direction, when the index reports it. When the document has an
    ``intervals`` section (:func:`compute_intervals`), a ``ΔR@1`` column per direction gives each method's
    difference to the reference with its paired 95% interval, ``n.s.`` when the interval contains 0.
    """
    grouped = group_rows(results["rows"])
    directions = sorted({r["direction"] for r in results["rows"]}, key=direction_order)
    multi_seed = any(len(g) > 1 for per_dir in grouped.values() for g in per_dir.values())
    with_collisions = any("collision_rate" in (r.get("index") or {}) for r in results["rows"])
    with_intervals = bool((results.get("intervals") or {}).get("rows"))
    header = ["method"]
    for d in directions:
        header += [f"{d.upper()} {m}" for m in METRICS] + ([f"{d.upper()} Δ{HEADLINE}"] if with_intervals else [])
        header += [f"{d.upper()} q/s"]
    header += ["train s", "ID tokens"] + (["collision"] if with_collisions else []) + (["seeds"] if multi_seed else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, per_dir in grouped.items():
        cells = [method]
        train_per_seed: dict[Any, float] = {}
        for d in directions:
            group = per_dir.get(d, [])
            for k in METRICS:
                values = [r["metrics"][k] for r in group if k in r["metrics"]]
                cells.append(_recall_cell(values) if values else "-")
            if with_intervals:
                cells.append(_diff_cell(results, method, d, HEADLINE))
            qps = [r["metrics"]["queries_per_s"] for r in group if "queries_per_s" in r["metrics"]]
            cells.append(f"{mean_std(qps)[0]:.0f}" if qps else "-")
            for r in group:
                seconds = r.get("train_seconds") or 0.0
                seed = r.get("seed")
                # the dense baseline is trained once for both directions; generative runs once per direction
                if r.get("kind") == "dense":
                    train_per_seed[seed] = max(train_per_seed.get(seed, 0.0), seconds)
                else:
                    train_per_seed[seed] = train_per_seed.get(seed, 0.0) + seconds
        train = mean_std(list(train_per_seed.values()))[0] if train_per_seed else 0.0
        lengths = [[r["index"]["mean_id_tokens"] for r in per_dir.get(d, [])
                    if (r.get("index") or {}).get("mean_id_tokens") is not None] for d in directions]
        lengths = [mean_std(x)[0] for x in lengths if x]
        cells.append(f"{train:.0f}" if train else "-")
        cells.append(" / ".join(f"{x:.1f}" for x in lengths) if lengths else "-")
        if with_collisions:
            rates = [[r["index"]["collision_rate"] for r in per_dir.get(d, [])
                      if (r.get("index") or {}).get("collision_rate") is not None] for d in directions]
            rates = [mean_std(x)[0] for x in rates if x]
            cells.append(" / ".join(f"{100 * x:.1f}" for x in rates) if rates else "-")
        if multi_seed:
            cells.append(str(max(len(g) for g in per_dir.values())))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def is_main_process() -> bool:
    """False in the extra processes a multi-process (DDP) run starts: only rank 0 writes and prints results."""
    return os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) == "0"


def save_results(results: dict[str, Any], directory: str | Path) -> Path:
    """Write ``results.json`` and ``results.md`` atomically into ``directory`` (rank 0 only)."""
    directory = Path(directory)
    if not is_main_process():
        return directory / "results.json"
    with atomic_write(directory / "results.json", "w") as fh:
        fh.write(compact_json(results) + "\n")
    with atomic_write(directory / "results.md", "w") as fh:
        fh.write(format_markdown(results))
    return directory / "results.json"


def format_markdown(results: dict[str, Any]) -> str:
    """``results.md``: the table, then the intervals table when the document has intervals."""
    intervals = format_intervals(results)
    return format_table(results) + "\n" + (f"\n{intervals}\n" if intervals else "")


def compact_json(value: Any, indent: int = 0) -> str:
    """Indented JSON with every list of plain values (per-query ids and ranks) on one line."""
    pad, inner = " " * indent, " " * (indent + 2)
    if isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(str(k))}: {compact_json(v, indent + 2)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(value, list | tuple) and value and any(isinstance(v, dict | list | tuple) for v in value):
        return "[\n" + ",\n".join(f"{inner}{compact_json(v, indent + 2)}" for v in value) + f"\n{pad}]"
    return json.dumps(value, default=str)


def print_table(results: dict[str, Any], title: str = "results") -> None:
    """Print the results table with rich (plain Markdown when not a terminal); rank 0 only."""
    if not is_main_process():
        return
    corpus = (results.get("corpus") or {}).get("name", "?")
    _print_markdown(format_table(results).splitlines(), f"{title}  ({corpus}, test split, {results.get('device')})")
    intervals = format_intervals(results).splitlines()
    if intervals:
        _print_markdown([line for line in intervals if line.startswith("|")], intervals[0])
        for note in intervals:
            if note.startswith("No interval"):
                print(note)


def _print_markdown(md: list[str], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    header = [c.strip() for c in md[0].strip("|").split("|")]
    table = Table(title=title)
    for h in header:
        table.add_column(h, justify="left" if h in ("method", "dir") else "right")
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in md[2:]]
    for row in rows:
        table.add_row(*row)
    width = sum(max(len(c) for c in column) + 3 for column in zip(header, *rows)) + 1
    Console(width=max(120, width)).print(table)
