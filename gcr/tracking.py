"""Mirror a results document to Weights & Biases (``wandb.enabled=true``); wandb is imported only then.

W&B mirrors, never replaces, ``results.json``: flat scalars (``{method}/{direction}/R@1`` ..., the mean over
seeds, with ``.../R@1_std`` when there are several), the table as a ``wandb.Table`` (one row per result
row), every ``*.png`` in the folder as a ``wandb.Image``, and ``results.json`` / ``results.md`` as an
artifact of type ``results``. The mode is ``wandb.mode`` (``offline`` by default); ``$WANDB_MODE``, when
set, wins, so ``WANDB_MODE=disabled`` turns it off without touching a config.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from gcr.results import aggregate, is_main_process

TABLE_COLUMNS = ("method", "kind", "direction", "seed", "R@1", "R@5", "R@10", "MRR@10", "queries_per_s",
                 "train_seconds", "mean_id_tokens", "collision_rate")


def flat_scalars(results: dict[str, Any]) -> dict[str, float]:
    """``{method}/{direction}/{metric}``: the mean over seeds, and ``{metric}_std`` where there are several."""
    out: dict[str, float] = {}
    for (method, direction), agg in aggregate(results["rows"]).items():
        for name, (mean, std) in agg["metrics"].items():
            out[f"{method}/{direction}/{name}"] = mean
            if agg["n"] > 1:
                out[f"{method}/{direction}/{name}_std"] = std
    bench = results.get("bench") or {}
    for label, seconds in (bench.get("wall_seconds") or {}).items():
        known = [s for s in seconds if s is not None]
        if known:
            out[f"{label}/wall_seconds"] = sum(known) / len(known)
    return out


def table_rows(results: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for r in results["rows"]:
        m, index = r["metrics"], r.get("index") or {}
        rows.append([r["method"], r["kind"], r["direction"], r.get("seed"), *(m.get(k) for k in TABLE_COLUMNS[4:9]),
                     r.get("train_seconds"), index.get("mean_id_tokens"), index.get("collision_rate")])
    return rows


def _artifact_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", name)


def log_bench(results: dict[str, Any], directory: str | Path, cfg: Any) -> str | None:
    """Log a bench's results to W&B when ``cfg.wandb.enabled``; returns the W&B run id (None when off).

    ``directory`` is the bench folder: W&B writes its run under ``directory/wandb/`` and the PNGs and
    results files found there are logged.
    """
    if not cfg.wandb.enabled or not is_main_process():
        return None
    import wandb

    directory = Path(directory)
    bench = results.get("bench") or {}
    name = f"bench-{bench.get('name', 'results')}"
    mode = os.environ.get("WANDB_MODE") or cfg.wandb.get("mode") or "offline"
    run = wandb.init(
        project=cfg.wandb.project, name=name, dir=str(directory), mode=mode, job_type="bench",
        config={"bench": bench, "config": results.get("config"), "corpus": results.get("corpus"),
                "gcr_version": results.get("gcr_version"), "git_commit": results.get("git_commit")},
        settings=wandb.Settings(console="off", silent=True),
    )
    try:
        payload: dict[str, Any] = dict(flat_scalars(results))
        payload["results"] = wandb.Table(columns=list(TABLE_COLUMNS), data=table_rows(results))
        for png in sorted(directory.glob("*.png")):
            payload[f"plots/{png.stem}"] = wandb.Image(str(png))
        run.log(payload)
        artifact = wandb.Artifact(_artifact_name(f"{name}-results"), type="results",
                                  metadata={"gcr_results_version": results.get("gcr_results_version")})
        for filename in ("results.json", "results.md"):
            if (directory / filename).is_file():
                artifact.add_file(str(directory / filename))
        run.log_artifact(artifact)
        return run.id
    finally:
        run.finish()
