"""Reload a saved backbone with the class its ``backbone.json`` names (no Lightning needed)."""

from __future__ import annotations

from pathlib import Path

from gcr.artifacts import read_json
from gcr.models.base import BACKBONE_FILE


def load_backbone(directory: str | Path):
    """The backbone saved in ``directory`` (``GenerativeBackbone.save``), rebuilt by its registered class."""
    from gcr.registry import BACKBONES

    meta = read_json(Path(directory) / BACKBONE_FILE, what="backbone description")
    return BACKBONES.get(meta.get("name", "tiny")).from_pretrained(directory)
