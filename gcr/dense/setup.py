"""The dense baseline of a run: trained once per (corpus, ``dense`` config, seed) and cached; its rows.

The cache folder is ``<cache_dir>/dense-<corpus fingerprint>-<config hash>``, so a sweep or bench over
schemes shares one baseline, and a changed corpus (files included) or config trains a new one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import lightning as L
from omegaconf import DictConfig, OmegaConf

from gcr.data.corpus import Corpus
from gcr.dense.models import DualEncoder
from gcr.dense.training import DenseModule, pair_loader, score_dense, train_frozen_dense
from gcr.descriptions.sources import scored_task
from gcr.errors import ConfigError
from gcr.models.tokenizer import corpus_tokenizer
from gcr.reporting.results import ResultRow
from gcr.train.trainer import build_trainer

log = logging.getLogger("gcr")
KINDS = ("clip", "pretrained")


def dense_dir(cfg: DictConfig, corpus: Corpus) -> Path:
    """The cache folder of the baseline ``cfg`` describes on ``corpus``."""
    dense_cfg = OmegaConf.to_container(cfg.dense, resolve=True)
    dense_cfg.pop("enabled", None)  # whether the row is shown does not change the model
    dense_cfg["type"] = dense_cfg.pop("name", "clip")  # hashed as before dense.type became dense.name: caches stay valid
    key = hashlib.sha256(json.dumps([dense_cfg, cfg.seed], sort_keys=True).encode())
    return Path(cfg.cache_dir) / f"dense-{corpus.fingerprint()}-{key.hexdigest()[:10]}"


def dense_baseline(cfg: DictConfig, corpus: Corpus, tracked=None):
    """Train (or load from the cache) the dense baseline (``dense.name``); returns it and its train seconds.

    ``tracked``: the dense baseline's :class:`gcr.reporting.tracking.TrackedRun`; its W&B run is started only if it trains.
    """
    directory = dense_dir(cfg, corpus)
    kind = cfg.dense.get("name", "clip")
    if kind not in KINDS:
        raise ConfigError(f"unknown dense.name {kind!r}; choose clip (dense=clip_tiny) or pretrained (dense=pretrained)")
    if (directory / "done.json").exists():
        meta = json.loads((directory / "done.json").read_text())
        loader = DualEncoder if kind == "clip" else _frozen_class()
        return loader.from_pretrained(directory), float(meta["train_seconds"])
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if kind == "pretrained":
        return _train_frozen(cfg, corpus, directory, tracked)
    return _train_clip(cfg, corpus, directory, tracked)


def _train_clip(cfg: DictConfig, corpus: Corpus, directory: Path, tracked=None):
    d = cfg.dense
    encoder = DualEncoder(
        corpus_tokenizer(corpus, d.vocab_size), image_size=d.image_size, patch_size=d.patch_size,
        vision_hidden_size=d.vision_hidden_size, vision_layers=d.vision_layers, text_hidden_size=d.text_hidden_size,
        text_layers=d.text_layers, embed_dim=d.embed_dim, max_text_tokens=d.max_text_tokens,
    )
    log.info("dense baseline: training (%s)", plural(int(d.max_epochs), "epoch"))
    start = time.perf_counter()
    loggers = tracked.lightning_logger() if tracked is not None else False
    trainer = build_trainer(cfg, max_epochs=int(d.max_epochs), run_dir=directory, loggers=loggers,
                            name="the dense baseline")
    trainer.fit(DenseModule(encoder, lr=d.lr, weight_decay=d.weight_decay), pair_loader(corpus, d.batch_size, cfg.seed))
    seconds = time.perf_counter() - start
    if tracked is not None:
        tracked.update_summary({"dense/train_seconds": seconds, "dense/cache": str(directory)})
    if trainer.is_global_zero:  # under DDP every rank holds the same weights; one writes them
        encoder.save(directory)
        (directory / "done.json").write_text(json.dumps({"train_seconds": seconds}))
    return encoder, seconds


def _frozen_class():
    from gcr.dense.frozen import FrozenTowerDualEncoder

    return FrozenTowerDualEncoder


def _train_frozen(cfg: DictConfig, corpus: Corpus, directory: Path, tracked=None):
    """Locked-tower tuning: frozen MiniLM + EfficientNet-Lite0 (or stored item vectors), trained projections."""
    d = cfg.dense
    encoder = _frozen_class()(embed_dim=int(d.embed_dim))
    log.info("dense baseline: training the projections over frozen pretrained towers (%s)",
             plural(int(d.max_epochs), "epoch"))
    start = time.perf_counter()
    history = train_frozen_dense(
        encoder, corpus, cache_dir=cfg.cache_dir, max_epochs=int(d.max_epochs), batch_size=int(d.batch_size),
        lr=float(d.lr), weight_decay=float(d.weight_decay), seed=cfg.seed,
    )
    seconds = time.perf_counter() - start
    log.info("dense projections: loss %.3f -> %.3f", history[0], history[-1])
    if tracked is not None and tracked.start("train") is not None:
        for epoch, loss in enumerate(history):
            tracked.run.log({"dense/epoch_loss": loss, "epoch": epoch})
        tracked.update_summary({"dense/train_seconds": seconds, "dense/cache": str(directory)})
    encoder.save(directory)
    (directory / "done.json").write_text(json.dumps({"train_seconds": seconds, "loss": history}))
    return encoder, seconds


def dense_rows(cfg: DictConfig, corpus: Corpus, dense, train_seconds: float) -> list[ResultRow]:
    """The dense baseline scored on every direction's test split (``dense`` or ``dense-<type>`` rows)."""
    name = "dense" if cfg.dense.get("name", "clip") == "clip" else f"dense-{cfg.dense.name}"
    rows = []
    for direction in cfg.directions:
        metrics, per_query = score_dense(dense, scored_task(cfg, corpus, direction), "test", tuple(cfg.eval.ks))
        rows.append(ResultRow(name, "dense", direction, metrics, train_seconds, seed=int(cfg.seed),
                              per_query=per_query))
    return rows


def plural(n: int, word: str) -> str:
    """``1 epoch``, ``2 epochs``."""
    return f"{n} {word}{'' if n == 1 else 's'}"
