"""Rationale-Guided Supervision: target layout, loss masking and weighting, separator checks, decoding that
stops at the separator, and ``gcr explain`` on a trained run.

Real parts: a tiny random LLaVA backbone with gcr's word-level tokenizer, shapes images, a one-epoch run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gcr.cli import compose, config_dir, main
from gcr.data.corpus import Content, Target, retrieval_task
from gcr.data.sources import load_shapes
from gcr.errors import ConfigError, IdentifierError
from gcr.heads.rationales import rgs_loss, separator_token_id, supervision
from gcr.index import IdentifierIndex
from gcr.models.base import IGNORE_INDEX
from gcr.models.tiny import TinyBackbone
from gcr.models.tokenizer import train_corpus_tokenizer
from gcr.retrieval import ConstrainedRetriever
from gcr.schemes import build_scheme
from gcr.train.datamodule import GenerativeDataModule

TINY = dict(hidden_size=32, num_layers=1, num_heads=2, vision_hidden_size=32, vision_layers=1, image_size=32,
            patch_size=8)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return load_shapes(str(tmp_path_factory.mktemp("shapes")), num_images=24)


@pytest.fixture(scope="module")
def setup(corpus):
    """A t2i task, an SSI index ending identifiers at ';', the rationales' token ids, and a tiny backbone."""
    scheme = build_scheme("ssi", parser="lexicon")
    tokenizer = train_corpus_tokenizer((c.text for c in corpus.captions("train")), 500,
                                       reserved_words=scheme.reserved_words())
    torch.manual_seed(0)
    backbone = TinyBackbone.create(corpus, tokenizer=tokenizer, **TINY).eval()
    task = retrieval_task(corpus, "t2i")
    scheme.bind_tokenizer(tokenizer)
    first_caption = {}
    for c in corpus.captions():  # ground-truth descriptions are fine here: this tests training mechanics only
        first_caption.setdefault(c.image_id, c.text)
    targets = [Target(t.target_id, t.split, t.content, first_caption[t.target_id]) for t in task.targets]
    ids = scheme.fit(targets)
    index = IdentifierIndex.build(scheme, [t.target_id for t in targets], ids, direction="t2i", corpus_fingerprint="f")
    rgs = supervision(tokenizer, index.identifiers, dict(zip([t.target_id for t in targets], scheme.rationales())),
                      separator=";", weight=0.5, scheme="ssi")
    index.tokenize(tokenizer, end_token_id=rgs.separator_id)
    return task, index, rgs, backbone


def test_training_targets_are_identifier_separator_rationale_eos(setup):
    task, index, rgs, backbone = setup
    data = GenerativeDataModule(task, index, backbone, batch_size=4, rationales=rgs.token_ids)
    data.setup("fit")
    batch = data.train_dataloader().collate_fn(data.examples[:4])  # what training batches go through
    tok = backbone.tokenizer
    for row, example in enumerate(data.examples[:4]):
        labelled = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX].tolist()
        assert labelled == [*example.target, *example.rationale]
        assert example.target[-1] == rgs.separator_id and example.rationale[-1] == tok.eos_token_id
        # the mask covers exactly the rationale's label positions; prompt and identifier are outside it
        masked = batch["labels"][row][batch["rationale_mask"][row]].tolist()
        assert masked == list(example.rationale)
        assert not batch["rationale_mask"][row][batch["labels"][row] == IGNORE_INDEX].any()


def test_rgs_loss_weighs_the_rationale_and_ignores_the_prompt(setup):
    task, index, rgs, backbone = setup
    data = GenerativeDataModule(task, index, backbone, batch_size=4, rationales=rgs.token_ids)
    data.setup("fit")
    batch = data.train_dataloader().collate_fn(data.examples[:4])
    labels, mask = batch["labels"], batch["rationale_mask"]
    with torch.no_grad():
        logits = backbone.logits({k: v for k, v in batch.items() if k != "rationale_mask"})
    loss, id_loss, rationale_loss = rgs_loss(logits, labels, mask, weight=0.5)
    # manual: per-token cross-entropy of the next token, split by the mask
    log_probs = logits[:, :-1].log_softmax(-1)
    target, is_rat = labels[:, 1:], mask[:, 1:]
    keep = target != IGNORE_INDEX
    token_nll = -log_probs.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    assert torch.isclose(id_loss, token_nll[keep & ~is_rat].mean(), atol=1e-5)
    assert torch.isclose(rationale_loss, token_nll[keep & is_rat].mean(), atol=1e-5)
    assert torch.isclose(loss, id_loss + 0.5 * rationale_loss)
    assert torch.isclose(rgs_loss(logits, labels, mask, weight=0.0)[0], id_loss)
    # prompt positions carry no label: changing their logits changes nothing
    prompt_end = (labels != IGNORE_INDEX).float().argmax(1)  # first labelled position of each row
    noisy = logits.clone()
    for row, end in enumerate(prompt_end.tolist()):
        noisy[row, : end - 1] += torch.randn_like(noisy[row, : end - 1]) * 10
    assert torch.allclose(rgs_loss(noisy, labels, mask, 0.5)[0], loss)


def test_decoding_stops_at_the_separator(setup):
    task, index, rgs, backbone = setup
    retriever = ConstrainedRetriever(backbone, index, num_beams=4)
    assert retriever.eos == rgs.separator_id and retriever.trie.eos_token_id == rgs.separator_id
    queries = [q.content for q in task.queries_of("test")[:3]]
    inputs = backbone.batch(queries)
    from transformers import LogitsProcessorList

    from gcr.decoding import TrieLogitsProcessor

    processor = TrieLogitsProcessor(retriever.trie, prompt_length=inputs["input_ids"].shape[1],
                                    eos_token_id=retriever.eos, pad_token_id=backbone.tokenizer.pad_token_id,
                                    num_beams=4)
    tokens, _ = backbone.generate(inputs, logits_processor=LogitsProcessorList([processor]), num_beams=4,
                                  max_new_tokens=retriever.max_new_tokens + 20)
    identifiers = {tuple(ids) for ids in index.token_ids}
    for row in tokens.tolist():
        end = row.index(rgs.separator_id)
        assert tuple(row[: end + 1]) in identifiers
        # generate() fills a finished beam with its end token (or pad): no rationale word is ever decoded
        assert set(row[end + 1:]) <= {rgs.separator_id, backbone.tokenizer.pad_token_id}
    found = retriever(queries)
    assert all(len(targets) > 0 for targets in found.targets)


def test_separator_checks(setup):
    task, index, rgs, backbone = setup
    tok = backbone.tokenizer
    with pytest.raises(ConfigError, match="one known token"):
        separator_token_id(tok, "@@")
    with pytest.raises(ConfigError, match="occurs inside identifiers"):
        supervision(tok, ["objects : star | scene : sky"], {"a": "it shows star"}, separator="|", weight=1, scheme="ssi")
    with pytest.raises(ConfigError, match="gives none"):
        supervision(tok, ["x"], {}, separator=";", weight=1, scheme="hkmeans")
    bad = IdentifierIndex.build(build_scheme("atomic"), ["a"], ["red ; star"], direction="t2i", corpus_fingerprint="f")
    with pytest.raises(IdentifierError, match="own end token"):
        bad.tokenize(tok, end_token_id=separator_token_id(tok, ";"))


@pytest.fixture(scope="module")
def rgs_run(tmp_path_factory):
    from gcr.train.pipeline import fit

    tmp = tmp_path_factory.mktemp("rgs")
    overrides = [f"output_dir={tmp / 'runs'}", f"data.root={tmp / 'data'}", "data.num_images=40", "trainer.max_epochs=2",
                 "dense.enabled=false", "model.hidden_size=64", "model.num_layers=1", "decoding.num_beams=4",
                 "description=ground_truth", "scheme=ssi", "scheme.parser=lexicon", "rgs.enabled=true",
                 "directions=[t2i]"]
    cfg = compose(overrides, config_dir())
    return cfg, fit(cfg)


def test_pipeline_trains_rgs_and_saves_the_rationales(rgs_run):
    cfg, results = rgs_run
    (row,) = [r for r in results["rows"] if r["kind"] == "generative"]
    assert row["method"] == "ssi+rgs"
    run_dir = Path(cfg.output_dir) / cfg.run_name
    rationales = json.loads((run_dir / "t2i" / "rationales.json").read_text())
    index = json.loads((run_dir / "t2i" / "index.json").read_text())
    assert len(rationales) == sum(len(t) for t in index["targets"]) == 40
    assert all(r.startswith("it ") for r in rationales.values())


def test_gcr_explain_prints_identifiers_and_rationales(rgs_run, capsys):
    cfg, _ = rgs_run
    run_dir = Path(cfg.output_dir) / cfg.run_name
    assert main(["explain", str(run_dir), "--text", "a red star", "--top", "2"]) == 0
    out = capsys.readouterr().out
    index = json.loads((run_dir / "t2i" / "index.json").read_text())
    assert sum(1 for ident in index["identifiers"] if ident[:20] in out) >= 1
    assert "rationale" in out


def test_gcr_explain_errors_name_the_fix(rgs_run, tmp_path, capsys):
    cfg, _ = rgs_run
    run_dir = Path(cfg.output_dir) / cfg.run_name
    assert main(["explain", str(run_dir), "--text", "a", "--image", "x.png"]) == 2
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    assert main(["explain", str(run_dir), "--image", str(broken)]) == 2
    assert main(["explain", str(tmp_path), "--text", "a red star"]) == 2
    err = capsys.readouterr().err
    assert "exactly one query" in err and "cannot be read" in err and "not inside a gcr run folder" in err


def test_explain_refuses_a_run_trained_without_rationales(rgs_run, tmp_path):
    from gcr.explain import explain_query

    cfg, _ = rgs_run
    run_dir = Path(cfg.output_dir) / cfg.run_name
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.yaml").write_text((run_dir / "config.yaml").read_text().replace("enabled: true", "enabled: false"))
    (plain / "t2i").mkdir()
    (plain / "t2i" / "backbone").mkdir()
    with pytest.raises(ConfigError, match="rgs.enabled=true"):
        explain_query(plain, Content.text("a red star"))
