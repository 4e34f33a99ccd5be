"""Suite-wide settings."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """One intra-op thread. On a busy 2-core machine two OpenMP threads wait on each other at every op:
    measured here, a SmolLM2 training step took ~40 s with 2 threads and ~1.6 s with 1 (tiny models: ~10x)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """40 generated shapes images at 32 px (a module may define its own ``corpus`` instead)."""
    from gcr.data.sources import load_shapes

    return load_shapes(str(tmp_path_factory.mktemp("shapes")), num_images=40, image_size=32)


@pytest.fixture(scope="module")
def dense(corpus):
    """A random-init CLIP-style dual encoder over ``corpus`` (the ``compact`` backbone's aligned towers)."""
    from gcr.dense.models import DualEncoder
    from gcr.models.tokenizer import train_corpus_tokenizer

    torch.manual_seed(0)
    tokenizer = train_corpus_tokenizer((c.text for c in corpus.captions("train")), 200)
    return DualEncoder(tokenizer, image_size=32, patch_size=8, vision_hidden_size=32, vision_layers=1,
                       text_hidden_size=32, text_layers=1, embed_dim=16)
