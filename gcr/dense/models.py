"""The dense baseline: a CLIP-style dual encoder (HF ``CLIPModel`` from a tiny config).

Trained contrastively on the train split, it is the non-generative reference in
every results table, and its towers give the target features that feature-based
schemes (``hkmeans``) cluster. Its vision tower has the same config as the tiny
LLaVA's, so the generative backbone can start from it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, PreTrainedTokenizerFast

from gcr.models.images import ImageTransform
from gcr.models.tiny import tiny_vision_config

DENSE_FILE = "dense.json"


class DualEncoder(nn.Module):
    """CLIP-style dual encoder: text tower + vision tower, symmetric InfoNCE loss."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerFast,
        *,
        image_size: int = 64,
        patch_size: int = 8,
        vision_hidden_size: int = 64,
        vision_layers: int = 2,
        text_hidden_size: int = 64,
        text_layers: int = 2,
        embed_dim: int = 64,
        max_text_tokens: int = 48,
    ):
        super().__init__()
        self.tokenizer = tokenizer
        self.max_text_tokens = max_text_tokens
        self.options = {
            "image_size": image_size,
            "patch_size": patch_size,
            "vision_hidden_size": vision_hidden_size,
            "vision_layers": vision_layers,
            "text_hidden_size": text_hidden_size,
            "text_layers": text_layers,
            "embed_dim": embed_dim,
            "max_text_tokens": max_text_tokens,
        }
        text = CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=text_hidden_size,
            intermediate_size=text_hidden_size * 2,
            num_hidden_layers=text_layers,
            num_attention_heads=max(1, text_hidden_size // 32),
            max_position_embeddings=max_text_tokens + 2,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            projection_dim=embed_dim,
        )
        vision = tiny_vision_config(image_size, patch_size, vision_hidden_size, vision_layers)
        config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=embed_dim)
        self.clip = CLIPModel(config)
        self.image_transform = ImageTransform(image_size)

    def text_inputs(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Right-padded ``<s> text </s>``: CLIP pools the hidden state at the first EOS."""
        tok = self.tokenizer
        encoded = tok(list(texts), add_special_tokens=False)["input_ids"]
        rows = [[tok.bos_token_id, *ids[: self.max_text_tokens], tok.eos_token_id] for ids in encoded]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings (B, D)."""
        inputs = {k: v.to(self._device()) for k, v in self.text_inputs(texts).items()}
        return nn.functional.normalize(self.clip.get_text_features(**inputs).pooler_output, dim=-1)

    def encode_images(self, paths: Sequence[str]) -> torch.Tensor:
        """L2-normalised image embeddings (B, D)."""
        pixels = self.image_transform(paths).to(self._device())
        return nn.functional.normalize(self.clip.get_image_features(pixel_values=pixels).pooler_output, dim=-1)

    def forward(self, texts: Sequence[str], paths: Sequence[str]) -> torch.Tensor:
        """Symmetric contrastive loss of matching (text, image) pairs."""
        inputs = {k: v.to(self._device()) for k, v in self.text_inputs(texts).items()}
        pixels = self.image_transform(paths).to(self._device())
        return self.clip(**inputs, pixel_values=pixels, return_loss=True).loss

    def vision_state(self) -> dict[str, torch.Tensor]:
        """Weights of the vision tower, loadable into the tiny LLaVA's vision tower."""
        return self.clip.vision_model.state_dict()

    def fingerprint(self) -> str:
        """Hash of options and weights: keys the feature cache."""
        h = hashlib.sha256(json.dumps(self.options, sort_keys=True).encode())
        for name, tensor in sorted(self.clip.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().float().numpy().tobytes())
        return h.hexdigest()[:16]

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        self.clip.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        (directory / DENSE_FILE).write_text(json.dumps(self.options, indent=2))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> DualEncoder:
        directory = Path(directory)
        options: dict[str, Any] = json.loads((directory / DENSE_FILE).read_text())
        encoder = cls(PreTrainedTokenizerFast.from_pretrained(directory), **options)
        encoder.clip = CLIPModel.from_pretrained(directory)
        return encoder
