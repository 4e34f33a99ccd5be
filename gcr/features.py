"""Target feature vectors, cached on disk keyed by corpus, encoder and modality.

Feature-based schemes (``hkmeans``; later K-Means/RQ-VAE) read one vector per
target. Computing them is the slow part, so they are cached as
``<cache>/<corpus fingerprint>-<encoder>-<encoder fingerprint>-<modality>.pt``,
written atomically and validated on load (the target ids must match).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from gcr.artifacts import load_tensors, save_tensors
from gcr.data.corpus import Target
from gcr.errors import ArtifactError
from gcr.progress import progress

FORMAT_VERSION = 1


class FeatureEncoder(Protocol):
    """What a feature encoder offers: a name, a fingerprint, and text/image towers."""

    def fingerprint(self) -> str: ...
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor: ...
    def encode_images(self, paths: Sequence[str]) -> torch.Tensor: ...


@torch.no_grad()
def encode_targets(encoder: FeatureEncoder, targets: Sequence[Target], batch_size: int = 256) -> np.ndarray:
    """One feature row per target, from the tower that matches the target's modality."""
    if isinstance(encoder, torch.nn.Module):
        encoder.eval()
    rows = []
    for start in progress(range(0, len(targets), batch_size), "encoding targets", total=-(-len(targets) // batch_size)):
        chunk = targets[start : start + batch_size]
        modality = chunk[0].content.modality
        values = [t.content.value for t in chunk]
        if any(t.content.modality != modality for t in chunk):
            raise ArtifactError("targets of one index must share one modality")
        emb = encoder.encode_images(values) if modality == "image" else encoder.encode_text(values)
        rows.append(emb.float().cpu())
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
    modality = targets[0].content.modality
    path = Path(cache_dir) / f"{corpus_fingerprint}-{encoder_name}-{encoder.fingerprint()}-{modality}.pt"
    ids = [t.target_id for t in targets]
    if path.exists():
        saved = load_tensors(path, what="feature cache")
        if saved.get("format_version") != FORMAT_VERSION or saved.get("ids") != ids:
            raise ArtifactError(
                f"feature cache {path} does not match these targets (stale or foreign); delete it to recompute"
            )
        return saved["features"].numpy()
    features = encode_targets(encoder, targets, batch_size)
    save_tensors(path, {"format_version": FORMAT_VERSION, "ids": ids, "features": torch.from_numpy(features)})
    return features
