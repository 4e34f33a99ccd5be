"""MiniLM (text) + EfficientNet-Lite0 (images) as one feature encoder, and a factory by name.

The two towers are trained separately, so their spaces are *not* aligned (and differ in width:
384 vs 1280). That is what feature-based identifier schemes need -- one vector per target, all of
one modality -- but it is no dual encoder: do not compare a text vector with an image vector.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch

from gcr.encoders.efficientnet import EfficientNetImageEncoder
from gcr.encoders.minilm import MiniLMTextEncoder
from gcr.errors import ConfigError

ENCODER_NAMES: tuple[str, ...] = ("minilm", "efficientnet", "pretrained")


class PretrainedFeatureEncoder:
    """Routes ``encode_text`` to MiniLM and ``encode_images`` to EfficientNet-Lite0."""

    modalities = ("text", "image")

    def __init__(
        self,
        *,
        text: MiniLMTextEncoder | None = None,
        image: EfficientNetImageEncoder | None = None,
        device: str | torch.device = "cpu",
    ):
        self.text = text if text is not None else MiniLMTextEncoder(device=device)
        self.image = image if image is not None else EfficientNetImageEncoder(device=device)
        self.dims = {"text": self.text.dim, "image": self.image.dim}

    def dim_for(self, modality: str) -> int:
        if modality not in self.dims:
            raise ConfigError(f"unknown modality {modality!r}; choose one of {', '.join(self.dims)}")
        return self.dims[modality]

    def fingerprint(self) -> str:
        both = f"pretrained:text={self.text.fingerprint()}:image={self.image.fingerprint()}"
        return hashlib.sha256(both.encode()).hexdigest()[:16]

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        return self.text.encode_text(texts)

    def encode_images(self, paths: Sequence[str]) -> torch.Tensor:
        return self.image.encode_images(paths)

    def eval(self) -> PretrainedFeatureEncoder:
        self.image.eval()
        return self


def build_feature_encoder(
    name: str, **kw: Any
) -> MiniLMTextEncoder | EfficientNetImageEncoder | PretrainedFeatureEncoder:
    """``"minilm"`` (text), ``"efficientnet"`` (images) or ``"pretrained"`` (both); ``kw`` go to the class."""
    if name == "minilm":
        return MiniLMTextEncoder(**kw)
    if name == "efficientnet":
        return EfficientNetImageEncoder(**kw)
    if name == "pretrained":
        return PretrainedFeatureEncoder(**kw)
    raise ConfigError(f"unknown feature encoder {name!r}; known: {', '.join(ENCODER_NAMES)}")
