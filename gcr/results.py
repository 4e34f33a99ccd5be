"""Versioned results JSON and the results table printed at the end of every run."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gcr import __version__
from gcr.artifacts import write_json

RESULTS_VERSION = 1
METRICS = ("R@1", "R@5", "R@10", "MRR@10")


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


def _recall_cell(values: list[float]) -> str:
    mean, std = mean_std([100 * v for v in values])
    return f"{mean:.1f}" if len(values) == 1 else f"{mean:.1f} ± {std:.1f}"


def format_table(results: dict[str, Any]) -> str:
    """A Markdown table: one line per method, T2I and I2T metrics side by side.

    A method with rows from several seeds (``gcr bench`` with ``seeds: [0, 1, ...]``) shows ``mean ± std`` of
    Recall@K and MRR@10 over the seeds (sample std, ddof=1), the mean q/s and the mean training seconds per
    seed, and a ``seeds`` column is added. ``collision`` is the share of targets (percent) whose identifier
    is shared with another target, per direction, when the index reports it.
    """
    grouped = group_rows(results["rows"])
    directions = sorted({r["direction"] for r in results["rows"]}, key=direction_order)
    multi_seed = any(len(g) > 1 for per_dir in grouped.values() for g in per_dir.values())
    with_collisions = any("collision_rate" in (r.get("index") or {}) for r in results["rows"])
    header = ["method"]
    for d in directions:
        header += [f"{d.upper()} {m}" for m in METRICS] + [f"{d.upper()} q/s"]
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
    write_json(directory / "results.json", results)
    from gcr.artifacts import atomic_write

    with atomic_write(directory / "results.md", "w") as fh:
        fh.write(format_table(results) + "\n")
    return directory / "results.json"


def print_table(results: dict[str, Any], title: str = "results") -> None:
    """Print the results table with rich (plain Markdown when not a terminal); rank 0 only."""
    if not is_main_process():
        return
    from rich.console import Console
    from rich.table import Table

    md = format_table(results).splitlines()
    header = [c.strip() for c in md[0].strip("|").split("|")]
    table = Table(title=f"{title}  ({results['corpus']['name']}, test split, {results['device']})")
    for h in header:
        table.add_column(h, justify="left" if h == "method" else "right")
    for line in md[2:]:
        table.add_row(*[c.strip() for c in line.strip("|").split("|")])
    Console(width=max(120, 14 * len(header))).print(table)
