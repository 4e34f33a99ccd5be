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


def format_table(results: dict[str, Any]) -> str:
    """A Markdown table: one line per method, T2I and I2T metrics side by side."""
    directions = sorted({r["direction"] for r in results["rows"]}, key=lambda d: ("t2i", "i2t").index(d))
    by_method: dict[str, dict[str, dict]] = {}
    for r in results["rows"]:
        by_method.setdefault(r["method"], {})[r["direction"]] = r
    header = ["method"]
    for d in directions:
        header += [f"{d.upper()} {m}" for m in METRICS] + [f"{d.upper()} q/s"]
    header += ["train s", "ID tokens"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, per_dir in by_method.items():
        cells = [method]
        train = 0.0
        for d in directions:
            row = per_dir.get(d)
            m = row["metrics"] if row else {}
            cells += [f"{100 * m[k]:.1f}" if k in m else "-" for k in METRICS]
            cells.append(f"{m['queries_per_s']:.0f}" if "queries_per_s" in m else "-")
            seconds = (row or {}).get("train_seconds") or 0.0
            # the dense baseline is trained once for both directions; generative runs once per direction
            train = max(train, seconds) if (row or {}).get("kind") == "dense" else train + seconds
        lengths = [r["index"].get("mean_id_tokens") for r in per_dir.values() if r.get("index")]
        cells.append(f"{train:.0f}" if train else "-")
        cells.append(" / ".join(f"{x:.1f}" for x in lengths) if lengths else "-")
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
