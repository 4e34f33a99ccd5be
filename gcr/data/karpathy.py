"""Load the Karpathy-split JSON used by Flickr30K and MS-COCO (and by the generated shapes data).

The format::

    {"dataset": "flickr30k",
     "images": [{"filename": "1000092795.jpg", "filepath": "val2014" (COCO only),
                 "imgid": 0, "cocoid": 391895 (COCO only), "split": "train",
                 "sentences": [{"raw": "Two young guys ...", "tokens": [...], "sentid": 0}, ...],
                 "sentids": [0, 1, 2, 3, 4]}, ...]}

:func:`load_karpathy` validates everything it reads and raises :class:`~gcr.errors.DataError`
with a message that names the problem, the offending entry and the fix.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image, UnidentifiedImageError

from gcr.data.corpus import SPLITS, Caption, Corpus, ImageRecord
from gcr.errors import ConfigError, DataError
from gcr.progress import progress

CHECK_MODES: tuple[str, ...] = ("none", "exists", "open", "full")
PROGRESS_THRESHOLD = 2000
# Errors PIL raises on missing, unreadable, corrupt or truncated files.
_IMAGE_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError)
_MAX_LISTED = 5

T = TypeVar("T")
R = TypeVar("R")


def load_karpathy(
    json_path: str | os.PathLike[str],
    image_root: str | os.PathLike[str],
    *,
    name: str | None = None,
    restval_as: str = "train",
    check_images: str = "open",
    require_splits: Iterable[str] = ("train", "test"),
) -> Corpus:
    """Read a Karpathy-split JSON into a :class:`Corpus`.

    * image id: ``cocoid`` if present, else ``imgid`` (else ``id``), as a string;
    * caption id: ``sentid`` as a string, else ``"{image_id}#{k}"``;
    * caption text: ``raw`` stripped, else the ``tokens`` joined by spaces;
    * image path: ``image_root / filepath / filename`` (``filepath`` is optional);
    * split ``restval`` (COCO) becomes ``restval_as``.

    ``check_images``: ``"none"`` (trust the paths), ``"exists"`` (files exist), ``"open"`` (files exist
    and PIL verifies their header and structure: catches corrupt files and truncated PNGs, not truncated
    JPEGs) or ``"full"`` (additionally decodes every image: catches any truncation; slow). Every split
    in ``require_splits`` must hold at least one image. Raises :class:`DataError` on malformed input.
    """
    json_path = Path(json_path)
    image_root = Path(image_root)
    if check_images not in CHECK_MODES:
        raise ConfigError(f"unknown data.check_images={check_images!r}; choose one of {', '.join(CHECK_MODES)}")
    if restval_as not in SPLITS:
        raise ConfigError(f"unknown data.restval_as={restval_as!r}; choose one of {', '.join(SPLITS)}")
    require_splits = tuple(require_splits)
    if not set(require_splits) <= set(SPLITS):
        raise ConfigError(f"require_splits={require_splits!r}: use names from {', '.join(SPLITS)}")
    data = _read_json(json_path)
    if not isinstance(data, dict) or "images" not in data:
        raise DataError(
            f"{json_path}: no top-level 'images' list, so this is not a Karpathy-split JSON; "
            "fix: pass dataset_flickr30k.json / dataset_coco.json (or a file of the same format)"
        )
    entries = data["images"]
    if not isinstance(entries, list):
        raise DataError(
            f"{json_path}: top-level 'images' is a {type(entries).__name__}, expected a list of image "
            "entries; fix: regenerate or re-download the file"
        )

    images: list[ImageRecord] = []
    records = (_parse_entry(json_path, image_root, index, entry, restval_as) for index, entry in enumerate(entries))
    images, counts = collect_records(
        json_path, records, require_splits, noun="image", id_fix="give every image a unique cocoid/imgid"
    )

    if check_images != "none":
        _check_image_files(images, check_images, image_root)

    dataset = data.get("dataset")
    corpus_name = name or (dataset if isinstance(dataset, str) and dataset else json_path.stem)
    meta = {
        "source": str(json_path),
        "image_root": str(image_root),
        "dataset": dataset,
        "restval_as": restval_as,
        "split_counts": counts,
    }
    if isinstance(data.get("gcr"), dict):
        meta["gcr"] = data["gcr"]
    return Corpus(name=corpus_name, images=images, meta=meta)


#: Where each loaded image came from (``image id …, entry … of <json>``), so that an image that fails to
#: decode during training is named by its id and JSON entry, not only by its path.
_ORIGINS: dict[str, str] = {}


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Open ``path`` fully decoded as an RGB image; :class:`DataError` if it is missing, corrupt or truncated."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise DataError(
            f"missing image file {path}; fix: check data.images (the image folder) / download the images, "
            "or regenerate the dataset"
        ) from None
    except _IMAGE_ERRORS as exc:
        origin = _ORIGINS.get(str(path))
        raise DataError(
            f"corrupt or truncated image {path}{f' ({origin})' if origin else ''}: {type(exc).__name__}: {exc}; "
            "fix: re-download or regenerate that file, or drop its entry from the JSON "
            "(data.check_images=full decodes every image before training)"
        ) from None


def _read_json(
    path: Path,
    what: str = "Karpathy JSON",
    missing_fix: str = "set data.json to an existing dataset_*.json (or use the default data=shapes)",
) -> Any:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{what} not found: {path}; fix: {missing_fix}") from None
    except OSError as exc:
        raise DataError(f"cannot read {what} {path} ({exc}); fix: check the path and permissions") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path} is not UTF-8 text (invalid byte at offset {exc.start}); "
            "fix: re-encode the file as UTF-8 (e.g. iconv -t UTF-8)"
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
            "fix: re-download or regenerate the file"
        ) from None


# The field that names an entry in error messages, by entry kind (Karpathy images: the file name).
_LABEL_FIELDS = {"image": "filename"}


def _field_error(
    json_path: Path, index: int, entry: Any, problem: str, fix: str, *, kind: str = "image"
) -> DataError:
    """``<json>: <kind> entry <index> (<name>): <problem>; fix: <fix>``."""
    label = f"{kind} entry {index}"
    field = _LABEL_FIELDS.get(kind, "id")
    name = entry.get(field) if isinstance(entry, dict) else None
    if isinstance(name, str) or (field == "id" and isinstance(name, int) and not isinstance(name, bool)):
        label += f" ({name})"
    return DataError(f"{json_path}: {label}: {problem}; fix: {fix}")


def collect_records(
    json_path: Path, records: Iterable[ImageRecord], require_splits: Iterable[str], *, noun: str, id_fix: str
) -> tuple[list[ImageRecord], dict[str, int]]:
    """The records as a list, after checking that item and caption ids are unique and every required split has
    an item; returns them with the per-split counts. ``noun`` names an item in messages (image, audio, ...)."""
    out: list[ImageRecord] = []
    seen_items: dict[str, int] = {}
    seen_captions: dict[str, str] = {}
    for index, record in enumerate(records):
        if record.image_id in seen_items:
            raise DataError(
                f"{json_path}: duplicate {noun} id {record.image_id!r} in entries {seen_items[record.image_id]} "
                f"and {index}; fix: {id_fix}"
            )
        seen_items[record.image_id] = index
        for caption in record.captions:
            if caption.caption_id in seen_captions:
                raise DataError(
                    f"{json_path}: duplicate caption id (sentid) {caption.caption_id!r} in {noun} items "
                    f"{seen_captions[caption.caption_id]!r} and {record.image_id!r}; "
                    "fix: give every sentence a unique sentid"
                )
            seen_captions[caption.caption_id] = record.image_id
        out.append(record)
    counts = {s: 0 for s in SPLITS}
    for record in out:
        counts[record.split] += 1
    for split in require_splits:
        if counts.get(split, 0) == 0:
            raise DataError(
                f"{json_path}: missing split {split!r}: no {noun} has split {split!r} "
                f"(counts: {', '.join(f'{k}={v}' for k, v in counts.items())}); "
                f"fix: use a JSON with a {split} split, or relabel some entries' 'split' field"
            )
    return out, counts


def _parse_entry(json_path: Path, image_root: Path, index: int, entry: Any, restval_as: str) -> ImageRecord:
    if not isinstance(entry, dict):
        raise _field_error(
            json_path,
            index,
            entry,
            f"is a {type(entry).__name__}, not an object",
            "make every entry a JSON object",
        )
    for key in ("filename", "split", "sentences"):
        if key not in entry:
            raise _field_error(json_path, index, entry, f"missing field {key!r}", f"add {key!r} to the entry")
    raw_id = next((entry[k] for k in ("cocoid", "imgid", "id") if entry.get(k) is not None), None)
    if raw_id is None:
        raise _field_error(
            json_path,
            index,
            entry,
            "missing field 'imgid' (no cocoid/imgid/id)",
            "add a unique 'imgid' to the entry",
        )
    image_id = str(raw_id)
    filename, filepath = entry["filename"], entry.get("filepath") or ""
    if not isinstance(filename, str) or not filename or not isinstance(filepath, str):
        raise _field_error(
            json_path,
            index,
            entry,
            "'filename'/'filepath' must be non-empty strings",
            "fix the file name fields",
        )
    split = entry["split"]
    if split == "restval":
        split = restval_as
    if split not in SPLITS:
        raise _field_error(
            json_path,
            index,
            entry,
            f"unknown split {entry['split']!r} (image id {image_id})",
            f"use one of {', '.join(SPLITS)} or restval",
        )
    sentences = entry["sentences"]
    if not isinstance(sentences, list) or not sentences:
        raise _field_error(
            json_path,
            index,
            entry,
            f"image {image_id} has no captions ('sentences' is empty or not a list)",
            "give every image at least one sentence, or remove the entry",
        )
    captions = tuple(
        _parse_sentence(json_path, index, entry, image_id, k, sent) for k, sent in enumerate(sentences)
    )
    path = image_root / filepath / filename
    _ORIGINS[str(path)] = f"image id {image_id}, entry {index} of {json_path}"
    return ImageRecord(image_id=image_id, path=path, split=split, captions=captions)


def _parse_sentence(
    json_path: Path, index: int, entry: dict, image_id: str, k: int, sent: Any, *, kind: str = "image"
) -> Caption:
    """One caption of entry ``index``; ``kind`` names the entry in messages (``image``, ``audio``, ...)."""
    if not isinstance(sent, dict):
        raise _field_error(
            json_path,
            index,
            entry,
            f"sentence {k} is a {type(sent).__name__}, not an object",
            "make every sentence an object with 'raw' and 'sentid'",
            kind=kind,
        )
    raw = sent.get("raw")
    if isinstance(raw, str):
        text = raw.strip()
    elif isinstance(sent.get("tokens"), list):
        text = " ".join(str(t) for t in sent["tokens"]).strip()
    else:
        raise _field_error(
            json_path,
            index,
            entry,
            f"sentence {k} is missing field 'raw' (and has no 'tokens')",
            "add the caption text as 'raw'",
            kind=kind,
        )
    sentid = sent.get("sentid")
    caption_id = str(sentid) if sentid is not None else f"{image_id}#{k}"
    if not text:
        raise _field_error(
            json_path,
            index,
            entry,
            f"empty caption (sentid {caption_id!r}, {kind} id {image_id})",
            "write the caption text or remove the sentence",
            kind=kind,
        )
    return Caption(caption_id=caption_id, text=text, image_id=image_id)


def _check_one(path: Path, mode: str) -> str | None:
    """The problem with one image file, or None if it passes ``mode``."""
    if mode == "exists":
        return None if path.is_file() else "missing"
    try:
        with Image.open(path) as im:
            kind = im.format
            im.verify()
        if mode == "open" and not _has_end_marker(path, kind):
            return f"truncated (the {kind} file ends before its end-of-image marker)"
        if mode == "full":
            # verify() does not decode pixel data, so only a full load catches every truncation.
            with Image.open(path) as im:
                im.load()
    except FileNotFoundError:
        return "missing"
    except _IMAGE_ERRORS as exc:
        return f"corrupt or truncated ({type(exc).__name__}: {exc})"
    return None


#: The bytes a complete file of each format ends with; a download cut short lacks them.
_END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND", "MPO": b"\xff\xd9"}


def _has_end_marker(path: Path, kind: str | None) -> bool:
    """Whether a JPEG/PNG file holds its end-of-image marker near its end (other formats: True).

    This is what keeps ``check_images=open`` (the default) cheap and still catches the common damage, a
    truncated file: one read of the last kilobyte, no pixel decoding (writers may pad after the marker).
    """
    marker = _END_MARKERS.get(kind or "")
    if marker is None:
        return True
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 1024))
        return marker in f.read()


def _check_image_files(images: Sequence[ImageRecord], mode: str, image_root: Path) -> None:
    def check(im: ImageRecord) -> str | None:
        return _check_one(im.path, mode)

    problems = _map_with_progress(check, images, f"checking images ({mode})")
    missing = [im for im, p in zip(images, problems, strict=True) if p == "missing"]
    broken = [(im, p) for im, p in zip(images, problems, strict=True) if p not in (None, "missing")]
    if missing:
        listed = "; ".join(f"{im.path} (image id {im.image_id})" for im in missing[:_MAX_LISTED])
        more = f" and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED else ""
        raise DataError(
            f"{len(missing)} missing image file(s) under data.images={image_root}: {listed}{more}; "
            "fix: point data.images at the folder holding the images (COCO: the one containing train2014/ and "
            "val2014/), download the missing files, or regenerate the dataset"
        )
    if broken:
        listed = "; ".join(f"{im.path} (image id {im.image_id}): {p}" for im, p in broken[:_MAX_LISTED])
        more = f" and {len(broken) - _MAX_LISTED} more" if len(broken) > _MAX_LISTED else ""
        raise DataError(
            f"{len(broken)} corrupt or truncated image file(s): {listed}{more}; "
            "fix: re-download or regenerate those files, or remove their entries from the JSON"
        )


def _map_with_progress(fn: Callable[[T], R], items: Sequence[T], description: str) -> list[R]:
    """``[fn(x) for x in items]``; threaded, with a progress bar, for large inputs (file checks wait on I/O)."""
    if len(items) <= PROGRESS_THRESHOLD:
        return [fn(x) for x in items]
    workers = min(8, 2 * (os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:

        def results() -> Iterator[R]:
            # Bounded batches: pool.map over a million items would hold a million futures at once.
            for start in range(0, len(items), 4096):
                yield from pool.map(fn, items[start : start + 4096])

        return list(progress(results(), description, total=len(items)))

