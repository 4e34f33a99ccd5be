"""How many images each caption of a generated shapes split fits (:func:`caption_ambiguity`)."""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gcr.data.shapes.scenes import BACKGROUNDS, COLORS, KINDS, MAX_OBJECTS, SIZES, TEXTURES, Claims, Scene
from gcr.errors import DataError

_KIND_IX = {k: i for i, k in enumerate(KINDS)}
_COLOR_IX = {c: i for i, c in enumerate(COLORS)}
_SIZE_IX = {s: i for i, s in enumerate(SIZES)}
_BG_IX = {b: i for i, b in enumerate(BACKGROUNDS)}
_TEXTURE_IX = {t: i for i, t in enumerate(TEXTURES)}
_N_CODES = len(KINDS) * len(COLORS) * len(SIZES)  # one code per (kind, colour, size); _N_CODES = no shape


class _SceneIndex:
    """The scenes of one split as arrays, to test claims against all of them at once."""

    def __init__(self, scenes: Sequence[Scene], margin: float):
        n = len(scenes)
        self.codes = np.full((n, MAX_OBJECTS), _N_CODES, np.int16)
        x = np.full((n, MAX_OBJECTS), np.nan)
        y = np.full((n, MAX_OBJECTS), np.nan)
        self.count = np.zeros(n, np.int8)
        self.background = np.array([_BG_IX[scene["background"]] for scene in scenes], np.int8)
        self.texture = np.array([_TEXTURE_IX[scene["texture"]] for scene in scenes], np.int8)
        for i, scene in enumerate(scenes):
            self.count[i] = len(scene["objects"])
            for j, o in enumerate(scene["objects"]):
                self.codes[i, j] = _code(o["kind"], o["color"], o["size"])
                x[i, j], y[i, j] = o["x"], o["y"]
        with np.errstate(invalid="ignore"):
            # rel[name][s, p, q]: in scene s, shape p is `name` of shape q (NaN slots compare False).
            self.rel = {
                "left": x[:, None, :] - x[:, :, None] >= margin,
                "right": x[:, :, None] - x[:, None, :] >= margin,
                "above": y[:, None, :] - y[:, :, None] >= margin,
                "below": y[:, :, None] - y[:, None, :] >= margin,
            }
        self.rows = np.arange(n)
        self._postings: dict[tuple[str, Any], tuple[np.ndarray, np.ndarray]] = {}
        # Every injective choice of shapes (slots) for m described ones.
        self.assignments = {
            m: np.array(list(itertools.permutations(range(MAX_OBJECTS), m)), np.int64).reshape(-1, m)
            for m in range(1, MAX_OBJECTS + 1)
        }

    def matches(self, claims: Claims) -> np.ndarray:
        """The (sorted) indices of the scenes that satisfy ``claims``."""
        objects = claims.get("objects", [])
        if len(objects) > MAX_OBJECTS:
            return self.rows[:0]
        keys = [("count", claims["count"])] if "count" in claims else []
        keys += [("background", _BG_IX[claims["background"]])] if "background" in claims else []
        keys += [("texture", _TEXTURE_IX[claims["texture"]])] if "texture" in claims else []
        keys += [("object", _desc_key(desc)) for desc in objects]
        # Intersect the posting lists (smallest first): what is left needs no more than presence checks,
        # except for captions about several shapes, where shapes must be distinct and relations hold.
        postings = sorted((self._posting(key) for key in keys), key=lambda p: len(p[0]))
        rows = postings[0][0] if postings else self.rows
        for _, mask in postings[1:]:
            rows = rows[mask[rows]]
        if len(objects) < 2 or not len(rows):
            return rows
        perms = self.assignments[len(objects)]
        codes = self.codes[rows]
        ok = np.ones((len(rows), len(perms)), bool)
        for v, desc in enumerate(objects):
            ok &= _DESC_TABLES[_desc_key(desc)][codes][:, perms[:, v]]
        for i, rel, j in claims.get("relations", []):
            ok &= self.rel[rel][rows][:, perms[:, i], perms[:, j]]
        return rows[ok.any(axis=1)]

    def _posting(self, key: tuple[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """The scenes with one property (a count, background, texture or shape): sorted indices and mask."""
        if key not in self._postings:
            kind, value = key
            if kind == "object":
                mask = _DESC_TABLES[value][self.codes].any(axis=1)
            else:
                mask = {"count": self.count, "background": self.background, "texture": self.texture}[
                    kind
                ] == value
            self._postings[key] = (np.flatnonzero(mask), mask)
        return self._postings[key]


def _code(kind: str, color: str, size: str) -> int:
    return (_KIND_IX[kind] * len(COLORS) + _COLOR_IX[color]) * len(SIZES) + _SIZE_IX[size]


def _desc_key(desc: dict[str, str]) -> tuple[str | None, str | None, str | None]:
    key = (desc.get("kind"), desc.get("color"), desc.get("size"))
    if key not in _DESC_TABLES or key == (None, None, None):
        raise ValueError(f"unknown shape description {desc!r}")
    return key


def _build_desc_tables() -> dict[tuple, np.ndarray]:
    tables = {}
    for kind in (None, *KINDS):
        for color in (None, *COLORS):
            for size in (None, *SIZES):
                t = np.zeros(_N_CODES + 1, bool)  # the last code (no shape) never matches
                for k, c, s in itertools.product(KINDS, COLORS, SIZES):
                    t[_code(k, c, s)] = (kind in (None, k)) and (color in (None, c)) and (size in (None, s))
                tables[(kind, color, size)] = t
    return tables


_DESC_TABLES = _build_desc_tables()


def caption_ambiguity(json_path: str | os.PathLike[str], split: str = "test") -> dict[str, Any]:
    """How many images of ``split`` each caption of ``split`` fits, from a generated JSON alone.

    Returns ``images`` and ``captions`` (counts), ``ambiguous_share`` (share of captions whose claims
    more than one image satisfies), ``mean_matches`` (mean number of images a caption fits, >= 1),
    ``max_matches`` and ``self_mismatches`` (captions their own image does not satisfy; always 0 for
    data from :func:`generate_shapes`).
    """
    path = Path(json_path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(
            f"cannot read shapes JSON {path} ({exc}); fix: regenerate it with generate_shapes"
        ) from None
    header = data.get("gcr") if isinstance(data, dict) else None
    if not isinstance(header, dict) or "relation_margin_px" not in header:
        raise DataError(
            f"{path} was not written by gcr.data.shapes (no 'gcr' record), so its captions carry no claims; "
            "fix: pass a dataset_shapes.json made by generate_shapes"
        )
    entries = [e for e in data.get("images", []) if isinstance(e, dict) and e.get("split") == split]
    if not entries:
        raise DataError(f"{path}: missing split {split!r}: no image has it; fix: pick train, val or test")
    try:
        index = _SceneIndex([e["gcr_scene"] for e in entries], float(header["relation_margin_px"]))
        cache: dict[str, np.ndarray] = {}
        matches, self_mismatches = [], 0
        for i, entry in enumerate(entries):
            for sentence in entry["sentences"]:
                claims = sentence["gcr_claims"]
                key = json.dumps(claims, sort_keys=True)
                if key not in cache:
                    cache[key] = index.matches(claims)
                hits = cache[key]
                matches.append(len(hits))
                pos = np.searchsorted(hits, i)
                self_mismatches += not (pos < len(hits) and hits[pos] == i)
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise DataError(
            f"{path}: malformed gcr_scene/gcr_claims ({type(exc).__name__}: {exc}); fix: regenerate the data"
        ) from None
    counts = np.array(matches)
    return {
        "split": split,
        "images": len(entries),
        "captions": len(counts),
        "ambiguous_share": float((counts > 1).mean()),
        "mean_matches": float(counts.mean()),
        "max_matches": int(counts.max()),
        "self_mismatches": int(self_mismatches),
    }
