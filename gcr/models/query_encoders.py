"""Frozen query encoders of the ``compact`` backbone, and the in-memory cache of their outputs.

An encoder turns a text, an image file or a stored feature vector into a small matrix ``(T, sum of widths)``:
``T`` memory tokens, each the concatenation of ``L`` per-layer vectors whose widths are ``widths[modality]``
(a modality with one width is read by every layer). The encoder never trains, so every content is encoded
once and kept in :data:`ENCODINGS`, keyed by the encoder's fingerprint and the content (for files also their
size and mtime, so a rewritten file is encoded again). Training an epoch then only runs the decoder.

* :class:`AlignedEncoder` (``model.encoder=aligned``): the dense baseline's own towers (text tower for
  captions, image tower for images, item projection for stored vectors). Every modality lands in one
  L2-normalised embedding space, so what the decoder learns from targets transfers to queries; one token, one
  layer, read through one projection shared by all modalities.
* :class:`LayerwiseEncoder` (``pretrained``): CART's memory. MiniLM's token states of all 7 hidden states;
  EfficientNet-Lite0's last 7 stage outputs pooled to ``grid x grid`` cells + one global token; stored
  vectors as one token read by every layer.
* :class:`PooledEncoder` (``features``): one pooled vector per content from the frozen pretrained feature
  encoder (MiniLM sentence embedding, EfficientNet-Lite0 pooled map, stored vectors).
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.nn import functional as F

from gcr.data.corpus import Content
from gcr.errors import ConfigError

ENCODERS = ("aligned", "pretrained", "features")


class EncodingCache:
    """``(encoder fingerprint, content, file identity) -> (T, W)`` tensor, shared by every backbone of a process.

    ``computed`` counts the contents actually sent through an encoder (what tests count).
    """

    def __init__(self):
        self._rows: dict[tuple, torch.Tensor] = {}
        self.computed = 0

    def __len__(self) -> int:
        return len(self._rows)

    def clear(self) -> None:
        self._rows.clear()

    def items(self) -> Iterator[tuple[Content, torch.Tensor]]:
        """Every cached ``(content, encoding)``, in the order they were encoded (what a run encoded)."""
        return ((key[1], row) for key, row in self._rows.items())

    @staticmethod
    def _key(encoder: QueryEncoder, content: Content) -> tuple:
        if content.modality == "text":
            return encoder.fingerprint, content
        path = content.value.split("#", 1)[0] if content.modality == "feature" else content.value
        try:
            st = os.stat(path)
            identity = (st.st_size, st.st_mtime_ns)
        except OSError:
            identity = None  # the encoder reports the missing file
        return encoder.fingerprint, content, identity

    def get(self, encoder: QueryEncoder, contents: Sequence[Content], batch_size: int = 256) -> list[torch.Tensor]:
        """One ``(T, W)`` tensor per content; contents not seen yet are encoded (per modality, in chunks)."""
        keys = [self._key(encoder, c) for c in contents]
        missing: dict[tuple, Content] = {k: c for k, c in zip(keys, contents) if k not in self._rows}
        by_modality: dict[str, list[tuple[tuple, Content]]] = {}
        for key, content in missing.items():
            by_modality.setdefault(content.modality, []).append((key, content))
        for modality, entries in by_modality.items():
            step = encoder.chunk_size(modality, batch_size)
            for start in range(0, len(entries), step):
                chunk = entries[start : start + step]
                rows = encoder.encode(modality, [c.value for _, c in chunk])
                for (key, _), row in zip(chunk, rows):
                    self._rows[key] = row.detach().to("cpu", encoder.cache_dtype).clone()
                self.computed += len(chunk)
        return [self._rows[k] for k in keys]


#: The process-wide cache (directions, schemes and seeds of one process share encodings).
ENCODINGS = EncodingCache()


class QueryEncoder:
    """What the compact backbone needs from a frozen encoder (see the module docstring)."""

    name = ""
    layers = 1
    #: True: all modalities share one embedding space, so the backbone reads them through one projection.
    aligned = False
    #: memory tokens per content that need learned positions (image cells), by modality
    positions: dict[str, int] = {}
    cache_dtype = torch.float32
    fingerprint = ""

    def widths(self, modality: str) -> list[int]:
        raise NotImplementedError

    def encode(self, modality: str, values: Sequence[str]) -> list[torch.Tensor]:
        raise NotImplementedError

    def chunk_size(self, modality: str, batch_size: int) -> int:
        return batch_size

    def _unknown(self, modality: str) -> ConfigError:
        return ConfigError(f"model.encoder={self.name} cannot read {modality!r} contents")


def _module_fingerprint(module: Any) -> str:
    return module.fingerprint() if hasattr(module, "fingerprint") else type(module).__name__


class AlignedEncoder(QueryEncoder):
    """The dense baseline's towers (``DualEncoder`` or ``FrozenTowerDualEncoder``): one aligned vector each."""

    name = "aligned"
    aligned = True

    def __init__(self, dense: Any):
        if dense is None:
            raise ConfigError(
                "model.encoder=aligned reads queries with the dense baseline's towers, but none was given; "
                "run it through the pipeline (it trains the dense baseline), or use model.encoder=pretrained"
            )
        self.dense = dense.eval()
        for p in getattr(dense, "parameters", lambda: [])():
            p.requires_grad_(False)
        self.dim = int(getattr(dense, "embed_dim", None) or dense.options["embed_dim"])
        self.fingerprint = f"aligned:{type(dense).__name__}:{_module_fingerprint(dense)}"

    def widths(self, modality: str) -> list[int]:
        return [self.dim]

    @torch.no_grad()
    def encode(self, modality: str, values: Sequence[str]) -> list[torch.Tensor]:
        if modality == "text":
            out = self.dense.encode_text(values)
        elif modality == "image":
            out = self.dense.encode_images(values)
        elif modality == "feature" and hasattr(self.dense, "encode_features"):
            out = self.dense.encode_features(values)
        elif modality == "feature":
            raise ConfigError(
                f"model.encoder=aligned: the dense baseline {type(self.dense).__name__} cannot read stored feature "
                "items; fix: dense=pretrained (its item projection reads them), or model.encoder=pretrained"
            )
        else:
            raise self._unknown(modality)
        return list(out.float().cpu()[:, None, :])


@functools.lru_cache(maxsize=2)
def _towers(image_size: int):
    """MiniLM (HF model + tokenizer) and EfficientNet-Lite0, loaded once per process (they never train)."""
    from gcr.models.cart import load_image_tower, load_text_tower

    (text, tokenizer), vision = load_text_tower(), load_image_tower(image_size)
    text.eval().requires_grad_(False)
    vision.eval().requires_grad_(False)
    return text, tokenizer, vision


class LayerwiseEncoder(QueryEncoder):
    """CART's per-layer memory of the frozen MiniLM and EfficientNet-Lite0 (float16 in the cache)."""

    name = "pretrained"
    cache_dtype = torch.float16

    def __init__(self, *, image_size: int = 224, image_grid: int = 4, max_text_tokens: int = 48,
                 feature_dim: int = 0):
        from gcr.models.cart import efficientnet_stages

        self.text, self.tokenizer, self.vision = _towers(int(image_size))
        self.layers = int(self.text.config.num_hidden_layers) + 1
        with torch.no_grad():
            probe = efficientnet_stages(self.vision.net, torch.zeros(1, 3, 64, 64, device=self.vision.device))
        if len(probe) < self.layers:
            raise ConfigError(f"the image tower has {len(probe)} stages, fewer than the text tower's {self.layers}")
        self.image_widths = [int(x.shape[1]) for x in probe[-self.layers :]]
        self.grid, self.max_text_tokens, self.feature_dim = int(image_grid), int(max_text_tokens), int(feature_dim)
        self.positions = {"image": self.grid**2 + 1}
        self.fingerprint = f"pretrained:{image_size}:{self.grid}:{self.max_text_tokens}"

    def widths(self, modality: str) -> list[int]:
        if modality == "text":
            return [int(self.text.config.hidden_size)] * self.layers
        if modality == "image":
            return self.image_widths
        if modality == "feature":
            if not self.feature_dim:
                raise ConfigError("model.feature_dim is unknown: build the backbone with create(corpus) of feature items")
            return [self.feature_dim]
        raise self._unknown(modality)

    def chunk_size(self, modality: str, batch_size: int) -> int:
        return min(batch_size, 32 if modality == "image" else 128)

    @torch.no_grad()
    def encode(self, modality: str, values: Sequence[str]) -> list[torch.Tensor]:
        if modality == "text":
            enc = self.tokenizer(list(values), padding=True, truncation=True, max_length=self.max_text_tokens + 2,
                                 return_tensors="pt")
            hidden = self.text(**enc, output_hidden_states=True).hidden_states
            rows = torch.cat(list(hidden), dim=-1)  # (N, T, L * 384)
            return [row[: int(n)] for row, n in zip(rows, enc["attention_mask"].sum(1))]
        if modality == "image":
            from gcr.data.karpathy import load_image
            from gcr.models.cart import efficientnet_stages

            pixels = self.vision.preprocess([load_image(p) for p in values]).to(self.vision.device)
            stages = efficientnet_stages(self.vision.net, pixels.contiguous(memory_format=torch.channels_last))
            tokens = []
            for x in stages[-self.layers :]:
                x = x.float()
                cells = F.adaptive_avg_pool2d(x, self.grid).flatten(2)
                tokens.append(torch.cat([cells, x.mean(dim=(2, 3))[..., None]], dim=2).transpose(1, 2))
            return list(torch.cat(tokens, dim=2).cpu())
        if modality == "feature":
            from gcr.features import read_precomputed

            return list(read_precomputed(values, normalize=True)[:, None, :])
        raise self._unknown(modality)


class PooledEncoder(QueryEncoder):
    """One pooled vector per content from :class:`~gcr.encoders.pretrained.PretrainedFeatureEncoder`."""

    name = "features"

    def __init__(self, *, image_size: int = 224, feature_dim: int = 0):
        from gcr.encoders import EfficientNetImageEncoder, MiniLMTextEncoder
        from gcr.encoders.pretrained import PretrainedFeatureEncoder

        self.towers = PretrainedFeatureEncoder(
            text=MiniLMTextEncoder(), image=EfficientNetImageEncoder(image_size=int(image_size)),
            feature_dim=int(feature_dim) or None,
        ).eval()
        self.feature_dim = int(feature_dim)
        self.fingerprint = "features:" + hashlib.sha256(
            f"{self.towers.fingerprint()}:{image_size}".encode()
        ).hexdigest()[:16]

    def widths(self, modality: str) -> list[int]:
        if modality == "feature":
            if not self.feature_dim:
                raise ConfigError("model.feature_dim is unknown: build the backbone with create(corpus) of feature items")
            return [self.feature_dim]
        if modality in ("text", "image"):
            return [int(self.towers.dims[modality])]
        raise self._unknown(modality)

    @torch.no_grad()
    def encode(self, modality: str, values: Sequence[str]) -> list[torch.Tensor]:
        tower = {"text": self.towers.encode_text, "image": self.towers.encode_images,
                 "feature": self.towers.encode_features}.get(modality)
        if tower is None:
            raise self._unknown(modality)
        return list(tower(list(values)).float().cpu()[:, None, :])


def build_query_encoder(name: str, *, dense: Any = None, image_size: int = 224, image_grid: int = 4,
                        max_text_tokens: int = 48, feature_dim: int = 0) -> QueryEncoder:
    """The frozen encoder ``model.encoder`` names."""
    if name == "aligned":
        return AlignedEncoder(dense)
    if name == "pretrained":
        return LayerwiseEncoder(image_size=image_size, image_grid=image_grid, max_text_tokens=max_text_tokens,
                                feature_dim=feature_dim)
    if name == "features":
        return PooledEncoder(image_size=image_size, feature_dim=feature_dim)
    raise ConfigError(f"unknown model.encoder {name!r}; choose one of {', '.join(ENCODERS)}")
