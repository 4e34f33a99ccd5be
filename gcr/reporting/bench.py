"""``gcr bench NAME``: several schemes or variants on the same data, backbone and budget, one table.

A bench file (``configs/bench/NAME.yaml``, or any YAML path) is plain YAML, not a Hydra group::

    name: baselines            # the output folder is <output_dir>/bench-<name>/ (default: the file's stem)
    seeds: [0, 1, 2]           # every run once per seed; the table reports mean ± std (sample std, ddof=1)
    overrides: []              # applied to every run, before the command line's overrides
    dense: true                # evaluate the dense baseline once per seed (false: no dense row)
    dense_extra: [pretrained]  # more dense baselines (``dense`` group options), one row each per seed
    reference: dense           # the row every other row is compared with (paired bootstrap 95% interval);
                               # a run label, or dense; default: dense when dense is true, else the first run
    runs:                      # label -> that run's Hydra overrides (applied last)
      atomic: [scheme=atomic]
      hkmeans: [scheme=hkmeans]

Each run is composed as ``overrides + command line + run overrides + [seed=S,
run_name=bench-NAME/LABEL-sS, dense.enabled=false, wandb.group=bench-NAME]``. Every config is composed and
checked before the first run starts, so a bad key fails at once. The runs must share ``data``, ``eval`` and ``output_dir``:
that is what makes one table of them a comparison.

Output, in ``<output_dir>/bench-<name>/``: one folder per run (``LABEL-sS/``, a normal ``gcr fit`` run
folder plus ``bench_run.json``), ``results.json`` (every row, each generative row's ``method`` renamed to
its run label and carrying its ``seed``, a ``bench`` section and an ``intervals`` section: every row's
95% interval and its paired difference to the reference, see :func:`gcr.reporting.results.compute_intervals`),
``results.md`` and ``recall_at_k.png``. ``gcr table PATH`` recomputes the tables from a stored results.json.
The dense baseline is trained (or loaded from the cache) once per seed, before that seed's runs.

With ``wandb.enabled=true`` every member is a W&B run of its own in the group ``bench-NAME`` (each
direction of each run and seed, ``LABEL-sS/DIR``; the dense baseline, ``dense-sS/``), and the bench
summary run (job_type ``bench``, files in ``wandb/`` of the bench folder) lists them (see gcr.reporting.tracking).

Resuming: a run folder holding a ``results.json`` whose config equals the run's resolved config (``wandb``
aside, which does not change a result) is a finished run: its rows are reused, nothing is retrained.
A folder without one (an interrupted run) is handed to ``fit``, which resumes each direction from its
``last.ckpt``. A folder left by a *different* config is cleared first: its checkpoints belong to another
config and must not be resumed.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gcr.config import compose, upgrade_config
from gcr.data.sources import load_dataset
from gcr.errors import ConfigError
from gcr.reporting import tracking
from gcr.reporting.plots import recall_curves
from gcr.reporting.results import (
    ResultRow,
    build_results,
    compute_intervals,
    default_reference,
    is_main_process,
    print_table,
    save_results,
)
from gcr.schemes import build_scheme

log = logging.getLogger("gcr")

BENCH_GROUP = "bench"
RUN_MARKER = "bench_run.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
_KEYS = {"name", "description", "seeds", "overrides", "runs", "dense", "dense_extra", "reference"}
#: Config keys that may differ between a finished run and the new one without forcing a retrain.
IGNORED_FOR_REUSE = ("wandb",)
#: Config keys every run of a bench must share.
SHARED_KEYS = ("data", "eval", "output_dir")


@dataclass
class BenchSpec:
    """A parsed bench file."""

    name: str
    runs: dict[str, list[str]]
    seeds: list[int] = field(default_factory=lambda: [0])
    overrides: list[str] = field(default_factory=list)
    dense: bool = True
    #: more dense baselines, each a ``dense`` group option (e.g. ``pretrained``): one row each per seed
    dense_extra: list[str] = field(default_factory=list)
    description: str | None = None
    path: str | None = None
    reference: str | None = None  # None: the dense baseline when there is one, else the first run

    @classmethod
    def from_mapping(cls, data: Any, *, default_name: str | None = None, path: str | None = None) -> BenchSpec:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(data, DictConfig):
            data = OmegaConf.to_container(data, resolve=True)
        where = path or "bench config"
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: a bench file is a mapping with runs: {{label: [overrides]}}")
        unknown = sorted(set(data) - _KEYS)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; a bench file has {', '.join(sorted(_KEYS))}")
        name = str(data.get("name") or default_name or "")
        if not _NAME.match(name):
            raise ConfigError(f"{where}: name {name!r} must be letters, digits, '_', '.', '+' or '-'")
        runs = data.get("runs")
        if not isinstance(runs, dict) or not runs:
            raise ConfigError(f"{where}: runs must map at least one label to its overrides, e.g. atomic: [scheme=atomic]")
        parsed_runs = {}
        for label, overrides in runs.items():
            label = str(label)
            if not _NAME.match(label):
                raise ConfigError(f"{where}: run label {label!r} must be letters, digits, '_', '.', '+' or '-'")
            parsed_runs[label] = _string_list(overrides, f"{where}: runs.{label}")
        seeds = data.get("seeds", [0])
        seeds = [seeds] if isinstance(seeds, int) else seeds
        if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise ConfigError(f"{where}: seeds must be a non-empty list of integers, got {seeds!r}")
        if len(set(seeds)) != len(seeds):
            raise ConfigError(f"{where}: seeds repeat: {seeds}")
        dense = data.get("dense", True)
        if not isinstance(dense, bool):
            raise ConfigError(f"{where}: dense must be true or false, got {dense!r}")
        reference = data.get("reference")
        if reference is not None:
            reference = str(reference)
            known = reference in parsed_runs or any(reference.startswith(f"{label}+") for label in parsed_runs)
            if not known and not (dense and reference.startswith("dense")):
                raise ConfigError(f"{where}: reference {reference!r} is not a run of this bench; choose one of "
                                  f"{', '.join([*parsed_runs, *(['dense'] if dense else [])])}")
        return cls(name=name, runs=parsed_runs, seeds=list(seeds),
                   overrides=_string_list(data.get("overrides") or [], f"{where}: overrides"),
                   dense=dense, description=data.get("description"), path=path, reference=reference,
                   dense_extra=_string_list(data.get("dense_extra") or [], f"{where}: dense_extra"))


def _string_list(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where} must be a list of key=value overrides, got {value!r}")
    return list(value)


def available_benches(cdir: Path) -> list[str]:
    return sorted(p.stem for p in (Path(cdir) / BENCH_GROUP).glob("*.yaml"))


def load_bench(name_or_path: str, cdir: Path) -> BenchSpec:
    """``NAME`` (``<config dir>/bench/NAME.yaml``) or a path to a bench YAML file."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") and candidate.is_file():
        path = candidate
    else:
        path = Path(cdir) / BENCH_GROUP / f"{name_or_path}.yaml"
        if not path.is_file():
            names = available_benches(cdir)
            raise ConfigError(
                f"unknown bench {name_or_path!r}: no file {path}. "
                f"Available in {Path(cdir) / BENCH_GROUP}: {', '.join(names) if names else 'none'}; "
                "or pass the path of a bench YAML file."
            )
    try:
        data = OmegaConf.load(path)
    except (OmegaConfBaseException, OSError, ValueError) as exc:
        raise ConfigError(f"bench file {path} is not valid YAML ({exc})") from None
    return BenchSpec.from_mapping(data, default_name=path.stem, path=str(path))


# -- planning -----------------------------------------------------------------------------------
@dataclass
class BenchRun:
    """One run of a bench: its label, seed, overrides and the composed, checked config (see :func:`plan`)."""

    label: str
    seed: int
    overrides: list[str]
    cfg: Any

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.output_dir) / self.cfg.run_name


def plan(spec: BenchSpec, base_overrides: list[str], cdir: Path) -> list[BenchRun]:
    """Compose and check every run's config (seed-major order); nothing is written."""
    from omegaconf import OmegaConf

    runs = []
    for seed in spec.seeds:
        for label, run_overrides in spec.runs.items():
            overrides = [*spec.overrides, *base_overrides, *run_overrides, f"seed={seed}",
                         f"run_name=bench-{spec.name}/{label}-s{seed}", "dense.enabled=false",
                         f"wandb.group=bench-{spec.name}"]  # the bench is one W&B group
            try:
                cfg = compose(overrides, cdir)
                options = {k: v for k, v in OmegaConf.to_container(cfg.scheme, resolve=True).items() if k != "name"}
                build_scheme(cfg.scheme.name, seed=cfg.seed, **options)  # unknown scheme options fail here
            except (ConfigError, TypeError, ValueError) as exc:
                raise ConfigError(f"bench {spec.name!r}, run {label!r} (seed {seed}): {exc}") from None
            runs.append(BenchRun(label, seed, overrides, cfg))
    first = runs[0]
    for run in runs[1:]:
        for key in SHARED_KEYS:
            if _container(run.cfg[key]) != _container(first.cfg[key]):
                raise ConfigError(
                    f"bench {spec.name!r}: run {run.label!r} changes {key} ({key} must be the same in every run of a "
                    f"bench, or the table compares different things); put it in the bench's overrides instead"
                )
    return runs


def _container(value: Any) -> Any:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, DictConfig | ListConfig):
        value = OmegaConf.to_container(value, resolve=True)
    return json.loads(json.dumps(value, default=str))  # the form it has after a round trip through results.json


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """What must match for reuse; a config stored before the key rename is read with the new keys."""
    return {k: v for k, v in upgrade_config(config).items() if k not in IGNORED_FOR_REUSE}


def finished_results(run: BenchRun) -> dict[str, Any] | None:
    """The run folder's results if they come from a finished run of exactly this config, else None."""
    path = run.run_dir / "results.json"
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(saved, dict) or _comparable(saved.get("config") or {}) != _comparable(_container(run.cfg)):
        return None
    directions = {r.get("direction") for r in saved.get("rows", []) if r.get("kind") == "generative"}
    return saved if set(run.cfg.directions) <= directions else None


def clear_stale(run: BenchRun) -> None:
    """Remove a run folder left by another config (its checkpoints must not be resumed under this one).

    A folder of this very config (an interrupted run) is kept: ``fit`` resumes it from ``last.ckpt``.
    """
    from omegaconf import OmegaConf

    config = run.run_dir / "config.yaml"
    if not config.is_file():
        return
    try:
        old = _container(OmegaConf.load(config))
    except Exception:  # an unreadable config.yaml: the folder cannot be trusted either
        old = None
    if old is not None and _comparable(old) == _comparable(_container(run.cfg)):
        return  # an interrupted run of this very config: fit resumes it from last.ckpt
    log.warning("bench: %s holds a run of another config; clearing it before retraining", run.run_dir)
    shutil.rmtree(run.run_dir)


# -- running ------------------------------------------------------------------------------------
def _relabel(rows: list[dict[str, Any]], run: BenchRun) -> list[dict[str, Any]]:
    """Generative rows take the run's label (``semcore+gsv`` -> ``LABEL+gsv``); every row takes the seed."""
    scheme = str(run.cfg.scheme.name)
    out = []
    for row in rows:
        if row.get("kind") != "generative":
            continue  # the bench evaluates the dense baseline itself, once per seed
        row = dict(row)
        method = row["method"]
        suffix = method[len(scheme):] if method.startswith(scheme) else ""
        row["method"] = run.label + suffix.replace("+rgs", "")  # how it trained is the label's business
        row["seed"] = run.seed
        out.append(row)
    return out


def _dense_rows(cfg: Any, corpus: Any, seed: int, bench_dir: Path, label: str = "") -> list[dict[str, Any]]:
    """The dense baseline, trained (or loaded from the cache) and scored as ``pipeline.fit`` does it.

    Tracked as the W&B run ``bench-NAME/dense-sS`` (files in that folder of the bench).
    """
    from dataclasses import asdict

    from gcr.dense import setup as dense_setup

    folder = f"dense-{label}-s{seed}" if label else f"dense-s{seed}"
    name = f"{bench_dir.name}/{folder}"
    with tracking.dense_run(cfg, name, bench_dir / folder) as tracked:
        dense, seconds = dense_setup.dense_baseline(cfg, corpus, tracked)
        rows = dense_setup.dense_rows(cfg, corpus, dense, seconds)
        tracked.log_rows(rows)
    return [asdict(row) for row in rows]


def _members(spec: BenchSpec, runs: list[BenchRun], bench_dir: Path, reused: dict[str, list[bool]]) -> list[dict[str, Any]]:
    """Every member of the bench as its W&B run (name, id from its folder's ``wandb-run.json``, ...)."""
    members = []
    for i, seed in enumerate(spec.seeds):
        if spec.dense:
            folder = bench_dir / f"dense-s{seed}"
            record = tracking.member_record(folder) or {}
            members.append({"name": f"{bench_dir.name}/dense-s{seed}", "id": record.get("id"),
                            "job_type": record.get("job_type"), "label": "dense", "seed": seed, "direction": None,
                            "reused": False, "folder": str(folder)})
        for run in (r for r in runs if r.seed == seed):
            for direction in run.cfg.directions:
                folder = run.run_dir / direction
                record = tracking.member_record(folder) or {}
                members.append({"name": f"{run.cfg.run_name}/{direction}", "id": record.get("id"),
                                "job_type": record.get("job_type"), "label": run.label, "seed": seed,
                                "direction": direction, "reused": reused[run.label][i], "folder": str(folder)})
    return members


def _reference(spec: BenchSpec, results: dict[str, Any]) -> str:
    """The bench's reference method: ``dense`` names the dense rows whatever their type (``dense-pretrained``)."""
    methods = {r["method"] for r in results["rows"]}
    if spec.reference is None or (spec.reference == "dense" and "dense" not in methods):
        return default_reference(results)
    return spec.reference


def run_bench(bench_cfg: BenchSpec | Any, base_overrides: list[str], cdir: Path) -> dict[str, Any]:
    """Run (or reuse) every run of the bench for every seed; save, plot, print and return one results document."""
    from gcr.train.pipeline import fit
    from gcr.train.quiet import silence_third_party

    # before the bench's own dense baselines train (fit() does the same for each member run)
    silence_third_party(verbose=log.isEnabledFor(logging.DEBUG))
    spec = bench_cfg if isinstance(bench_cfg, BenchSpec) else BenchSpec.from_mapping(bench_cfg)
    runs = plan(spec, list(base_overrides), Path(cdir))  # every config checked before any work
    first = runs[0].cfg
    bench_dir = Path(first.output_dir) / f"bench-{spec.name}"
    corpus = load_dataset(first.data)
    labels = list(spec.runs)
    wall = {label: [None] * len(spec.seeds) for label in labels}
    reused = {label: [False] * len(spec.seeds) for label in labels}
    rows: list[dict[str, Any]] = []
    dense_rows: list[dict[str, Any]] = []
    extra_dense = {(option, seed): compose([*spec.overrides, *base_overrides, f"dense={option}", f"seed={seed}"],
                                           Path(cdir))
                   for option in spec.dense_extra for seed in spec.seeds}  # checked before any work
    for i, seed in enumerate(spec.seeds):
        seed_runs = [r for r in runs if r.seed == seed]
        if spec.dense:  # first: a member that needs dense features then finds it cached, not trained inside it
            dense_rows += _dense_rows(seed_runs[0].cfg, corpus, seed, bench_dir)
        for option in spec.dense_extra:
            dense_rows += _dense_rows(extra_dense[option, seed], corpus, seed, bench_dir, label=option)
        for run in seed_runs:
            saved = finished_results(run)
            if saved is not None:
                marker = run.run_dir / RUN_MARKER
                previous = json.loads(marker.read_text()) if marker.is_file() else {}
                wall[run.label][i] = previous.get("wall_seconds")
                reused[run.label][i] = True
                log.info("bench %s: reusing %s (seed %d), finished in %s", spec.name, run.label, seed, run.run_dir)
            else:
                clear_stale(run)
                log.info("bench %s: running %s (seed %d) -> %s", spec.name, run.label, seed, run.run_dir)
                start = time.perf_counter()
                saved = fit(run.cfg)
                wall[run.label][i] = time.perf_counter() - start
                if is_main_process():
                    (run.run_dir / RUN_MARKER).write_text(json.dumps(
                        {"bench": spec.name, "label": run.label, "seed": seed, "overrides": run.overrides,
                         "wall_seconds": wall[run.label][i]}, indent=2) + "\n")
            rows += _relabel(saved["rows"], run)

    # the dense reference first, as in a `gcr fit` table
    results = build_results(first, corpus, [ResultRow(**r) for r in dense_rows + rows])
    results["bench"] = {
        "name": spec.name,
        "file": spec.path,
        "labels": labels,
        "seeds": list(spec.seeds),
        "dense": spec.dense,
        "runs": {label: {"overrides": list(spec.runs[label]),
                         "scheme": str(next(r.cfg.scheme.name for r in runs if r.label == label))} for label in labels},
        "overrides": [*spec.overrides, *base_overrides],
        "wall_seconds": wall,  # per label, one entry per seed (in the order of seeds); a reused run keeps its own
        "reused": reused,
        "reference": _reference(spec, results),
    }
    results["intervals"] = compute_intervals(results, results["bench"]["reference"])
    for missing in results["intervals"]["missing"]:
        log.warning("bench %s: no interval for %s %s: %s", spec.name, missing["method"], missing["direction"],
                    missing["why"])
    if is_main_process():
        save_results(results, bench_dir)
        recall_curves(results, bench_dir / "recall_at_k.png")
        print_table(results, title=f"bench {spec.name}: {len(labels)} runs x {len(spec.seeds)} seed(s) -> {bench_dir}")
        if first.wandb.enabled:
            tracking.log_bench(results, bench_dir, first, members=_members(spec, runs, bench_dir, reused))
    return results
