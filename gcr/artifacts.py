"""Atomic, versioned artifacts on disk.

Every file gcr writes goes through :func:`atomic_write` (temp file in the same
folder, fsync, ``os.replace``), so an interrupted run never leaves a half-written
artifact. Tensors are saved with ``torch.save`` and loaded with
``weights_only=True``; metadata is plain JSON with a ``format_version``.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gcr.errors import ArtifactError


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator[Any]:
    """Open a temp file next to ``path``; on success it replaces ``path`` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, payload: Any) -> Path:
    """Write ``payload`` as indented JSON, atomically."""
    with atomic_write(path, "w") as fh:
        json.dump(payload, fh, indent=2, sort_keys=False, default=str)
        fh.write("\n")
    return Path(path)


def read_json(path: str | Path, *, what: str = "file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{what} not found: {path}. Run the step that creates it first.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{what} {path} is not valid JSON ({exc}); delete it and re-run to rebuild it.") from exc


def save_tensors(path: str | Path, tensors: dict[str, Any]) -> Path:
    """``torch.save`` a dict of tensors/plain values, atomically."""
    import torch

    with atomic_write(path, "wb") as fh:
        torch.save(tensors, fh)
    return Path(path)


def load_tensors(path: str | Path, *, what: str = "tensor file") -> dict[str, Any]:
    """Load what :func:`save_tensors` wrote, never unpickling arbitrary objects."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{what} not found: {path}.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ArtifactError(f"{what} {path} could not be loaded safely ({exc}); delete it and re-run.") from exc


def find_run_dir(path: str | Path) -> Path:
    """The run folder (holding ``config.yaml``) that ``path`` is, or lies in (up to 3 levels down)."""
    path = Path(path)
    for candidate in [path, *path.parents][:4]:
        if (candidate / "config.yaml").is_file():
            return candidate
    raise ArtifactError(f"{path} is not inside a gcr run folder (no config.yaml found above it); pass a run folder")


def check_header(meta: dict, *, kind: str, version: int, path: Path | str, **expected: Any) -> None:
    """Validate an artifact's header: its kind, format version and any expected fields."""
    if meta.get("kind") != kind:
        raise ArtifactError(f"{path} is a {meta.get('kind')!r} artifact, expected {kind!r}.")
    if meta.get("format_version") != version:
        raise ArtifactError(
            f"{path} has format version {meta.get('format_version')}, this gcr reads {version}; "
            "rebuild it with this version of gcr."
        )
    for key, want in expected.items():
        if want is not None and meta.get(key) != want:
            raise ArtifactError(
                f"{path} was built for {key}={meta.get(key)!r}, but this run uses {key}={want!r}. "
                "Point to the matching artifact or delete it to rebuild."
            )
