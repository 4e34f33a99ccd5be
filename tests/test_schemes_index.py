"""Tests of the atomic and hierarchical K-Means schemes, the identifier index and atomic artifacts."""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict

import numpy as np
import pytest
from threadpoolctl import threadpool_limits
from transformers import PreTrainedTokenizerFast

from gcr.artifacts import atomic_write, read_json, write_json
from gcr.data.corpus import Content, Target
from gcr.errors import ArtifactError, ConfigError, IdentifierError
from gcr.index import INDEX_FILE, TRIE_FILE, IdentifierIndex, tokenizer_fingerprint
from gcr.models.tokenizer import train_corpus_tokenizer
from gcr.schemes import IdentifierScheme
from gcr.schemes.atomic import AtomicScheme
from gcr.schemes.hkmeans import HierarchicalKMeansScheme

TOKEN = re.compile(r"<[^>]+>")
TEXTS = [
    "a red circle left of a blue square",
    "a green triangle above a small yellow circle",
    "two blue squares next to a large red triangle",
    "a yellow square below a green circle",
    "the small circle is right of the big square",
    "a purple triangle and an orange circle",
] * 5


@pytest.fixture(scope="module", autouse=True)
def _single_thread_kmeans():
    # Many tiny KMeans fits: OpenMP thread start-up dominates on small shared CPUs (same results).
    with threadpool_limits(limits=1):
        yield


def _targets(n: int, prefix: str = "t") -> list[Target]:
    return [Target(f"{prefix}{i}", "train", Content.text(f"caption {i}"), f"caption {i}") for i in range(n)]


def _path(identifier: str) -> str:
    """The cluster path of an hkmeans identifier (everything before the leaf position)."""
    return identifier.rsplit("<p_", 1)[0]


@pytest.fixture(scope="module")
def tokenizer():
    return train_corpus_tokenizer(TEXTS, vocab_size=200)


# --------------------------------------------------------------------------- atomic


def test_atomic_ids_are_unique_and_covered_by_new_tokens():
    scheme = AtomicScheme()
    ids = scheme.fit(_targets(25))
    assert len(set(ids)) == 25
    assert ids[0] == "<id_0>" and ids[-1] == "<id_24>"
    assert scheme.new_tokens() == ids
    assert all(TOKEN.fullmatch(i) for i in ids)  # one token each


def test_atomic_assign_continues_numbering_and_refit_restarts():
    scheme = AtomicScheme(prefix="img")
    old = scheme.fit(_targets(3))
    new = scheme.assign(_targets(2, "n"))
    assert new == ["<img_3>", "<img_4>"]
    assert not set(old) & set(new)
    assert scheme.new_tokens() == old + new
    assert scheme.fit(_targets(2)) == ["<img_0>", "<img_1>"]
    assert scheme.new_tokens() == ["<img_0>", "<img_1>"]


def test_atomic_state_dict_round_trip_through_json():
    scheme = AtomicScheme(seed=3, prefix="x")
    ids = scheme.fit(_targets(7))
    state = json.loads(json.dumps(scheme.state_dict()))
    fresh = AtomicScheme(**scheme.config())
    fresh.load_state_dict(state)
    assert fresh.new_tokens() == ids
    assert fresh.assign(_targets(1, "n")) == ["<x_7>"]
    assert fresh.config() == {"seed": 3, "prefix": "x"}


# --------------------------------------------------------------------------- hkmeans


@pytest.fixture(scope="module")
def blobs():
    """500 x 16 features from 5 well separated Gaussian blobs, and each row's blob."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(5, 16)) * 10
    blob = np.arange(500) % 5
    x = (centers[blob] + rng.normal(size=(500, 16))).astype(np.float32)
    return x, blob, centers


@pytest.fixture(scope="module")
def fitted(blobs):
    x, _, _ = blobs
    scheme = HierarchicalKMeansScheme(seed=0, k=5, leaf_size=10)
    return scheme, scheme.fit(_targets(len(x)), x)


def test_hkmeans_identifiers_are_unique_and_use_declared_tokens(fitted):
    scheme, ids = fitted
    assert len(set(ids)) == len(ids) == 500
    new = set(scheme.new_tokens())
    assert len(new) == len(scheme.new_tokens())
    for ident in ids:
        tokens = TOKEN.findall(ident)
        assert "".join(tokens) == ident
        assert tokens[-1].startswith("<p_")
        assert [t.split("_")[0] for t in tokens[:-1]] == [f"<c{d}" for d in range(len(tokens) - 1)]
        assert set(tokens) <= new


def test_hkmeans_leaves_hold_at_most_leaf_size_with_contiguous_positions(fitted):
    _, ids = fitted
    leaves: dict[str, list[int]] = defaultdict(list)
    for ident in ids:
        leaves[_path(ident)].append(int(ident.rsplit("<p_", 1)[1].rstrip(">")))
    assert all(len(positions) <= 10 for positions in leaves.values())
    assert all(sorted(positions) == list(range(len(positions))) for positions in leaves.values())
    # no leaf path is a prefix of another leaf's path (so the identifiers form a proper tree)
    paths = sorted(leaves)
    assert not any(b.startswith(a) for a, b in zip(paths, paths[1:]) if a)


def test_hkmeans_same_blob_shares_first_token_far_more_than_across_blobs(fitted, blobs):
    _, ids = fitted
    _, blob, _ = blobs
    first = np.array([TOKEN.findall(i)[0] for i in ids])
    same_token = np.equal.outer(first, first)
    same_blob = np.equal.outer(blob, blob)
    np.fill_diagonal(same_blob, False)
    across = ~np.equal.outer(blob, blob)
    assert same_token[same_blob].mean() > 0.9
    assert same_token[across].mean() < 0.1


def test_hkmeans_is_deterministic_for_a_seed():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(120, 8)).astype(np.float32)
    a = HierarchicalKMeansScheme(seed=5, k=3, leaf_size=6).fit(_targets(120), x)
    b = HierarchicalKMeansScheme(seed=5, k=3, leaf_size=6).fit(_targets(120), x.copy())
    assert a == b


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_hkmeans_splits_identical_features_and_terminates():
    scheme = HierarchicalKMeansScheme(k=3, leaf_size=4)
    ids = scheme.fit(_targets(40), np.ones((40, 8), dtype=np.float32))
    assert len(set(ids)) == 40
    assert max(Counter(_path(i) for i in ids).values()) <= 4


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_hkmeans_mixed_duplicates_and_distinct_features_get_unique_ids():
    rng = np.random.default_rng(2)
    x = np.concatenate([np.zeros((30, 4)), rng.normal(size=(10, 4)) + 5]).astype(np.float32)
    ids = HierarchicalKMeansScheme(k=2, leaf_size=3).fit(_targets(40), x)
    assert len(set(ids)) == 40
    assert max(Counter(_path(i) for i in ids).values()) <= 3


def test_hkmeans_small_corpus_is_one_leaf():
    scheme = HierarchicalKMeansScheme(k=4, leaf_size=10)
    ids = scheme.fit(_targets(6), np.random.default_rng(0).normal(size=(6, 3)))
    assert ids == [f"<p_{i}>" for i in range(6)]
    assert scheme.new_tokens() == ids


def test_hkmeans_assign_after_state_round_trip_descends_to_the_nearest_cluster(fitted, blobs):
    scheme, ids = fitted
    x, blob, centers = blobs
    fresh = HierarchicalKMeansScheme(**scheme.config())
    fresh.load_state_dict(json.loads(json.dumps(scheme.state_dict())))

    # an old target's own vector descends to exactly its old cluster path
    again = fresh.assign(_targets(len(x), "again"), x)
    assert [_path(i) for i in again] == [_path(i) for i in ids]
    assert not set(again) & set(ids)

    # new vectors near a blob center land under that blob's first token, with fresh ids
    rng = np.random.default_rng(9)
    new_blob = np.arange(20) % 5
    new_x = (centers[new_blob] + rng.normal(size=(20, 16))).astype(np.float32)
    new_ids = fresh.assign(_targets(20, "new"), new_x)
    every = ids + again + new_ids
    assert len(set(every)) == len(every)
    blob_first = {
        b: Counter(TOKEN.findall(i)[0] for i, bb in zip(ids, blob) if bb == b).most_common(1)[0][0]
        for b in range(5)
    }
    assert [TOKEN.findall(i)[0] for i in new_ids] == [blob_first[b] for b in new_blob]
    assert {t for i in new_ids for t in TOKEN.findall(i)} <= set(fresh.new_tokens())


def test_hkmeans_feature_and_option_errors(blobs):
    x, _, _ = blobs
    scheme = HierarchicalKMeansScheme(k=3, leaf_size=5)
    with pytest.raises(ConfigError, match="needs target features"):
        scheme.fit(_targets(10), None)
    with pytest.raises(ConfigError, match=r"shape \(9, 16\) for 10 targets"):
        scheme.fit(_targets(10), x[:9])
    with pytest.raises(ConfigError, match="expected \\(num_targets, dim\\)"):
        scheme.fit(_targets(16), x[0])
    with pytest.raises(ConfigError, match="fitted scheme"):
        scheme.assign(_targets(2), x[:2])
    scheme.fit(_targets(20), x[:20])
    with pytest.raises(ConfigError, match="shape"):
        scheme.assign(_targets(2), x[:3])
    with pytest.raises(ConfigError, match="k >= 2"):
        HierarchicalKMeansScheme(k=1)
    with pytest.raises(ConfigError, match="leaf_size >= 1"):
        HierarchicalKMeansScheme(leaf_size=0)
    assert HierarchicalKMeansScheme.requires.features and not AtomicScheme.requires.features


# --------------------------------------------------------------------------- IdentifierIndex


class CaptionScheme(IdentifierScheme):
    """Natural-language identifiers: the target's text (several targets may share one)."""

    name = "caption"
    shares_identifiers = True

    def fit(self, targets, features=None):
        return [t.text for t in targets]


class UniqueCaptionScheme(CaptionScheme):
    """Like CaptionScheme but claims its identifiers are unique."""

    name = "caption-unique"
    shares_identifiers = False


def _build(scheme, targets, ids, **kw):
    kw = {"direction": "t2i", "corpus_fingerprint": "fp0", **kw}
    return IdentifierIndex.build(scheme, [t.target_id for t in targets], ids, **kw)


def test_build_rejects_bad_assignments():
    scheme = AtomicScheme()
    with pytest.raises(IdentifierError, match="duplicate target ids.*'a'"):
        IdentifierIndex.build(
            scheme, ["a", "b", "a"], ["<x>", "<y>", "<z>"], direction="t2i", corpus_fingerprint="fp"
        )
    with pytest.raises(IdentifierError, match="empty identifier.*'b'"):
        IdentifierIndex.build(
            scheme, ["a", "b", "c"], ["<x>", "  ", "<z>"], direction="t2i", corpus_fingerprint="fp"
        )
    with pytest.raises(IdentifierError, match="empty identifier"):
        IdentifierIndex.build(scheme, ["a"], [""], direction="t2i", corpus_fingerprint="fp")
    with pytest.raises(IdentifierError, match="2 identifiers for 3 targets"):
        IdentifierIndex.build(
            scheme, ["a", "b", "c"], ["<x>", "<y>"], direction="t2i", corpus_fingerprint="fp"
        )
    with pytest.raises(IdentifierError, match="empty"):
        IdentifierIndex.build(scheme, [], [], direction="t2i", corpus_fingerprint="fp")


def test_build_rejects_collisions_unless_the_scheme_shares_identifiers():
    targets = [
        Target(f"t{i}", "train", Content.text(c), c) for i, c in enumerate(["red", "blue", "red", "red"])
    ]
    with pytest.raises(IdentifierError) as info:
        _build(UniqueCaptionScheme(), targets, UniqueCaptionScheme().fit(targets))
    assert "collision" in str(info.value) and "'red'" in str(info.value)

    index = _build(CaptionScheme(), targets, CaptionScheme().fit(targets))
    assert index.identifiers == ["red", "blue"]
    assert index.targets == [["t0", "t2", "t3"], ["t1"]]
    assert index.identifier_of("t2") == index.identifier_of("t3") == 0
    assert index.subset(["t3", "t1", "t0"]) == [0, 1]
    assert index.stats()["collision_rate"] == pytest.approx(3 / 4)
    with pytest.raises(IdentifierError, match="'nope' is not in the index"):
        index.identifier_of("nope")


def test_tokenize_atomic_ends_with_eos_and_round_trips(tokenizer):
    tok = train_corpus_tokenizer(TEXTS, vocab_size=200)  # own copy: new tokens are added to it
    scheme = AtomicScheme()
    targets = _targets(12)
    index = _build(scheme, targets, scheme.fit(targets))
    tok.add_tokens(scheme.new_tokens())
    index.tokenize(tok)
    assert len(index.token_ids) == 12
    for ident, ids in zip(index.identifiers, index.token_ids):
        assert ids[-1] == tok.eos_token_id and tok.eos_token_id not in ids[:-1]
        assert len(ids) == 2  # one new token + EOS
        assert tok.decode(ids[:-1]).replace(" ", "") == ident
    assert len({tuple(i) for i in index.token_ids}) == 12
    stats = index.stats()
    assert stats["mean_id_tokens"] == 1.0 and stats["max_id_tokens"] == 1 and stats["collision_rate"] == 0.0
    assert index.tokenizer_fingerprint == tokenizer_fingerprint(tok) != tokenizer_fingerprint(tokenizer)


def test_tokenize_hkmeans_maps_every_token_back(fitted):
    scheme, ids = fitted
    tok = train_corpus_tokenizer(TEXTS, vocab_size=200)
    tok.add_tokens(scheme.new_tokens())
    index = _build(scheme, _targets(len(ids)), ids).tokenize(tok)
    for ident, token_ids in zip(index.identifiers, index.token_ids):
        assert token_ids[-1] == tok.eos_token_id
        assert tok.convert_ids_to_tokens(token_ids[:-1]) == TOKEN.findall(ident)
        assert tok.decode(token_ids[:-1]).replace(" ", "") == ident
    assert index.stats()["max_id_tokens"] == max(len(TOKEN.findall(i)) for i in ids)


def test_tokenize_natural_language_identifiers(tokenizer):
    targets = [Target(f"t{i}", "train", Content.text(c), c) for i, c in enumerate(TEXTS[:6])]
    index = _build(CaptionScheme(), targets, CaptionScheme().fit(targets)).tokenize(tokenizer)
    for ident, ids in zip(index.identifiers, index.token_ids):
        assert ids[-1] == tokenizer.eos_token_id and len(ids) > 2
        assert tokenizer.decode(ids[:-1]).replace(" ", "") == ident.replace(" ", "")


def test_tokenize_without_new_tokens_reports_unknown_tokens(tokenizer):
    scheme = AtomicScheme()
    index = _build(scheme, _targets(3), scheme.fit(_targets(3)))
    with pytest.raises(IdentifierError, match="unknown to the tokenizer.*new_tokens"):
        index.tokenize(tokenizer)
    assert index.token_ids is None


def test_tokenize_rejects_identifiers_that_collide_as_token_ids(tokenizer):
    # distinct strings, but the tokenizer lower-cases: same token ids
    targets = [
        Target("a", "train", Content.text("x"), "red circle"),
        Target("b", "train", Content.text("x"), "Red Circle"),
    ]
    index = _build(UniqueCaptionScheme(), targets, UniqueCaptionScheme().fit(targets))
    with pytest.raises(IdentifierError, match="same token ids"):
        index.tokenize(tokenizer)


def _saved_index(tmp_path, tokenize: bool = False):
    """A saved hkmeans index (optionally tokenized); returns the scheme, the index and its tokenizer."""
    scheme = HierarchicalKMeansScheme(seed=1, k=3, leaf_size=4)
    x = np.random.default_rng(3).normal(size=(30, 6)).astype(np.float32)
    targets = _targets(30)
    index = _build(scheme, targets, scheme.fit(targets, x))
    tok = None
    if tokenize:
        tok = train_corpus_tokenizer(TEXTS, vocab_size=200)
        tok.add_tokens(scheme.new_tokens())
        index.tokenize(tok)
    index.save(tmp_path)
    return scheme, index, tok


def test_save_load_round_trip_restores_index_and_scheme_state(tmp_path):
    scheme, index, _ = _saved_index(tmp_path, tokenize=True)
    assert index.token_ids is not None
    assert (tmp_path / INDEX_FILE).is_file()
    loaded = IdentifierIndex.load(tmp_path, scheme="hkmeans", corpus_fingerprint="fp0", direction="t2i")
    assert loaded == index
    assert loaded.identifier_of("t17") == index.identifier_of("t17")
    assert loaded.scheme_config == {"seed": 1, "k": 3, "leaf_size": 4, "minibatch_above": 20000}

    restored = HierarchicalKMeansScheme(**loaded.scheme_config)
    restored.load_state_dict(loaded.scheme_state)
    new_x = np.random.default_rng(4).normal(size=(5, 6)).astype(np.float32)
    assert restored.assign(_targets(5, "n"), new_x) == scheme.assign(_targets(5, "n"), new_x)
    assert sorted(f.name for f in tmp_path.iterdir()) == [INDEX_FILE, TRIE_FILE]  # no temp files left behind
    assert loaded.has_trie  # read from trie.pt, not rebuilt
    assert loaded.trie().sequences() == index.token_ids
    subset = loaded.trie([3, 7])
    assert subset.sequences() == [index.token_ids[3], index.token_ids[7]]


def test_stale_saved_trie_is_rebuilt_not_trusted(tmp_path, caplog):
    _, index, _ = _saved_index(tmp_path, tokenize=True)  # trie.pt holds the trie of index.token_ids
    swapped = [index.token_ids[1], index.token_ids[0], *index.token_ids[2:]]
    write_json(tmp_path / INDEX_FILE, {**read_json(tmp_path / INDEX_FILE), "token_ids": swapped})
    loaded = IdentifierIndex.load(tmp_path)
    assert "stale" in caplog.text and not loaded.has_trie
    assert loaded.trie().sequences() == swapped != index.token_ids  # rebuilt from index.json, not trie.pt


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("scheme", {"scheme": "atomic"}),
        ("corpus_fingerprint", {"corpus_fingerprint": "other"}),
        ("direction", {"direction": "i2t"}),
    ],
)
def test_load_rejects_a_foreign_index_naming_the_field(tmp_path, field, kwargs):
    _saved_index(tmp_path)
    with pytest.raises(ArtifactError) as info:
        IdentifierIndex.load(tmp_path, **kwargs)
    message = str(info.value)
    assert f"{field}=" in message and repr(next(iter(kwargs.values()))) in message
    assert "delete it" in message


def test_load_rejects_truncated_missing_and_foreign_files(tmp_path):
    with pytest.raises(ArtifactError, match="not found"):
        IdentifierIndex.load(tmp_path)
    _saved_index(tmp_path)
    path = tmp_path / INDEX_FILE
    text = path.read_text()

    path.write_text(text[: len(text) // 2])
    with pytest.raises(ArtifactError, match="not valid JSON.*delete it"):
        IdentifierIndex.load(tmp_path)

    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ArtifactError, match="delete it"):
        IdentifierIndex.load(tmp_path)

    meta = json.loads(text)
    path.write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ArtifactError, match="format version 99"):
        IdentifierIndex.load(tmp_path)
    path.write_text(json.dumps({**meta, "kind": "dense_index"}))
    with pytest.raises(ArtifactError, match="'dense_index' artifact, expected 'identifier_index'"):
        IdentifierIndex.load(tmp_path)


def test_check_tokenizer(tmp_path, tokenizer):
    _, index, tok = _saved_index(tmp_path / "index", tokenize=True)
    index.check_tokenizer(tok)
    # the tokenizer as a model checkpoint stores it (save_pretrained / from_pretrained) is accepted
    tok.save_pretrained(tmp_path / "tok")
    reloaded = PreTrainedTokenizerFast.from_pretrained(tmp_path / "tok")
    IdentifierIndex.load(tmp_path / "index").check_tokenizer(reloaded)

    other = train_corpus_tokenizer(["completely different words here"] * 3, vocab_size=200)
    scheme = HierarchicalKMeansScheme()
    scheme.load_state_dict(index.scheme_state)
    other.add_tokens(scheme.new_tokens())
    with pytest.raises(IdentifierError, match="re-tokenize"):
        index.check_tokenizer(other)
    with pytest.raises(IdentifierError, match="re-tokenize"):
        index.check_tokenizer(tokenizer)  # same texts, but without the scheme's new tokens
    reloaded.add_tokens(["<extra>"])
    with pytest.raises(IdentifierError, match="re-tokenize"):
        index.check_tokenizer(reloaded)  # the vocabulary changed after tokenizing


# --------------------------------------------------------------------------- artifacts


def test_atomic_write_keeps_the_old_file_when_interrupted(tmp_path):
    path = tmp_path / "artifact.json"
    path.write_text("original content\n")
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_write(path, "w") as fh:
            fh.write("partial new cont")
            fh.flush()
            raise RuntimeError("interrupted mid-write")
    assert path.read_text() == "original content\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact.json"]


def test_atomic_write_replaces_on_success_and_creates_folders(tmp_path):
    path = tmp_path / "a" / "b" / "data.bin"
    with atomic_write(path) as fh:
        fh.write(b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    with atomic_write(path) as fh:
        fh.write(b"new")
    assert path.read_bytes() == b"new"
    assert [p.name for p in path.parent.iterdir()] == ["data.bin"]


def test_write_json_read_json_round_trip(tmp_path):
    payload = {"kind": "x", "values": [1, 2.5, "three"], "nested": {"a": None}}
    path = write_json(tmp_path / "x.json", payload)
    assert read_json(path) == payload
    with pytest.raises(ArtifactError, match="results not found"):
        read_json(tmp_path / "missing.json", what="results")


class ArrayStateScheme(CaptionScheme):
    """Returns a numpy array in its state: index.json could only hold its str()."""

    name = "array-state"
    shares_identifiers = False

    def fit(self, targets, features=None):
        return [t.target_id for t in targets]

    def state_dict(self):
        return {"centroids": np.zeros((2, 2))}


def test_build_refuses_a_state_that_is_not_plain_json():
    targets = [Target(f"t{i}", "train", Content.text("x"), "x") for i in range(3)]
    with pytest.raises(IdentifierError, match=r"'array-state'.*plain JSON.*tolist"):
        _build(ArrayStateScheme(), targets, ArrayStateScheme().fit(targets))
