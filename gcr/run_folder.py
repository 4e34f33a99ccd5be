"""The run folder a ``gcr fit`` writes into, chosen so that no run ever damages another.

* A folder holding a run of the **same** config is reused: an interrupted run resumes from its
  checkpoints, a finished one is re-evaluated.
* A folder holding a run of **another** config is never written to: the run goes to the first free
  ``<run_name>-1``, ``-2``, ... (or the one holding this same config), and gcr says so and why.
* ``config.yaml`` is written (atomically) only after the config passed every check, and only into a
  folder that is new or holds this same config.
* A run that fails before training wrote its first checkpoint removes the folder it created, so no
  half-made run folder is left behind; one that already trained keeps its folder, to resume.

Configs are compared as plain data, ``wandb`` (it does not change a result) and ``run_name`` (the
folder's own name) aside.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gcr.artifacts import atomic_write
from gcr.config import upgrade_config

log = logging.getLogger("gcr")

CONFIG_FILE = "config.yaml"
#: Keys that may differ between two runs of "the same config".
IGNORED_KEYS = ("wandb", "run_name")


def comparable(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` without the keys that do not change what a run computes."""
    return {k: v for k, v in config.items() if k not in IGNORED_KEYS}


def differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every leaf that differs (dotted keys), sorted."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += differences(old.get(key, "<absent>"), new.get(key, "<absent>"), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old} -> {new}"]


def saved_config(run_dir: Path) -> dict[str, Any] | None:
    """The config a run folder holds, with today's keys (:func:`gcr.config.upgrade_config`); ``None`` if it holds
    none, or one that cannot be read."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    return upgrade_config(loaded) if isinstance(loaded, dict) else None


def choose_run_dir(output_dir: Path, run_name: str, config: dict[str, Any]) -> tuple[Path, str | None]:
    """The folder this run writes into, and why it is not ``output_dir/run_name`` (``None`` if it is).

    The first of ``run_name``, ``run_name-1``, ... that is absent, empty or holds this same config.
    """
    wanted = comparable(config)
    first_diff: list[str] = []
    for n in range(10_000):
        name = run_name if n == 0 else f"{run_name}-{n}"
        run_dir = output_dir / name
        if not run_dir.exists() or (run_dir.is_dir() and not any(run_dir.iterdir())):
            break
        held = saved_config(run_dir)
        if held is not None and comparable(held) == wanted:
            break
        if n == 0:
            first_diff = differences(comparable(held), wanted) if held is not None else ["(no readable config.yaml)"]
    else:  # pragma: no cover - ten thousand runs of one name
        raise RuntimeError(f"no free run folder for {run_name!r} under {output_dir}")
    if n == 0:
        return run_dir, None
    shown = "; ".join(first_diff[:4]) + (f"; and {len(first_diff) - 4} more" if len(first_diff) > 4 else "")
    return run_dir, f"{output_dir / run_name} holds a run of another config ({shown}), so this run goes to {run_dir}"


@dataclass
class RunFolder:
    """A claimed run folder: :meth:`claim` writes the config; a failure before training removes a new folder."""

    path: Path
    created: bool = False

    @classmethod
    @contextlib.contextmanager
    def claim(cls, run_dir: Path, config: dict[str, Any]) -> Iterator[RunFolder]:
        folder = cls(run_dir, created=not run_dir.exists() or not any(run_dir.iterdir()))
        run_dir.mkdir(parents=True, exist_ok=True)
        if saved_config(run_dir) is None:
            with atomic_write(run_dir / CONFIG_FILE, "w") as fh:
                yaml.safe_dump(config, fh, sort_keys=False)
        try:
            yield folder
        except BaseException:
            if folder.created and not folder.trained():
                shutil.rmtree(run_dir, ignore_errors=True)
                log.info("removed the unfinished run folder %s (the run failed before training)", run_dir)
            raise

    def trained(self) -> bool:
        """Whether any direction wrote a checkpoint (then the folder is kept, to resume)."""
        return any(self.path.glob("*/checkpoints/*.ckpt"))
