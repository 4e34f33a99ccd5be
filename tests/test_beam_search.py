"""gcr's own beam search scoring only the allowed children from hidden states (``output_embedding``)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gcr.decoding import TokenTrie, constrained_beam_search

EOS = 0
HIDDEN = 6
FAST = settings(max_examples=30, deadline=None)


@st.composite
def identifier_sets(draw, max_size: int = 16) -> list[list[int]]:
    """Unique identifiers over tokens 1..5 (a prefix of another one before EOS included)."""
    bodies = draw(st.lists(st.lists(st.integers(1, 5), max_size=4), min_size=1, max_size=max_size, unique_by=tuple))
    return [[*body, EOS] for body in bodies]


class HiddenModel:
    """A random 'model': hidden state = table[item, position, previous token]; logits = hidden @ W.T + b."""

    def __init__(self, seed: int, batch: int, length: int, vocab: int, bias: bool) -> None:
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(batch, length, vocab + 1, HIDDEN, generator=g)
        self.weight = torch.randn(vocab, HIDDEN, generator=g)
        self.bias = torch.randn(vocab, generator=g) if bias else None
        self.vocab = vocab

    def hidden_step(self, num_beams: int):
        batch_of_row = torch.arange(self.table.shape[0]).repeat_interleave(num_beams)

        def step(tokens: torch.Tensor, state):
            t = tokens.shape[1]
            previous = tokens[:, -1] if t else torch.full_like(batch_of_row, self.vocab)
            return self.table[batch_of_row, t, previous], state

        return step

    def log_prob_step(self, num_beams: int):
        hidden = self.hidden_step(num_beams)

        def step(tokens: torch.Tensor, state):
            h, state = hidden(tokens, state)
            return torch.nn.functional.linear(h, self.weight, self.bias).log_softmax(-1), state

        return step

    def allowed_score(self, trie: TokenTrie, item: int, identifier: list[int]) -> float:
        """Sum of log-probs renormalised over the trie's children of each prefix."""
        total, previous = 0.0, self.vocab
        for t, token in enumerate(identifier):
            state = trie.walk(torch.tensor([identifier[:t]], dtype=torch.long).view(1, t))
            children = torch.nonzero(trie.allowed_mask(state)[0]).flatten()
            logits = torch.nn.functional.linear(self.table[item, t, previous], self.weight, self.bias)
            total += float(logits[token] - logits[children].logsumexp(0))
            previous = token
        return total


@FAST
@given(identifier_sets(), st.integers(0, 2**31), st.integers(1, 5), st.sampled_from([7, 40]), st.booleans())
def test_full_normalisation_ranks_like_the_full_vocabulary_path(identifiers, seed, num_beams, vocab, bias):
    """Same identifiers, order and scores as scoring every token; vocab 7 also takes the wide-node fallback."""
    batch = 2
    trie = TokenTrie.build(identifiers, vocab, EOS)
    model = HiddenModel(seed, batch, trie.max_length, vocab, bias)
    reference = constrained_beam_search(model.log_prob_step(num_beams), trie, batch, num_beams)
    own = constrained_beam_search(
        model.hidden_step(num_beams), trie, batch, num_beams, output_embedding=model.weight, output_bias=model.bias
    )
    assert own.sequences == reference.sequences
    assert torch.equal(own.identifiers, reference.identifiers)
    torch.testing.assert_close(own.scores, reference.scores, rtol=1e-5, atol=1e-5)
    for item in own.sequences:
        assert all(sequence in identifiers for sequence in item)  # every output is a valid identifier


@FAST
@given(identifier_sets(), st.integers(0, 2**31), st.sampled_from([7, 40]))
def test_allowed_normalisation_is_exhaustive_over_renormalised_scores(identifiers, seed, vocab):
    """With beams covering every identifier: each one, ranked by its trie-renormalised score."""
    batch, num_beams = 2, len(identifiers)
    trie = TokenTrie.build(identifiers, vocab, EOS)
    model = HiddenModel(seed, batch, trie.max_length, vocab, bias=True)
    out = constrained_beam_search(
        model.hidden_step(num_beams),
        trie,
        batch,
        num_beams,
        output_embedding=model.weight,
        output_bias=model.bias,
        normalize="allowed",
    )
    for item in range(batch):
        assert sorted(out.identifiers[item].tolist()) == list(range(len(identifiers)))
        assert all(sequence in identifiers for sequence in out.sequences[item])
        expected = torch.tensor([model.allowed_score(trie, item, identifiers[i]) for i in out.identifiers[item]])
        torch.testing.assert_close(out.scores[item], expected, rtol=1e-4, atol=1e-4)
        assert torch.all(out.scores[item, :-1] >= out.scores[item, 1:])


def test_hidden_path_rejects_bad_shapes_and_options():
    trie = TokenTrie.build([[1, EOS], [2, EOS]], 40, EOS)
    model = HiddenModel(0, 1, trie.max_length, 40, bias=False)
    try:
        constrained_beam_search(model.hidden_step(2), trie, 1, 2, output_embedding=model.weight, normalize="top")
    except ValueError as error:
        assert "normalize" in str(error)
    else:
        raise AssertionError("normalize='top' was accepted")
    try:
        constrained_beam_search(model.log_prob_step(2), trie, 1, 2, output_embedding=model.weight)
    except ValueError as error:
        assert "hidden states of shape" in str(error)
    else:
        raise AssertionError("log-probs were accepted as hidden states")
