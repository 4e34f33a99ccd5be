"""Backbone ``tiny``: a LLaVA-style HF model built from config classes, random init.

A small CLIP vision tower, a projector and a small Llama decoder
(``LlavaForConditionalGeneration``), with a tokenizer trained on the corpus. It
runs the exact training and ``generate()`` path a pretrained HF checkpoint uses,
fast enough to train on two CPU cores.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
)

from gcr.data.corpus import Corpus
from gcr.models.base import BACKBONE_FILE, GenerativeBackbone
from gcr.models.images import ImageTransform
from gcr.models.tokenizer import train_corpus_tokenizer


def tiny_vision_config(image_size: int, patch_size: int, hidden_size: int, layers: int) -> CLIPVisionConfig:
    """The CLIP vision tower shared by the tiny LLaVA and the dense baseline."""
    return CLIPVisionConfig(
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden_size // 32),
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=hidden_size,
    )


class TinyBackbone(GenerativeBackbone):
    """LLaVA-style model from HF configs (CLIP vision + Llama), random init, corpus tokenizer."""

    name = "tiny"
    starts_vision_from_dense = True
    #: Its tokenizer is built from the train captions: ``create(corpus, reserved_words=...)`` adds the words
    #: an identifier scheme needs (field names, cluster words) that the captions may lack.
    builds_vocabulary = True

    def __init__(self, model: LlavaForConditionalGeneration, tokenizer: PreTrainedTokenizerFast, **options: Any):
        image_size = model.config.vision_config.image_size
        patch = model.config.vision_config.patch_size
        super().__init__(
            model,
            tokenizer,
            image_transform=ImageTransform(image_size),
            num_image_tokens=(image_size // patch) ** 2,
            max_text_tokens=options.get("max_text_tokens", 48),
        )

    @classmethod
    def create(
        cls,
        corpus: Corpus,
        *,
        tokenizer: PreTrainedTokenizerFast | None = None,
        reserved_words: Sequence[str] = (),
        vocab_size: int = 1000,
        hidden_size: int = 128,
        num_layers: int = 2,
        num_heads: int = 4,
        vision_hidden_size: int = 64,
        vision_layers: int = 2,
        image_size: int = 64,
        patch_size: int = 8,
        max_text_tokens: int = 48,
        **unknown: Any,
    ) -> TinyBackbone:
        """A fresh random model; the tokenizer is trained on the train captions unless given."""
        if unknown:
            from gcr.errors import ConfigError

            raise ConfigError(f"unknown option(s) {sorted(unknown)} for model 'tiny'")
        if tokenizer is None:
            tokenizer = train_corpus_tokenizer((c.text for c in corpus.captions("train")), vocab_size,
                                               reserved_words=reserved_words)
        text = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 2,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_heads,
            max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=False,
        )
        vision = tiny_vision_config(image_size, patch_size, vision_hidden_size, vision_layers)
        config = LlavaConfig(
            vision_config=vision,
            text_config=text,
            image_token_index=tokenizer.convert_tokens_to_ids(tokenizer.image_token),
            image_seq_length=(image_size // patch_size) ** 2,
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
        )
        model = LlavaForConditionalGeneration(config)
        return cls(model, tokenizer, max_text_tokens=max_text_tokens)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> TinyBackbone:
        """Reload what :meth:`save` wrote (an ordinary HF checkpoint folder)."""
        directory = Path(directory)
        options = json.loads((directory / BACKBONE_FILE).read_text())
        options.pop("name", None)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(directory)
        model = LlavaForConditionalGeneration.from_pretrained(directory)
        return cls(model, tokenizer, **options)

    def load_vision_tower(self, vision_state: dict) -> None:
        """Start the vision tower from trained CLIP vision weights (e.g. the dense baseline's)."""
        try:
            self.model.model.vision_tower.load_state_dict(vision_state)
        except RuntimeError as exc:
            from gcr.errors import ConfigError

            raise ConfigError(
                "model.vision_init=dense needs the dense baseline's vision tower to have the tiny model's shape "
                "(image_size, patch_size, vision_hidden_size, vision_layers in both model and dense configs); "
                f"align them or set model.vision_init=random ({str(exc).splitlines()[0]})"
            ) from exc

    def options(self) -> dict[str, Any]:
        return {"max_text_tokens": self.max_text_tokens}
