"""Initialising new token embeddings from a scheme's vectors (codebook vectors, centroids)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def project_vectors(vectors: Sequence[np.ndarray], width: int, *, reference: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """(n, width) rows: ``vectors`` (n, d) centred, projected by a fixed seeded Gaussian map, then scaled so
    their per-coordinate std matches ``reference`` (the existing embedding rows) around its mean row.

    A random projection keeps distances up to a constant (Johnson-Lindenstrauss), so tokens whose vectors
    are close start close.
    """
    x = torch.as_tensor(np.stack([np.asarray(v, dtype=np.float32) for v in vectors]))
    x = x - x.mean(0, keepdim=True) if len(x) > 1 else x
    generator = torch.Generator().manual_seed(seed + x.shape[1])
    projection = torch.randn(x.shape[1], width, generator=generator) / x.shape[1] ** 0.5
    rows = x @ projection
    ref = reference.detach().float().cpu()
    scale = ref.std() / rows.std().clamp(min=1e-8) if len(rows) > 1 else 1.0
    return ref.mean(0, keepdim=True) + rows * scale
