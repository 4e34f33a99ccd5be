"""The captioner behind ``description=generated``: trained (or loaded) once per config, captions cached.

``description.captioner=backbone`` trains a fresh copy of the run's backbone to caption the *train*
split; ``hf`` uses a pretrained HF checkpoint zero-shot. Captions are cached in ``cache_dir`` keyed by
everything that shapes them, so a sweep or bench over schemes trains the captioner once.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable

from omegaconf import DictConfig, OmegaConf

from gcr.captioning import HFZeroShotCaptioner, cached_captions, train_backbone_captioner
from gcr.data.corpus import Content, Corpus
from gcr.errors import ConfigError

log = logging.getLogger("gcr")


def _writes_text(model_name: str) -> bool:
    from gcr.registry import BACKBONES

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
        spec = {
            # a model that cannot write text (cart) is replaced by a default tiny captioner (pipeline._captioner_factory)
            "model": OmegaConf.to_container(cfg.model, resolve=True) if _writes_text(cfg.model.name) else "tiny-default",
            "description": OmegaConf.to_container(d, resolve=True),
            "dense": OmegaConf.to_container(cfg.dense, resolve=True) if cfg.model.get("vision_init") == "dense" else None,
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
