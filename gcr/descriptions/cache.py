"""A resumable cache of captions: one JSON file per corpus and captioner, rewritten after every chunk.

:func:`cached_captions` keeps the captions in ``<cache_dir>/captions-<corpus fingerprint>-<key>.json``,
written atomically after every chunk, so an interrupted run resumes where it stopped. A file of another
corpus, captioner or format, or a corrupt one, is ignored with a warning and rebuilt.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from gcr.artifacts import check_header, read_json, write_json
from gcr.data.corpus import Content
from gcr.errors import ArtifactError, DataError

CAPTIONS_KIND = "gcr-captions"
FORMAT_VERSION = 1

CaptionFn = Callable[[Sequence[Content]], Sequence[str]]


def captions_cache_path(cache_dir: str | Path, corpus_fingerprint: str, captioner_key: str) -> Path:
    """``<cache_dir>/captions-<corpus fingerprint>-<key>.json``; an unsafe key is cleaned and hashed."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", captioner_key).strip("._") or "captioner"
    if safe != captioner_key:
        safe += "-" + hashlib.sha256(captioner_key.encode()).hexdigest()[:8]
    return Path(cache_dir) / f"captions-{corpus_fingerprint}-{safe}.json"


def _load_cache(path: Path, captioner_key: str, corpus_fingerprint: str) -> dict[str, str]:
    """The cached captions, or ``{}`` (with a warning) when the file is corrupt, stale or foreign."""
    if not path.exists():
        return {}
    try:
        meta = read_json(path, what="caption cache")
        if not isinstance(meta, dict):
            raise ArtifactError(f"{path} does not hold a JSON object")
        check_header(
            meta, kind=CAPTIONS_KIND, version=FORMAT_VERSION, path=path,
            corpus_fingerprint=corpus_fingerprint, captioner=captioner_key,
        )  # fmt: skip
        captions = meta.get("captions")
        if not isinstance(captions, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v.strip() for k, v in captions.items()
        ):
            raise ArtifactError(f"{path} has a malformed 'captions' table")
    except ArtifactError as exc:
        warnings.warn(f"ignoring the caption cache and recomputing it: {exc}", stacklevel=3)
        return {}
    return dict(captions)


def _write_cache(path: Path, captioner_key: str, corpus_fingerprint: str, captions: dict[str, str]) -> None:
    write_json(
        path,
        {
            "kind": CAPTIONS_KIND,
            "format_version": FORMAT_VERSION,
            "corpus_fingerprint": corpus_fingerprint,
            "captioner": captioner_key,
            "captions": captions,
        },
    )


def cached_captions(
    captioner_key: str,
    image_ids: Sequence[str],
    images: Sequence[Content],
    caption_fn: CaptionFn,
    *,
    cache_dir: str | Path,
    corpus_fingerprint: str,
    chunk_size: int = 256,
) -> dict[str, str]:
    """Captions of ``images`` by id, read from the cache where present, else ``caption_fn(images)``.

    Only ids missing from the cache are captioned, ``chunk_size`` images per ``caption_fn`` call; the file is
    rewritten atomically after every chunk, so an interrupted run keeps the chunks it finished. A cache
    file for another corpus fingerprint or captioner key, another format, or a corrupt one, is ignored with
    a warning and rebuilt. ``captioner_key`` must change whenever the captioner does.
    """
    ids, images = list(image_ids), list(images)
    if len(ids) != len(images):
        raise ValueError(f"{len(ids)} image ids but {len(images)} images")
    if len(set(ids)) != len(ids):
        raise DataError("duplicate image ids passed to cached_captions; each image must appear once")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    path = captions_cache_path(cache_dir, corpus_fingerprint, captioner_key)
    captions = _load_cache(path, captioner_key, corpus_fingerprint)
    missing = [i for i, image_id in enumerate(ids) if image_id not in captions]
    for start in range(0, len(missing), chunk_size):
        chunk = missing[start : start + chunk_size]
        texts = list(caption_fn([images[i] for i in chunk]))
        if len(texts) != len(chunk):
            raise ValueError(f"caption_fn returned {len(texts)} captions for {len(chunk)} images")
        for i, text in zip(chunk, texts):
            if not isinstance(text, str) or not text.strip():
                raise DataError(
                    f"caption_fn gave an empty or non-text caption ({text!r}) for image {ids[i]!r}"
                )
            captions[ids[i]] = text
        _write_cache(path, captioner_key, corpus_fingerprint, captions)
    return {image_id: captions[image_id] for image_id in ids}
