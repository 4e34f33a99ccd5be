"""Train the description captioner, and the captioner behind ``description=generated``.

:func:`fit_captioner` trains a :class:`~gcr.descriptions.captioners.BackboneCaptioner` with Lightning
(this is why it lives in the training layer; the captioners and the caption cache themselves are in
:mod:`gcr.descriptions`, which imports no Lightning). :func:`generated_captions` is what the pipeline
calls: ``description.captioner=backbone`` trains a fresh copy of the run's backbone to caption the *train*
split; ``hf`` uses a pretrained HF checkpoint zero-shot. Captions are cached in ``cache_dir`` keyed by
everything that shapes them, so a sweep or bench over schemes trains the captioner once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from gcr.data.corpus import Content, Corpus
from gcr.descriptions.cache import cached_captions
from gcr.descriptions.captioners import (
    BackboneCaptioner,
    HFZeroShotCaptioner,
    require_images,
    train_caption_pairs,
)
from gcr.errors import ConfigError, DataError
from gcr.registry import BACKBONES
from gcr.train.module import GenerativeRetrievalModule
from gcr.train.progress_bar import StageProgress

log = logging.getLogger("gcr")


class EpochLoss(L.Callback):
    """The mean training loss of every epoch."""

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


def fit_captioner(
    captioner: BackboneCaptioner,
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
    """Train ``captioner`` on ``(image, caption)`` pairs with Lightning; returns the mean loss of every epoch.

    The pairs must come from training images only (see :func:`~gcr.descriptions.captioners.train_caption_pairs`).
    Sets the captioner's ``history`` and ``trained_images``.
    """
    pairs = list(pairs)
    if not pairs:
        raise DataError("the captioner needs at least one (image, caption) training pair")
    require_images([c for c, _ in pairs], "fit_captioner")
    targets = captioner.targets([text for _, text in pairs])  # fail on an empty caption before training
    examples = list(zip([c for c, _ in pairs], targets))
    backbone = captioner.backbone

    def collate(items: list[tuple[Content, list[int]]]) -> dict[str, torch.Tensor]:
        return backbone.batch([c for c, _ in items], [t for _, t in items])

    L.seed_everything(seed, workers=True, verbose=False)
    loader = torch.utils.data.DataLoader(
        examples, batch_size=batch_size, shuffle=True, collate_fn=collate,
        generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip
    module = GenerativeRetrievalModule(
        backbone, lr=lr, weight_decay=weight_decay, warmup_ratio=warmup_ratio
    )
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
    captioner.history = list(losses.history)
    captioner.trained_images = frozenset(c.value for c, _ in pairs)
    return captioner.history


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
    fit_captioner(captioner, train_caption_pairs(corpus), max_epochs=max_epochs, batch_size=batch_size, lr=lr, seed=seed)
    return captioner


def _writes_text(model_name: str) -> bool:
    return bool(getattr(BACKBONES.get(model_name), "writes_text", True))


def generated_captions(cfg: DictConfig, corpus: Corpus, backbone_factory: Callable) -> dict[str, str]:
    """One caption per image of ``corpus`` from the configured captioner (cached on disk)."""
    return generated_caption_ranks(cfg, corpus, backbone_factory, count=1)[0]


def generated_caption_ranks(
    cfg: DictConfig, corpus: Corpus, backbone_factory: Callable, *, count: int
) -> list[dict[str, str]]:
    """``count`` captions per image: the best beam, the second best, ... (one ``{image id: caption}`` per rank).

    Each rank is cached on its own (rank 0 is the cache of :func:`generated_captions`), so asking for more
    later reuses what was written; the captioner is trained at most once per call, and only if some rank
    of some image is not cached yet.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    d = cfg.description
    images = [Content.image(im.path) for im in corpus.images]
    ids = [im.image_id for im in corpus.images]
    if d.captioner == "hf":
        if not d.get("path"):
            raise ConfigError("description.captioner=hf needs description.path (an HF image-text-to-text checkpoint)")
        captioner = HFZeroShotCaptioner(str(d.path), prompt=str(d.prompt), num_beams=int(d.num_beams),
                                        max_new_tokens=int(d.max_new_tokens))
        key = captioner.key
        caption_at = captioner.caption
    elif d.captioner == "backbone":
        description = OmegaConf.to_container(d, resolve=True)
        description["source"] = description.pop("name")  # hashed under its pre-rename key: cached captions stay valid
        dense = None
        if cfg.model.get("vision_init") == "dense":
            dense = OmegaConf.to_container(cfg.dense, resolve=True)
            dense["type"] = dense.pop("name")  # likewise (dense.type became dense.name)
        spec = {
            # a model that cannot write text (cart) is replaced by a default tiny captioner (pipeline._captioner_factory)
            "model": OmegaConf.to_container(cfg.model, resolve=True) if _writes_text(cfg.model.name) else "tiny-default",
            "description": description,
            "dense": dense,
            "seed": int(cfg.seed),
        }
        key = "backbone-" + hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
        trained = {}

        def caption_at(batch: list[Content], *, rank: int) -> list[str]:
            if "captioner" not in trained:  # trained only when some image is not cached yet
                log.info("training the captioner (%s, %d epochs) on the train split", cfg.model.name, d.max_epochs)
                trained["captioner"] = train_backbone_captioner(
                    corpus, backbone_factory, max_epochs=int(d.max_epochs), batch_size=int(d.batch_size),
                    lr=float(d.lr), seed=int(cfg.seed), max_caption_tokens=int(d.max_new_tokens),
                    num_beams=int(d.num_beams),
                )
            return trained["captioner"].caption(batch, batch_size=int(cfg.eval.batch_size), rank=rank)
    else:
        raise ConfigError(f"unknown description.captioner {d.captioner!r}; choose backbone or hf")
    return [
        cached_captions(
            key + (f"-rank{rank}" if rank else ""), ids, images,
            lambda batch, rank=rank: caption_at(batch, rank=rank),
            cache_dir=cfg.cache_dir, corpus_fingerprint=corpus.fingerprint(),
        )
        for rank in range(count)
    ]
