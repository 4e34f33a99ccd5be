"""The embedded default dataset: procedurally drawn shapes with generated captions.

:func:`generate_shapes` writes ``dataset_shapes.json`` in the Karpathy-split format plus PNGs under
``images/NNNN/`` (at most 1000 per folder), so the data goes through
:func:`gcr.data.karpathy.load_karpathy` like Flickr30K or COCO. Each scene has 1 to 3 shapes
(kind, colour, size, position) on a textured, coloured background. Each of its five captions states a
random subset of facts about the scene; the facts are stored as structured claims next to the caption
(``gcr_claims``), and the scene itself next to the image (``gcr_scene``), so that
:func:`caption_ambiguity` can tell, from the JSON alone, how many images each caption fits.

Claims (all keys optional): ``{"objects": [{"kind", "color", "size"}...], "relations": [[i, rel, j]...],
"count": n, "background": colour, "texture": texture}``. A scene satisfies them when distinct shapes
match the objects (each given attribute equal), every relation ``objects[i] rel objects[j]`` holds
(``rel`` in left/right/above/below: the centres differ by at least ``relation_margin_px`` along that
axis), it has exactly ``count`` shapes and the given background colour and texture.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import multiprocessing
import os
import random
import re
import struct
import zlib
from collections.abc import Callable, Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from gcr.errors import ConfigError, DataError

FORMAT_VERSION = 1
JSON_NAME = "dataset_shapes.json"
IMAGES_DIR = "images"
FILES_PER_FOLDER = 1000
_CHUNK = 250  # images per worker task; divides FILES_PER_FOLDER, so a task writes into one folder
CAPTIONS_PER_IMAGE = 5
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

_KIND_IX = {k: i for i, k in enumerate(KINDS)}
_COLOR_IX = {c: i for i, c in enumerate(COLORS)}
_SIZE_IX = {s: i for i, s in enumerate(SIZES)}
_BG_IX = {b: i for i, b in enumerate(BACKGROUNDS)}
_TEXTURE_IX = {t: i for i, t in enumerate(TEXTURES)}
_N_CODES = len(KINDS) * len(COLORS) * len(SIZES)  # one code per (kind, colour, size); _N_CODES = no shape

Scene = dict[str, Any]
Claims = dict[str, Any]


# --------------------------------------------------------------------------- generation


def generate_shapes(
    out_dir: str | os.PathLike[str],
    n_images: int = 1000,
    *,
    seed: int = 0,
    image_size: int = 64,
    split_fractions: Sequence[float] = (0.8, 0.1, 0.1),
    workers: int = 1,
) -> Path:
    """Generate the shapes dataset under ``out_dir`` and return the path of its Karpathy JSON.

    Deterministic: the same ``seed``, ``n_images``, ``image_size`` and ``split_fractions`` give a
    byte-identical JSON and identical pixels, whatever ``workers``. ``split_fractions`` are the
    train/val/test shares. If the JSON already exists with the same parameters (and its images are
    there), nothing is regenerated. ``workers > 1`` draws in that many processes.
    """
    params = _validate(n_images, seed, image_size, split_fractions, workers)
    out_dir = Path(out_dir)
    json_path = out_dir / JSON_NAME
    header = {
        "format_version": FORMAT_VERSION,
        "generator": "gcr.data.shapes",
        "params": params,
        "relation_margin_px": RELATION_MARGIN * image_size,
    }
    last_image = out_dir / _folder(n_images - 1) / _filename(n_images - 1)
    if read_header(json_path) == header and last_image.is_file():
        return json_path
    out_dir.mkdir(parents=True, exist_ok=True)
    logging.getLogger("gcr").info("data: generating %d shape images in %s (once; reused after)", n_images, out_dir)
    splits = _assign_splits(n_images, seed, params["split_fractions"])
    chunks = [
        (str(out_dir), seed, image_size, start, min(start + _CHUNK, n_images))
        for start in range(0, n_images, _CHUNK)
    ]
    tmp = json_path.with_name(f".{json_path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            # The header goes on the first line so read_header() need not parse the whole file.
            f.write(
                '{"gcr":' + json.dumps(header, separators=(",", ":")) + ',"dataset":"shapes","images":[\n'
            )
            first = True
            for chunk in _run_chunks(chunks, workers, n_images):
                for i, scene, captions in chunk:
                    f.write(
                        ("" if first else ",\n")
                        + json.dumps(_entry(i, splits[i], scene, captions), separators=(",", ":"))
                    )
                    first = False
            f.write("\n]}\n")
        os.replace(tmp, json_path)
    finally:
        tmp.unlink(missing_ok=True)
    return json_path


def read_header(json_path: str | os.PathLike[str]) -> dict | None:
    """The ``gcr`` record (format version, generator parameters) of a generated JSON, or None."""
    prefix = '{"gcr":'
    try:
        with open(json_path, encoding="utf-8") as f:
            line = f.readline()
    except (OSError, UnicodeDecodeError):
        return None
    if not line.startswith(prefix):
        return None
    try:
        header, _ = json.JSONDecoder().raw_decode(line, len(prefix))
    except json.JSONDecodeError:
        return None
    return header if isinstance(header, dict) else None


def _validate(
    n_images: int, seed: int, image_size: int, split_fractions: Sequence[float], workers: int
) -> dict[str, Any]:
    if not isinstance(n_images, int) or not 1 <= n_images <= 9_999_999:
        raise ConfigError(f"n_images={n_images!r}: use an integer from 1 to 9,999,999")
    if not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed={seed!r}: use a non-negative integer")
    if not isinstance(image_size, int) or not 32 <= image_size <= 1024:
        raise ConfigError(f"image_size={image_size!r}: use an integer from 32 to 1024")
    fractions = [float(x) for x in split_fractions]
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ConfigError(
            f"split_fractions={tuple(split_fractions)!r}: give three non-negative train/val/test shares summing to 1"
        )
    if not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers={workers!r}: use a positive integer")
    # workers is left out on purpose: it does not change the output.
    return {"n_images": n_images, "seed": seed, "image_size": image_size, "split_fractions": fractions}


def _assign_splits(n: int, seed: int, fractions: Sequence[float]) -> list[str]:
    n_val = max(1, round(n * fractions[1])) if fractions[1] > 0 else 0
    n_test = max(1, round(n * fractions[2])) if fractions[2] > 0 else 0
    n_train = n - n_val - n_test
    if n_train < 1 or n_test < 1:
        raise ConfigError(
            f"n_images={n} with split_fractions={tuple(fractions)} leaves no train or no test image; "
            "use more images or larger train/test shares"
        )
    order = list(range(n))
    random.Random(f"gcr-shapes-splits:{seed}").shuffle(order)
    splits = [""] * n
    for rank, i in enumerate(order):
        splits[i] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return splits


def _entry(i: int, split: str, scene: Scene, captions: list[tuple[str, Claims]]) -> dict[str, Any]:
    sentids = [i * CAPTIONS_PER_IMAGE + k for k in range(len(captions))]
    return {
        "filepath": _folder(i),
        "filename": _filename(i),
        "imgid": i,
        "split": split,
        "sentids": sentids,
        "sentences": [
            {
                "tokens": re.findall(r"[a-z]+", raw),
                "raw": raw,
                "imgid": i,
                "sentid": sid,
                "gcr_claims": claims,
            }
            for sid, (raw, claims) in zip(sentids, captions, strict=True)
        ],
        "gcr_scene": scene,
    }


def _folder(i: int) -> str:
    return f"{IMAGES_DIR}/{i // FILES_PER_FOLDER:04d}"


def _filename(i: int) -> str:
    return f"{i:07d}.png"


ChunkResult = list[tuple[int, Scene, list[tuple[str, Claims]]]]


def _run_chunks(chunks: list[tuple], workers: int, n_images: int) -> Iterator[ChunkResult]:
    from gcr.data.karpathy import PROGRESS_THRESHOLD
    from gcr.progress import progress

    def shown(it: Iterator[ChunkResult]) -> Iterator[ChunkResult]:
        if n_images > PROGRESS_THRESHOLD:
            return progress(it, f"generating {n_images} shape images", total=len(chunks))
        return it

    if workers == 1 or len(chunks) == 1:
        yield from shown(map(_generate_chunk, chunks))
        return
    # fork where there is one: spawn would re-import the caller's __main__ (a script without a main guard,
    # or stdin, breaks). The workers only use numpy, PIL and zlib (torch's DataLoader forks as well).
    ctx = multiprocessing.get_context(
        "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    )
    with ctx.Pool(min(workers, len(chunks))) as pool:
        yield from shown(pool.imap(_generate_chunk, chunks))


def _generate_chunk(args: tuple[str, int, int, int, int]) -> ChunkResult:
    """Draw, save and caption images ``start..stop-1`` (all in one folder)."""
    out_dir, seed, image_size, start, stop = args
    folder = Path(out_dir) / _folder(start)
    folder.mkdir(parents=True, exist_ok=True)
    out: ChunkResult = []
    for i in range(start, stop):
        rng = random.Random(f"gcr-shapes:{seed}:{i}")  # per-image seed: any worker split gives the same data
        scene, style = _sample_scene(rng, image_size)
        (folder / _filename(i)).write_bytes(_png_bytes(_render(scene, style, image_size)))
        out.append((i, scene, _captions(scene, rng)))
    return out


# --------------------------------------------------------------------------- scenes


def _pick(rng: random.Random, seq: Sequence[Any]) -> Any:
    return seq[int(rng.random() * len(seq))]  # rng.choice costs ~4x more; this runs ~100 times per image


def _int(rng: random.Random, lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi]."""
    return lo + int(rng.random() * (hi - lo + 1))


_COLOR_NAMES, _SIZE_NAMES, _BG_NAMES = tuple(COLORS), tuple(SIZES), tuple(BACKGROUNDS)


def _sample_scene(rng: random.Random, size: int) -> tuple[Scene, dict[str, Any]]:
    """A random scene (what captions talk about) and its rendering style (what they do not)."""
    n_objects = rng.choices((1, 2, 3), weights=(0.2, 0.4, 0.4))[0]
    background, texture = _pick(rng, _BG_NAMES), _pick(rng, TEXTURES)
    objects: list[dict[str, Any]] = []
    radii: list[float] = []
    used: set[tuple[str, str]] = set()
    for _ in range(n_objects):
        kind, color = _pick(rng, KINDS), _pick(rng, _COLOR_NAMES)
        while (kind, color) in used:
            kind, color = _pick(rng, KINDS), _pick(rng, _COLOR_NAMES)
        for attempt in range(40):
            size_name = _pick(rng, _SIZE_NAMES) if attempt < 25 else "small"  # crowded: settle for small
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


def _dominant_relation(a: dict[str, Any], b: dict[str, Any]) -> str:
    """The relation a person would name: along the axis where the centres differ most."""
    dx, dy = b["x"] - a["x"], b["y"] - a["y"]
    if abs(dx) >= abs(dy):
        return "left" if dx > 0 else "right"
    return "above" if dy > 0 else "below"


# --------------------------------------------------------------------------- rendering


def _unit_polygon(kind: str) -> list[tuple[float, float]]:
    if kind == "triangle":
        return [(0.0, -1.0), (0.95, 0.8), (-0.95, 0.8)]
    if kind == "diamond":
        return [(0.0, -1.0), (0.75, 0.0), (0.0, 1.0), (-0.75, 0.0)]
    if kind == "hexagon":
        return [(math.cos(a), math.sin(a)) for a in (math.pi / 3 * k for k in range(6))]
    if kind == "star":
        return [
            (
                (1.0 if k % 2 == 0 else 0.45) * math.sin(math.pi / 5 * k),
                -(1.0 if k % 2 == 0 else 0.45) * math.cos(math.pi / 5 * k),
            )
            for k in range(10)
        ]
    if kind == "cross":
        w = 0.34
        return [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w),
                (-1, -w), (-w, -w)]  # fmt: skip
    raise ValueError(kind)


_POLYGONS = {k: _unit_polygon(k) for k in ("triangle", "diamond", "hexagon", "star", "cross")}


@lru_cache(maxsize=8)
def _textures(size: int) -> dict[str, list[np.ndarray]]:
    """Per texture, a few [size, size] uint8 masks: 0 = background colour, 255 = its tone."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    s = size / 64
    out: dict[str, list[np.ndarray]] = {"plain": [np.zeros((size, size), np.float32)]}
    out["striped"] = [
        ((axis // max(1, round(half * s))) % 2) for half in (3, 4, 5) for axis in (yy, xx, xx + yy)
    ]
    dots = []
    for period in (8, 10, 12):
        p = max(4, round(period * s))
        d2 = (xx % p - p / 2 + 0.5) ** 2 + (yy % p - p / 2 + 0.5) ** 2
        dots.append((d2 <= (0.28 * p) ** 2).astype(np.float32))
    out["dotted"] = dots
    out["checkered"] = [
        ((xx // max(1, round(half * s)) + yy // max(1, round(half * s))) % 2) for half in (4, 6, 8)
    ]
    ramp_x, ramp_y = xx / (size - 1), yy / (size - 1)
    out["gradient"] = [ramp_x, 1 - ramp_x, ramp_y, 1 - ramp_y, (ramp_x + ramp_y) / 2]
    # Noise in 2x2 blocks (compresses and looks like grain); one fixed tile, cropped at random offsets.
    block = max(1, round(2 * s))
    tile = np.random.default_rng(20240601).random((2 * size // block + 1,) * 2, dtype=np.float32)
    out["noisy"] = [np.kron(tile, np.ones((block, block), np.float32))]
    return {k: [np.round(m * 255).astype(np.uint8) for m in v] for k, v in out.items()}


_LEVELS = np.arange(256, dtype=np.float32)[:, None] / 255


def _palette(base: np.ndarray, tone: np.ndarray) -> np.ndarray:
    """[256, 3] uint8: the colour of each mask level, from ``base`` (0) to ``tone`` (255); both in 0..255."""
    return (base + (tone - base) * _LEVELS + 0.5).astype(np.uint8)


def _render(scene: Scene, style: dict[str, Any], size: int) -> Image.Image:
    """Draw a scene: the textured background, then the shapes."""
    rgb = BACKGROUNDS[scene["background"]]
    base = np.array(rgb, np.float32) + np.array(style["bg_jitter"], np.float32)
    tone = np.array(rgb, np.float32) + (-50 if sum(rgb) > 300 else 50)  # darker on light, lighter on dark
    masks = _textures(size)[scene["texture"]]
    variant = style["variant"]
    mask = masks[variant % len(masks)]
    if scene["texture"] == "noisy":
        oy, ox = (variant >> 3) % size, (variant >> 9) % size
        mask = mask[oy : oy + size, ox : ox + size]
    # A palette lookup: much faster than blending a [size, size, 3] float array.
    img = Image.frombytes("RGB", (size, size), _palette(base, tone).take(mask, axis=0).tobytes())
    draw = ImageDraw.Draw(img)
    for obj, jitter in zip(scene["objects"], style["jitter"], strict=True):
        fill = tuple(min(255, max(0, c + j)) for c, j in zip(COLORS[obj["color"]], jitter, strict=True))
        r = SIZES[obj["size"]] * size
        x, y = obj["x"], obj["y"]
        if obj["kind"] == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif obj["kind"] == "square":
            h = 0.85 * r
            draw.rectangle((x - h, y - h, x + h, y + h), fill=fill)
        else:
            draw.polygon([(x + u * r, y + v * r) for u, v in _POLYGONS[obj["kind"]]], fill=fill)
    return img


def _png_bytes(img: Image.Image) -> bytes:
    """Encode an RGB image as PNG (filter 0, zlib level 1): ~3x faster than PIL's encoder for tiny images."""
    w, h = img.size
    rows = np.frombuffer(img.tobytes(), np.uint8).reshape(h, w * 3)
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1).tobytes()

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 1))
        + chunk(b"IEND", b"")
    )


# --------------------------------------------------------------------------- captions

_KIND_WORDS = {
    "circle": ("circle", "circle", "disc"),
    "square": ("square", "square", "box"),
    "triangle": ("triangle",),
    "star": ("star",),
    "cross": ("cross", "cross", "plus sign"),
    "diamond": ("diamond", "diamond", "rhombus"),
    "hexagon": ("hexagon",),
}
_THING_WORDS = ("shape", "shape", "object", "figure")
_COLOR_WORDS = {c: (c,) for c in COLORS} | {"purple": ("purple", "violet"), "cyan": ("cyan", "turquoise")}
_SIZE_WORDS = {
    "small": ("small", "small", "little", "tiny"),
    "medium": ("medium", "medium sized", "mid sized"),
    "large": ("large", "large", "big", "huge"),
}
_BG_COLOR_WORDS = {
    "white": ("white",),
    "black": ("black", "dark"),
    "gray": ("gray", "grey"),
    "beige": ("beige",),
}
_TEXTURE_ADJ = {
    "plain": ("plain", "solid", "flat"),
    "striped": ("striped", "stripy"),
    "dotted": ("dotted", "spotted", "polka dot"),
    "checkered": ("checkered", "checkerboard", "checked"),
    "noisy": ("noisy", "grainy", "speckled"),
    "gradient": ("gradient", "shaded", "fading"),
}
_TEXTURE_NOUN = {
    "striped": ("stripes",),
    "dotted": ("dots", "spots"),
    "checkered": ("a checkerboard pattern", "checks"),
    "noisy": ("noise", "grain"),
    "gradient": ("a gradient", "shading"),
}
_BG_NOUNS = ("background", "background", "backdrop")
_REL_WORDS = {
    "left": ("to the left of", "left of", "on the left of"),
    "right": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over", "higher than"),
    "below": ("below", "under", "beneath", "lower than"),
}
_REL_IT = {
    "left": ("to its left",),
    "right": ("to its right",),
    "above": ("above it",),
    "below": ("below it", "under it"),
}
_COUNT_WORDS = {1: ("one", "a single"), 2: ("two", "a pair of"), 3: ("three",)}

# How often a mentioned shape is described by each attribute; tuned for ~5-30% ambiguous test captions
# on the 1000-image default (see caption_ambiguity).
_P_KIND, _P_COLOR, _P_SIZE, _P_SIZE_ALONE = 0.9, 0.85, 0.4, 0.6
_P_BACKGROUND = 0.5


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _pick_attrs(obj: dict[str, Any], rng: random.Random, p_size: float = _P_SIZE) -> dict[str, str]:
    keys = [k for k, p in (("kind", _P_KIND), ("color", _P_COLOR)) if rng.random() < p]
    if not keys:
        keys = [_pick(rng, ("kind", "color"))]
    if rng.random() < p_size:
        keys.append("size")
    return {k: obj[k] for k in ("kind", "color", "size") if k in keys}


def _noun_phrase(desc: dict[str, str], rng: random.Random) -> str:
    noun = _pick(rng, _KIND_WORDS[desc["kind"]]) if "kind" in desc else _pick(rng, _THING_WORDS)
    size = _pick(rng, _SIZE_WORDS[desc["size"]]) + " " if "size" in desc else ""
    color = _pick(rng, _COLOR_WORDS[desc["color"]]) if "color" in desc else ""
    form = rng.random() if color else 0.0
    if form < 0.7:
        phrase = f"{size}{color + ' ' if color else ''}{noun}"
    elif form < 0.8:
        phrase = f"{size}{noun} that is {color}"
    elif form < 0.9:
        phrase = f"{size}{color} colored {noun}"
    else:
        phrase = f"{size}{noun} in {color}"
    return _a(phrase)


def _background_phrase(scene: Scene, rng: random.Random, claims: Claims, *, with_ok: bool = True) -> str:
    """A phrase like "a gray striped background"; records what it states in ``claims``."""
    which = _pick(rng, ("both", "both", "both", "color", "texture"))
    noun = _pick(rng, _BG_NOUNS)
    color = _pick(rng, _BG_COLOR_WORDS[scene["background"]])
    texture = scene["texture"]
    if which != "texture":
        claims["background"] = scene["background"]
    if which != "color":
        claims["texture"] = texture
    if which == "color":
        return _a(f"{color} {noun}")
    if with_ok and which == "both" and texture in _TEXTURE_NOUN and rng.random() < 0.3:
        return _a(f"{color} {noun} with {_pick(rng, _TEXTURE_NOUN[texture])}")
    adj = _pick(rng, _TEXTURE_ADJ[texture])
    if which == "texture":
        return _a(f"{adj} {noun}")
    return _a(f"{color} {adj} {noun}" if rng.random() < 0.6 else f"{adj} {color} {noun}")


def _maybe_background(
    scene: Scene, rng: random.Random, claims: Claims, p: float = _P_BACKGROUND, *, with_ok: bool = True
) -> str:
    if rng.random() >= p:
        return ""
    return f" {_pick(rng, ('on', 'on', 'against', 'over'))} {_background_phrase(scene, rng, claims, with_ok=with_ok)}"


def _describe(objs: Sequence[dict[str, Any]], rng: random.Random, claims: Claims) -> list[dict[str, str]]:
    # A lone shape is named more precisely: a caption about one shape must still single out its image.
    p_size = _P_SIZE_ALONE if len(objs) == 1 else _P_SIZE
    descs = [_pick_attrs(o, rng, p_size) for o in objs]
    claims["objects"] = descs
    return descs


def _caption_exists(scene: Scene, rng: random.Random) -> tuple[str, Claims]:
    claims: Claims = {}
    (desc,) = _describe([_pick(rng, scene["objects"])], rng, claims)
    a = _noun_phrase(desc, rng)
    bg = _maybe_background(scene, rng, claims, p=0.85)
    template = _pick(rng, ("there is {a}{bg}", "{a}{bg}", "an image of {a}{bg}", "a picture showing {a}{bg}",
                           "{a} is shown{bg}", "you can see {a}{bg}"))  # fmt: skip
    return template.format(a=a, bg=bg), claims


def _caption_relation(scene: Scene, rng: random.Random) -> tuple[str, Claims]:
    claims: Claims = {}
    a_obj, b_obj = rng.sample(scene["objects"], 2)
    rel = _dominant_relation(a_obj, b_obj)
    da, db = _describe([a_obj, b_obj], rng, claims)
    claims["relations"] = [[0, rel, 1]]
    b = _noun_phrase(db, rng)
    style = rng.random()
    if style < 0.15 and "kind" in da and "color" in da:
        # "a small square, blue, sits right of a big red disc"
        head = _noun_phrase({k: v for k, v in da.items() if k != "color"}, rng)
        return (
            f"{head}, {_pick(rng, _COLOR_WORDS[da['color']])}, sits {_pick(rng, _REL_WORDS[rel])} {b}",
            claims,
        )
    if style < 0.3:
        bg = _maybe_background(scene, rng, claims, with_ok=False)
        return f"{b} with {_noun_phrase(da, rng)} {_pick(rng, _REL_IT[rel])}{bg}", claims
    verb = _pick(rng, ("", "", " is", " sits", " appears"))
    return (
        f"{_noun_phrase(da, rng)}{verb} {_pick(rng, _REL_WORDS[rel])} {b}{_maybe_background(scene, rng, claims)}",
        claims,
    )


def _caption_list(scene: Scene, rng: random.Random) -> tuple[str, Claims]:
    claims: Claims = {}
    objs = list(scene["objects"])
    rng.shuffle(objs)
    phrases = [_noun_phrase(d, rng) for d in _describe(objs, rng, claims)]
    listed = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    n = len(objs)
    if n == 1:
        claims["count"] = 1
        text = _pick(rng, ("a single shape: {l}", "just one shape, {l}", "only {l}", "one shape only: {l}"))
    elif rng.random() < 0.75:
        claims["count"] = n
        text = f"{_pick(rng, _COUNT_WORDS[n])} {_pick(rng, ('shapes', 'objects', 'figures'))}: {{l}}"
    else:
        text = "{l}"
    return text.format(l=listed) + _maybe_background(scene, rng, claims, p=0.4), claims


def _caption_background_first(scene: Scene, rng: random.Random) -> tuple[str, Claims]:
    claims: Claims = {}
    bg = _background_phrase(scene, rng, claims, with_ok=False)
    (desc,) = _describe([_pick(rng, scene["objects"])], rng, claims)
    a = _noun_phrase(desc, rng)
    if rng.random() < 0.3:
        n = len(scene["objects"])
        claims["count"] = n
        noun = "shape" if n == 1 else "shapes"
        return (
            f"{_pick(rng, _COUNT_WORDS[n])} {noun} on {bg}, including {a}" if n > 1 else f"{a} alone on {bg}",
            claims,
        )
    template = _pick(rng, ("{bg} with {a}", "{bg} with {a} on it", "on {bg}, {a}", "{a} in front of {bg}"))
    return template.format(bg=bg, a=a), claims


_FAMILIES: tuple[tuple[Callable[[Scene, random.Random], tuple[str, Claims]], float, int], ...] = (
    # (family, weight, least number of shapes it needs)
    (_caption_exists, 0.2, 1),
    (_caption_relation, 0.35, 2),
    (_caption_list, 0.25, 1),
    (_caption_background_first, 0.2, 1),
)


def _captions(scene: Scene, rng: random.Random, k: int = CAPTIONS_PER_IMAGE) -> list[tuple[str, Claims]]:
    """``k`` captions of ``scene`` with their claims, distinct where possible."""
    families = [(f, w) for f, w, need in _FAMILIES if len(scene["objects"]) >= need]
    out: list[tuple[str, Claims]] = []
    seen: set[str] = set()
    for _ in range(20 * k):
        if len(out) == k:
            break
        family = rng.choices([f for f, _ in families], weights=[w for _, w in families])[0]
        text, claims = family(scene, rng)
        if text not in seen:
            seen.add(text)
            out.append((text, claims))
    while len(out) < k:  # only for scenes with very few possible captions
        out.append(_caption_list(scene, rng))
    return out


# --------------------------------------------------------------------------- ambiguity


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
