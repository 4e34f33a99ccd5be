"""Dense baseline with pretrained frozen towers: MiniLM (text) and EfficientNet-Lite0 (images).

Locked-tower tuning: both pretrained towers stay frozen and only two linear projections into a shared
space (plus the softmax temperature) are trained with the symmetric InfoNCE loss. Because the towers never
change, their features are computed once (and cached on disk by :func:`gcr.features.cached_features`), so
training is a few seconds of matrix products even on a CPU.

Items given as precomputed embeddings (audio, video, ...; :mod:`gcr.data.feature_items`) take the image
tower's place: their stored vectors are the frozen "tower" output, and the item projection's input width
is their D (``item_dim``, set from the data by :func:`gcr.dense.training.train_frozen_dense`). This is the
dense baseline of text-to-audio and text-to-video runs.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from torch import nn

from gcr.artifacts import atomic_write
from gcr.encoders.pretrained import PretrainedFeatureEncoder
from gcr.errors import ArtifactError

FROZEN_DENSE_FILE = "frozen_dense.json"
WEIGHTS_FILE = "projections.safetensors"


class FrozenTowerDualEncoder(nn.Module):
    """Frozen MiniLM + EfficientNet-Lite0 towers (or stored item vectors), trained linear projections, learned temperature.

    ``item_dim``: the width of precomputed item vectors, when the items are not images (None: images, 1280).
    """

    def __init__(
        self, *, embed_dim: int = 256, towers: PretrainedFeatureEncoder | None = None, item_dim: int | None = None
    ):
        super().__init__()
        self.towers = towers if towers is not None else PretrainedFeatureEncoder()
        self.embed_dim = embed_dim
        self.item_dim = int(item_dim) if item_dim is not None else None
        self.text_projection = nn.Linear(self.towers.dims["text"], embed_dim, bias=False)
        self.image_projection = nn.Linear(self.item_dim or self.towers.dims["image"], embed_dim, bias=False)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def set_item_dim(self, dim: int) -> None:
        """Make the item ("image") projection read ``dim``-wide precomputed vectors; re-initialises it if the
        width changes, so call it before training."""
        dim = int(dim)
        if self.image_projection.in_features != dim:
            weight = self.image_projection.weight
            self.image_projection = nn.Linear(dim, self.embed_dim, bias=False).to(weight.device, weight.dtype)
        self.item_dim = dim

    # -- the FeatureEncoder protocol (gcr.features) ----------------------------------------------
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        return self.project_text(self.towers.encode_text(texts))

    def encode_images(self, paths: Sequence[str]) -> torch.Tensor:
        return self.project_images(self.towers.encode_images(paths))

    def encode_features(self, values: Sequence[str]) -> torch.Tensor:
        """Precomputed items (``feature`` contents): their stored vectors through the item projection."""
        return self.project_images(self.towers.encode_features(values))

    def fingerprint(self) -> str:
        """Hash of the towers and the trained projections: keys the feature cache."""
        h = hashlib.sha256(self.towers.fingerprint().encode())
        for name, tensor in sorted(self.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().float().numpy().tobytes())
        return h.hexdigest()[:16]

    # -- training on precomputed tower features ---------------------------------------------------
    def project_text(self, features: torch.Tensor) -> torch.Tensor:
        weight = self.text_projection.weight
        return nn.functional.normalize(self.text_projection(features.to(weight.device, weight.dtype)), dim=-1)

    def project_images(self, features: torch.Tensor) -> torch.Tensor:
        weight = self.image_projection.weight
        if features.shape[-1] != weight.shape[1]:
            from gcr.errors import ConfigError

            raise ConfigError(
                f"the dense baseline's item projection reads {weight.shape[1]}-d vectors but got "
                f"{features.shape[-1]}-d ones: it was trained on other items (images vs precomputed features, "
                "or features of another width); fix: retrain it on this corpus (delete its cache folder)"
            )
        return nn.functional.normalize(self.image_projection(features.to(weight.device, weight.dtype)), dim=-1)

    def contrastive_loss(self, text_features: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        """Symmetric InfoNCE over the batch; row ``i`` of both inputs is a matching pair."""
        logits = self.log_scale.clamp(max=math.log(100)).exp() * self.project_text(text_features) @ self.project_images(
            image_features
        ).T
        labels = torch.arange(len(logits), device=logits.device)
        return (nn.functional.cross_entropy(logits, labels) + nn.functional.cross_entropy(logits.T, labels)) / 2

    def vision_state(self):
        from gcr.errors import ConfigError

        raise ConfigError(
            "the pretrained dense baseline's vision tower (EfficientNet) does not fit the tiny LLaVA; "
            "set model.vision_init=random, or use dense=clip_tiny"
        )

    # -- persistence ----------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        trained = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items() if not k.startswith("towers.")}
        with atomic_write(directory / WEIGHTS_FILE, "wb") as fh:
            fh.write(save(trained))
        meta = {"embed_dim": self.embed_dim, "towers": self.towers.fingerprint()}
        if self.item_dim is not None:
            meta["item_dim"] = self.item_dim
        with atomic_write(directory / FROZEN_DENSE_FILE, "w") as fh:
            fh.write(json.dumps(meta, indent=2))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> FrozenTowerDualEncoder:
        directory = Path(directory)
        meta = json.loads((directory / FROZEN_DENSE_FILE).read_text())
        encoder = cls(embed_dim=meta["embed_dim"], item_dim=meta.get("item_dim"))
        if encoder.towers.fingerprint() != meta["towers"]:
            raise ArtifactError(
                f"{directory} was trained on other pretrained towers (package versions changed); "
                "delete it to retrain the projections"
            )
        encoder.load_state_dict(load_file(directory / WEIGHTS_FILE), strict=False)
        return encoder
