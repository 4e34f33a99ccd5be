"""Target feature vectors, cached on disk keyed by corpus, encoder and modality.

Feature-based schemes (``hkmeans``; later K-Means/RQ-VAE) read one vector per
target. Computing them is the slow part, so they are cached as
``<cache>/<corpus fingerprint>-<encoder>-<encoder fingerprint>-<tag>-<modality>.pt``,
written atomically and validated on load (the target ids must match). Precomputed
``feature`` contents (audio, video, ... items) add a hash of their files' path, size
and mtime to the name, so rewriting a feature file invalidates every cache built on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from gcr.artifacts import load_tensors, save_tensors
from gcr.data.corpus import Content, Target
from gcr.errors import ArtifactError, ConfigError
from gcr.progress import progress

FORMAT_VERSION = 1


class FeatureEncoder(Protocol):
    """What a feature encoder offers: a name, a fingerprint, and text/image towers.

    An encoder that can read precomputed ``feature`` contents (items given as embedding files) also has
    ``encode_features(values: Sequence[str]) -> torch.Tensor``; :func:`read_precomputed` reads the vectors.
    """

    def fingerprint(self) -> str: ...
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor: ...
    def encode_images(self, paths: Sequence[str]) -> torch.Tensor: ...


def read_precomputed(values: Sequence[str], normalize: bool = False) -> torch.Tensor:
    """The stored vectors of ``feature`` content values: float32 (n, D), L2-normalised if ``normalize``."""
    from gcr.data.feature_items import load_feature_vectors

    vectors = torch.from_numpy(load_feature_vectors(values))
    return torch.nn.functional.normalize(vectors, dim=-1) if normalize else vectors


def _tower(encoder: FeatureEncoder, modality: str, example: str):
    if modality == "image":
        return encoder.encode_images
    if modality == "text":
        return encoder.encode_text
    if modality == "feature":
        encode = getattr(encoder, "encode_features", None)
        if encode is None:
            raise ConfigError(
                f"{type(encoder).__name__} cannot read precomputed feature items (e.g. {example!r}); "
                "fix: features.name=precomputed (stored vectors + MiniLM text) or pretrained, "
                "and dense=pretrained for the dense baseline"
            )
        return encode
    raise ConfigError(f"unknown content modality {modality!r}; expected text, image or feature")


@torch.no_grad()
def encode_contents(encoder: FeatureEncoder, contents: Sequence[Content], batch_size: int = 256) -> np.ndarray:
    """One feature row per text, image or precomputed item, from the matching tower (all of one modality).

    ``feature`` contents go to ``encoder.encode_features`` (see :func:`read_precomputed`).
    """
    modalities = {c.modality for c in contents}
    if len(modalities) != 1:
        raise ConfigError(f"encode one modality at a time, got {sorted(modalities)}")
    encode = _tower(encoder, next(iter(modalities)), contents[0].value)
    if isinstance(encoder, torch.nn.Module):
        encoder.eval()
    rows = []
    for start in progress(range(0, len(contents), batch_size), "encoding", total=-(-len(contents) // batch_size)):
        rows.append(encode([c.value for c in contents[start : start + batch_size]]).float().cpu())
    return torch.cat(rows).numpy()


def cached_target_features(
    encoder: FeatureEncoder,
    encoder_name: str,
    targets: Sequence[Target],
    *,
    corpus_fingerprint: str,
    cache_dir: str | Path,
    batch_size: int = 256,
) -> np.ndarray:
    """Features of ``targets``, read from the cache when present, else computed and cached."""
    return cached_features(
        encoder,
        encoder_name,
        [t.target_id for t in targets],
        [t.content for t in targets],
        corpus_fingerprint=corpus_fingerprint,
        cache_dir=cache_dir,
        batch_size=batch_size,
    )


def cached_features(
    encoder: FeatureEncoder,
    encoder_name: str,
    ids: Sequence[str],
    contents: Sequence[Content],
    *,
    corpus_fingerprint: str,
    cache_dir: str | Path,
    batch_size: int = 256,
    tag: str = "targets",
) -> np.ndarray:
    """One feature row per content (all of one modality), cached under the corpus and encoder fingerprints.

    ``ids`` name the rows; a cache file whose ids differ (stale or foreign) is an error, not a silent reuse.
    """
    modality = contents[0].modality
    if modality == "feature":  # the stored vectors are inputs too: a rewritten file must not hit a stale cache
        from gcr.data.feature_items import feature_files_identity

        modality = f"feature-{feature_files_identity(c.value for c in contents)}"
    path = Path(cache_dir) / f"{corpus_fingerprint}-{encoder_name}-{encoder.fingerprint()}-{tag}-{modality}.pt"
    ids = list(ids)
    if path.exists():
        saved = load_tensors(path, what="feature cache")
        if saved.get("format_version") != FORMAT_VERSION or saved.get("ids") != ids:
            raise ArtifactError(
                f"feature cache {path} does not match these targets (stale or foreign); delete it to recompute"
            )
        return saved["features"].numpy()
    features = encode_contents(encoder, contents, batch_size)
    save_tensors(path, {"format_version": FORMAT_VERSION, "ids": ids, "features": torch.from_numpy(features)})
    return features
