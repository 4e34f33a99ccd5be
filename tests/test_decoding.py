"""Tests of gcr.decoding: the CSR trie, the HF logits processor and gcr's own constrained beam search."""

from __future__ import annotations

import inspect
import io
import math
import random
from collections.abc import Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, LogitsProcessorList

from gcr.decoding import TokenTrie, TrieLogitsProcessor, constrained_beam_search
from gcr.decoding.trie import DEAD, finished_state
from gcr.errors import ArtifactError, DecodingError, IdentifierError

EOS = 0
VOCAB = 7  # EOS, tokens 1..5, and token 6 which no identifier uses
FAST = settings(max_examples=40, deadline=None)


@st.composite
def identifier_sets(draw, max_size: int = 20) -> list[list[int]]:
    """Unique identifiers over a tiny alphabet (so prefixes are shared), some the prefix of another before EOS."""
    bodies = draw(
        st.lists(st.lists(st.integers(1, 5), max_size=5), min_size=1, max_size=max_size, unique_by=tuple)
    )
    cuts = draw(st.lists(st.integers(0, 5), min_size=len(bodies), max_size=len(bodies)))
    extra = [body[:cut] for body, cut in zip(bodies, cuts) if cut < len(body)]
    unique = list(dict.fromkeys(tuple(b) for b in bodies + extra))
    draw(st.randoms(use_true_random=False)).shuffle(unique)
    return [[*body, EOS] for body in unique]


def naive_trie(identifiers: list[list[int]]) -> dict:
    """Reference trie as nested dicts; a leaf is {"id": index}."""
    root: dict = {}
    for index, identifier in enumerate(identifiers):
        node = root
        for token in identifier:
            node = node.setdefault(token, {})
        node["id"] = index
    return root


def naive_node(root: dict, prefix: list[int]) -> dict | None:
    node = root
    for token in prefix:
        if token not in node:
            return None
        node = node[token]
    return node


def prefixes_and_strays(identifiers: list[list[int]], rng: random.Random) -> list[list[int]]:
    prefixes = [identifier[:cut] for identifier in identifiers for cut in range(len(identifier) + 1)]
    strays = [[rng.randrange(VOCAB) for _ in range(rng.randint(1, 6))] for _ in range(20)]
    return prefixes + strays


def padded(rows: list[list[int]], pad: int = -1) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long)


# ---------------------------------------------------------------------------- trie


def assert_matches_naive_trie(trie: TokenTrie, identifiers: list[list[int]], rng: random.Random) -> None:
    root = naive_trie(identifiers)
    queries = prefixes_and_strays(identifiers, rng)
    states = trie.walk(padded(queries))
    allowed = trie.allowed_mask(states)
    tokens = torch.tensor([rng.randrange(VOCAB) for _ in queries])
    advanced = trie.advance(states, tokens)
    expected_advanced = trie.walk(padded([q + [int(t)] for q, t in zip(queries, tokens)]))
    for i, query in enumerate(queries):
        reference = naive_node(root, query)
        assert (int(states[i]) != DEAD) == (reference is not None), query
        assert bool(trie.is_finished(states[i])) == (reference is not None and "id" in reference), query
        children = set() if reference is None else {k for k in reference if k != "id"}
        assert set(torch.nonzero(allowed[i]).flatten().tolist()) == children, query
        assert int(trie.identifier_of(states[i : i + 1])) == (reference or {}).get("id", -1)
        assert int(advanced[i]) == int(expected_advanced[i])
    assert trie.num_identifiers == len(identifiers)
    assert trie.sequences() == identifiers
    assert trie.max_length == max(map(len, identifiers))
    # every node's edge slots are sorted by token (advance() binary-searches them)
    packed = trie.state_dict()
    for start, end in zip(packed["indptr"][:-1].tolist(), packed["indptr"][1:].tolist()):
        window = packed["child_token"][start:end]
        assert torch.equal(window.sort().values, window)


@FAST
@given(identifier_sets(), st.randoms(use_true_random=False))
def test_trie_agrees_with_naive_dict_trie(identifiers, rng):
    assert_matches_naive_trie(TokenTrie.build(identifiers, VOCAB, EOS), identifiers, rng)


@FAST
@given(identifier_sets(), st.randoms(use_true_random=False), st.integers(1, 4))
def test_inserting_in_chunks_equals_building_at_once(identifiers, rng, chunks):
    size = -(-len(identifiers) // chunks)
    trie = TokenTrie.build(identifiers[:size], VOCAB, EOS)
    states_before = trie.walk(padded(identifiers[:size]))
    for start in range(size, len(identifiers), size):
        assert trie.insert(identifiers[start : start + size]) == range(start, min(start + size, len(identifiers)))
    assert_matches_naive_trie(trie, identifiers, rng)
    assert torch.equal(trie.walk(padded(identifiers[:size])), states_before)  # old states stay valid
    assert_matches_naive_trie(trie.compact(), identifiers, rng)


def test_trie_layout_and_prefix_before_eos():
    trie = TokenTrie.build([[5, 7, 2], [5, 7, 9, 2], [3, 2], [2]], vocab_size=10, eos_token_id=2)
    # inner nodes: root, [3], [5], [5 7], [5 7 9]; the four EOS edges are the identifiers
    assert trie.num_nodes == 5 and trie.num_edges == 8
    packed = trie.state_dict()
    assert packed["indptr"].tolist() == [0, 3, 4, 5, 7, 8]
    assert packed["child_token"].tolist() == [2, 3, 5, 2, 7, 2, 9, 2]
    assert packed["child_node"].tolist() == [-5, 1, 2, -4, 3, -2, 4, -3]
    node_57 = trie.walk(torch.tensor([[5, 7]]))
    assert int(node_57) == 3
    assert torch.nonzero(trie.allowed_mask(node_57)[0]).flatten().tolist() == [2, 9]
    finished = trie.walk(torch.tensor([[5, 7, 2, -1], [5, 7, 9, 2], [3, 2, -1, -1], [2, -1, -1, -1]]))
    assert finished.tolist() == [finished_state(i) for i in range(4)]
    assert trie.identifier_of(finished).tolist() == [0, 1, 2, 3]
    assert trie.is_finished(finished).all() and not trie.is_finished(node_57).any()
    assert trie.advance(torch.tensor([DEAD, 0, 0, -2]), torch.tensor([5, 4, 12, 2])).tolist() == [DEAD] * 4
    assert not trie.allowed_mask(torch.tensor([DEAD, -2])).any()
    assert trie.tokens_of(torch.tensor([3, 1])).tolist() == [[2, -1, -1, -1], [5, 7, 9, 2]]


def test_wide_nodes_get_dense_rows_and_agree_with_the_window():
    rng = random.Random(0)
    vocab = 300
    identifiers = list(dict.fromkeys((rng.randrange(3, vocab), rng.randrange(3, vocab), 2) for _ in range(3000)))
    trie = TokenTrie.build([list(i) for i in identifiers], vocab, 2)
    layout = trie.layout()
    assert len(layout["dense_nodes"]) >= 1 and layout["window"] < 3 + max(
        sum(1 for i in identifiers if i[0] == first) for first in {i[0] for i in identifiers}
    )
    root = naive_trie([list(i) for i in identifiers])
    firsts = sorted({i[0] for i in identifiers})
    states = trie.walk(torch.tensor([[]] * 1, dtype=torch.long).view(1, 0))
    assert set(torch.nonzero(trie.allowed_mask(states)[0]).flatten().tolist()) == set(firsts)
    states = trie.walk(torch.tensor([[f] for f in firsts]))
    allowed = trie.allowed_mask(states)
    for row, first in zip(allowed, firsts):
        assert set(torch.nonzero(row).flatten().tolist()) == set(root[first])
    mixed = torch.cat([torch.zeros(1, dtype=torch.long), states, torch.tensor([DEAD, finished_state(3)])])
    scores = torch.randn(mixed.numel(), vocab)
    sync_free = trie.mask_scores_(scores.clone(), mixed, sync_free=True)
    assert torch.equal(sync_free, trie.mask_scores_(scores.clone(), mixed, sync_free=False))
    assert torch.equal(sync_free.isfinite(), trie.allowed_mask(mixed))
    # insert grows a dense row and a sparse node alike
    new = [[firsts[0], 1, 2], [vocab - 1, vocab - 1, 2]] if (vocab - 1, vocab - 1, 2) not in identifiers else []
    trie.insert(new)
    assert int(trie.identifier_of(trie.walk(torch.tensor(new)))[0]) == len(identifiers)


@pytest.mark.parametrize(
    ("identifiers", "message"),
    [
        ([], "no identifiers"),
        ([[1, 0], [2, 0], [1, 0], [3, 0], [2, 0]], r"indices \[0, 2\].*indices \[1, 4\]"),
        ([[1, 0], [1, 2]], "identifier 1 does not end with EOS"),
        ([[1, 0, 2, 0]], "EOS .* before its end"),
        ([[1, 0], [7, 0]], "identifier 1 has token 7 outside"),
        ([[-3, 0]], "token -3 outside"),
        ([[1, 0], []], "identifier 1 is empty"),
    ],
)
def test_build_rejects_invalid_identifier_sets(identifiers, message):
    with pytest.raises(IdentifierError, match=message):
        TokenTrie.build(identifiers, VOCAB, EOS)


def test_state_dict_round_trip_with_weights_only_load():
    identifiers = [[1, 2, 0], [1, 0], [3, 4, 5, 0]]
    trie = TokenTrie.build(identifiers, VOCAB, EOS)
    trie.insert([[3, 4, 0]])  # slack from insert() is packed away on save
    buffer = io.BytesIO()
    torch.save(trie.state_dict(), buffer)
    buffer.seek(0)
    loaded = TokenTrie.from_state_dict(torch.load(buffer, weights_only=True))
    assert loaded.sequences() == [*identifiers, [3, 4, 0]]
    assert loaded.nbytes() < trie.nbytes()
    for key in ("indptr", "child_token", "child_node"):
        assert torch.equal(loaded.state_dict()[key], trie.state_dict()[key])
    assert (loaded.vocab_size, loaded.eos_token_id, loaded.max_length) == (VOCAB, EOS, 4)
    assert trie.to("cpu").sequences() == loaded.sequences()
    with pytest.raises(ArtifactError, match="not a saved TokenTrie"):
        TokenTrie.from_state_dict({**trie.state_dict(), "format": "gcr.TokenTrie/1"})
    with pytest.raises(ArtifactError, match="corrupt"):
        TokenTrie.from_state_dict({**trie.state_dict(), "num_identifiers": 7})


def test_insert_keeps_indices_and_rejects_duplicates_without_changing_the_trie():
    trie = TokenTrie.build([[1, 2, 0], [3, 0]], VOCAB, EOS)
    assert trie.insert([[1, 0], [1, 2, 4, 0]]) == range(2, 4)
    assert trie.sequences() == [[1, 2, 0], [3, 0], [1, 0], [1, 2, 4, 0]] and trie.version == 1
    with pytest.raises(IdentifierError, match=r"new sequence 1 \[3, 0\] is already identifier 1"):
        trie.insert([[5, 0], [3, 0]])
    with pytest.raises(IdentifierError, match=r"new indices \[0, 2\]"):
        trie.insert([[5, 0], [4, 0], [5, 0]])
    with pytest.raises(IdentifierError, match="does not end with EOS"):
        trie.insert([[5, 5]])
    assert trie.sequences() == [[1, 2, 0], [3, 0], [1, 0], [1, 2, 4, 0]] and trie.version == 1
    assert trie.insert([]) == range(4, 4)


def test_build_scales_to_100k_identifiers():
    rng = random.Random(0)
    identifiers = list(
        {tuple(rng.randrange(3, 32000) for _ in range(rng.randint(1, 12))) + (2,) for _ in range(100_000)}
    )
    trie = TokenTrie.build(identifiers, 32000, 2)
    assert trie.num_identifiers == len(identifiers)
    sample = rng.sample(range(len(identifiers)), 500)
    leaves = trie.walk(padded([list(identifiers[i]) for i in sample]))
    assert trie.identifier_of(leaves).tolist() == sample


# ---------------------------------------------------------------------------- own beam search


def table_step_fn(table: torch.Tensor, num_beams: int):
    """Step function whose log-probs depend on (batch item, position, previous token) via ``table``.

    ``table`` is ``(B, L, VOCAB + 1, VOCAB)`` log-probs; previous token ``VOCAB`` stands for "start".
    """
    batch_of_row = torch.arange(table.shape[0]).repeat_interleave(num_beams)

    def step(tokens: torch.Tensor, state):
        t = tokens.shape[1]
        previous = tokens[:, -1] if t else torch.full_like(batch_of_row, VOCAB)
        return table[batch_of_row, t, previous], state

    return step


def exact_score(table: torch.Tensor, item: int, identifier: list[int]) -> float:
    previous = [VOCAB, *identifier[:-1]]
    return sum(float(table[item, t, p, tok]) for t, (p, tok) in enumerate(zip(previous, identifier)))


def random_table(seed: int, batch: int, length: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, VOCAB + 1, VOCAB, generator=generator).mul(2).log_softmax(-1)


@FAST
@given(identifier_sets(), st.integers(0, 2**31), st.integers(0, 3), st.sampled_from([0.0, 1.0, -0.5]))
def test_beam_search_is_exhaustive_when_beams_cover_all_identifiers(identifiers, seed, spare, length_penalty):
    batch, num_beams = 2, len(identifiers) + spare
    table = random_table(seed, batch, max(map(len, identifiers)))
    trie = TokenTrie.build(identifiers, VOCAB, EOS)
    out = constrained_beam_search(
        table_step_fn(table, num_beams), trie, batch, num_beams, length_penalty=length_penalty
    )
    for item in range(batch):
        scored = sorted(
            ((exact_score(table, item, s) / len(s) ** length_penalty, i) for i, s in enumerate(identifiers)),
            reverse=True,
        )
        found = out.identifiers[item, : len(identifiers)].tolist()
        assert sorted(found) == list(range(len(identifiers)))
        assert (out.identifiers[item, len(identifiers) :] == -1).all()
        assert out.sequences[item] == [identifiers[i] for i in found]
        expected = torch.tensor([score for score, _ in scored])
        torch.testing.assert_close(out.scores[item, : len(identifiers)], expected, rtol=1e-5, atol=1e-5)


@FAST
@given(identifier_sets(), st.integers(0, 2**31), st.integers(1, 4))
def test_pruned_beam_search_returns_distinct_valid_identifiers_with_exact_scores(
    identifiers, seed, num_beams
):
    table = random_table(seed, 1, max(map(len, identifiers)))
    trie = TokenTrie.build(identifiers, VOCAB, EOS)
    out = constrained_beam_search(table_step_fn(table, num_beams), trie, 1, num_beams)
    found = [i for i in out.identifiers[0].tolist() if i >= 0]
    assert 1 <= len(found) <= num_beams and len(set(found)) == len(found)
    assert out.sequences[0] == [identifiers[i] for i in found]
    scores = out.scores[0, : len(found)]
    assert torch.all(scores[:-1] >= scores[1:])
    torch.testing.assert_close(scores, torch.tensor([exact_score(table, 0, identifiers[i]) for i in found]))


# ---------------------------------------------------------------------------- processor, without a model


@FAST
@given(identifier_sets(), st.randoms(use_true_random=False), st.integers(1, 4), st.integers(1, 3))
def test_processor_tracks_reordered_beams(identifiers, rng, num_beams, batch):
    """Drive the processor like beam search: rows are reshuffled within each group every step."""
    trie = TokenTrie.build(identifiers, VOCAB, EOS)
    root = naive_trie(identifiers)
    prompt_length, pad = 2, 6
    processor = TrieLogitsProcessor(trie, prompt_length, EOS, pad_token_id=pad, num_beams=num_beams)
    rows = [[9, 9] for _ in range(batch * num_beams)]
    for _ in range(trie.max_length + 2):
        masked = processor(torch.tensor(rows), torch.zeros(len(rows), VOCAB))
        for row, scores in zip(rows, masked):
            generated = row[prompt_length:]
            if EOS in generated:
                expected = {EOS, pad}
            else:
                expected = {k for k in naive_node(root, generated) if k != "id"}
            assert set(torch.nonzero(scores.isfinite()).flatten().tolist()) == expected
        new_rows = []
        for group in range(batch):
            for _ in range(num_beams):
                parent = rng.randrange(group * num_beams, (group + 1) * num_beams)
                choices = torch.nonzero(masked[parent].isfinite()).flatten().tolist()
                new_rows.append(rows[parent] + [rng.choice(choices)])
        rows = new_rows


def test_processor_ends_off_trie_rows_and_check_raises():
    trie = TokenTrie.build([[1, 2, 0], [3, 0]], VOCAB, EOS)
    processor = TrieLogitsProcessor(trie, prompt_length=1, eos_token_id=EOS)
    masked = processor(torch.tensor([[9, 1, 2], [9, 1, 4]]), torch.zeros(2, VOCAB))
    assert torch.nonzero(masked[0].isfinite()).flatten().tolist() == [EOS] and masked[0, EOS] == 0
    assert torch.nonzero(masked[1].isfinite()).flatten().tolist() == [EOS] and masked[1, EOS] == -1e9
    with pytest.raises(DecodingError, match="left the identifier trie in 1 row-step"):
        processor.check()
    processor.reset()
    processor.check()  # a fresh start has nothing to report
    finished = processor(torch.tensor([[9, 3, 0, 0]]), torch.zeros(1, VOCAB))
    assert torch.nonzero(finished[0].isfinite()).flatten().tolist() == [EOS]


def test_processor_masks_a_copy_when_not_in_place():
    trie = TokenTrie.build([[1, 2, 0], [3, 0]], VOCAB, EOS)
    scores = torch.zeros(1, VOCAB + 3)  # model vocabulary padded past the trie's
    copy = TrieLogitsProcessor(trie, prompt_length=0, eos_token_id=EOS, inplace=False)(
        torch.zeros(1, 0, dtype=torch.long), scores
    )
    assert scores.isfinite().all()
    assert torch.nonzero(copy[0].isfinite()).flatten().tolist() == [1, 3]
    TrieLogitsProcessor(trie, prompt_length=0, eos_token_id=EOS)(torch.zeros(1, 0, dtype=torch.long), scores)
    assert torch.nonzero(scores[0].isfinite()).flatten().tolist() == [1, 3]


# ---------------------------------------------------------------------------- with a tiny HF model

HF_VOCAB, HF_EOS, HF_PAD = 50, 2, 0


@pytest.fixture(scope="module")
def model() -> Iterator[LlamaForCausalLM]:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=HF_VOCAB,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=HF_EOS,
        pad_token_id=HF_PAD,
    )
    yield LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def hf_identifiers() -> list[list[int]]:
    rng = random.Random(3)
    bodies = {tuple(rng.randrange(3, 12) for _ in range(rng.randint(0, 4))) for _ in range(40)}
    bodies |= {body[:1] for body in bodies}  # some identifiers are prefixes of others before EOS
    return [[*body, HF_EOS] for body in sorted(bodies)]


PROMPTS = torch.tensor([[1, 5, 6, 7], [1, 8, 9, 10]])


def hf_beam_search(model, trie, num_beams: int) -> tuple[list[list[list[int]]], torch.Tensor]:
    processor = TrieLogitsProcessor(trie, PROMPTS.shape[1], HF_EOS, pad_token_id=HF_PAD, num_beams=num_beams)
    with torch.no_grad():
        out = model.generate(
            PROMPTS,
            attention_mask=torch.ones_like(PROMPTS),
            num_beams=num_beams,
            num_return_sequences=num_beams,
            do_sample=False,
            length_penalty=0.0,
            logits_processor=LogitsProcessorList([processor]),
            max_new_tokens=trie.max_length + 1,
            return_dict_in_generate=True,
            output_scores=True,
        )
    rows = [row[: row.index(HF_EOS) + 1] for row in out.sequences[:, PROMPTS.shape[1] :].tolist()]
    return [rows[b * num_beams : (b + 1) * num_beams] for b in range(len(PROMPTS))], out.sequences_scores


def model_step_fn(model, num_beams: int):
    """Step function over the HF model with its KV cache; the prompt is fed on the first call."""
    prompts = PROMPTS.repeat_interleave(num_beams, dim=0)

    # transformers' v5 Cache API: the caller owns a DynamicCache and passes it as `cache` (`past_key_values`
    # before 5.24, deprecated since).
    keyword = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def step(tokens: torch.Tensor, cache):
        with torch.no_grad():
            if cache is None:
                cache = DynamicCache(config=model.config)
                out = model(input_ids=prompts, use_cache=True, **{keyword: cache})
            else:
                out = model(input_ids=tokens[:, -1:], use_cache=True, **{keyword: cache})
        return out.logits[:, -1].float().log_softmax(-1), cache

    def reorder(cache, beam_idx: torch.Tensor):
        cache.reorder_cache(beam_idx)
        return cache

    return step, reorder


@pytest.mark.parametrize("num_beams", [2, 4, 8])
def test_hf_generate_with_processor_returns_distinct_valid_identifiers(model, hf_identifiers, num_beams):
    trie = TokenTrie.build(hf_identifiers, HF_VOCAB, HF_EOS)
    assert num_beams <= len(hf_identifiers)
    per_item, _ = hf_beam_search(model, trie, num_beams)
    for rows in per_item:
        assert all(row in hf_identifiers for row in rows)
        assert len({tuple(row) for row in rows}) == num_beams


@pytest.mark.parametrize("num_beams", [3, 6])
def test_own_beam_search_matches_hf_generate(model, hf_identifiers, num_beams):
    trie = TokenTrie.build(hf_identifiers, HF_VOCAB, HF_EOS)
    hf_rows, hf_scores = hf_beam_search(model, trie, num_beams)
    step, reorder = model_step_fn(model, num_beams)
    out = constrained_beam_search(step, trie, len(PROMPTS), num_beams, reorder_fn=reorder)
    assert out.sequences == hf_rows
    torch.testing.assert_close(out.scores.flatten(), hf_scores, rtol=1e-4, atol=1e-4)


def test_hf_greedy_generate_matches_one_beam(model, hf_identifiers):
    trie = TokenTrie.build(hf_identifiers, HF_VOCAB, HF_EOS)
    processor = TrieLogitsProcessor(trie, PROMPTS.shape[1], HF_EOS, pad_token_id=HF_PAD)
    with torch.no_grad():
        out = model.generate(
            PROMPTS,
            attention_mask=torch.ones_like(PROMPTS),
            do_sample=False,
            num_beams=1,
            logits_processor=LogitsProcessorList([processor]),
            max_new_tokens=trie.max_length + 2,
        )
    rows = [row[: row.index(HF_EOS) + 1] for row in out[:, PROMPTS.shape[1] :].tolist()]
    step, reorder = model_step_fn(model, 1)
    own = constrained_beam_search(step, trie, len(PROMPTS), 1, reorder_fn=reorder)
    assert [seqs[0] for seqs in own.sequences] == rows


def test_own_beam_search_with_model_is_exhaustive(model, hf_identifiers):
    trie = TokenTrie.build(hf_identifiers, HF_VOCAB, HF_EOS)
    num_beams = len(hf_identifiers)
    step, reorder = model_step_fn(model, num_beams)
    out = constrained_beam_search(step, trie, len(PROMPTS), num_beams, reorder_fn=reorder)
    # Score every identifier with teacher forcing and compare the rankings.
    with torch.no_grad():
        for item, prompt in enumerate(PROMPTS.tolist()):
            exact = []
            for identifier in hf_identifiers:
                logits = model(input_ids=torch.tensor([prompt + identifier[:-1]])).logits[
                    0, len(prompt) - 1 :
                ]
                exact.append(float(logits.log_softmax(-1).gather(1, torch.tensor(identifier)[:, None]).sum()))
            order = sorted(range(len(exact)), key=lambda i: -exact[i])
            assert out.identifiers[item].tolist() == order
            assert all(
                math.isclose(a, exact[i], abs_tol=1e-4) for a, i in zip(out.scores[item].tolist(), order)
            )


def test_hf_sampling_with_processor_stays_in_trie(model, hf_identifiers):
    trie = TokenTrie.build(hf_identifiers, HF_VOCAB, HF_EOS)
    processor = TrieLogitsProcessor(trie, PROMPTS.shape[1], HF_EOS, pad_token_id=HF_PAD, num_beams=3)
    torch.manual_seed(1)
    with torch.no_grad():
        out = model.generate(
            PROMPTS,
            attention_mask=torch.ones_like(PROMPTS),
            do_sample=True,
            num_return_sequences=3,
            logits_processor=LogitsProcessorList([processor]),
            max_new_tokens=trie.max_length + 2,
        )
    for row in out[:, PROMPTS.shape[1] :].tolist():
        assert row[: row.index(HF_EOS) + 1] in hf_identifiers
        assert set(row[row.index(HF_EOS) + 1 :]) <= {HF_PAD}
    processor.check()


@st.composite
def hf_identifier_sets(draw) -> list[list[int]]:
    """Identifiers over a slice of the tiny model's vocabulary, some of them prefixes of others."""
    bodies = draw(st.lists(st.lists(st.integers(3, 9), max_size=4), min_size=2, max_size=16, unique_by=tuple))
    return [[*body, HF_EOS] for body in bodies]


@settings(max_examples=12, deadline=None)
@given(hf_identifier_sets(), st.integers(2, 5), st.booleans())
def test_hf_processor_and_own_beam_search_agree_on_any_identifier_set(model, identifiers, num_beams, grow):
    """Same model, same trie: generate() with the processor and gcr's beam search return the same ranking.

    With ``grow`` the trie is built from half the set and the rest inserted, as a growing corpus would.
    """
    num_beams = min(num_beams, len(identifiers))
    if grow:
        trie = TokenTrie.build(identifiers[: len(identifiers) // 2], HF_VOCAB, HF_EOS)
        trie.insert(identifiers[len(identifiers) // 2 :])
    else:
        trie = TokenTrie.build(identifiers, HF_VOCAB, HF_EOS)
    hf_rows, hf_scores = hf_beam_search(model, trie, num_beams)
    step, reorder = model_step_fn(model, num_beams)
    own = constrained_beam_search(step, trie, len(PROMPTS), num_beams, reorder_fn=reorder)
    for item in range(len(PROMPTS)):
        assert all(row in identifiers for row in own.sequences[item])  # every decoded sequence is valid
        assert own.sequences[item] == hf_rows[item]
        assert [identifiers[i] for i in own.identifiers[item].tolist()] == own.sequences[item]
    torch.testing.assert_close(own.scores.flatten(), hf_scores, rtol=1e-4, atol=1e-4)


@FAST
@given(identifier_sets(max_size=12), st.integers(0, 2**31))
def test_inserted_identifier_is_found_by_decoding(identifiers, seed):
    """A step function that prefers one new identifier above all: after insert() decoding must return it."""
    *old, new = identifiers
    if not old:
        return
    table = random_table(seed, 1, max(map(len, identifiers)))
    previous = [VOCAB, *new[:-1]]
    for t, (p, token) in enumerate(zip(previous, new)):
        table[0, t, p, token] = 50.0  # far above any log-prob: `new` beats every other identifier
    trie = TokenTrie.build(old, VOCAB, EOS)
    before = constrained_beam_search(table_step_fn(table, 1), trie, 1, 1)
    assert before.sequences[0] != [new]
    assert trie.insert([new]) == range(len(old), len(old) + 1)
    after = constrained_beam_search(table_step_fn(table, 1), trie, 1, 1)
    assert after.sequences[0] == [new] and after.identifiers[0, 0] == len(old)
    exhaustive = constrained_beam_search(table_step_fn(table, len(identifiers)), trie, 1, len(identifiers))
    assert sorted(exhaustive.identifiers[0].tolist()) == list(range(len(identifiers)))


@FAST
@given(identifier_sets(), st.randoms(use_true_random=False), st.booleans())
def test_all_masking_paths_agree(identifiers, rng, kernel):
    """The host-sync-free path (accelerators), the CPU kernel and the eager CPU path give the same scores.

    Over 7 tokens the root often allows more than half of them (its forbidden tokens are listed instead).
    """
    trie = TokenTrie.build(identifiers, VOCAB, EOS)
    trie.cpu_kernel = kernel
    states = trie.walk(padded(prefixes_and_strays(identifiers, rng)))
    scores = torch.randn(states.numel(), VOCAB + 2)
    sync_free = trie.mask_scores_(scores.clone(), states, sync_free=True)
    cpu = trie.mask_scores_(scores.clone(), states, sync_free=False)
    assert torch.equal(sync_free, cpu)
    assert torch.equal(sync_free[:, :VOCAB].isfinite(), trie.allowed_mask(states))
    assert not sync_free[:, VOCAB:].isfinite().any()


@pytest.mark.parametrize("kernel", [True, False])
def test_masking_paths_agree_at_wide_dense_and_complement_nodes(kernel):
    """Rows at a dense node of middling width, at a node allowing most tokens, and at narrow nodes, in one step."""
    rng = random.Random(1)
    vocab = 400
    firsts = rng.sample(range(3, vocab), 300)  # the root allows 300 of 400 tokens: a complement node
    identifiers = {(f, 2) for f in firsts}
    identifiers |= {(firsts[0], t, 2) for t in rng.sample(range(3, vocab), 120)}  # middling: a dense row
    identifiers |= {(firsts[1], t, u, 2) for t in range(3, 8) for u in range(3, 6)}  # narrow nodes
    trie = TokenTrie.build([list(i) for i in sorted(identifiers)], vocab, 2)
    trie.cpu_kernel = kernel
    assert trie.layout()["complement_nodes"] == [0] and len(trie.layout()["dense_nodes"]) >= 1
    prefixes = [[], [firsts[0]], [firsts[1]], [firsts[1], 3], [firsts[2], 2], [7, 7], [firsts[0]]] * 3
    states = trie.walk(padded(prefixes))
    scores = torch.randn(states.numel(), vocab + 3)
    expected = trie.mask_scores_(scores.clone(), states, sync_free=True)
    assert torch.equal(trie.mask_scores_(scores.clone(), states, sync_free=False), expected)
    root = naive_trie([list(i) for i in sorted(identifiers)])
    for row, prefix in zip(expected, prefixes):
        node = naive_node(root, prefix)
        allowed = set() if node is None else {k for k in node if k != "id"}
        assert set(torch.nonzero(row.isfinite()).flatten().tolist()) == allowed
    tokens = torch.tensor([rng.choice([firsts[0], 2, 5, 3]) for _ in prefixes])
    reference = trie.walk(padded([p + [int(t)] for p, t in zip(prefixes, tokens)]))
    trie.cpu_kernel = not kernel
    assert torch.equal(trie.advance(states, tokens), reference)
