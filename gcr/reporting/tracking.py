"""Weights & Biases tracking (``wandb.enabled=true``): one W&B run per gcr run; wandb is imported only then.

Every gcr run is a W&B run of its own, created with ``reinit="create_new"`` and finished before the next
starts (a run left active would otherwise swallow the next one: Lightning's ``WandbLogger`` reuses any
active run). The W&B run's name is the gcr run folder, relative to ``output_dir``:

========================================  ===========  ==================================================
W&B run name                              job_type     what
========================================  ===========  ==================================================
``<run_name>/<direction>``                train        one direction of ``gcr fit`` (curves + test row)
``<run_name>/dense``                      train / eval the dense baseline, when it trains or is scored
``bench-<name>/<label>-s<seed>/<dir>``    train        a bench member (a direction of one run and seed)
``bench-<name>/dense-s<seed>``            train / eval the bench's dense baseline for one seed
``bench-<name>``                          bench        the bench summary: table, plots, results.json
``<run_name>/eval``                       eval         ``gcr eval`` of a finished run
========================================  ===========  ==================================================

Runs are grouped by ``wandb.group`` (a bench sets ``bench-<name>``; a plain ``gcr fit`` uses its
``run_name``), so a bench is one W&B group. Each run carries the full resolved config (plus a ``gcr_run``
section: name, folder, part), tags ``scheme:``, ``backbone:``, ``data:``, ``direction:``, ``seed:``, and its
results rows (summary scalars ``{method}/{direction}/{metric}``, a ``results`` table, the raw ``rows``).
Each run's id is written to ``wandb-run.json`` in its folder, which is how the bench summary references
its members (ids and names in its config and a ``members`` table), reused ones included.

The mode is ``wandb.mode`` (``offline`` by default); ``$WANDB_MODE``, when set, wins (``disabled`` turns
tracking off). A run's W&B files go into its gcr run folder (``<folder>/wandb/offline-run-*``), never to
``$WANDB_DIR``, so a run folder holds everything about its run; :func:`read_offline_run` reads one back.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterable, Iterator
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from gcr.artifacts import write_json
from gcr.reporting.results import aggregate, is_main_process

TABLE_COLUMNS = ("method", "kind", "direction", "seed", "R@1", "R@5", "R@10", "MRR@10", "queries_per_s",
                 "train_seconds", "mean_id_tokens", "collision_rate")
MEMBERS_COLUMNS = ("name", "id", "job_type", "label", "seed", "direction", "reused", "folder")
RUN_RECORD = "wandb-run.json"  # written into a gcr run folder: the W&B run that tracked it


# -- what a results document becomes in W&B -------------------------------------------------------
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


def _scalar(value: Any) -> bool:
    return isinstance(value, int | float | str | bool) or value is None


def _row_dict(row: Any) -> dict[str, Any]:
    return asdict(row) if is_dataclass(row) else dict(row)


# -- one gcr run, one W&B run ---------------------------------------------------------------------
def enabled(cfg: Any) -> bool:
    """Whether ``cfg`` asks for W&B here (rank 0 only, and not ``WANDB_MODE=disabled``)."""
    wandb_cfg = cfg.get("wandb")
    return bool(wandb_cfg and wandb_cfg.get("enabled")) and is_main_process() and run_mode(cfg) != "disabled"


def run_mode(cfg: Any) -> str:
    mode = os.environ.get("WANDB_MODE") or (cfg.get("wandb") or {}).get("mode") or "offline"
    return "offline" if mode == "dryrun" else str(mode)


def run_group(cfg: Any) -> str:
    """``wandb.group`` (a bench sets ``bench-<name>``), else the run's own name."""
    return str((cfg.get("wandb") or {}).get("group") or cfg.run_name)


def run_tags(cfg: Any, **fields: Any) -> list[str]:
    """``key:value`` tags: scheme, backbone, data, seed, then ``fields`` (direction, ...); a None field is left out."""
    base = {"scheme": cfg.scheme.name, "backbone": cfg.model.name, "data": cfg.data.dataset, "seed": cfg.seed}
    tags = []
    for key, value in {**base, **fields}.items():
        for v in value if isinstance(value, list | tuple) else [value]:
            if v is not None:
                tags.append(f"{key}:{v}"[:64])  # W&B's limit on a tag
    return tags


class TrackedRun:
    """The W&B run of one gcr run: started on entry (or, ``lazy``, on first use), finished on exit.

    With W&B off (``wandb.enabled=false``, another rank, ``WANDB_MODE=disabled``) every method is a no-op,
    so callers need no ``if``. ``directory`` is the gcr run folder the W&B run is named after; its W&B files
    go to ``directory/wandb/`` (or ``$WANDB_DIR``) and its id to ``directory/wandb-run.json``.
    """

    def __init__(self, cfg: Any, name: str, directory: str | Path, *, job_type: str, tags: Iterable[str] = (),
                 config: dict[str, Any] | None = None, lazy: bool = False, **gcr_run: Any):
        self.cfg, self.name, self.directory = cfg, str(name), Path(directory)
        self.job_type, self.tags, self.lazy = job_type, list(tags), lazy
        self.extra_config = config
        self.gcr_run = gcr_run
        self.enabled = enabled(cfg)
        self.run = None

    def __enter__(self) -> TrackedRun:
        if not self.lazy:
            self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(exit_code=1 if exc_type is not None else 0)

    def start(self, job_type: str | None = None):
        """The W&B run (created now if needed; ``job_type`` overrides the default when it is created); None when off."""
        if not self.enabled:
            return None
        if self.run is not None:
            return self.run
        import wandb
        from omegaconf import OmegaConf

        if job_type is not None:
            self.job_type = job_type
        self.directory.mkdir(parents=True, exist_ok=True)
        config = self.extra_config
        if config is None:
            config = OmegaConf.to_container(self.cfg, resolve=True)
        config = {**config, "gcr_run": {"name": self.name, "folder": str(self.directory.resolve()), **self.gcr_run}}
        # the W&B files live in the gcr run folder they track (so a run folder is self-contained); wandb-core
        # resolves a relative dir against its own working directory, so the path is made absolute
        root = self.directory.resolve()
        self.run = wandb.init(
            project=str(self.cfg.wandb.project), name=self.name, group=run_group(self.cfg), job_type=self.job_type,
            tags=self.tags, config=config, dir=str(root), mode=run_mode(self.cfg), reinit="create_new",
            settings=wandb.Settings(console="off", silent=True),
        )
        self._record()
        return self.run

    def _record(self) -> None:
        run = self.run
        write_json(self.directory / RUN_RECORD, {
            "id": run.id, "name": self.name, "group": run_group(self.cfg), "project": str(self.cfg.wandb.project),
            "job_type": self.job_type, "mode": run_mode(self.cfg), "files": str(Path(run.dir).parent),
        })

    def lightning_logger(self, job_type: str = "train"):
        """A Lightning ``WandbLogger`` writing into this run (starting it as ``job_type``), or False when off."""
        run = self.start(job_type)
        if run is None:
            return False
        from lightning.pytorch.loggers import WandbLogger

        # what WandbLogger does for a run it creates itself: every metric is plotted against the global step
        run.define_metric("trainer/global_step")
        run.define_metric("*", step_metric="trainer/global_step", step_sync=True)
        return WandbLogger(experiment=run, name=self.name, project=str(self.cfg.wandb.project),
                           save_dir=str(self.directory))

    def log_rows(self, rows: Iterable[Any], job_type: str = "eval") -> None:
        """Put result rows (``ResultRow``s or their dicts) into the summary and a ``results`` table."""
        rows = [_row_dict(r) for r in rows]
        if not rows:
            return
        run = self.start(job_type)
        if run is None:
            return
        import wandb

        summary: dict[str, Any] = {}
        for r in rows:
            prefix = f"{r['method']}/{r['direction']}"
            summary.update({f"{prefix}/{k}": v for k, v in r["metrics"].items() if _scalar(v)})
            if r.get("train_seconds") is not None:
                summary[f"{prefix}/train_seconds"] = r["train_seconds"]
            summary.update({f"{prefix}/index/{k}": v for k, v in (r.get("index") or {}).items() if _scalar(v)})
        summary["rows"] = json.loads(json.dumps(rows, default=str))
        run.summary.update(summary)
        run.log({"results": wandb.Table(columns=list(TABLE_COLUMNS), data=table_rows({"rows": rows}))})

    def update_summary(self, values: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update(values)

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            run, self.run = self.run, None
            run.finish(exit_code=exit_code)


def direction_run(cfg: Any, direction: str, run_dir: str | Path) -> TrackedRun:
    """The W&B run of one direction of ``gcr fit`` (``<run_name>/<direction>``, job_type train)."""
    return TrackedRun(cfg, f"{cfg.run_name}/{direction}", Path(run_dir) / direction, job_type="train",
                      tags=run_tags(cfg, direction=direction), part="direction", direction=direction)


#: Config sections of the generative run that do not shape the dense baseline (left out of its W&B config).
GENERATIVE_ONLY = ("scheme", "model", "features", "description", "augment", "gsv", "rgs", "decoding")


def dense_run(cfg: Any, name: str, directory: str | Path) -> TrackedRun:
    """The dense baseline's W&B run, created only if it trains (job_type train) or is scored (eval)."""
    from omegaconf import OmegaConf

    dense_type = cfg.dense.get("name", "clip")
    tags = run_tags(cfg, direction=list(cfg.directions), backbone=f"dense-{dense_type}", scheme="dense")
    config = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in GENERATIVE_ONLY}
    config["dense"] = {**config["dense"], "enabled": True}  # a bench member's dense.enabled=false is not this run's
    return TrackedRun(cfg, name, directory, job_type="train", tags=tags, config=config, lazy=True, part="dense")


def log_eval(cfg: Any, run_dir: str | Path, results: dict[str, Any]) -> str | None:
    """``gcr eval``: the rows of a re-evaluated run in a W&B run of its own (``<run_name>/eval``, same group)."""
    directions = sorted({r["direction"] for r in results["rows"]})
    with TrackedRun(cfg, f"{cfg.run_name}/eval", Path(run_dir) / "eval", job_type="eval",
                    tags=run_tags(cfg, direction=directions), part="eval") as tracked:
        run_id = tracked.run.id if tracked.run is not None else None
        tracked.log_rows(results["rows"])
    return run_id


# -- the bench summary ----------------------------------------------------------------------------
def member_record(directory: str | Path) -> dict[str, Any] | None:
    """The ``wandb-run.json`` of a gcr run folder (None when it was never tracked)."""
    path = Path(directory) / RUN_RECORD
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def log_bench(results: dict[str, Any], directory: str | Path, cfg: Any,
              members: list[dict[str, Any]] | None = None) -> str | None:
    """Log a bench's summary run (job_type bench) when ``cfg.wandb.enabled``; returns its W&B run id (None when off).

    ``directory`` is the bench folder: the PNGs and results files found there are logged, results.json and
    results.md as an artifact. ``members``: one dict per member run (``name``, ``id``, ``label``, ``seed``,
    ``direction``, ``job_type``, ``reused``, ``folder``), put in the config and in a ``members`` table.
    """
    if not enabled(cfg):
        return None
    directory = Path(directory)
    bench = results.get("bench") or {}
    name = f"bench-{bench.get('name', 'results')}"
    members = list(members or [])
    config = {"bench": bench, "config": results.get("config"), "corpus": results.get("corpus"),
              "gcr_version": results.get("gcr_version"), "git_commit": results.get("git_commit"),
              "members": members}
    schemes = sorted({str(run["scheme"]) for run in (bench.get("runs") or {}).values()})
    tags = [f"bench:{bench.get('name')}", f"backbone:{cfg.model.name}", f"data:{cfg.data.dataset}",
            *(f"scheme:{s}" for s in schemes), *(f"seed:{s}" for s in bench.get("seeds") or [])]
    with TrackedRun(cfg, name, directory, job_type="bench", tags=tags, config=config, part="bench") as tracked:
        import wandb

        run = tracked.run
        payload: dict[str, Any] = dict(flat_scalars(results))
        payload["results"] = wandb.Table(columns=list(TABLE_COLUMNS), data=table_rows(results))
        payload["members"] = wandb.Table(columns=list(MEMBERS_COLUMNS),
                                         data=[[m.get(c) for c in MEMBERS_COLUMNS] for m in members])
        for png in sorted(directory.glob("*.png")):
            payload[f"plots/{png.stem}"] = wandb.Image(str(png))
        run.log(payload)
        run.summary["member_ids"] = [m.get("id") for m in members]
        artifact = wandb.Artifact(_artifact_name(f"{name}-results"), type="results",
                                  metadata={"gcr_results_version": results.get("gcr_results_version")})
        for filename in ("results.json", "results.md"):
            if (directory / filename).is_file():
                artifact.add_file(str(directory / filename))
        run.log_artifact(artifact)
        return run.id


# -- reading an offline run back ------------------------------------------------------------------
_BLOCK, _HEADER = 32768, 7  # the LevelDB log format W&B writes: 32 KiB blocks, 7-byte record headers


def _raw_records(path: Path) -> Iterator[bytes]:
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file (no ':W&B' header)")
    pos, pending = 7, b""  # after the file header: ident, magic, version
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        chunk = data[pos + _HEADER:pos + _HEADER + length]
        pos += _HEADER + length
        if kind == 1:  # FULL
            yield chunk
        elif kind == 2:  # FIRST
            pending = chunk
        elif kind == 3:  # MIDDLE
            pending += chunk
        elif kind == 4:  # LAST
            yield pending + chunk
            pending = b""


def read_offline_run(folder: str | Path) -> dict[str, Any]:
    """An offline W&B run folder (``offline-run-*``) read back with wandb's own record schema.

    Returns ``id``, ``name``, ``group``, ``job_type``, ``tags``, ``config`` (final values), ``summary`` (final
    values), ``history`` (one dict per logged step), ``artifacts`` (name, type, file paths) and ``exit_code``
    (None if the run never finished).
    """
    from wandb.proto import wandb_internal_pb2 as pb

    folder = Path(folder)
    (path,) = folder.glob("run-*.wandb")
    out: dict[str, Any] = {"config": {}, "summary": {}, "history": [], "artifacts": [], "exit_code": None}

    def apply(target: dict, item) -> None:
        keys = list(item.nested_key) or [item.key]
        for key in keys[:-1]:
            target = target.setdefault(key, {})
        target[keys[-1]] = json.loads(item.value_json)

    for raw in _raw_records(path):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            out.update(id=r.run_id, name=r.display_name, group=r.run_group, job_type=r.job_type,
                       project=r.project, tags=list(r.tags))
            for item in r.config.update:
                apply(out["config"], item)
        elif kind == "config":
            for item in record.config.update:
                apply(out["config"], item)
        elif kind == "summary":
            for item in record.summary.update:
                apply(out["summary"], item)
        elif kind == "history":
            step: dict[str, Any] = {}
            for item in record.history.item:
                apply(step, item)
            out["history"].append(step)
        elif kind == "artifact":
            a = record.artifact
            out["artifacts"].append({"name": a.name, "type": a.type, "files": [e.path for e in a.manifest.contents]})
        elif kind == "exit":
            out["exit_code"] = record.exit.exit_code
    return out
