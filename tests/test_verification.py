"""Generative Semantic Verification (GSV): scoring, re-ranking, training loss, hard negatives, pipeline rows.

Real parts only: a tiny LLaVA backbone (random init) on generated shapes images, its word-level tokenizer,
and a one-epoch pipeline run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gcr.data.corpus import Content, Query, RetrievalTask, Target, retrieval_task
from gcr.data.sources import load_shapes
from gcr.errors import ConfigError
from gcr.heads.verification import GenerativeVerifier, hard_negative_pairs
from gcr.models.base import IGNORE_INDEX
from gcr.models.tiny import TinyBackbone

TINY = dict(
    vocab_size=200, hidden_size=64, num_layers=1, num_heads=2, vision_hidden_size=32, vision_layers=1,
    image_size=32, patch_size=8,
)  # fmt: skip



@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return load_shapes(str(tmp_path_factory.mktemp("shapes20")), num_images=20)


def _backbone(corpus, seed: int = 0) -> TinyBackbone:
    torch.manual_seed(seed)
    return TinyBackbone.create(corpus, **TINY).eval()


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
        # every head score is the generation score + weight * the pair's own verification score
        verified = verifier.score([contents[t] for t in before[:4]], [query.value] * 4).tolist()
        expected = {t: g + v for t, g, v in zip(before[:4], gen, verified)}
        for t, s in zip(after[:4], combined[:4]):
            assert s == pytest.approx(expected[t], abs=1e-5)


def test_rerank_with_equal_generation_scores_follows_the_verifier_and_weight_zero_changes_nothing(backbone, t2i):
    queries, targets, scores = _candidates(t2i)
    verifier = _verifier(backbone, t2i, weight=1.0, top_k=4)
    tied = [[-1.0] * 6 for _ in queries]
    out_targets, _ = verifier.rerank(queries, targets, tied)
    changed = 0
    for query, before, after in zip(queries, targets, out_targets):
        verified = verifier.score([verifier.target_contents[t] for t in before[:4]], [query.value] * 4).tolist()
        of = dict(zip(before[:4], verified))
        assert all(of[a] >= of[b] - 1e-5 for a, b in zip(after[:3], after[1:4])), (after, of)
        changed += after != before
    assert changed > 0  # the model's verification does re-order (so the weight=0 check below means something)

    off = _verifier(backbone, t2i, weight=0.0, top_k=4)
    out_targets, out_scores = off.rerank(queries, targets, scores)
    assert out_targets == targets and out_scores == scores
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
    assert rows["atomic+gsv"]["index"] == rows["atomic"]["index"]
    assert rows["atomic+gsv"]["direction"] == "t2i"
