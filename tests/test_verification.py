"""Generative Semantic Verification (GSV): scoring, re-ranking, training loss, hard negatives, pipeline rows.

Real parts only: a tiny LLaVA backbone (random init) on generated shapes images, its word-level tokenizer
(built with the verifier's reserved words for prompt mode), the trie decoder over shared identifiers, the
``gcr`` command line as a subprocess, and a one-epoch pipeline run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gcr.data.corpus import Content, Query, RetrievalTask, Target, retrieval_task
from gcr.data.sources import load_shapes
from gcr.errors import ConfigError
from gcr.heads.verification import MODES, GenerativeVerifier, hard_negative_pairs, reserved_words
from gcr.index import IdentifierIndex
from gcr.models.base import IGNORE_INDEX
from gcr.models.tiny import TinyBackbone
from gcr.models.tokenizer import train_corpus_tokenizer
from gcr.retrieval import ConstrainedRetriever
from gcr.schemes.base import IdentifierScheme

TINY = dict(
    vocab_size=200, hidden_size=64, num_layers=1, num_heads=2, vision_hidden_size=32, vision_layers=1,
    image_size=32, patch_size=8,
)  # fmt: skip



@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return load_shapes(str(tmp_path_factory.mktemp("shapes20")), num_images=20)


def _backbone(corpus, seed: int = 0, words=()) -> TinyBackbone:
    torch.manual_seed(seed)
    tokenizer = train_corpus_tokenizer((c.text for c in corpus.captions("train")), TINY["vocab_size"],
                                       reserved_words=words)
    options = {k: v for k, v in TINY.items() if k != "vocab_size"}
    return TinyBackbone.create(corpus, tokenizer=tokenizer, **options).eval()


def _prompt_backbone(corpus, seed: int = 0) -> TinyBackbone:
    """A tiny backbone whose corpus tokenizer spells the verification prompt and yes/no (as the pipeline builds it)."""
    return _backbone(corpus, seed, reserved_words("prompt"))


@pytest.fixture(scope="module")
def prompt_backbone(corpus):
    return _prompt_backbone(corpus)


@pytest.fixture(scope="module")
def backbone(corpus):
    return _backbone(corpus)


@pytest.fixture(scope="module")
def t2i(corpus):
    return retrieval_task(corpus, "t2i")


def _verifier(backbone, task, **options) -> GenerativeVerifier:
    return GenerativeVerifier(backbone, {t.target_id: t.content for t in task.targets}, **options)


# --------------------------------------------------------------------------- re-ranking


def _candidates(task, n_queries: int = 3):
    """Text queries, each with 6 image candidates (in a different order per query) and falling scores."""
    queries = [q.content for q in task.queries_of("train")[:n_queries]]
    images = [t.target_id for t in task.targets][:6]
    targets = [images[q:] + images[:q] for q in range(n_queries)]
    scores = [[-0.1, -0.5, -0.9, -1.3, -2.0, -2.5] for _ in range(n_queries)]
    return queries, targets, scores


def test_rerank_reorders_only_the_top_k_by_the_combined_score(backbone, t2i):
    verifier = _verifier(backbone, t2i, weight=1.0, top_k=4)
    queries, targets, scores = _candidates(t2i)
    out_targets, out_scores = verifier.rerank(queries, targets, scores)
    contents = verifier.target_contents
    for query, before, gen, after, combined in zip(queries, targets, scores, out_targets, out_scores):
        assert sorted(after) == sorted(before) and len(after) == 6
        assert after[4:] == before[4:] and combined[4:] == gen[4:]  # past top_k: untouched
        assert set(after[:4]) == set(before[:4])
        assert combined[:4] == sorted(combined[:4], reverse=True)
        # every head score: log p_gen + weight * log p_verify, both normalised over the 4 verified candidates
        verified = verifier.score([contents[t] for t in before[:4]], [query.value] * 4).double()
        log_gen = torch.tensor(gen[:4], dtype=torch.float64).log_softmax(0)
        expected = {t: g + v for t, g, v in zip(before[:4], log_gen.tolist(), verified.log_softmax(0).tolist())}
        for t, s in zip(after[:4], combined[:4]):
            assert s == pytest.approx(expected[t], abs=1e-5)


def test_rerank_with_equal_generation_scores_follows_the_verifier_and_weight_zero_changes_nothing(backbone, t2i):
    queries, targets, scores = _candidates(t2i)
    verifier = _verifier(backbone, t2i, weight=1.0, top_k=4)
    tied = [[-1.0] * 6 for _ in queries]  # one identifier shared by 6 targets: all are verified (never split)
    out_targets, _ = verifier.rerank(queries, targets, tied)
    changed = 0
    for query, before, after in zip(queries, targets, out_targets):
        verified = verifier.score([verifier.target_contents[t] for t in before], [query.value] * 6).tolist()
        of = dict(zip(before, verified))
        assert all(of[a] >= of[b] - 1e-5 for a, b in zip(after, after[1:])), (after, of)
        changed += after != before
    assert changed > 0  # the model's verification does re-order (so the weight=0 check below means something)

    off = _verifier(backbone, t2i, weight=0.0, top_k=4)
    out_targets, out_scores = off.rerank(queries, targets, scores)
    assert out_targets == targets
    for gen, out in zip(scores, out_scores):  # the head on the normalised scale, the rest untouched
        assert out[:4] == pytest.approx(torch.tensor(gen[:4], dtype=torch.float64).log_softmax(0).tolist())
        assert out[4:] == gen[4:]
    out_targets, _ = off.rerank(queries, targets, tied)
    assert out_targets == targets  # ties keep the beam order


def test_rerank_image_to_text_and_short_lists(backbone, corpus):
    i2t = retrieval_task(corpus, "i2t")
    verifier = _verifier(backbone, i2t, weight=100.0, top_k=10)
    query = i2t.queries_of("test")[0].content
    captions = [t.target_id for t in i2t.targets][:3]  # fewer candidates than top_k
    (after,), (combined,) = verifier.rerank([query], [captions], [[-1.0, -2.0, -3.0]])
    assert sorted(after) == sorted(captions) and combined == sorted(combined, reverse=True)
    texts = [verifier.target_contents[c].value for c in captions]
    verified = verifier.score([query] * 3, texts).tolist()
    assert after == [captions[c] for c in sorted(range(3), key=lambda c: -verified[c])]
    assert verifier.rerank([query], [[]], [[]]) == ([[]], [[]])  # a query without candidates


# --------------------------------------------------------------------------- inputs and scores


def test_batch_labels_score_exactly_the_text_and_eos(backbone, t2i):
    verifier = _verifier(backbone, t2i)
    tok = backbone.tokenizer
    images = [t.content for t in t2i.targets[:3]]
    texts = ["a red circle", "a small blue square on a gray striped background", "star"]
    batch = verifier.batch(images, texts)
    marker = tok(":", add_special_tokens=False)["input_ids"]
    assert len(marker) == 1 and tok.unk_token_id not in marker
    width = batch["labels"].shape[1]
    for i, text in enumerate(texts):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        labels, inputs = batch["labels"][i], batch["input_ids"][i]
        scored = (labels != IGNORE_INDEX).nonzero().flatten()
        assert len(scored) == len(ids) + 1
        assert scored.tolist() == list(range(width - len(ids) - 1, width))  # the last tokens of the row
        assert labels[scored].tolist() == [*ids, tok.eos_token_id]
        assert inputs[scored].tolist() == [*ids, tok.eos_token_id]  # teacher forcing: labels are the inputs
        start = scored[0].item()
        assert inputs[start - 1].item() == marker[0] and labels[start - 1].item() == IGNORE_INDEX  # the marker
        assert inputs[start - 2].item() == tok.sep_token_id  # the image prompt ends with the separator
        prompt = inputs[:start - 1][batch["attention_mask"][i][:start - 1] == 1]
        assert (prompt == tok.convert_tokens_to_ids(tok.image_token)).sum() == backbone.num_image_tokens
    assert "pixel_values" in batch and batch["pixel_values"].shape[0] == 3


def test_batch_truncates_long_texts_and_rejects_an_unspellable_marker(backbone, t2i):
    images = [t2i.targets[0].content]
    short = _verifier(backbone, t2i, max_text_tokens=3).batch(images, ["a small blue square on a gray background"])
    assert (short["labels"] != IGNORE_INDEX).sum() == 3 + 1
    bare = _verifier(backbone, t2i, marker="").batch(images, ["a red circle"])
    assert (bare["labels"] != IGNORE_INDEX).sum() == 3 + 1
    marked = _verifier(backbone, t2i).batch(images, ["a red circle"])
    assert bare["input_ids"].shape[1] == marked["input_ids"].shape[1] - 1  # no marker: one token shorter
    with pytest.raises(ConfigError, match="marker"):
        _verifier(backbone, t2i, marker="@").batch(images, ["a red circle"])


def test_mean_log_probs_equals_a_manual_computation(backbone, t2i):
    verifier = _verifier(backbone, t2i)
    images = [t.content for t in t2i.targets[:2]]
    texts = ["a red circle on a white background", "a star"]
    batch = verifier.batch(images, texts)
    with torch.no_grad():
        got = verifier.mean_log_probs(batch)
        logits = backbone.logits(batch)
    assert got.shape == (2,)
    for row in range(2):
        labels = batch["labels"][row]
        logps = []
        for pos in range(1, labels.shape[0]):
            if labels[pos] != IGNORE_INDEX:
                logps.append(torch.log_softmax(logits[row, pos - 1].double(), -1)[labels[pos]].item())
        assert len(logps) == len(backbone.tokenizer(texts[row], add_special_tokens=False)["input_ids"]) + 1
        assert got[row].item() == pytest.approx(sum(logps) / len(logps), abs=1e-5)
        assert got[row].item() < 0


def test_score_does_not_depend_on_the_batch_it_is_computed_in(backbone, t2i):
    images = [t.content for t in t2i.targets[:3]]
    texts = ["a star", "a small blue square on a gray striped background left of a red circle", "a red circle"]
    together = _verifier(backbone, t2i, batch_size=3).score(images, texts)
    alone = _verifier(backbone, t2i, batch_size=1).score(images, texts)
    assert torch.allclose(together, alone, atol=1e-4), (together, alone)


# --------------------------------------------------------------------------- training


def test_gsv_loss_steps_raise_the_positive_negative_margin(corpus):
    backbone = _backbone(corpus, seed=1)
    verifier = GenerativeVerifier(backbone)
    ims = corpus.split("train")[:4]
    images = [Content.image(im.path) for im in ims]
    positives = [im.captions[0].text for im in ims]
    negatives = positives[1:] + positives[:1]  # every text is a positive for one image and a negative for another
    pos, neg = verifier.batch(images, positives), verifier.batch(images, negatives)

    def margin() -> float:
        backbone.eval()
        with torch.no_grad():
            return (verifier.mean_log_probs(pos) - verifier.mean_log_probs(neg)).mean().item()

    before = margin()
    optimizer = torch.optim.AdamW(backbone.parameters(), lr=3e-3)
    losses = []
    backbone.train()
    for _ in range(15):
        optimizer.zero_grad()
        loss = verifier.loss(pos, neg)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    after = margin()
    assert losses[-1] < losses[0]
    # only the image tells the texts apart, so a larger margin means the model learnt to look at it
    assert after > before + 0.3, (before, after)


# --------------------------------------------------------------------------- hard negatives


def _t(target_id: str, split: str = "train", text: str = "") -> Target:
    return Target(target_id, split, Content.image(f"{target_id}.png"), text)


def test_hard_negatives_text_to_image_share_the_longest_identifier_prefix():
    captions = {"qa1": ("A", "a red circle"), "qa2": ("A", "one red circle"), "qb": ("B", "a red square"),
                "qc": ("C", "a blue star"), "qd": ("D", "a green cross"), "qe": ("E", "a pink hexagon")}
    targets = [_t("A"), _t("B"), _t("C"), _t("D"), _t("E", "test")]
    split = {"A": "train", "B": "train", "C": "train", "D": "train", "E": "test"}
    queries = [Query(q, split[im], Content.text(text), (im,)) for q, (im, text) in captions.items()]
    task = RetrievalTask("t2i", targets, queries)
    token_ids = {"A": [5, 6, 7, 2], "B": [5, 6, 8, 2], "C": [5, 9, 9, 2], "D": [4, 1, 1, 2], "E": [5, 6, 7, 3]}
    pairs = hard_negative_pairs(task, token_ids)
    # identifier order: D < A (x2) < B < C; each negative: the nearer side with the longer shared prefix
    expected = {
        "a green cross": "a red circle",  # D: only A after it (shares 0 tokens)
        "a red circle": "a red square",  # A: D before (0), B after (2) -- A's own second caption is skipped
        "one red circle": "a red square",
        "a red square": "one red circle",  # B: A before (2) beats C after (1); the nearest A pair
        "a blue star": "a red square",  # C: B before (1), nothing after
    }
    assert {p.positive: p.negative for p in pairs} == expected
    image_of = {text: im for im, text in captions.values()}
    for p in pairs:
        assert p.image == Content.image(f"{image_of[p.positive]}.png")
        assert image_of[p.negative] != image_of[p.positive]
    assert "a pink hexagon" not in {p.positive for p in pairs} | {p.negative for p in pairs}  # train only


def test_hard_negatives_image_to_text_share_the_longest_identifier_prefix():
    texts = {"a1": ("A", "a red circle"), "a2": ("A", "one red circle"), "b1": ("B", "a blue star"),
             "c1": ("C", "a green cross"), "e1": ("E", "a pink hexagon")}
    targets = [Target(c, "test" if im == "E" else "train", Content.text(text), text) for c, (im, text) in texts.items()]
    queries = [
        Query("A", "train", Content.image("A.png"), ("a1", "a2")),
        Query("B", "train", Content.image("B.png"), ("b1",)),
        Query("C", "train", Content.image("C.png"), ("c1",)),
        Query("E", "test", Content.image("E.png"), ("e1",)),
    ]
    task = RetrievalTask("i2t", targets, queries)
    token_ids = {"a1": [3, 4, 2], "a2": [7, 7, 2], "b1": [3, 5, 2], "c1": [7, 8, 2], "e1": [3, 4, 9, 2]}
    pairs = hard_negative_pairs(task, token_ids)
    # caption order: a1 [3 4] < b1 [3 5] < a2 [7 7] < c1 [7 8]
    expected = {
        "a red circle": "a blue star",  # a1: b1 after (1)
        "a blue star": "a red circle",  # b1: a1 before (1) beats a2 after (0)
        "one red circle": "a green cross",  # a2: c1 after (1) beats b1 before (0), though b1 is as near
        "a green cross": "one red circle",  # c1: a2 before (1)
    }
    assert {p.positive: p.negative for p in pairs} == expected
    image_of = {text: im for im, text in texts.values()}
    for p in pairs:
        assert p.image == Content.image(f"{image_of[p.positive]}.png")
        assert image_of[p.negative] != image_of[p.positive]


def test_hard_negatives_need_two_images():
    task = RetrievalTask("t2i", [_t("A")], [Query("q1", "train", Content.text("a red circle"), ("A",)),
                                            Query("q2", "train", Content.text("one red circle"), ("A",))])
    assert hard_negative_pairs(task, {"A": [5, 2]}) == []


# --------------------------------------------------------------------------- pipeline


def test_pipeline_with_gsv_adds_a_verified_row_with_the_same_candidates(tmp_path):
    from gcr.cli import compose, config_dir
    from gcr.train.pipeline import fit

    cfg = compose([
        f"output_dir={tmp_path / 'runs'}", f"data.root={tmp_path / 'data'}", "data.num_images=60",
        "trainer.max_epochs=1", "model.hidden_size=64", "model.num_layers=1", "decoding.num_beams=5",
        "scheme=atomic", "directions=[t2i]", "dense.enabled=false", "model.vision_init=random",
        "gsv.enabled=true", "gsv.top_k=10", "gsv.pairs_per_step=8",
    ], config_dir())
    fit(cfg)
    saved = json.loads((Path(cfg.output_dir) / cfg.run_name / "results.json").read_text())
    rows = {r["method"]: r for r in saved["rows"]}
    assert set(rows) == {"atomic", "atomic+gsv"}
    plain, verified = rows["atomic"]["metrics"], rows["atomic+gsv"]["metrics"]
    # GSV re-orders within the top 10 (all 5 beams here): it cannot change which targets are in the top 10 or 5
    assert verified["R@10"] == pytest.approx(plain["R@10"])
    assert verified["R@5"] == pytest.approx(plain["R@5"])
    assert 0.0 <= verified["R@1"] <= verified["R@5"] and 0.0 <= verified["MRR@10"] <= 1.0
    assert 0 < verified["queries_per_s"] < plain["queries_per_s"]  # verification costs time
    gsv = rows["atomic+gsv"]["index"].pop("gsv")  # how the scores were combined is recorded
    assert gsv["mode"] == "likelihood" and gsv["weight"] == 1.0 and "log softmax" in gsv["combination"]
    assert rows["atomic+gsv"]["index"] == rows["atomic"]["index"]
    assert rows["atomic+gsv"]["direction"] == "t2i"


# --------------------------------------------------------------------------- the verified window


@pytest.mark.parametrize("mode", MODES)
def test_verification_reorders_only_inside_the_candidate_set(mode, backbone, prompt_backbone, t2i):
    model = prompt_backbone if mode == "prompt" else backbone
    verifier = _verifier(model, t2i, mode=mode, weight=50.0, top_k=3)
    queries, targets, scores = _candidates(t2i, n_queries=4)
    out_targets, _ = verifier.rerank(queries, targets, scores)
    moved = 0
    for before, after in zip(targets, out_targets):
        assert sorted(after) == sorted(before)  # the same candidates
        assert set(after[:3]) == set(before[:3]) and after[3:] == before[3:]  # beyond the window: unchanged
        moved += after != before
    assert moved > 0  # weight 50: the verifier does decide the head's order


def test_window_never_splits_the_targets_of_one_identifier(backbone, t2i):
    verifier = _verifier(backbone, t2i, top_k=2)
    assert verifier.window([-1.0, -2.0, -2.0, -2.0, -3.0]) == 4  # the 2nd candidate's identifier names 3 targets
    assert verifier.window([-1.0, -2.0, -3.0]) == 2
    assert verifier.window([-1.0]) == 1 and verifier.window([]) == 0


WORDS = ("red", "blue")


class TwoWordScheme(IdentifierScheme):
    """Like semcore collisions=verify: one SID ("red") shared by all targets but one ("blue")."""

    name = "two-words"
    shares_identifiers = True

    def fit(self, targets, features=None):
        return [WORDS[i == 0] for i, _ in enumerate(targets)]


@pytest.mark.parametrize("mode", MODES)
def test_targets_sharing_an_identifier_are_ordered_by_the_verifier(mode, corpus, t2i):
    backbone = _backbone(corpus, words=(*WORDS, *reserved_words(mode)))
    scheme = TwoWordScheme()
    index = IdentifierIndex.build(scheme, [t.target_id for t in t2i.targets], scheme.fit(t2i.targets),
                                  direction="t2i", corpus_fingerprint=corpus.fingerprint())
    index.tokenize(backbone.tokenizer)
    searched = [t.target_id for t in t2i.targets][:8]  # "blue" and 7 targets sharing "red"
    retriever = ConstrainedRetriever(backbone, index, searched, num_beams=2)
    queries = [q.content for q in t2i.queries_of("train")[:3]]
    found = retriever(queries)
    shared = searched[1:]
    # top_k=2: the window widens to every target of the shared identifier, whichever identifier ranks first
    verifier = _verifier(backbone, t2i, mode=mode, top_k=2)
    out_targets, _ = verifier.rerank(queries, found.targets, found.scores)
    for query, before, gen, after in zip(queries, found.targets, found.scores, out_targets):
        assert sorted(before) == sorted(after) == sorted(searched)
        assert len({s for t, s in zip(before, gen) if t in shared}) == 1  # one SID: one generation score
        verified = verifier.score([verifier.target_contents[t] for t in shared], [query.value] * len(shared)).tolist()
        of = dict(zip(shared, verified))
        ranked = [t for t in after if t in shared]
        assert ranked == sorted(shared, key=lambda t: -of[t]), (ranked, of)  # the verifier alone orders them
        assert ranked != [t for t in before if t in shared]  # ... which the beam order alone does not


# --------------------------------------------------------------------------- prompt mode


def test_prompt_score_is_log_p_yes_under_a_manual_forward_pass(prompt_backbone, t2i):
    verifier = _verifier(prompt_backbone, t2i, mode="prompt")
    tok = prompt_backbone.tokenizer
    yes, no = (tok.convert_tokens_to_ids(w) for w in ("yes", "no"))
    assert tok.unk_token_id not in (yes, no) and verifier.answer_ids() == (yes, no)
    images = [t.content for t in t2i.targets[:2]]
    texts = ["a red circle on a white background", "a star"]
    got = verifier.score(images, texts)
    image_token = tok.convert_tokens_to_ids(tok.image_token)
    for image, text, score in zip(images, texts, got.tolist()):
        question = tok(f"does the image show {text} ? answer yes or no :", add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in question
        ids = [tok.bos_token_id, *[image_token] * prompt_backbone.num_image_tokens, tok.sep_token_id, *question]
        pixels = prompt_backbone.image_transform([image.value])
        with torch.no_grad():
            logits = prompt_backbone.model(input_ids=torch.tensor([ids]), pixel_values=pixels).logits[0, -1].double()
        assert score == pytest.approx(logits[[yes, no]].log_softmax(0)[0].item(), abs=1e-4)
        assert score != pytest.approx(logits.log_softmax(0)[yes].item(), abs=1e-4)  # normalised over {yes, no}


def test_prompt_mode_needs_a_tokenizer_that_spells_yes_and_no(backbone, t2i):
    assert {"yes", "no", "does", "image", "?"} <= set(reserved_words("prompt")) and reserved_words("likelihood") == []
    with pytest.raises(ConfigError, match="yes"):
        _verifier(backbone, t2i, mode="prompt").batch([t2i.targets[0].content], ["a red circle"])
    with pytest.raises(ConfigError, match="gsv.mode"):
        _verifier(backbone, t2i, mode="entailment")
    with pytest.raises(ConfigError, match="text"):
        _verifier(backbone, t2i, mode="prompt", prompt="does it match ?")


def test_yes_no_loss_decreases_and_separates_positives_from_hard_negatives(corpus):
    backbone = _prompt_backbone(corpus, seed=1)
    verifier = GenerativeVerifier(backbone, mode="prompt")
    ims = corpus.split("train")[:4]
    images = [Content.image(im.path) for im in ims]
    positives = [im.captions[0].text for im in ims]
    negatives = positives[1:] + positives[:1]  # only the image tells a positive from a negative
    pos, neg = verifier.batch(images, positives), verifier.batch(images, negatives)

    def gap() -> float:
        backbone.eval()
        with torch.no_grad():
            return (verifier.pair_scores(pos) - verifier.pair_scores(neg)).mean().item()

    before = gap()
    optimizer = torch.optim.AdamW(backbone.parameters(), lr=3e-3)
    losses = []
    backbone.train()
    for _ in range(15):
        optimizer.zero_grad()
        loss = verifier.loss(pos, neg)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    after = gap()
    assert after > before + 0.3, (before, after)  # log p(yes) is higher for the matching caption


# --------------------------------------------------------------------------- the command line


def _gcr(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "GCR_CONFIG_DIR"}
    return subprocess.run([sys.executable, "-m", "gcr.cli", *args], env={**env, "CI": "1", "COLUMNS": "200"},
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])


@pytest.mark.integration
def test_both_modes_compose_from_the_command_line_and_an_unknown_mode_is_refused():
    from gcr.config_checks import GSV_MODES

    assert GSV_MODES == MODES
    for mode in MODES:
        proc = _gcr("fit", "gsv.enabled=true", f"gsv.mode={mode}", "--cfg")
        assert proc.returncode == 0, proc.stderr
        assert f"mode: {mode}" in proc.stdout and "{text}" in proc.stdout
    proc = _gcr("fit", "gsv.enabled=true", "gsv.mode=entailment", "--cfg")
    assert proc.returncode != 0
    assert "gsv.mode=entailment" in proc.stderr and "likelihood, prompt" in proc.stderr
