"""SSI structured semantic identifiers: MLLM answer parsing, concept extraction, normalization, collisions,
the MLLM generator's retry/fallback, and state round-trips.

Real parts: the word-level tokenizer gcr builds from captions, spaCy's English pipeline (when installed, as
``gcr[parse]`` installs it), a tiny random LLaVA backbone as the MLLM, generated shapes captions.
"""

from __future__ import annotations

import json

import pytest
import torch

from gcr.data.corpus import Content, Target
from gcr.data.sources import load_shapes
from gcr.errors import ConfigError
from gcr.index import IdentifierIndex
from gcr.models.tokenizer import train_corpus_tokenizer
from gcr.schemes import build_scheme
from gcr.schemes.helpers.concepts import ROLES, LexiconConcepts, parse_fields, spacy_available
from gcr.schemes.ssi import TEMPLATE_WORDS, template_rationale

CAPTIONS = [
    "a green diamond and a big triangle",
    "a small cyan star on a striped background",
    "a large yellow triangle right of a little green rhombus over a checkered background",
    "two red crosses on a black background",
    "a red cross sits on a black background",
    "a tiny blue circle appears left of a blue star",
]
needs_spacy = pytest.mark.skipif(not spacy_available(), reason="spaCy English pipeline not installed (gcr[parse])")


def _targets(texts, split="train"):
    return [Target(f"t{i}", split, Content.text(t), t) for i, t in enumerate(texts)]


def _tokenizer(texts, extra=()):
    return train_corpus_tokenizer(texts, 500, reserved_words=[*ROLES, *TEMPLATE_WORDS, *extra])


def _scheme(texts=CAPTIONS, **options):
    scheme = build_scheme("ssi", **{"parser": "lexicon", **options})
    scheme.bind_tokenizer(_tokenizer(texts))
    return scheme


# -- parsing MLLM answers -------------------------------------------------------------------------
def test_parse_fields_reads_a_well_formed_answer():
    answer = "objects: dog, frisbee | action: jumping | attributes: brown | scene: park | rationale: A dog leaps."
    assert parse_fields(answer, ROLES) == {
        "objects": ["dog", "frisbee"], "action": ["jumping"], "attributes": ["brown"], "scene": ["park"],
        "rationale": ["A dog leaps."],
    }


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("Sure! Here you go:\nObjects: Dogs and Cats\nScene - the beach", {"objects": ["dogs", "cats"], "scene": ["the beach"]}),
        ("object = dog; verbs: run / jump; attributes: none", {"objects": ["dog"], "action": ["run", "jump"]}),
        ("* OBJECTS: star, star\n* colors: red", {"objects": ["star"], "attributes": ["red"]}),
    ],
)
def test_parse_fields_tolerates_malformed_answers(answer, expected):
    assert parse_fields(answer, ROLES) == expected


@pytest.mark.parametrize("answer", ["", "a dog in a park", "objects: | scene: none", "rationale: just because"])
def test_parse_fields_returns_none_when_nothing_is_usable(answer):
    assert parse_fields(answer, ROLES) is None


def test_parse_fields_keeps_free_form_fields_for_the_mllm_generator():
    assert parse_fields("mood: calm | objects: lake", ["mood", "objects"]) == {"mood": ["calm"], "objects": ["lake"]}


# -- concept extraction ---------------------------------------------------------------------------
def test_lexicon_parser_learns_roles_from_the_captions():
    lexicon = LexiconConcepts().fit(CAPTIONS)
    fields = lexicon.extract(["a big green rhombus on a striped background"])[0]
    assert fields["objects"] == ["rhombus"]
    assert set(fields["attributes"]) == {"big", "green"}
    assert fields["scene"] == ["striped", "background"]
    assert lexicon.roles["sits"] == "action"  # never after a determiner and no "sit" in the captions: a verb
    assert lexicon.lemma("crosses") == "cross"


def test_lexicon_parser_must_be_fitted():
    with pytest.raises(ConfigError, match="not fitted"):
        LexiconConcepts().extract(["a dog"])


@needs_spacy
def test_spacy_parser_fills_fields_by_part_of_speech():
    from gcr.schemes.helpers.concepts import SpacyConcepts

    fields = SpacyConcepts().extract(["A brown dog is jumping to catch a frisbee in the park."])[0]
    assert fields["objects"] == ["dog", "frisbee"]
    assert fields["action"][:1] == ["jump"]
    assert fields["attributes"] == ["brown"]
    assert fields["scene"] == ["park"]


# -- identifiers ----------------------------------------------------------------------------------
def test_identifiers_are_fields_in_config_order_with_sorted_concepts():
    scheme = _scheme(fields=["objects", "attributes"])
    ids = scheme.fit(_targets(CAPTIONS))
    assert ids[0] == "objects : diamond , triangle | attributes : big , green"
    for ident in ids:
        fields = [part.split(" : ")[0] for part in ident.split(" | ") if " : " in part]
        assert fields == [f for f in ("objects", "attributes") if f in fields]
        for part in ident.split(" | "):
            if " : " in part:
                concepts = part.split(" : ")[1].split(" , ")
                assert concepts == sorted(concepts)


def test_equal_meanings_give_equal_concepts():
    """Word order, plural and case do not change the concepts (collisions then tell the targets apart)."""
    scheme = _scheme()
    a, b = scheme.fit(_targets(["A Red Cross on a BLACK background", "two red crosses on a black background"]))
    assert a == "objects : cross | attributes : red | scene : background , black"
    assert b == a + " | 1"  # the same concepts: told apart by the collision suffix


def test_collisions_add_the_next_concept_then_a_number():
    same = ["a red cross on a black background"] * 3
    scheme = _scheme(texts=same + CAPTIONS, max_per_field=1, fields=["objects", "attributes", "scene"])
    ids = scheme.fit(_targets(same))
    assert len(set(ids)) == 3
    # "black" and "background" are equally specific here: the first in the description is kept
    assert ids[0] == "objects : cross | attributes : red | scene : black"
    assert ids[1] == "objects : cross | attributes : red | scene : background , black"  # the spare concept
    assert ids[2].endswith(" | 1") and ids[2].startswith(ids[1])
    index = IdentifierIndex.build(scheme, ["a", "b", "c"], ids, direction="t2i", corpus_fingerprint="x")
    assert len(index) == 3


def test_every_target_gets_a_unique_identifier_on_the_shapes_captions(tmp_path):
    corpus = load_shapes(str(tmp_path / "shapes"), num_images=80)
    texts = [c.text for c in corpus.captions("train")]
    targets = [Target(im.image_id, "train", Content.text(""), texts[i]) for i, im in enumerate(corpus.images[:60])]
    scheme = build_scheme("ssi", parser="lexicon")
    scheme.bind_tokenizer(_tokenizer(texts))
    ids = scheme.fit(targets)
    assert len(set(ids)) == len(ids) == 60
    assert scheme.stats()["wordless"] == 0
    tok = _tokenizer(texts)
    assert all(tok.unk_token_id not in tok(i, add_special_tokens=False)["input_ids"] for i in ids)


def test_words_the_tokenizer_cannot_spell_are_left_out():
    scheme = build_scheme("ssi", parser="lexicon")
    scheme.bind_tokenizer(_tokenizer(["a star on a background"]))  # knows neither "green" nor "diamond"
    ids = scheme.fit(_targets(["a green diamond on a striped background", "a star on a background"]))
    assert "green" not in ids[0] and "diamond" not in ids[0]
    assert ids[1].startswith("objects : star")


def test_field_names_must_be_spellable_and_known_to_the_parser():
    scheme = build_scheme("ssi", parser="lexicon")
    tok = train_corpus_tokenizer(CAPTIONS, 500)  # built without the scheme's reserved words
    with pytest.raises(ConfigError, match="cannot spell 'objects'"):
        scheme.bind_tokenizer(tok)
    with pytest.raises(ConfigError, match="unknown to the parser"):
        build_scheme("ssi", fields=["objects", "mood"])
    with pytest.raises(ConfigError, match="generator"):
        build_scheme("ssi", generator="oracle")
    with pytest.raises(ConfigError, match="unknown option"):
        build_scheme("ssi", fieldz=["objects"])


def test_empty_descriptions_are_rejected():
    with pytest.raises(ConfigError, match="description"):
        _scheme().fit(_targets(["a red star", "  "]))


def test_rationales_follow_the_identifier_fields():
    scheme = _scheme()
    scheme.fit(_targets(CAPTIONS[:2]))
    first, second = scheme.rationales()
    assert first == "it shows diamond and triangle that is big and green"
    assert "star" in second and "background" in second
    assert template_rationale({"scene": ["park"]}) == "it matches , on park"


def test_state_round_trip_assigns_new_targets_like_the_fitted_scheme():
    scheme = _scheme()
    ids = scheme.fit(_targets(CAPTIONS))
    new = _targets(["a big green diamond on a checkered background"], split="test")
    reloaded = build_scheme("ssi", **scheme.config())
    reloaded.bind_tokenizer(_tokenizer(CAPTIONS))
    reloaded.load_state_dict(json.loads(json.dumps(scheme.state_dict())))
    assert reloaded.assign(new) == scheme.assign(new)
    assert reloaded.assign(new)[0] not in ids


# -- the MLLM generator ---------------------------------------------------------------------------
def test_mllm_generator_retries_then_falls_back_and_counts_each_outcome():
    """A scripted MLLM: target 0 answers well at once, target 1 only to the stricter prompt, target 2 never."""
    calls = []

    def answerer(targets, prompts):
        calls.append([t.target_id for t in targets])
        strict = "answer exactly" in prompts[0]
        out = []
        for t in targets:
            if t.target_id == "t0" or (t.target_id == "t1" and strict):
                out.append("objects: diamond | attributes: green | rationale: A green diamond is big. It is.")
            else:
                out.append("I cannot tell.")
        return out

    scheme = _scheme(generator="mllm")
    scheme.answerer = answerer
    ids = scheme.fit(_targets(CAPTIONS[:3]))
    assert calls == [["t0", "t1", "t2"], ["t1", "t2"]]
    assert {k: scheme.stats()[k] for k in ("mllm_first_try", "mllm_after_retry", "mllm_fallback")} == dict.fromkeys(
        ("mllm_first_try", "mllm_after_retry", "mllm_fallback"), 1)
    assert ids[0] == "objects : diamond | attributes : green"
    assert scheme.rationales()[0] == "a green diamond is big"  # first sentence, spellable words
    assert "rhombus" in ids[2]  # from the parser


def test_mllm_generator_with_a_real_untrained_backbone_falls_back_to_the_parser(tmp_path):
    from gcr.heads.rationales import mllm_answerer
    from gcr.models.tiny import TinyBackbone

    corpus = load_shapes(str(tmp_path / "shapes"), num_images=20)
    texts = [c.text for c in corpus.captions("train")]
    torch.manual_seed(0)
    backbone = TinyBackbone.create(corpus, tokenizer=_tokenizer(texts), hidden_size=32, num_layers=1,
                                   vision_hidden_size=32, vision_layers=1, image_size=32, patch_size=8).eval()
    targets = [Target(im.image_id, "train", Content.image(im.path), texts[5 * i]) for i, im in enumerate(corpus.images[:4])]
    scheme = build_scheme("ssi", generator="mllm", parser="lexicon")
    scheme.bind_tokenizer(backbone.tokenizer)
    scheme.answerer = mllm_answerer(backbone, batch_size=2, max_new_tokens=8)
    ids = scheme.fit(targets)
    stats = scheme.stats()
    assert sum(stats[f"mllm_{k}"] for k in ("first_try", "after_retry", "fields_only", "fallback")) == 4
    assert len(set(ids)) == 4


def test_mllm_generator_needs_an_answerer():
    with pytest.raises(ConfigError, match="writes text"):
        _scheme(generator="mllm").fit(_targets(CAPTIONS[:2]))
