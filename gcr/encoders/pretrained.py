"""MiniLM (text) + EfficientNet-Lite0 (images) as one feature encoder, and a factory by name.

The two towers are trained separately, so their spaces are *not* aligned (and differ in width:
384 vs 1280). That is what feature-based identifier schemes need -- one vector per target, all of
one modality -- but it is no dual encoder: do not compare a text vector with an image vector.

Items given as precomputed embeddings (audio, video, ...; :mod:`gcr.data.feature_items`) are their
own features: :class:`PrecomputedFeatureEncoder` (``"precomputed"``) returns the stored vectors for
them and MiniLM for text, and :class:`PretrainedFeatureEncoder` reads them the same way.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from gcr.encoders.efficientnet import EfficientNetImageEncoder
from gcr.encoders.minilm import MiniLMTextEncoder
from gcr.errors import ConfigError

if TYPE_CHECKING:
    from gcr.data.corpus import Corpus

ENCODER_NAMES: tuple[str, ...] = ("minilm", "efficientnet", "pretrained", "precomputed")


def _feature_dim_error(encoder: object) -> ConfigError:
    return ConfigError(
        f"{type(encoder).__name__} does not know the width of the precomputed feature items yet: it is read "
        "from the data; fix: encode some feature items first, or pass feature_dim="
    )


class PretrainedFeatureEncoder:
    """Routes ``encode_text`` to MiniLM, ``encode_images`` to EfficientNet-Lite0, ``encode_features`` to the stored vectors.

    ``dims`` has ``"text"`` and ``"image"``, and ``"feature"`` (the stored vectors' D) once feature items
    have been read, or when ``feature_dim`` is given.
    """

    modalities = ("text", "image", "feature")

    def __init__(
        self,
        *,
        text: MiniLMTextEncoder | None = None,
        image: EfficientNetImageEncoder | None = None,
        device: str | torch.device = "cpu",
        feature_dim: int | None = None,
        normalize_features: bool = True,
    ):
        self.text = text if text is not None else MiniLMTextEncoder(device=device)
        self.image = image if image is not None else EfficientNetImageEncoder(device=device)
        self.normalize_features = bool(normalize_features)
        self.dims = {"text": self.text.dim, "image": self.image.dim}
        if feature_dim is not None:
            self.dims["feature"] = int(feature_dim)

    def dim_for(self, modality: str) -> int:
        return _dim_for(self, modality)

    def fingerprint(self) -> str:
        both = f"pretrained:text={self.text.fingerprint()}:image={self.image.fingerprint()}"
        if not self.normalize_features:  # the default adds nothing: existing caches stay valid
            both += ":features=raw"
        return hashlib.sha256(both.encode()).hexdigest()[:16]

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        return self.text.encode_text(texts)

    def encode_images(self, paths: Sequence[str]) -> torch.Tensor:
        return self.image.encode_images(paths)

    def encode_features(self, values: Sequence[str]) -> torch.Tensor:
        """The stored vectors of ``feature`` contents (L2-normalised, like the towers' outputs, by default)."""
        from gcr.features import read_precomputed

        vectors = read_precomputed(values, normalize=self.normalize_features)
        self.dims["feature"] = int(vectors.shape[1])
        return vectors

    def eval(self) -> PretrainedFeatureEncoder:
        self.image.eval()
        return self


class PrecomputedFeatureEncoder:
    """Precomputed items (audio, video, ...) are their stored vectors; text goes through MiniLM.

    ``features.name=precomputed``: the target features of a text-to-item task are the items' own
    embeddings (L2-normalised when ``normalize``), and those of an item-to-text task are MiniLM's. With
    ``corpus``, :meth:`fingerprint` also covers the path, size and mtime of each of the corpus's feature
    files, so a rewritten file invalidates every cache keyed by it (:func:`gcr.features.cached_features`
    adds the same hash of the files it reads in any case).
    """

    modalities = ("text", "feature")

    def __init__(
        self,
        *,
        text: MiniLMTextEncoder | None = None,
        corpus: Corpus | None = None,
        normalize: bool = True,
        device: str | torch.device = "cpu",
        feature_dim: int | None = None,
    ):
        self.text = text if text is not None else MiniLMTextEncoder(device=device)
        self.normalize = bool(normalize)
        self.feature_values = (
            [im.content().value for im in corpus.images if im.modality != "image"] if corpus is not None else []
        )
        self.dims = {"text": self.text.dim}
        if feature_dim is not None:
            self.dims["feature"] = int(feature_dim)
        elif corpus is not None and isinstance(corpus.meta.get("feature_dim"), int):
            self.dims["feature"] = corpus.meta["feature_dim"]

    def dim_for(self, modality: str) -> int:
        return _dim_for(self, modality)

    def fingerprint(self) -> str:
        spec = f"precomputed:text={self.text.fingerprint()}:normalize={self.normalize}"
        if self.feature_values:
            from gcr.data.feature_items import feature_files_identity

            spec += f":files={feature_files_identity(self.feature_values)}"
        return hashlib.sha256(spec.encode()).hexdigest()[:16]

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        return self.text.encode_text(texts)

    def encode_features(self, values: Sequence[str]) -> torch.Tensor:
        from gcr.features import read_precomputed

        vectors = read_precomputed(values, normalize=self.normalize)
        self.dims["feature"] = int(vectors.shape[1])
        return vectors

    def encode_images(self, paths: Sequence[str]) -> torch.Tensor:
        raise ConfigError(
            "the precomputed encoder reads stored feature vectors (items given as .npy embeddings) and text, "
            "not image files; fix: features.name=pretrained (or efficientnet) for image targets"
        )


def _dim_for(encoder: Any, modality: str) -> int:
    """Feature width of ``modality`` for an encoder with ``dims`` and ``modalities`` (both encoders here)."""
    if modality == "feature" and "feature" not in encoder.dims:
        raise _feature_dim_error(encoder)
    if modality not in encoder.dims:
        raise ConfigError(f"unknown modality {modality!r}; choose one of {', '.join(encoder.modalities)}")
    return encoder.dims[modality]


def build_feature_encoder(
    name: str, **kw: Any
) -> MiniLMTextEncoder | EfficientNetImageEncoder | PretrainedFeatureEncoder | PrecomputedFeatureEncoder:
    """``"minilm"`` (text), ``"efficientnet"`` (images), ``"pretrained"`` (both, and stored vectors) or
    ``"precomputed"`` (stored vectors + MiniLM text; ``corpus=`` adds its feature files to the fingerprint);
    ``kw`` go to the class."""
    if name == "minilm":
        return MiniLMTextEncoder(**kw)
    if name == "efficientnet":
        return EfficientNetImageEncoder(**kw)
    if name == "pretrained":
        return PretrainedFeatureEncoder(**kw)
    if name == "precomputed":
        return PrecomputedFeatureEncoder(**kw)
    raise ConfigError(f"unknown feature encoder {name!r}; known: {', '.join(ENCODER_NAMES)}")
