"""Describe every image without test-query leakage: captioners and a resumable caption cache.

Schemes that build identifiers from a *description* of each image target (SemCORE) must not read a test
image's ground-truth captions: those are its test queries. The descriptions come from a captioner instead:

* :class:`BackboneCaptioner` -- a gcr backbone (e.g. ``tiny``) trained to write captions after the image
  prompt, on the **train split only** (:func:`train_backbone_captioner`, :func:`train_caption_pairs`);
* :class:`HFZeroShotCaptioner` -- a pretrained HF image-text-to-text checkpoint used zero-shot with an
  instruction ("Describe the image in one sentence.").

Both decode with :meth:`~gcr.models.base.GenerativeBackbone.generate_text` (unconstrained beam search).
:func:`cached_captions` keeps the captions in ``<cache_dir>/captions-<corpus fingerprint>-<key>.json``,
written atomically after every chunk, so an interrupted run resumes where it stopped.

Lightning is imported only inside :meth:`BackboneCaptioner.fit`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from gcr.artifacts import check_header, read_json, write_json
from gcr.data.corpus import Content, Corpus
from gcr.errors import ArtifactError, DataError

CAPTIONS_KIND = "gcr-captions"
FORMAT_VERSION = 1
DEFAULT_INSTRUCTION = "Describe the image in one sentence."

CaptionFn = Callable[[Sequence[Content]], Sequence[str]]


def _progress_disabled() -> bool | None:
    """tqdm's ``disable``: off under CI, and (``None``) when stderr is not a terminal."""
    return True if os.environ.get("CI") else None


def _check_images(contents: Sequence[Content], what: str) -> None:
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
        _check_images(images, type(self).__name__)
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
    """A gcr backbone trained to write an image's caption (then EOS) after the image prompt."""

    empty_hint = "train the captioner for more epochs (max_epochs) or with a higher learning rate"

    def __init__(self, backbone: Any, *, max_caption_tokens: int = 32, num_beams: int = 3):
        self.backbone = backbone
        self.max_caption_tokens = int(max_caption_tokens)
        self.num_beams = int(num_beams)
        self.max_new_tokens = self.max_caption_tokens + 1  # the caption and its EOS
        self.history: list[float] = []
        #: image paths of the last :meth:`fit` (what the captioner has seen; see the leakage rule)
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

    def fit(
        self,
        pairs: Sequence[tuple[Content, str]],
        *,
        max_epochs: int = 10,
        batch_size: int = 32,
        lr: float = 3e-3,
        seed: int = 0,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.05,
        accelerator: str = "auto",
    ) -> list[float]:
        """Train on ``(image, caption)`` pairs with Lightning; returns the mean loss of every epoch.

        The pairs must come from training images only (see :func:`train_caption_pairs`).
        """
        import lightning as L

        from gcr.train.module import GenerativeRetrievalModule

        pairs = list(pairs)
        if not pairs:
            raise DataError("the captioner needs at least one (image, caption) training pair")
        _check_images([c for c, _ in pairs], "BackboneCaptioner.fit")
        targets = self.targets([text for _, text in pairs])  # fail on an empty caption before training
        examples = list(zip([c for c, _ in pairs], targets))
        backbone = self.backbone

        def collate(items: list[tuple[Content, list[int]]]) -> dict[str, torch.Tensor]:
            return backbone.batch([c for c, _ in items], [t for _, t in items])

        class EpochLoss(L.Callback):
            def __init__(self) -> None:
                self.losses: list[float] = []
                self.history: list[float] = []

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
                loss = outputs["loss"] if isinstance(outputs, dict) else outputs
                self.losses.append(float(loss.detach()))

            def on_train_epoch_end(self, trainer, pl_module) -> None:
                if self.losses:
                    self.history.append(sum(self.losses) / len(self.losses))
                self.losses = []

        L.seed_everything(seed, workers=True, verbose=False)
        loader = torch.utils.data.DataLoader(
            examples, batch_size=batch_size, shuffle=True, collate_fn=collate,
            generator=torch.Generator().manual_seed(seed),
        )  # fmt: skip
        module = GenerativeRetrievalModule(
            backbone, lr=lr, weight_decay=weight_decay, warmup_ratio=warmup_ratio
        )
        from gcr.train.progress_bar import StageProgress

        losses = EpochLoss()
        trainer = L.Trainer(
            accelerator=accelerator, devices=1, max_epochs=int(max_epochs), logger=False,
            callbacks=[losses, StageProgress("the description captioner")],
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=1,
        )  # fmt: skip
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
            warnings.filterwarnings(
                "ignore", message=r"You defined a `validation_step` but have no `val_dataloader`.*"
            )
            warnings.filterwarnings("ignore", message=r"You have overridden `transfer_batch_to_device`.*")
            trainer.fit(module, loader)
        backbone.eval()
        self.history = list(losses.history)
        self.trained_images = frozenset(c.value for c, _ in pairs)
        return self.history


def train_caption_pairs(corpus: Corpus) -> list[tuple[Content, str]]:
    """Every (train image, one of its captions). Never val/test captions: those are evaluation queries."""
    return [(Content.image(im.path), c.text) for im in corpus.split("train") for c in im.captions]


def train_backbone_captioner(
    corpus: Corpus,
    backbone_factory: Callable[[Corpus], Any],
    *,
    max_epochs: int = 10,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
    max_caption_tokens: int = 32,
    num_beams: int = 3,
) -> BackboneCaptioner:
    """Build a backbone with ``backbone_factory(corpus)`` and train it as a captioner on the train split only."""
    torch.manual_seed(seed)  # the factory's random init
    captioner = BackboneCaptioner(
        backbone_factory(corpus), max_caption_tokens=max_caption_tokens, num_beams=num_beams
    )
    captioner.fit(train_caption_pairs(corpus), max_epochs=max_epochs, batch_size=batch_size, lr=lr, seed=seed)
    return captioner


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


# -- the cache --------------------------------------------------------------------------------------
def captions_cache_path(cache_dir: str | Path, corpus_fingerprint: str, captioner_key: str) -> Path:
    """``<cache_dir>/captions-<corpus fingerprint>-<key>.json``; an unsafe key is cleaned and hashed."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", captioner_key).strip("._") or "captioner"
    if safe != captioner_key:
        safe += "-" + hashlib.sha256(captioner_key.encode()).hexdigest()[:8]
    return Path(cache_dir) / f"captions-{corpus_fingerprint}-{safe}.json"


def _load_cache(path: Path, captioner_key: str, corpus_fingerprint: str) -> dict[str, str]:
    """The cached captions, or ``{}`` (with a warning) when the file is corrupt, stale or foreign."""
    if not path.exists():
        return {}
    try:
        meta = read_json(path, what="caption cache")
        if not isinstance(meta, dict):
            raise ArtifactError(f"{path} does not hold a JSON object")
        check_header(
            meta, kind=CAPTIONS_KIND, version=FORMAT_VERSION, path=path,
            corpus_fingerprint=corpus_fingerprint, captioner=captioner_key,
        )  # fmt: skip
        captions = meta.get("captions")
        if not isinstance(captions, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v.strip() for k, v in captions.items()
        ):
            raise ArtifactError(f"{path} has a malformed 'captions' table")
    except ArtifactError as exc:
        warnings.warn(f"ignoring the caption cache and recomputing it: {exc}", stacklevel=3)
        return {}
    return dict(captions)


def _write_cache(path: Path, captioner_key: str, corpus_fingerprint: str, captions: dict[str, str]) -> None:
    write_json(
        path,
        {
            "kind": CAPTIONS_KIND,
            "format_version": FORMAT_VERSION,
            "corpus_fingerprint": corpus_fingerprint,
            "captioner": captioner_key,
            "captions": captions,
        },
    )


def cached_captions(
    captioner_key: str,
    image_ids: Sequence[str],
    images: Sequence[Content],
    caption_fn: CaptionFn,
    *,
    cache_dir: str | Path,
    corpus_fingerprint: str,
    chunk_size: int = 256,
) -> dict[str, str]:
    """Captions of ``images`` by id, read from the cache where present, else ``caption_fn(images)``.

    Only ids missing from the cache are captioned, ``chunk_size`` images per ``caption_fn`` call; the file is
    rewritten atomically after every chunk, so an interrupted run keeps the chunks it finished. A cache
    file for another corpus fingerprint or captioner key, another format, or a corrupt one, is ignored with
    a warning and rebuilt. ``captioner_key`` must change whenever the captioner does.
    """
    ids, images = list(image_ids), list(images)
    if len(ids) != len(images):
        raise ValueError(f"{len(ids)} image ids but {len(images)} images")
    if len(set(ids)) != len(ids):
        raise DataError("duplicate image ids passed to cached_captions; each image must appear once")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    path = captions_cache_path(cache_dir, corpus_fingerprint, captioner_key)
    captions = _load_cache(path, captioner_key, corpus_fingerprint)
    missing = [i for i, image_id in enumerate(ids) if image_id not in captions]
    for start in range(0, len(missing), chunk_size):
        chunk = missing[start : start + chunk_size]
        texts = list(caption_fn([images[i] for i in chunk]))
        if len(texts) != len(chunk):
            raise ValueError(f"caption_fn returned {len(texts)} captions for {len(chunk)} images")
        for i, text in zip(chunk, texts):
            if not isinstance(text, str) or not text.strip():
                raise DataError(
                    f"caption_fn gave an empty or non-text caption ({text!r}) for image {ids[i]!r}"
                )
            captions[ids[i]] = text
        _write_cache(path, captioner_key, corpus_fingerprint, captions)
    return {image_id: captions[image_id] for image_id in ids}
