"""Writing the shapes dataset: the Karpathy JSON and its PNG folders (:func:`generate_shapes`)."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import random
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from gcr.data.shapes.captions import CAPTIONS_PER_IMAGE, caption_scene
from gcr.data.shapes.rendering import png_bytes, render
from gcr.data.shapes.scenes import RELATION_MARGIN, Claims, Scene, sample_scene
from gcr.errors import ConfigError

FORMAT_VERSION = 1
JSON_NAME = "dataset_shapes.json"
IMAGES_DIR = "images"
FILES_PER_FOLDER = 1000
_CHUNK = 250  # images per worker task; divides FILES_PER_FOLDER, so a task writes into one folder


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
        scene, style = sample_scene(rng, image_size)
        (folder / _filename(i)).write_bytes(png_bytes(render(scene, style, image_size)))
        out.append((i, scene, caption_scene(scene, rng)))
    return out
