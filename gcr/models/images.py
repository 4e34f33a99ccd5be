"""Image files -> normalised pixel tensors, with an in-memory uint8 cache."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image


class ImageTransform:
    """Resize to ``image_size`` and normalise; decoded images are cached as uint8 arrays."""

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        cache: bool = True,
    ):
        self.image_size = int(image_size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self._cache: dict[str, np.ndarray] | None = {} if cache else None

    def _load(self, path: str) -> np.ndarray:
        if self._cache is not None and path in self._cache:
            return self._cache[path]
        from gcr.data.karpathy import load_image  # raises DataError naming a missing/corrupt file

        image = load_image(path)
        if image.size != (self.image_size, self.image_size):
            image = image.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        array = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).copy()
        if self._cache is not None:
            self._cache[path] = array
        return array

    def __call__(self, paths: Sequence[str]) -> torch.Tensor:
        """A float tensor of shape (len(paths), 3, image_size, image_size)."""
        batch = torch.from_numpy(np.stack([self._load(str(p)) for p in paths])).float().div_(255.0)
        return (batch - self.mean) / self.std
