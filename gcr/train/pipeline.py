"""``gcr fit`` and ``gcr eval``: the whole job, from a composed config to a results table.

A run is a sequence of stages with one direction of data flow; no stage tests a scheme's or a backbone's
name, each part declares what it needs (``scheme.requirements``) and what it can do (a backbone's
``writes_text``, ``builds_vocabulary``, ``needs_dense``)::

    data -> dense baseline (cached; if shown, or a part needs it)
    per direction:
      describe targets (if the scheme builds identifiers from text)  -> cached captions
      build the backbone once (it owns its tokenizer)
      target features (if the scheme needs them)                      -> cached
      scheme.prepare(SchemeContext) -> scheme.fit -> index -> trie
      train (resumes from last.ckpt) -> evaluate -> rows
    results.json + results.md

Run folder layout (``<output_dir>/<run_name>/``)::

    config.yaml            the resolved config (written once checked; never over another config's run)
    <direction>/index.json the identifier index (t2i, i2t)
    <direction>/backbone/  the trained backbone (HF format: config, weights, tokenizer)
    <direction>/checkpoints/last.ckpt   Lightning checkpoint (resume)
    results.json           versioned results; results.md the table
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf

from gcr.artifacts import find_run_dir, load_tensors, write_json
from gcr.config import load_run_config
from gcr.config_checks import build_checked_scheme
from gcr.data.corpus import Corpus, RetrievalTask
from gcr.data.sources import load_dataset
from gcr.dense.setup import dense_baseline, dense_rows, plural
from gcr.descriptions.sources import describe_targets, scored_task
from gcr.errors import ArtifactError
from gcr.features import cached_target_features
from gcr.index import IdentifierIndex
from gcr.models.loading import load_backbone
from gcr.registry import BACKBONES
from gcr.reporting import tracking
from gcr.reporting.results import ResultRow, build_results, save_results
from gcr.run_folder import RunFolder, choose_run_dir
from gcr.schemes import SchemeContext
from gcr.train.callbacks import ConstrainedDecoding, RetrievalEvaluation
from gcr.train.datamodule import GenerativeDataModule
from gcr.train.module import GenerativeRetrievalModule, check_checkpoint_identity, check_checkpoint_keys
from gcr.train.pseudo_queries import pseudo_queries
from gcr.train.quiet import silence_third_party
from gcr.train.reproducible import EpochEndCheckpoint, EpochSeed
from gcr.train.trainer import build_trainer

log = logging.getLogger("gcr")


# -- stages -------------------------------------------------------------------------------------
def build_backbone(cfg: DictConfig, corpus: Corpus, dense, reserved_words=()):
    """``model.name`` from the backbone registry; every key but ``name``/``vision_init`` is a create() option.

    A backbone that builds its vocabulary from the corpus is given the scheme's ``reserved_words``; one that
    needs the dense baseline is given it (both declared on the class).
    """
    options = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k not in ("name", "vision_init")}
    backbone_class = BACKBONES.get(cfg.model.name)
    if getattr(backbone_class, "builds_vocabulary", False):
        options["reserved_words"] = list(reserved_words)
    if backbone_needs_dense(cfg):
        options["dense"] = dense
    backbone = backbone_class.create(corpus, **options)
    if cfg.model.get("vision_init", "none") == "dense":
        backbone.load_vision_tower(dense.vision_state())  # config_checks made sure both sides allow it
    return backbone


def backbone_needs_dense(cfg: DictConfig) -> bool:
    """True when ``model.name``'s class declares (``needs_dense(options)``) that it reads the dense baseline."""
    return bool(BACKBONES.get(cfg.model.name).needs_dense(OmegaConf.to_container(cfg.model, resolve=True)))


def _needs_dense(cfg: DictConfig, scheme) -> bool:
    return bool(
        cfg.dense.enabled
        or cfg.model.get("vision_init") == "dense"
        or (scheme.requirements.features and cfg.features.name == "dense")
        or backbone_needs_dense(cfg)
    )


# -- fit ----------------------------------------------------------------------------------------
def fit(cfg: DictConfig) -> dict[str, Any]:
    """Train and evaluate ``cfg.scheme`` on ``cfg.data`` in every direction, plus the dense baseline."""
    silence_third_party(verbose=log.isEnabledFor(logging.DEBUG))
    config = OmegaConf.to_container(cfg, resolve=True)
    run_dir, moved = choose_run_dir(Path(cfg.output_dir), str(cfg.run_name), config)
    if moved:
        log.warning("%s", moved)
        cfg.run_name = config["run_name"] = str(run_dir.relative_to(cfg.output_dir))
    with RunFolder.claim(run_dir, config):
        return _fit(cfg, run_dir)



def _fit(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    log.info("run folder %s", run_dir)
    corpus = load_dataset(cfg.data)
    sizes = ", ".join(f"{len(corpus.split(s))} {s}" for s in ("train", "val", "test"))
    log.info("data: %s, %s (%s)", corpus.name, plural(len(corpus.images), "item"), sizes)
    rows: list[ResultRow] = []
    # each part is a W&B run of its own (gcr.reporting.tracking), finished before the next starts
    with tracking.dense_run(cfg, f"{cfg.run_name}/dense", run_dir / "dense") as tracked:
        needed = _needs_dense(cfg, build_checked_scheme(cfg))
        dense, dense_seconds = dense_baseline(cfg, corpus, tracked) if needed else (None, 0.0)
        if cfg.dense.enabled:
            log.info("dense baseline: evaluating")
            rows += dense_rows(cfg, corpus, dense, dense_seconds)
            tracked.log_rows(rows)
    for direction in cfg.directions:
        with tracking.direction_run(cfg, direction, run_dir) as tracked:
            direction_rows = _fit_direction(cfg, corpus, direction, dense, run_dir / direction, tracked)
            tracked.log_rows(direction_rows)
        rows += direction_rows
    results = build_results(cfg, corpus, rows)
    save_results(results, run_dir)
    return results


def _fit_direction(cfg: DictConfig, corpus: Corpus, direction: str, dense, out_dir: Path,
                   tracked=None) -> list[ResultRow]:
    """One direction's stages: describe -> backbone -> features -> identifiers -> index -> train -> evaluate."""
    task = scored_task(cfg, corpus, direction)
    scheme = build_checked_scheme(cfg)
    needs = scheme.requirements
    if needs.descriptions:
        task = _described(cfg, corpus, task, dense)
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # the same weights whether or not a captioner trained
    backbone = build_backbone(cfg, corpus, dense, _reserved_words(cfg, scheme))
    features = _target_features(cfg, corpus, task, dense) if needs.features else None
    generator = None
    if needs.text_generator:  # e.g. ssi generator=mllm: the run's backbone writes the identifiers
        from gcr.heads.rationales import mllm_answerer

        generator = mllm_answerer(backbone, batch_size=int(cfg.eval.batch_size))
    scheme.prepare(SchemeContext(tokenizer=backbone.tokenizer, features=features, generator=generator,
                                 cache_dir=str(cfg.cache_dir)))
    index, index_seconds = _build_index(cfg, corpus, scheme, task, features)
    backbone.add_identifier_tokens(scheme.new_tokens())
    for group in scheme.token_vectors().values():  # e.g. CART: tokens start at their codebook vectors
        backbone.init_token_embeddings(group)
    if getattr(backbone, "needs_code_vectors", None) and backbone.needs_code_vectors(backbone.options()):
        backbone.set_code_vectors(scheme.code_vectors())  # model.fusion=candidate (checked up front)
    rgs = _rationale_setup(cfg, scheme, task, index, backbone)
    index.tokenize(backbone.tokenizer, end_token_id=rgs.separator_id if rgs else None)
    if getattr(backbone, "sibling_smoothing", 0.0) > 0:
        backbone.set_identifier_trie(index.trie())  # model.sibling_smoothing: every target's identifier
    index.save(out_dir)
    if rgs is not None:
        write_json(out_dir / "rationales.json", dict(zip([t.target_id for t in task.targets], scheme.rationales())))
    generated = pseudo_queries(cfg, corpus, task, index, _captioner_factory(cfg, dense))
    if generated.examples:
        generated.save(out_dir)
    results, per_query, train_seconds = _train_and_evaluate(cfg, task, index, backbone, rgs, out_dir, tracked,
                                                            extra_examples=generated.examples)
    stats = {**index.stats(), "build_seconds": index_seconds, **scheme.stats(), "pseudo_queries": generated.record}
    if needs.descriptions:
        stats["description"] = cfg.description.name
    return _rows(cfg, task.direction, results, train_seconds, stats, per_query)


def _target_features(cfg: DictConfig, corpus: Corpus, task: RetrievalTask, dense):
    log.info("features: %s targets with the %s encoder (cached)", len(task.targets), cfg.features.name)
    encoder = dense if cfg.features.name == "dense" else _feature_encoder(cfg.features.name, corpus)
    return cached_target_features(
        encoder, cfg.features.name, task.targets, corpus_fingerprint=corpus.fingerprint(),
        cache_dir=cfg.cache_dir, batch_size=cfg.features.batch_size,
    )


def _build_index(cfg: DictConfig, corpus: Corpus, scheme, task: RetrievalTask, features):
    log.info("identifiers: %s for %s %s targets", cfg.scheme.name, len(task.targets), task.direction)
    start = time.perf_counter()
    assignments = scheme.fit(task.targets, features)
    index = IdentifierIndex.build(
        scheme, [t.target_id for t in task.targets], assignments,
        direction=task.direction, corpus_fingerprint=corpus.fingerprint(),
    )
    return index, time.perf_counter() - start


def _train_and_evaluate(cfg, task, index, backbone, rgs, out_dir: Path, tracked, *, extra_examples=()):
    """Train (resuming from ``last.ckpt``), save the backbone, score the test split."""
    verifier, pairs = _verifier(cfg, task, index, backbone)
    module = GenerativeRetrievalModule(
        backbone, lr=cfg.trainer.lr, weight_decay=cfg.trainer.weight_decay, warmup_ratio=cfg.trainer.warmup_ratio,
        verifier=verifier, gsv_loss_weight=float(cfg.gsv.loss_weight),
        rationale_weight=float(rgs.weight) if rgs else 1.0, identity=_identity(index),
    )
    data = GenerativeDataModule(
        task, index, backbone, batch_size=cfg.trainer.batch_size, eval_batch_size=cfg.eval.batch_size,
        verifier=verifier, verification_pairs=pairs, pairs_per_step=int(cfg.gsv.pairs_per_step), seed=int(cfg.seed),
        extra_examples=list(extra_examples),
        rationales=rgs.token_ids if rgs else None,
    )
    evaluation = RetrievalEvaluation(tuple(cfg.eval.ks))
    last = out_dir / "checkpoints" / "last.ckpt"
    callbacks = [ConstrainedDecoding(task, index, num_beams=cfg.decoding.num_beams), evaluation,
                 EpochEndCheckpoint(last), EpochSeed(int(cfg.seed))]
    name = f"{cfg.scheme.name}/{task.direction}"
    trainer = build_trainer(cfg, max_epochs=int(cfg.trainer.max_epochs), run_dir=out_dir, callbacks=callbacks,
                            name=name, loggers=tracked.lightning_logger() if tracked is not None else False)
    log.info("training %s: %s per epoch", name, plural(len(data.examples), "example"))
    start = time.perf_counter()
    if last.exists():
        log.info("resuming %s from %s", name, last)
    # weights_only: resuming never unpickles arbitrary objects (the checkpoint holds tensors and plain values)
    trainer.fit(module, datamodule=data, ckpt_path=str(last) if last.exists() else None, weights_only=True)
    train_seconds = time.perf_counter() - start
    if trainer.is_global_zero:
        backbone.save(out_dir / "backbone")
    log.info("evaluating %s on %s test queries", name, len(task.queries_of("test")))
    trainer.test(module, datamodule=data, verbose=False)
    return evaluation.results, evaluation.per_query, train_seconds


def _feature_encoder(name: str, corpus: Corpus):
    from gcr.encoders import build_feature_encoder

    return build_feature_encoder(name, corpus=corpus) if name == "precomputed" else build_feature_encoder(name)


def _described(cfg: DictConfig, corpus: Corpus, task: RetrievalTask, dense) -> RetrievalTask:
    """``task`` with leakage-free target descriptions (``description.name``) for text-built identifiers."""
    d = cfg.description
    captions = None
    if d.name == "generated" and task.direction == "t2i":
        from gcr.train.captioner import generated_captions

        captions = generated_captions(cfg, corpus, _captioner_factory(cfg, dense))
    return describe_targets(task, corpus, d.name, heldout_caption=int(d.heldout_caption), captions=captions)


def _captioner_factory(cfg: DictConfig, dense):
    """``corpus -> backbone`` for the description captioner: the run's model, or ``tiny`` if it cannot write text."""
    if getattr(BACKBONES.get(cfg.model.name), "writes_text", True):
        return lambda corpus: build_backbone(cfg, corpus, dense)
    def tiny_captioner(corpus: Corpus):
        from gcr.models.tiny import TinyBackbone

        log.info("model %r cannot write captions; the description captioner is a tiny model", cfg.model.name)
        return TinyBackbone.create(corpus)

    return tiny_captioner


def _verifier(cfg: DictConfig, task, index, backbone):
    """GSV (``gsv.enabled``): the verifier and its (image, caption, hard negative) training triples."""
    if not cfg.get("gsv", {}).get("enabled", False):
        return None, []
    from gcr.heads.verification import GenerativeVerifier, hard_negative_pairs

    g = cfg.gsv
    verifier = GenerativeVerifier(
        backbone, {t.target_id: t.content for t in task.targets}, weight=float(g.weight), top_k=int(g.top_k),
        marker=str(g.marker), batch_size=int(cfg.eval.batch_size), **_gsv_mode(cfg),
    )
    token_ids = {t.target_id: index.token_ids[index.identifier_of(t.target_id)] for t in task.targets}
    return verifier, hard_negative_pairs(task, token_ids)


def _gsv_mode(cfg: DictConfig) -> dict[str, str]:
    """``gsv.mode`` and ``gsv.prompt`` (runs saved before gcr had them: likelihood)."""
    from gcr.heads.verification import DEFAULT_PROMPT

    g = cfg.get("gsv") or {}
    return {"mode": str(g.get("mode", "likelihood")), "prompt": str(g.get("prompt", DEFAULT_PROMPT))}


def _reserved_words(cfg: DictConfig, scheme) -> list[str]:
    """Words the run's corpus tokenizer must spell: the scheme's, and GSV's prompt and answers."""
    words = list(scheme.reserved_words())
    if cfg.get("gsv") is not None and cfg.gsv.enabled:
        from gcr.heads.verification import reserved_words

        words += reserved_words(**_gsv_mode(cfg))
    return words


def _identity(index: IdentifierIndex) -> dict[str, str | None]:
    """What a checkpoint must match to be evaluated with ``index``: scheme, direction and tokenizer."""
    return {"scheme": index.scheme, "direction": index.direction, "tokenizer": index.tokenizer_fingerprint}


def _rationale_setup(cfg: DictConfig, scheme, task, index, backbone):
    """Rationale-Guided Supervision (``rgs.enabled``): the separator and every target's rationale tokens."""
    r = cfg.get("rgs")
    if r is None or not r.enabled:
        return None
    from gcr.heads.rationales import supervision

    rationales = scheme.rationales()
    by_target = dict(zip([t.target_id for t in task.targets], rationales)) if rationales else {}
    return supervision(backbone.tokenizer, index.identifiers, by_target, separator=str(r.separator),
                       weight=float(r.weight), scheme=scheme.name, max_tokens=int(r.max_tokens))


def _rows(cfg: DictConfig, direction: str, results: dict, train_seconds, stats: dict,
          per_query: dict | None = None) -> list[ResultRow]:
    """The test row, and the ``+gsv`` row when verification re-ranked the same candidates."""
    from gcr.train.callbacks import VERIFIED

    method, seed = cfg.scheme.name, int(cfg.seed)
    if cfg.get("rgs") is not None and cfg.rgs.enabled:
        method += "+rgs"
    per_query = per_query or {}
    rows = [ResultRow(method, "generative", direction, dict(results["test"]), train_seconds, index=stats, seed=seed,
                      per_query=per_query.get("test"))]
    if "test" + VERIFIED in results:
        from gcr.heads.verification import describe

        gsv = describe(**_gsv_mode(cfg), weight=float(cfg.gsv.weight), top_k=int(cfg.gsv.top_k))  # how scores combine
        rows.append(ResultRow(method + VERIFIED, "generative", direction, dict(results["test" + VERIFIED]),
                              train_seconds, index={**stats, "gsv": gsv}, seed=seed,
                              per_query=per_query.get("test" + VERIFIED)))
    return rows


# -- eval ---------------------------------------------------------------------------------------
def evaluate(path: str | Path, overrides: DictConfig | None = None) -> dict[str, Any]:
    """Re-evaluate a finished run (a run folder, a direction folder, or a ``.ckpt`` inside one)."""
    silence_third_party(verbose=log.isEnabledFor(logging.DEBUG))
    path = Path(path)
    ckpt = path if path.suffix == ".ckpt" else None
    run_dir = find_run_dir(path)
    cfg = load_run_config(run_dir / "config.yaml")
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
        task = scored_task(cfg, corpus, direction)
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
        build_trainer(cfg, max_epochs=1, run_dir=None, callbacks=callbacks, name=f"{cfg.scheme.name}/{direction}").test(
            module, datamodule=data, verbose=False)
        rows += _rows(cfg, direction, evaluation.results, None, index.stats(), evaluation.per_query)
    results = build_results(cfg, corpus, rows)
    tracking.log_eval(cfg, run_dir, results)  # a W&B run of its own (job_type eval) in the run's group
    return results
