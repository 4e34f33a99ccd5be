"""Scenes of the shapes dataset: the vocabulary (kinds, colours, sizes, backgrounds, textures) and sampling.

A scene is what captions talk about: ``{"background", "texture", "objects": [{"kind", "color", "size", "x",
"y"}...]}``; :func:`sample_scene` draws one, with the rendering style (jitter, texture variant) that
captions do not mention.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

MAX_OBJECTS = 3
RELATION_MARGIN = 0.15  # of the image size: centres closer than this along an axis are not "left of" etc.
_GAP = 0.03  # of the image size: the least free space between two shapes' bounding boxes

KINDS: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond", "hexagon")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 215, 35),
    "orange": (245, 135, 25),
    "purple": (135, 55, 190),
    "pink": (245, 125, 190),
    "cyan": (40, 200, 215),
}
SIZES: dict[str, float] = {"small": 0.10, "medium": 0.16, "large": 0.23}  # half extent / image size
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (238, 238, 232),
    "black": (22, 22, 28),
    "gray": (125, 125, 128),
    "beige": (222, 205, 168),
}
TEXTURES: tuple[str, ...] = ("plain", "striped", "dotted", "checkered", "noisy", "gradient")
RELATIONS: tuple[str, ...] = ("left", "right", "above", "below")

Scene = dict[str, Any]
Claims = dict[str, Any]


def pick(rng: random.Random, seq: Sequence[Any]) -> Any:
    """A uniform element of ``seq``."""
    return seq[int(rng.random() * len(seq))]  # rng.choice costs ~4x more; this runs ~100 times per image


def _int(rng: random.Random, lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi]."""
    return lo + int(rng.random() * (hi - lo + 1))


_COLOR_NAMES, _SIZE_NAMES, _BG_NAMES = tuple(COLORS), tuple(SIZES), tuple(BACKGROUNDS)


def sample_scene(rng: random.Random, size: int) -> tuple[Scene, dict[str, Any]]:
    """A random scene (what captions talk about) and its rendering style (what they do not)."""
    n_objects = rng.choices((1, 2, 3), weights=(0.2, 0.4, 0.4))[0]
    background, texture = pick(rng, _BG_NAMES), pick(rng, TEXTURES)
    objects: list[dict[str, Any]] = []
    radii: list[float] = []
    used: set[tuple[str, str]] = set()
    for _ in range(n_objects):
        kind, color = pick(rng, KINDS), pick(rng, _COLOR_NAMES)
        while (kind, color) in used:
            kind, color = pick(rng, KINDS), pick(rng, _COLOR_NAMES)
        for attempt in range(40):
            size_name = pick(rng, _SIZE_NAMES) if attempt < 25 else "small"  # crowded: settle for small
            r = SIZES[size_name] * size
            lo, hi = math.ceil(r) + 1, size - 2 - math.ceil(r)
            x, y = _int(rng, lo, hi), _int(rng, lo, hi)
            if all(
                _well_separated(x, y, r, o["x"], o["y"], ro, size)
                for o, ro in zip(objects, radii, strict=True)
            ):
                objects.append({"kind": kind, "color": color, "size": size_name, "x": x, "y": y})
                radii.append(r)
                used.add((kind, color))
                break
    style = {
        "variant": rng.getrandbits(16),
        "bg_jitter": [_int(rng, -8, 8) for _ in range(3)],
        "jitter": [[_int(rng, -18, 18) for _ in range(3)] for _ in objects],
    }
    return {"background": background, "texture": texture, "objects": objects}, style


def _well_separated(x: int, y: int, r: float, x2: int, y2: int, r2: float, size: int) -> bool:
    """Bounding boxes apart, and far enough apart along one axis for a spatial relation to hold."""
    dx, dy = abs(x - x2), abs(y - y2)
    apart = max(dx, dy) - (r + r2) >= _GAP * size
    return apart and max(dx, dy) >= RELATION_MARGIN * size


def relations(a: dict[str, Any], b: dict[str, Any], margin: float) -> list[str]:
    """Every relation ``a rel b`` that holds between two scene objects (image y grows downwards)."""
    out = []
    if b["x"] - a["x"] >= margin:
        out.append("left")
    if a["x"] - b["x"] >= margin:
        out.append("right")
    if b["y"] - a["y"] >= margin:
        out.append("above")
    if a["y"] - b["y"] >= margin:
        out.append("below")
    return out


def dominant_relation(a: dict[str, Any], b: dict[str, Any]) -> str:
    """The relation a person would name: along the axis where the centres differ most."""
    dx, dy = b["x"] - a["x"], b["y"] - a["y"]
    if abs(dx) >= abs(dy):
        return "left" if dx > 0 else "right"
    return "above" if dy > 0 else "below"
