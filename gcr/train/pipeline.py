"""``gcr fit`` and ``gcr eval``: the whole job, from a composed config to a results table.

Run folder layout (``<output_dir>/<run_name>/``)::

    config.yaml            the resolved config
    <direction>/index.json the identifier index (t2i, i2t)
    <direction>/backbone/  the trained backbone (HF format: config, weights, tokenizer)
    <direction>/checkpoints/last.ckpt   Lightning checkpoint (resume)
    results.json           versioned results; results.md the table

The dense baseline is trained once per (corpus, dense config) and cached in
``cache_dir``, so a sweep over schemes shares it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf

from gcr.artifacts import find_run_dir, load_tensors, write_json
from gcr.data.corpus import Corpus, retrieval_task
from gcr.data.sources import load_dataset
from gcr.descriptions import check_source, describe_targets, evaluation_task
from gcr.errors import ArtifactError, ConfigError
from gcr.features import cached_target_features
from gcr.index import IdentifierIndex
from gcr.models.dense import DualEncoder
from gcr.models.loading import load_backbone
from gcr.models.tokenizer import train_corpus_tokenizer
from gcr.registry import BACKBONES
from gcr.results import ResultRow, build_results, save_results
from gcr.schemes import build_scheme
from gcr.train.callbacks import ConstrainedDecoding, RetrievalEvaluation
from gcr.train.datamodule import GenerativeDataModule
from gcr.train.dense import DenseModule, evaluate_dense, pair_loader, train_frozen_dense
from gcr.train.module import GenerativeRetrievalModule, check_checkpoint_identity, check_checkpoint_keys
from gcr.train.reproducible import AtomicCheckpointIO, EpochEndCheckpoint, EpochSeed

log = logging.getLogger("gcr")
# Noise that says nothing about a gcr run: a Lightning-internal deprecation, and a note that our
# module's batch transfer (evaluation batches are query lists) is used, which is the intent.
warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
warnings.filterwarnings("ignore", message=r"You have overridden `transfer_batch_to_device`.*")


# -- shared pieces ------------------------------------------------------------------------------
def _trainer(cfg: DictConfig, *, max_epochs: int, run_dir: Path | None, callbacks=(), loggers=False) -> L.Trainer:
    t = cfg.trainer
    every = int(t.check_val_every_n_epoch)
    # A batch of text queries leaves the vision tower unused (and vice versa), which plain DDP rejects.
    strategy = "ddp_find_unused_parameters_true" if t.strategy == "ddp" else t.strategy
    return L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        strategy=strategy,
        precision=t.precision,
        max_epochs=max_epochs,
        callbacks=list(callbacks),
        logger=loggers,
        default_root_dir=str(run_dir) if run_dir else None,
        enable_checkpointing=False,  # gcr's own EpochEndCheckpoint writes last.ckpt (see gcr.train.reproducible)
        check_val_every_n_epoch=every if every > 0 else None,
        limit_train_batches=t.get("limit_train_batches", 1.0),
        limit_val_batches=1.0 if every > 0 else 0,
        num_sanity_val_steps=0,
        log_every_n_steps=int(t.log_every_n_steps),
        deterministic=False,
        enable_model_summary=False,
        plugins=[AtomicCheckpointIO()],
    )


def _dense_dir(cfg: DictConfig, corpus: Corpus) -> Path:
    dense_cfg = OmegaConf.to_container(cfg.dense, resolve=True)
    dense_cfg.pop("enabled", None)  # whether the row is shown does not change the model
    key = hashlib.sha256(json.dumps([dense_cfg, cfg.seed], sort_keys=True).encode())
    return Path(cfg.cache_dir) / f"dense-{corpus.fingerprint()}-{key.hexdigest()[:10]}"


def corpus_tokenizer(corpus: Corpus, vocab_size: int, reserved_words=()):
    """The word-level tokenizer of the train captions (deterministic, so retraining is cheap)."""
    return train_corpus_tokenizer((c.text for c in corpus.captions("train")), vocab_size, reserved_words=reserved_words)


def dense_baseline(cfg: DictConfig, corpus: Corpus):
    """Train (or load from the cache) the dense baseline (``dense.type``); returns it and its train seconds."""
    directory = _dense_dir(cfg, corpus)
    kind = cfg.dense.get("type", "clip")
    if kind not in ("clip", "pretrained"):
        raise ConfigError(f"unknown dense.type {kind!r}; choose clip (dense=clip_tiny) or pretrained (dense=pretrained)")
    if (directory / "done.json").exists():
        meta = json.loads((directory / "done.json").read_text())
        loader = DualEncoder if kind == "clip" else _frozen_dense_class()
        return loader.from_pretrained(directory), float(meta["train_seconds"])
    d = cfg.dense
    L.seed_everything(cfg.seed, workers=True)
    if kind == "pretrained":
        return _frozen_dense(cfg, corpus, directory)
    encoder = DualEncoder(
        corpus_tokenizer(corpus, d.vocab_size),
        image_size=d.image_size,
        patch_size=d.patch_size,
        vision_hidden_size=d.vision_hidden_size,
        vision_layers=d.vision_layers,
        text_hidden_size=d.text_hidden_size,
        text_layers=d.text_layers,
        embed_dim=d.embed_dim,
        max_text_tokens=d.max_text_tokens,
    )
    log.info("training the dense baseline (%d epochs)", d.max_epochs)
    start = time.perf_counter()
    trainer = _trainer(cfg, max_epochs=int(d.max_epochs), run_dir=directory)
    trainer.fit(DenseModule(encoder, lr=d.lr, weight_decay=d.weight_decay), pair_loader(corpus, d.batch_size, cfg.seed))
    seconds = time.perf_counter() - start
    if trainer.is_global_zero:  # under DDP every rank holds the same weights; one writes them
        encoder.save(directory)
        (directory / "done.json").write_text(json.dumps({"train_seconds": seconds}))
    return encoder, seconds


def _frozen_dense_class():
    from gcr.models.frozen_dense import FrozenTowerDualEncoder

    return FrozenTowerDualEncoder


def _frozen_dense(cfg: DictConfig, corpus: Corpus, directory: Path):
    """Locked-tower tuning: frozen MiniLM + EfficientNet-Lite0, trained projections."""
    d = cfg.dense
    encoder = _frozen_dense_class()(embed_dim=int(d.embed_dim))
    log.info("training the pretrained dense baseline's projections (%d epochs)", d.max_epochs)
    start = time.perf_counter()
    history = train_frozen_dense(
        encoder, corpus, cache_dir=cfg.cache_dir, max_epochs=int(d.max_epochs), batch_size=int(d.batch_size),
        lr=float(d.lr), weight_decay=float(d.weight_decay), seed=cfg.seed,
    )
    seconds = time.perf_counter() - start
    log.info("dense projections: loss %.3f -> %.3f", history[0], history[-1])
    encoder.save(directory)
    (directory / "done.json").write_text(json.dumps({"train_seconds": seconds, "loss": history}))
    return encoder, seconds


def _build_backbone(cfg: DictConfig, corpus: Corpus, dense, reserved_words=()):
    """``model.name`` from the backbone registry; every key but ``name``/``vision_init`` is a create() option.

    ``reserved_words``: words a corpus-built tokenizer (``tiny``) must hold, e.g. an identifier scheme's
    field names; pretrained tokenizers spell any word.
    """
    options = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k not in ("name", "vision_init")}
    backbone_class = BACKBONES.get(cfg.model.name)
    if cfg.model.name == "tiny":
        options["tokenizer"] = corpus_tokenizer(corpus, cfg.model.vocab_size, reserved_words)
    if getattr(backbone_class, "builds_vocabulary", False):  # create() builds a corpus tokenizer (compact)
        options["reserved_words"] = list(reserved_words)
    if _backbone_needs_dense(cfg):
        options["dense"] = dense
    backbone = backbone_class.create(corpus, **options)
    if cfg.model.get("vision_init", "random") == "dense":
        if dense is None:
            raise ConfigError("model.vision_init=dense needs the dense baseline; set dense.enabled=true")
        backbone.load_vision_tower(dense.vision_state())
    return backbone


def _backbone_needs_dense(cfg: DictConfig) -> bool:
    """True when ``model.name``'s class declares (``needs_dense(options)``) that it reads the dense baseline."""
    needs = getattr(BACKBONES.get(cfg.model.name), "needs_dense", None)
    return bool(needs(OmegaConf.to_container(cfg.model, resolve=True))) if needs is not None else False


def _wandb_logger(cfg: DictConfig, run_dir: Path, name: str):
    if not cfg.wandb.enabled:
        return False
    import os

    from lightning.pytorch.loggers import WandbLogger

    # The mode goes to wandb.init itself: Lightning's offline=True only sets $WANDB_MODE, which a wandb
    # already set up in this process (e.g. by an earlier bench) no longer reads.
    mode = os.environ.get("WANDB_MODE") or cfg.wandb.mode
    mode = "offline" if mode == "dryrun" else mode
    return WandbLogger(project=cfg.wandb.project, name=name, save_dir=str(run_dir), offline=mode == "offline", mode=mode)


# -- fit ----------------------------------------------------------------------------------------
def fit(cfg: DictConfig) -> dict[str, Any]:
    """Train and evaluate ``cfg.scheme`` on ``cfg.data`` in every direction, plus the dense baseline."""
    run_dir = Path(cfg.output_dir) / cfg.run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    corpus = load_dataset(cfg.data)
    scheme_options = {k: v for k, v in OmegaConf.to_container(cfg.scheme, resolve=True).items() if k != "name"}
    probe = build_scheme(cfg.scheme.name, seed=cfg.seed, **scheme_options)  # fail fast on unknown options
    check_source(cfg.description.source)

    needs_dense = (
        cfg.dense.enabled
        or cfg.model.get("vision_init") == "dense"
        or (probe.needs_features and cfg.features.encoder == "dense")
        or _backbone_needs_dense(cfg)
    )
    dense, dense_seconds = dense_baseline(cfg, corpus) if needs_dense else (None, 0.0)
    rows: list[ResultRow] = []
    if cfg.dense.enabled:
        rows += dense_rows(cfg, corpus, dense, dense_seconds)
    for direction in cfg.directions:
        task = _evaluation_task(cfg, corpus, direction)
        rows += _fit_direction(cfg, corpus, task, dense, run_dir / direction, scheme_options)
    results = build_results(cfg, corpus, rows)
    save_results(results, run_dir)
    return results


def dense_rows(cfg: DictConfig, corpus: Corpus, dense, train_seconds: float) -> list[ResultRow]:
    """The dense baseline scored on every direction's test split (``dense`` or ``dense-<type>`` rows)."""
    name = "dense" if cfg.dense.get("type", "clip") == "clip" else f"dense-{cfg.dense.type}"
    return [
        ResultRow(name, "dense", direction,
                  evaluate_dense(dense, _evaluation_task(cfg, corpus, direction), "test", tuple(cfg.eval.ks)),
                  train_seconds, seed=int(cfg.seed))
        for direction in cfg.directions
    ]


def _feature_encoder(name: str, corpus: Corpus):
    from gcr.encoders import build_feature_encoder

    return build_feature_encoder(name, corpus=corpus) if name == "precomputed" else build_feature_encoder(name)


def _evaluation_task(cfg: DictConfig, corpus: Corpus, direction: str):
    """The direction's task as every method of the run is scored on it (``description=heldout`` drops queries)."""
    d = cfg.get("description")  # absent from runs made before gcr had descriptions: all queries count
    if d is None:
        return retrieval_task(corpus, direction)
    return evaluation_task(retrieval_task(corpus, direction), corpus, d.source, heldout_caption=int(d.heldout_caption))


def _described(cfg: DictConfig, corpus: Corpus, task, dense):
    """``task`` with leakage-free target descriptions (``description.source``) for text-built identifiers."""
    d = cfg.description
    captions = None
    if d.source == "generated" and task.direction == "t2i":
        from gcr.train.captioner import generated_captions

        captions = generated_captions(cfg, corpus, _captioner_factory(cfg, dense))
    return describe_targets(task, corpus, d.source, heldout_caption=int(d.heldout_caption), captions=captions)


def _captioner_factory(cfg: DictConfig, dense):
    """``corpus -> backbone`` for the description captioner: the run's model, or ``tiny`` if it cannot write text."""
    if getattr(BACKBONES.get(cfg.model.name), "writes_text", True):
        return lambda corpus: _build_backbone(cfg, corpus, dense)
    log.info("model %r cannot write captions; the description captioner is a tiny model", cfg.model.name)
    from gcr.models.tiny import TinyBackbone

    return lambda corpus: TinyBackbone.create(corpus)


def _caption_queries(cfg: DictConfig, corpus: Corpus, task, index, dense) -> list:
    """CART's caption-enhanced training queries: each image target's generated caption -> its identifier.

    The captions come from the ``description`` captioner (trained on the train split only), so test images
    gain pseudo-queries without any test caption being read. Text-to-image only (image queries cannot be made).
    """
    if not cfg.augment.caption_queries or task.direction != "t2i":
        return []
    from gcr.data.corpus import Content
    from gcr.train.captioner import generated_captions
    from gcr.train.datamodule import Example

    captions = generated_captions(cfg, corpus, _captioner_factory(cfg, dense))
    return [
        Example(Content.text(captions[t.target_id]), tuple(index.token_ids[index.identifier_of(t.target_id)]))
        for t in task.targets if captions.get(t.target_id, "").strip()
    ]


def _verifier(cfg: DictConfig, task, index, backbone):
    """GSV (``gsv.enabled``): the verifier and its (image, caption, hard negative) training triples."""
    if not cfg.get("gsv", {}).get("enabled", False):
        return None, []
    from gcr.verification import GenerativeVerifier, hard_negative_pairs

    g = cfg.gsv
    verifier = GenerativeVerifier(
        backbone, {t.target_id: t.content for t in task.targets}, weight=float(g.weight), top_k=int(g.top_k),
        marker=str(g.marker), batch_size=int(cfg.eval.batch_size),
    )
    token_ids = {t.target_id: index.token_ids[index.identifier_of(t.target_id)] for t in task.targets}
    return verifier, hard_negative_pairs(task, token_ids)


def _identity(index: IdentifierIndex) -> dict[str, str | None]:
    """What a checkpoint must match to be evaluated with ``index``: scheme, direction and tokenizer."""
    return {"scheme": index.scheme, "direction": index.direction, "tokenizer": index.tokenizer_fingerprint}


def _rationale_setup(cfg: DictConfig, scheme, task, index, backbone):
    """Rationale-Guided Supervision (``rgs.enabled``): the separator and every target's rationale tokens."""
    r = cfg.get("rgs")
    if r is None or not r.enabled:
        return None
    if not getattr(type(backbone), "writes_text", True):
        raise ConfigError(f"rgs.enabled=true needs a backbone that writes text; model {cfg.model.name!r} cannot")
    from gcr.rationales import supervision

    rationales = scheme.rationales()
    by_target = dict(zip([t.target_id for t in task.targets], rationales)) if rationales else {}
    return supervision(backbone.tokenizer, index.identifiers, by_target, separator=str(r.separator),
                       weight=float(r.weight), scheme=scheme.name, max_tokens=int(r.max_tokens))


def _fit_direction(cfg, corpus, task, dense, out_dir: Path, scheme_options) -> list[ResultRow]:
    L.seed_everything(cfg.seed, workers=True)
    scheme = build_scheme(cfg.scheme.name, seed=cfg.seed, **scheme_options)
    backbone = _build_backbone(cfg, corpus, dense, scheme.reserved_words())
    scheme.bind_tokenizer(backbone.tokenizer)
    if scheme.uses_descriptions:
        task = _described(cfg, corpus, task, dense)
        L.seed_everything(cfg.seed, workers=True)  # the same weights whether or not a captioner trained first
        backbone = _build_backbone(cfg, corpus, dense, scheme.reserved_words())
    features = None
    if scheme.needs_features:
        encoder = dense if cfg.features.encoder == "dense" else _feature_encoder(cfg.features.encoder, corpus)
        features = cached_target_features(
            encoder, cfg.features.encoder, task.targets, corpus_fingerprint=corpus.fingerprint(),
            cache_dir=cfg.cache_dir, batch_size=cfg.features.batch_size,
        )
    if getattr(scheme, "generator", None) == "mllm":  # ssi: the run's (pretrained) MLLM writes the fields
        if not getattr(type(backbone), "writes_text", True):
            raise ConfigError(f"ssi.generator=mllm needs a backbone that writes text; model {cfg.model.name!r} cannot")
        from gcr.rationales import mllm_answerer

        scheme.answerer = mllm_answerer(backbone, batch_size=int(cfg.eval.batch_size))
    t0 = time.perf_counter()
    assignments = scheme.fit(task.targets, features)
    index = IdentifierIndex.build(
        scheme, [t.target_id for t in task.targets], assignments,
        direction=task.direction, corpus_fingerprint=corpus.fingerprint(),
    )
    index_seconds = time.perf_counter() - t0
    backbone.add_identifier_tokens(scheme.new_tokens())
    for group in scheme.token_vectors().values():  # e.g. CART: tokens start at their codebook vectors
        backbone.init_token_embeddings(group)
    rgs = _rationale_setup(cfg, scheme, task, index, backbone)
    index.tokenize(backbone.tokenizer, end_token_id=rgs.separator_id if rgs else None)
    index.save(out_dir)
    if rgs is not None:
        write_json(out_dir / "rationales.json", dict(zip([t.target_id for t in task.targets], scheme.rationales())))

    verifier, pairs = _verifier(cfg, task, index, backbone)
    module = GenerativeRetrievalModule(
        backbone, lr=cfg.trainer.lr, weight_decay=cfg.trainer.weight_decay, warmup_ratio=cfg.trainer.warmup_ratio,
        verifier=verifier, gsv_loss_weight=float(cfg.gsv.loss_weight),
        rationale_weight=float(rgs.weight) if rgs else 1.0, identity=_identity(index),
    )
    data = GenerativeDataModule(
        task, index, backbone, batch_size=cfg.trainer.batch_size, eval_batch_size=cfg.eval.batch_size,
        verifier=verifier, verification_pairs=pairs, pairs_per_step=int(cfg.gsv.pairs_per_step), seed=int(cfg.seed),
        extra_examples=_caption_queries(cfg, corpus, task, index, dense),
        rationales=rgs.token_ids if rgs else None,
    )
    evaluation = RetrievalEvaluation(tuple(cfg.eval.ks))
    last = out_dir / "checkpoints" / "last.ckpt"
    callbacks = [ConstrainedDecoding(task, index, num_beams=cfg.decoding.num_beams), evaluation,
                 EpochEndCheckpoint(last), EpochSeed(int(cfg.seed))]
    trainer = _trainer(
        cfg, max_epochs=int(cfg.trainer.max_epochs), run_dir=out_dir, callbacks=callbacks,
        loggers=_wandb_logger(cfg, out_dir, f"{cfg.run_name}-{task.direction}"),
    )
    log.info("training %s/%s: %d examples per epoch", cfg.scheme.name, task.direction, len(data.examples))
    start = time.perf_counter()
    trainer.fit(module, datamodule=data, ckpt_path=str(last) if last.exists() else None)
    train_seconds = time.perf_counter() - start
    if trainer.is_global_zero:
        backbone.save(out_dir / "backbone")
    trainer.test(module, datamodule=data, verbose=False)
    stats = {**index.stats(), "build_seconds": index_seconds, **scheme.stats()}
    if scheme.uses_descriptions:
        stats["description"] = cfg.description.source
    return _rows(cfg, task.direction, evaluation.results, train_seconds, stats)


def _rows(cfg: DictConfig, direction: str, results: dict, train_seconds, stats: dict) -> list[ResultRow]:
    """The test row, and the ``+gsv`` row when verification re-ranked the same candidates."""
    from gcr.train.callbacks import VERIFIED

    method, seed = cfg.scheme.name, int(cfg.seed)
    if cfg.get("rgs") is not None and cfg.rgs.enabled:
        method += "+rgs"
    rows = [ResultRow(method, "generative", direction, dict(results["test"]), train_seconds, index=stats, seed=seed)]
    if "test" + VERIFIED in results:
        rows.append(ResultRow(method + VERIFIED, "generative", direction, dict(results["test" + VERIFIED]),
                              train_seconds, index=stats, seed=seed))
    return rows


# -- eval ---------------------------------------------------------------------------------------
def evaluate(path: str | Path, overrides: DictConfig | None = None) -> dict[str, Any]:
    """Re-evaluate a finished run (a run folder, a direction folder, or a ``.ckpt`` inside one)."""
    path = Path(path)
    ckpt = path if path.suffix == ".ckpt" else None
    run_dir = find_run_dir(path)
    cfg = OmegaConf.load(run_dir / "config.yaml")
    if overrides is not None:
        cfg = OmegaConf.merge(cfg, overrides)
    corpus = load_dataset(cfg.data)
    if ckpt is not None:
        directions = [ckpt.parent.parent.name]
    elif path != run_dir:
        directions = [path.name]
    else:
        directions = list(cfg.directions)
    rows = []
    for direction in directions:
        task = _evaluation_task(cfg, corpus, direction)
        out_dir = run_dir / direction
        index = IdentifierIndex.load(out_dir, scheme=cfg.scheme.name, corpus_fingerprint=corpus.fingerprint(), direction=direction)
        backbone = load_backbone(out_dir / "backbone")
        if ckpt is not None:
            checkpoint = load_tensors(ckpt, what="checkpoint")
            check_checkpoint_identity(checkpoint.get("gcr_identity"), _identity(index), ckpt)
            state = checkpoint["state_dict"]
            module = GenerativeRetrievalModule(backbone)
            check_checkpoint_keys(set(state), set(module.state_dict()), module.frozen_keys())
            try:
                module.load_state_dict(state, strict=False)
            except RuntimeError as exc:
                raise ArtifactError(f"checkpoint {ckpt} does not fit this run's backbone ({exc})") from exc
        verifier, _ = _verifier(cfg, task, index, backbone)
        module = GenerativeRetrievalModule(backbone, verifier=verifier)
        data = GenerativeDataModule(task, index, backbone, eval_batch_size=cfg.eval.batch_size)
        evaluation = RetrievalEvaluation(tuple(cfg.eval.ks))
        callbacks = [ConstrainedDecoding(task, index, num_beams=cfg.decoding.num_beams), evaluation]
        _trainer(cfg, max_epochs=1, run_dir=None, callbacks=callbacks).test(module, datamodule=data, verbose=False)
        rows += _rows(cfg, direction, evaluation.results, None, index.stats())
    return build_results(cfg, corpus, rows)
