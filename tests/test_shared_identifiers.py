"""Retrieval with identifiers shared across splits returns only the targets being searched.

Real parts: the shapes corpus, gcr's word tokenizer, a tiny random LLaVA backbone, the trie decoder.
"""

from __future__ import annotations

import pytest
import torch

from gcr.data.corpus import retrieval_task
from gcr.data.sources import load_shapes
from gcr.index import IdentifierIndex
from gcr.models.tiny import TinyBackbone
from gcr.models.tokenizer import train_corpus_tokenizer
from gcr.retrieval import ConstrainedRetriever
from gcr.schemes.base import IdentifierScheme

TINY = dict(hidden_size=32, num_layers=1, num_heads=2, vision_hidden_size=32, vision_layers=1, image_size=32,
            patch_size=8)
WORDS = ("red", "blue", "green")


class ThreeWordScheme(IdentifierScheme):
    """Every target gets one of three colour words, round robin: each word names train, val and test targets."""

    name = "three-words"
    shares_identifiers = True

    def fit(self, targets, features=None):
        return [WORDS[i % len(WORDS)] for i, _ in enumerate(targets)]


@pytest.fixture(scope="module")
def shared_index(tmp_path_factory):
    corpus = load_shapes(str(tmp_path_factory.mktemp("shapes")), num_images=30)
    task = retrieval_task(corpus, "t2i")
    tokenizer = train_corpus_tokenizer((c.text for c in corpus.captions("train")), 300, reserved_words=WORDS)
    torch.manual_seed(0)
    backbone = TinyBackbone.create(corpus, tokenizer=tokenizer, **TINY).eval()
    scheme = ThreeWordScheme()
    index = IdentifierIndex.build(scheme, [t.target_id for t in task.targets], scheme.fit(task.targets),
                                  direction="t2i", corpus_fingerprint=corpus.fingerprint())
    index.tokenize(tokenizer)
    return task, index, backbone


def test_shared_identifier_expands_only_to_searched_targets(shared_index):
    task, index, backbone = shared_index
    test_targets = {t.target_id for t in task.targets_of("test")}
    # the premise: every identifier also names targets outside the test split
    for position in index.subset(test_targets):
        assert set(index.targets[position]) - test_targets
    retriever = ConstrainedRetriever(backbone, index, test_targets, num_beams=len(WORDS))
    out = retriever([q.content for q in task.queries_of("test")[:4]])
    for ranked, scores in zip(out.targets, out.scores):
        assert set(ranked) <= test_targets
        assert set(ranked) == test_targets  # all three identifiers decoded: every test target, once
        assert len(ranked) == len(scores) and scores == sorted(scores, reverse=True)


def test_unrestricted_retriever_still_returns_every_sharing_target(shared_index):
    task, index, backbone = shared_index
    retriever = ConstrainedRetriever(backbone, index, num_beams=len(WORDS))
    out = retriever([task.queries_of("test")[0].content])
    assert set(out.targets[0]) == {t.target_id for t in task.targets}


def test_a_single_searchable_identifier_is_retrieved(shared_index):
    """One identifier in the searched set: beam search degenerates to greedy (num_beams=1), which HF returns
    without sequence scores; the retriever still returns every target it names, with a finite score."""
    task, index, backbone = shared_index
    test_targets = [t.target_id for t in task.targets_of("test")]
    one = [t for t in test_targets if index.identifier_of(t) == index.identifier_of(test_targets[0])]
    retriever = ConstrainedRetriever(backbone, index, one, num_beams=5)
    assert retriever.num_beams == 1
    out = retriever([q.content for q in task.queries_of("test")[:3]])
    for ranked, scores in zip(out.targets, out.scores):
        assert ranked == one or set(ranked) == set(one)
        assert all(-1e6 < s <= 0 for s in scores)  # finite log-probabilities (under the constraint)
