"""New token embeddings start from a scheme's vectors (CART codebooks), keeping their geometry."""

from __future__ import annotations

import numpy as np
import torch

from gcr.data.corpus import Caption, Corpus, ImageRecord
from gcr.models.tiny import TinyBackbone
from gcr.models.token_init import project_vectors


def _corpus(tmp_path) -> Corpus:
    captions = ("a red circle", "a blue square", "two green stars")
    images = [ImageRecord(str(i), tmp_path / f"{i}.png", "train", (Caption(f"c{i}", t, str(i)),)) for i, t in enumerate(captions)]
    return Corpus("toy", images)


def test_projection_keeps_neighbours_and_matches_the_embedding_scale():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 32)) * 5
    vectors = [centres[i % 4] + 0.1 * rng.normal(size=32) for i in range(40)]
    reference = torch.randn(100, 64) * 0.02 + 0.5
    rows = project_vectors(vectors, 64, reference=reference)
    assert rows.shape == (40, 64)
    assert abs(float(rows.std()) - float(reference.std())) < 0.2 * float(reference.std())
    distances = torch.cdist(rows, rows) + torch.eye(40) * 1e9
    nearest = distances.argmin(1)
    assert all(int(nearest[i]) % 4 == i % 4 for i in range(40)), "each row's nearest row is from its own cluster"
    again = project_vectors(vectors, 64, reference=reference)
    assert torch.equal(rows, again), "the projection is seeded"


def test_tiny_backbone_sets_new_token_rows(tmp_path):
    backbone = TinyBackbone.create(_corpus(tmp_path), vocab_size=50, hidden_size=32, num_layers=1,
                                   vision_hidden_size=32, vision_layers=1, image_size=16, patch_size=8)
    tokens = [f"<b0_{k}>" for k in range(6)]
    backbone.add_identifier_tokens(tokens)
    before = backbone.model.get_input_embeddings().weight.detach().clone()
    vectors = {t: np.eye(6, dtype=np.float32)[k] * (1 + k) for k, t in enumerate(tokens)}
    assert backbone.init_token_embeddings(vectors) == 6
    after = backbone.model.get_input_embeddings().weight.detach()
    ids = backbone.tokenizer.convert_tokens_to_ids(tokens)
    others = [i for i in range(after.shape[0]) if i not in ids]
    assert torch.equal(before[others], after[others]), "only the given tokens change"
    assert not torch.allclose(before[ids], after[ids])
    assert torch.equal(after[ids], project_vectors(list(vectors.values()), after.shape[1], reference=before))
