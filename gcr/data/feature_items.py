"""Items given as precomputed embedding files (audio, video, ...), in a Karpathy-like JSON.

Text-to-audio (Clotho, AudioCaps) and text-to-video (MSR-VTT, MSVD) corpora come as one embedding per
item, extracted once by an audio or video model, plus captions. The format::

    {"dataset": "clotho", "modality": "audio",
     "items": [{"id": "0001", "split": "train", "feature": "feats/0001.npy",
                "sentences": [{"raw": "A dog barks in a park.", "sentid": 0}, ...]},
               {"id": 17, "split": "test", "feature": "all.npy", "feature_index": 12,
                "sentences": [...]}, ...]}

* ``modality`` names what the items are (``audio``, ``video``, ...; not ``image`` or ``text``);
* ``id`` is a unique string or integer; ``split`` is ``train``, ``val``, ``test`` or ``restval``;
* ``feature`` is a ``.npy`` file relative to the ``features`` folder, holding one (D,) vector, or, with
  ``feature_index``, an (N, D) matrix of which the item is row ``feature_index``;
* ``sentences`` are the captions, as in Karpathy JSON (``raw``, ``sentid``; ``tokens`` as fallback).

Files are read with ``np.load(path, allow_pickle=False, mmap_mode="r")``: gcr never unpickles, so an
object array (or any pickle) is rejected, not executed. :func:`load_feature_items` checks everything
(fields, files, shapes, one D for all items, finite values, unique ids, non-empty captions) and raises
:class:`~gcr.errors.DataError` naming the problem, the item and the fix. The corpus it returns holds
:class:`~gcr.data.corpus.ImageRecord` s whose ``modality`` is the JSON's and whose content is a
``feature`` :class:`~gcr.data.corpus.Content`, so ``t2i``/``i2t`` tasks are text-to-item/item-to-text.

:func:`gcr.data.feature_fixtures.write_feature_items_fixture` writes a small synthetic corpus in this format
(a worked example).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gcr.data.corpus import SPLITS, Caption, Corpus, ImageRecord
from gcr.errors import ConfigError, DataError

FORMAT_HELP = "docs/data.md, section 'Audio and video: precomputed features' (gcr/data/feature_items.py)"
RESERVED_MODALITIES = ("text", "image")
_ROW_SUFFIX = re.compile(r"#(\d+)$")
_MODALITY_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")
_NUMERIC_KINDS = "fiu"  # float, signed and unsigned integers
_ROW_BLOCK = 4096  # rows read at once when checking a large (N, D) file
_MAX_LISTED = 5


# --------------------------------------------------------------------------- reading vectors


def split_feature_value(value: str) -> tuple[Path, int | None]:
    """A ``feature`` content value -> (file, row or None): ``"a.npy#12"`` is row 12 of ``a.npy``."""
    match = _ROW_SUFFIX.search(value)
    if match is None:
        return Path(value), None
    return Path(value[: match.start()]), int(match.group(1))


def open_feature_array(path: str | os.PathLike[str], where: str | None = None) -> np.ndarray:
    """Memory-map the ``.npy`` file ``path`` without ever unpickling.

    Checks the header first, so every failure is a :class:`DataError` that says what is wrong: missing
    file, a pickle or object array (refused, never loaded), an ``.npz`` archive, a non-numeric dtype,
    an empty array, or a truncated/corrupt file. ``where`` prefixes the message (which item needs it).
    """
    path = Path(path)
    prefix = f"{where}: " if where else ""

    def error(problem: str, fix: str) -> DataError:
        return DataError(f"{prefix}feature file {path} {problem}; fix: {fix}")

    try:
        with path.open("rb") as fh:
            head = fh.read(6)
            if head != b"\x93NUMPY":
                raise _not_npy(error, head)
            fh.seek(0)
            header = _read_header(fh)
    except FileNotFoundError:
        raise error(
            "is missing", "point data.features at the folder the items' 'feature' paths are relative to, "
            "or restore the file"
        ) from None
    except IsADirectoryError:
        raise error("is a folder, not a .npy file", "make 'feature' name a .npy file") from None
    except OSError as exc:
        raise error(f"cannot be read ({exc})", "check the path and permissions") from None
    if header is not None:
        shape, dtype = header
        if dtype.hasobject:
            raise error(
                f"holds a pickled object array (dtype {dtype}), which gcr refuses to load (it never unpickles)",
                "save a numeric array instead, e.g. np.save(path, np.asarray(vector, dtype=np.float32))",
            )
        if dtype.kind not in _NUMERIC_KINDS or dtype.fields is not None:
            raise error(
                f"has dtype {dtype}, not a numeric (float or integer) array",
                "save the embedding as float32, e.g. np.save(path, vector.astype(np.float32))",
            )
        if 0 in shape:
            raise error(f"holds an empty array of shape {shape}", "re-extract the embedding for this item")
    try:
        array = np.load(path, allow_pickle=False, mmap_mode="r")
    except (ValueError, OSError, EOFError) as exc:
        raise error(
            f"is not a readable .npy file ({type(exc).__name__}: {exc})",
            "re-extract or re-copy the file (it may be truncated or corrupt)",
        ) from None
    if not isinstance(array, np.ndarray):  # defensive: np.load returned an archive
        raise error("is not a single .npy array", "save each embedding with np.save (.npy), not np.savez")
    if array.dtype.hasobject or array.dtype.kind not in _NUMERIC_KINDS:
        raise error(f"has dtype {array.dtype}, not a numeric array", "save the embedding as float32")
    return array


def _not_npy(error: Callable[[str, str], DataError], head: bytes) -> DataError:
    if head.startswith(b"PK"):
        return error(
            "is an .npz archive, not a .npy array",
            "save each array with np.save (.npy) and point 'feature' (plus 'feature_index') at it",
        )
    if head[:1] == b"\x80":
        return error(
            "is a Python pickle (torch.save / pickle.dump?), which gcr refuses to load (it never unpickles)",
            "save a numeric array with np.save(path, np.asarray(vector, dtype=np.float32))",
        )
    return error("is not a .npy file (no NUMPY magic)", "save the embedding with np.save")


def _read_header(fh) -> tuple[tuple[int, ...], np.dtype] | None:
    """(shape, dtype) from a .npy header (safe: no unpickling), or None for a format version we do not parse."""
    from numpy.lib import format as npy_format

    version = npy_format.read_magic(fh)
    if version == (1, 0):
        shape, _, dtype = npy_format.read_array_header_1_0(fh)
    elif version == (2, 0):
        shape, _, dtype = npy_format.read_array_header_2_0(fh)
    else:
        return None  # np.load below still checks it
    return tuple(shape), np.dtype(dtype)


def _rows_of(array: np.ndarray, path: Path, rows: Sequence[int | None], where: str) -> int:
    """Check that ``array`` fits the references ``rows`` (None: the whole (D,) file); returns D."""
    if any(r is None for r in rows):
        if array.ndim != 1:
            raise DataError(
                f"{where}: feature file {path} holds an array of shape {array.shape}, but without "
                "'feature_index' a feature file must hold one 1-D (D,) vector; fix: save one (D,) vector "
                "per item, or add 'feature_index' to pick a row of a 2-D (N, D) file"
            )
        return int(array.shape[0])
    if array.ndim != 2:
        raise DataError(
            f"{where}: feature file {path} has shape {array.shape}, but 'feature_index' needs a 2-D (N, D) "
            "matrix; fix: drop 'feature_index' for a (D,) file, or save the (N, D) matrix"
        )
    top = max(rows)  # type: ignore[type-var]
    if top >= array.shape[0]:
        raise DataError(
            f"{where}: 'feature_index' {top} is out of range for feature file {path} with "
            f"{array.shape[0]} rows; fix: use an index below {array.shape[0]}"
        )
    return int(array.shape[1])


def _as_rows(array: np.ndarray, rows: Sequence[int | None]) -> np.ndarray:
    """float32 (len(rows), D) copy of the referenced rows (all None: the 1-D file, once per reference)."""
    if array.ndim == 1:
        return np.repeat(np.asarray(array, dtype=np.float32)[None, :], len(rows), axis=0)
    return np.asarray(array[np.asarray(rows, dtype=np.int64)], dtype=np.float32)


def load_feature_vectors(values: Sequence[str]) -> np.ndarray:
    """float32 (len(values), D) matrix of ``feature`` content values, each file opened once.

    Raises :class:`DataError` on a missing or unreadable file, a wrong shape, differing D, or NaN/inf.
    """
    values = list(values)
    if not values:
        raise DataError("no feature values to read; fix: pass at least one feature item")
    by_file: dict[Path, list[tuple[int, int | None]]] = {}
    for i, value in enumerate(values):
        path, row = split_feature_value(value)
        by_file.setdefault(path, []).append((i, row))
    out: np.ndarray | None = None
    first: tuple[Path, int] | None = None
    for path, refs in by_file.items():
        array = open_feature_array(path)
        where = f"feature {values[refs[0][0]]}"
        rows = [r for _, r in refs]
        dim = _rows_of(array, path, rows, where)
        if first is None:
            first, out = (path, dim), np.empty((len(values), dim), dtype=np.float32)
        elif dim != first[1]:
            raise DataError(
                f"feature file {path} has D={dim} but {first[0]} has D={first[1]}; fix: every item's vector "
                "must have the same length (extract them all with one model)"
            )
        block = _as_rows(array, rows)
        bad = ~np.isfinite(block).all(axis=1)
        if bad.any():
            raise DataError(
                f"feature {values[refs[int(np.argmax(bad))][0]]} holds NaN or inf values; fix: re-extract "
                "that embedding (or drop the item)"
            )
        assert out is not None
        out[[i for i, _ in refs]] = block
    assert out is not None
    return out


def load_feature_vector(value: str) -> np.ndarray:
    """The float32 1-D vector a ``feature`` content value names (``"<path>"`` or ``"<path>#<row>"``)."""
    return load_feature_vectors([value])[0]


def feature_files_identity(values: Iterable[str]) -> str:
    """Short hash of the distinct files behind ``feature`` values: path, size and mtime of each.

    Keys caches of precomputed vectors, so rewriting a file invalidates them.
    """
    h = hashlib.sha256()
    for path in sorted({str(split_feature_value(v)[0]) for v in values}):
        try:
            st = os.stat(path)
            h.update(f"{path}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{path}\tmissing\n".encode())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- the JSON loader


def load_feature_items(
    json: str | os.PathLike[str],
    features: str | os.PathLike[str],
    name: str | None = None,
    restval_as: str = "train",
    require_splits: Iterable[str] = ("train", "test"),
    **_: object,
) -> Corpus:
    """Read a feature-items JSON (module docstring) into a :class:`Corpus` of precomputed items.

    ``features`` is the folder the items' ``feature`` paths are relative to. Split ``restval`` becomes
    ``restval_as``; every split in ``require_splits`` must hold an item. Every feature file is opened
    (memory-mapped, never unpickled) and every referenced vector checked. The corpus is named ``name``,
    else the JSON's ``dataset``, else the file's stem. Raises :class:`DataError` on malformed input.
    """
    from gcr.data.karpathy import _map_with_progress, _read_json, collect_records

    json_path, root = Path(json), Path(features)
    if restval_as not in SPLITS:
        raise ConfigError(f"unknown restval_as={restval_as!r}; choose one of {', '.join(SPLITS)}")
    require_splits = tuple(require_splits)
    if not set(require_splits) <= set(SPLITS):
        raise ConfigError(f"require_splits={require_splits!r}: use names from {', '.join(SPLITS)}")
    data = _read_json(
        json_path, "feature-items JSON", f"pass the path of an existing JSON in the format of {FORMAT_HELP}"
    )
    if not isinstance(data, dict) or "items" not in data:
        hint = " (this looks like a Karpathy JSON of images: use data=flickr30k or data=coco)" if (
            isinstance(data, dict) and "images" in data
        ) else ""
        raise DataError(
            f"{json_path}: no top-level 'items' list, so this is not a feature-items JSON{hint}; "
            f"fix: write {{\"dataset\": ..., \"modality\": ..., \"items\": [...]}} as described in {FORMAT_HELP}"
        )
    modality = _modality(json_path, data)
    entries = data["items"]
    if not isinstance(entries, list):
        raise DataError(
            f"{json_path}: top-level 'items' is a {type(entries).__name__}, expected a list of item entries; "
            "fix: make 'items' a JSON list"
        )
    if not root.is_dir():
        raise DataError(
            f"features folder not found: {root}; fix: point data.features at the folder the items' "
            "'feature' paths are relative to"
        )

    parsed = (_parse_item(json_path, root, index, entry, restval_as, modality) for index, entry in enumerate(entries))
    records, counts = collect_records(
        json_path, parsed, require_splits, noun=modality, id_fix="give every item a unique 'id'"
    )

    by_file: dict[Path, list[tuple[int, ImageRecord]]] = {}
    for index, rec in enumerate(records):
        by_file.setdefault(rec.path, []).append((index, rec))

    def check(path: Path) -> int | None:
        return _check_feature_file(json_path, path, by_file[path], modality)

    files = list(by_file)
    dims = _map_with_progress(check, files, "checking features")
    missing = [path for path, dim in zip(files, dims, strict=True) if dim is None]
    if missing:
        listed = "; ".join(f"{p} ({modality} id {by_file[p][0][1].image_id})" for p in missing[:_MAX_LISTED])
        more = f" and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED else ""
        raise DataError(
            f"{len(missing)} missing feature file(s) under features folder {root}: {listed}{more}; "
            "fix: point data.features at the folder the items' 'feature' paths are relative to, "
            "or extract/copy the missing files"
        )
    first_path, first_dim = files[0], dims[0]
    for path, dim in zip(files, dims, strict=True):
        if dim != first_dim:
            a, b = by_file[first_path][0][1], by_file[path][0][1]
            raise DataError(
                f"{json_path}: inconsistent feature dimension: {modality} id {a.image_id!r} has D={first_dim} "
                f"({first_path}) but {modality} id {b.image_id!r} has D={dim} ({path}); "
                "fix: every item's vector must have the same length (extract them all with one model)"
            )

    dataset = data.get("dataset")
    corpus_name = name or (dataset if isinstance(dataset, str) and dataset else json_path.stem)
    meta = {
        "source": str(json_path),
        "features": str(root),
        "dataset": dataset,
        "modality": modality,
        "feature_dim": first_dim,
        "feature_files": len(files),
        "restval_as": restval_as,
        "split_counts": counts,
    }
    return Corpus(name=corpus_name, images=records, meta=meta)


def _modality(json_path: Path, data: dict) -> str:
    if "modality" not in data:
        raise DataError(
            f"{json_path}: missing top-level field 'modality'; fix: add \"modality\": \"audio\" "
            "(or \"video\", ...: what the items' embeddings are of)"
        )
    modality = data["modality"]
    if not isinstance(modality, str) or not _MODALITY_NAME.match(modality):
        raise DataError(
            f"{json_path}: top-level 'modality' is {modality!r}, not a name; fix: use a short word such as "
            "\"audio\" or \"video\" (letters, digits, _ . -)"
        )
    if modality in RESERVED_MODALITIES:
        use = "captions" if modality == "text" else "image files read as pixels: use data=flickr30k/coco"
        raise DataError(
            f"{json_path}: modality {modality!r} is reserved ({use}); "
            "fix: name the embeddings' modality differently, e.g. \"image_features\" for precomputed image embeddings"
        )
    return modality


_ITEM_FIXES = {
    "id": "add a unique 'id' (a string or an integer) to the item",
    "split": f"add 'split': one of {', '.join(SPLITS)} or restval",
    "feature": "add 'feature': the .npy file relative to the features folder "
    "(plus 'feature_index' for a row of an (N, D) file)",
    "sentences": "add 'sentences': [{\"raw\": \"...\", \"sentid\": ...}, ...]",
}


def _parse_item(
    json_path: Path, root: Path, index: int, entry: Any, restval_as: str, modality: str
) -> ImageRecord:
    from gcr.data.karpathy import _field_error, _parse_sentence

    def fail(problem: str, fix: str) -> DataError:
        return _field_error(json_path, index, entry, problem, fix, kind=modality)

    if not isinstance(entry, dict):
        raise fail(f"is a {type(entry).__name__}, not an object", "make every item a JSON object")
    for key, fix in _ITEM_FIXES.items():
        if key not in entry or entry[key] is None:
            raise fail(f"missing field {key!r}", fix)
    raw_id = entry["id"]
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)) or not str(raw_id).strip():
        raise fail(f"'id' is {raw_id!r}, not a non-empty string or an integer", "give the item a unique id")
    item_id = str(raw_id)
    split = entry["split"]
    if split == "restval":
        split = restval_as
    if split not in SPLITS:
        raise fail(
            f"unknown split {entry['split']!r} ({modality} id {item_id})", f"use one of {', '.join(SPLITS)} or restval"
        )
    feature = entry["feature"]
    if not isinstance(feature, str) or not feature.strip():
        raise fail(f"'feature' is {feature!r}, not a non-empty path", _ITEM_FIXES["feature"])
    if _ROW_SUFFIX.search(feature):
        raise fail(
            f"'feature' {feature!r} ends in '#<digits>', which gcr reads as a row number",
            "rename the file, and give the row as 'feature_index'",
        )
    row = entry.get("feature_index")
    if row is not None and (isinstance(row, bool) or not isinstance(row, int) or row < 0):
        raise fail(
            f"'feature_index' is {row!r}, not a row number (an integer >= 0)",
            "set 'feature_index' to the item's row of the (N, D) file, or drop it for a (D,) file",
        )
    sentences = entry["sentences"]
    if not isinstance(sentences, list) or not sentences:
        raise fail(
            f"{modality} {item_id} has no captions ('sentences' is empty or not a list)",
            "give every item at least one sentence, or remove the item",
        )
    captions: tuple[Caption, ...] = tuple(
        _parse_sentence(json_path, index, entry, item_id, k, sent, kind=modality) for k, sent in enumerate(sentences)
    )
    return ImageRecord(
        image_id=item_id, path=root / feature, split=split, captions=captions, modality=modality, feature_row=row
    )


def _check_feature_file(
    json_path: Path, path: Path, refs: Sequence[tuple[int, ImageRecord]], modality: str
) -> int | None:
    """D of the file ``path`` after checking every item that references it; None if it is missing."""
    if not path.exists():
        return None
    index, rec = refs[0]
    more = f" and {len(refs) - 1} more item(s)" if len(refs) > 1 else ""
    where = f"{json_path}: {modality} entry {index} (id {rec.image_id}{more})"
    array = open_feature_array(path, where)
    rows = [r.feature_row for _, r in refs]
    if any(r is None for r in rows) and any(r is not None for r in rows):
        raise DataError(
            f"{where}: feature file {path} is used both whole and by 'feature_index'; fix: give every item "
            "of a 2-D (N, D) file a 'feature_index', and no item of a (D,) file one"
        )
    if array.ndim == 2:  # name the first item whose row is out of range, not the file's first item
        for i, r in refs:
            if r.feature_row is not None and r.feature_row >= array.shape[0]:
                raise DataError(
                    f"{json_path}: {modality} entry {i} (id {r.image_id}): 'feature_index' {r.feature_row} is out "
                    f"of range for feature file {path} with {array.shape[0]} rows; fix: use an index below "
                    f"{array.shape[0]}"
                )
    dim = _rows_of(array, path, rows, where)
    if array.ndim == 1:
        if not np.isfinite(np.asarray(array, dtype=np.float32)).all():
            raise DataError(
                f"{where}: feature file {path} holds NaN or inf values; fix: re-extract that embedding "
                "(or drop the item)"
            )
        return dim
    for start in range(0, len(refs), _ROW_BLOCK):
        chunk = refs[start : start + _ROW_BLOCK]
        block = _as_rows(array, [r.feature_row for _, r in chunk])
        bad = ~np.isfinite(block).all(axis=1)
        if bad.any():
            i, r = chunk[int(np.argmax(bad))]
            raise DataError(
                f"{json_path}: {modality} entry {i} (id {r.image_id}): row {r.feature_row} of feature file {path} "
                "holds NaN or inf values; fix: re-extract that embedding (or drop the item)"
            )
    return dim


#: The modality of the items this loader yields (checked against the backbone before any work).
load_feature_items.item_modality = "feature"
