"""Captioners that describe image targets without test-query leakage.

Schemes that build identifiers from a *description* of each image target (SemCORE, SSI) must not read a
test image's ground-truth captions: those are its test queries. The descriptions come from a captioner:

* :class:`BackboneCaptioner` -- a gcr backbone (e.g. ``tiny``) that writes a caption after the image
  prompt, once trained on the **train split only** (pairs from :func:`train_caption_pairs`; the training
  itself is :func:`gcr.train.captioner.fit_captioner`, in the training layer);
* :class:`HFZeroShotCaptioner` -- a pretrained HF image-text-to-text checkpoint used zero-shot with an
  instruction ("Describe the image in one sentence.").

Both decode with :meth:`~gcr.models.base.GenerativeBackbone.generate_text` (unconstrained beam search).
:func:`gcr.descriptions.cache.cached_captions` keeps their captions on disk. This module imports no
Lightning.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

import torch

from gcr.data.corpus import Content, Corpus
from gcr.errors import DataError

DEFAULT_INSTRUCTION = "Describe the image in one sentence."


def _progress_disabled() -> bool | None:
    """tqdm's ``disable``: off under CI, and (``None``) when stderr is not a terminal."""
    return True if os.environ.get("CI") else None


def require_images(contents: Sequence[Content], what: str) -> None:
    """Refuse anything but images (a :class:`DataError` naming ``what`` and the first offender)."""
    bad = [c for c in contents if c.modality != "image"]
    if bad:
        raise DataError(
            f"{what} reads images only, got {len(bad)} {bad[0].modality!r} content(s) (e.g. {bad[0].value!r})"
        )


class _Captioner:
    """Shared caption loop: a backbone, beam settings, and the check that no caption comes back empty."""

    backbone: Any
    num_beams: int
    max_new_tokens: int
    empty_hint = ""

    def caption(self, images: Sequence[Content], *, batch_size: int = 64, rank: int = 0) -> list[str]:
        """One caption per image (beam search; the best beam, or the ``rank``-th best), in order, with a progress bar.

        Raises :class:`DataError` when any caption comes out empty (a description without words cannot
        build an identifier), naming how many.
        """
        from tqdm.auto import tqdm

        images = list(images)
        require_images(images, type(self).__name__)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if rank < 0:
            raise ValueError(f"rank must be >= 0, got {rank}")
        backbone = self.backbone
        backbone.eval()
        device = next(backbone.parameters()).device
        out: list[str] = []
        with tqdm(total=len(images), desc="captioning", unit="img", disable=_progress_disabled()) as bar:
            for start in range(0, len(images), batch_size):
                chunk = images[start : start + batch_size]
                batch = {k: v.to(device) for k, v in backbone.batch(chunk).items()}
                self._before_generate()
                beams = backbone.generate_text(
                    batch, num_beams=self.num_beams, max_new_tokens=self.max_new_tokens,
                    num_return_sequences=rank + 1,
                )
                out.extend(beams[rank :: rank + 1])
                bar.update(len(chunk))
        empty = [i for i, text in enumerate(out) if not text]
        if empty:
            raise DataError(
                f"{len(empty)} of {len(images)} images got an empty caption (e.g. {images[empty[0]].value}); "
                f"{self.empty_hint}"
            )
        return out

    def _before_generate(self) -> None:
        """Hook run before every ``generate_text`` call."""


# -- a gcr backbone trained on the train captions ---------------------------------------------------
class BackboneCaptioner(_Captioner):
    """A gcr backbone trained to write an image's caption (then EOS) after the image prompt.

    :func:`gcr.train.captioner.fit_captioner` trains it and fills :attr:`history` and :attr:`trained_images`.
    """

    empty_hint = "train the captioner for more epochs (max_epochs) or with a higher learning rate"

    def __init__(self, backbone: Any, *, max_caption_tokens: int = 32, num_beams: int = 3):
        self.backbone = backbone
        self.max_caption_tokens = int(max_caption_tokens)
        self.num_beams = int(num_beams)
        self.max_new_tokens = self.max_caption_tokens + 1  # the caption and its EOS
        #: the mean training loss of every epoch of the last training
        self.history: list[float] = []
        #: image paths of the last training (what the captioner has seen; see the leakage rule)
        self.trained_images: frozenset[str] = frozenset()

    def targets(self, captions: Sequence[str]) -> list[list[int]]:
        """Caption token ids (cut to ``max_caption_tokens``) followed by EOS."""
        tok = self.backbone.tokenizer
        out = []
        for text in captions:
            if not text.strip():
                raise DataError("empty caption in the captioner's training pairs; fix or drop it")
            ids = tok(text, add_special_tokens=False).input_ids[: self.max_caption_tokens]
            out.append([*ids, tok.eos_token_id])
        return out


def train_caption_pairs(corpus: Corpus) -> list[tuple[Content, str]]:
    """Every (train image, one of its captions). Never val/test captions: those are evaluation queries."""
    return [(Content.image(im.path), c.text) for im in corpus.split("train") for c in im.captions]


# -- a pretrained checkpoint, zero-shot -------------------------------------------------------------
class HFZeroShotCaptioner(_Captioner):
    """A pretrained HF image-text-to-text checkpoint prompted with the image and an instruction, untrained.

    ``prompt`` is the instruction placed after the image; a prompt that contains ``{query}`` is used as the
    :class:`~gcr.models.hf.HFBackbone` template verbatim (``{query}`` is where the image goes).
    """

    empty_hint = "try another prompt, a larger max_new_tokens or another checkpoint"

    def __init__(
        self,
        path: str,
        *,
        prompt: str = DEFAULT_INSTRUCTION,
        dtype: str = "auto",
        image_size: int | None = None,
        trust_remote_code: bool = False,
        num_beams: int = 3,
        max_new_tokens: int = 32,
        device: str | torch.device | None = None,
    ):
        from gcr.models.hf import HFBackbone

        template = prompt if "{query}" in prompt else "{query}\n" + prompt
        self.backbone = HFBackbone.create(
            None, path=path, prompt=template, lora={"enabled": False}, dtype=dtype, image_size=image_size,
            trust_remote_code=trust_remote_code,
        )  # fmt: skip
        if device is not None:
            self.backbone.to(device)
        self.backbone.eval()
        self.prompt = template
        self.num_beams = int(num_beams)
        self.max_new_tokens = int(max_new_tokens)

    @property
    def key(self) -> str:
        """A cache key for :func:`cached_captions`: checkpoint, prompt and decoding settings.

        The checkpoint enters by its path (hub name or folder), not its weights: replacing the weights in a
        folder needs a new key.
        """
        spec = [self.backbone.path, self.prompt, self.backbone.dtype, self.backbone.image_size,
                self.num_beams, self.max_new_tokens]  # fmt: skip
        return "hf-" + hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:12]
