"""Structured Semantic Identifiers (SSI): concept-level words in fixed fields, in the model's own vocabulary.

``objects: dog, frisbee | action: jump | attributes: brown | scene: park`` -- the field set and order
come from the config (``fields``); empty fields are left out. Concepts are normalized (lemmas, lower
case, sorted within a field) so that equal meanings give equal identifiers, and each field keeps its
``max_per_field`` most *specific* concepts (rarest across targets first). No new tokens are added.

Generators:

* ``parser`` -- a deterministic concept extractor over the target's description
  (:mod:`gcr.schemes.helpers.concepts`: spaCy when installed, else a lexicon learned from the descriptions).
* ``llm`` -- a language model of its own, chosen independently of the retriever (``generator_path``: any HF
  causal or image-text-to-text checkpoint; by default the packaged SmolLM2-135M-Instruct, offline, reading
  the description as text), prompted with a few-shot structured format
  (:mod:`gcr.schemes.helpers.llm_fields`); the same answer ends with a ``because:`` sentence, the rationale.
  Answers are cached on disk (:mod:`gcr.schemes.helpers.answer_cache`).
* ``mllm`` -- the run's own backbone is prompted with the target (image) and its description.

With ``llm`` and ``mllm`` each answer is validated against the field schema; an incomplete one is retried
with a stricter prompt (``llm_attempts`` in all), and targets without usable fields fall back to the parser
(and the templated rationale). :meth:`SsiScheme.stats` counts each outcome.

Collisions: the target's next most specific concept is added, then a number. Every target also gets a
one-sentence *rationale* (:meth:`SsiScheme.rationales`), the model's ``because:`` sentence or templated from
the fields, which Rationale-Guided Supervision (``rgs.enabled``) trains on.

As with ``semcore``, the scheme reads ``Target.text``: the pipeline replaces it with a leakage-free
description (``description=heldout|generated``), so no test query builds its own target's identifier.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np

from gcr.data.corpus import Target
from gcr.errors import ConfigError
from gcr.schemes.base import IdentifierScheme, SchemeContext
from gcr.schemes.helpers.answer_cache import AnswerCache, answers_key, targets_fingerprint
from gcr.schemes.helpers.concepts import ROLES, LexiconConcepts, build_extractor
from gcr.schemes.helpers.llm_fields import Answerer, answer_with_retries, field_prompt, validate_answer
from gcr.schemes.helpers.options import SchemeOptions, SchemeRequirements, invalid, option
from gcr.schemes.helpers.suffixes import PrefixCounter
from gcr.schemes.helpers.words import Spellable, require_descriptions, spelled_number, tokenizer_spelling

log = logging.getLogger("gcr")
#: Words of :func:`template_rationale` (a corpus-built tokenizer reserves them, like the field names).
TEMPLATE_WORDS = ("it", "shows", "matches", "that", "is", "and", "on")
#: ``generator=mllm``: first prompt, then the stricter retry; ``{fields}`` is the field list.
PROMPTS = (
    "{description} . list the {fields} of this image, then a rationale . answer :",
    "{description} . answer exactly as ' {example} | rationale : <one sentence> ' . answer :",
)
#: Fields and rationale of one target: concepts per field, and the model's sentence (``None``: templated).
Generated = tuple[dict[str, list[str]], str | None]


class SsiScheme(IdentifierScheme):
    """SSI: concept words in fixed fields (objects | action | attributes | scene); no new tokens."""

    name = "ssi"
    requires = SchemeRequirements(descriptions=True, words=True, rationales=True)

    @property
    def requirements(self) -> SchemeRequirements:
        """``generator=mllm`` asks the run for a model that writes the fields (``llm`` brings its own)."""
        return replace(self.requires, text_generator=self.options.generator == "mllm")

    def prepare(self, context: SchemeContext) -> None:
        super().prepare(context)
        if self.options.generator == "mllm":
            self.answerer = context.generator
        self._cache_dir = self.llm_cache_dir or context.cache_dir

    @dataclass
    class Options(SchemeOptions):
        fields: list[str] = option(default_factory=lambda: list(ROLES), doc="field set and order")
        max_per_field: int = option(3, ge=1, doc="most specific concepts kept per field")
        generator: Literal["parser", "llm", "mllm"] = "parser"
        generator_path: Any = option(None, doc="generator=llm: HF checkpoint folder or hub name; null: packaged SmolLM2")
        parser: Literal["auto", "spacy", "lexicon"] = "auto"
        llm_attempts: int = option(2, ge=1, doc="generator=llm|mllm: tries per target before the parser")
        llm_batch_size: int = option(16, ge=1, doc="generator=llm: prompts per generate() call")
        llm_max_new_tokens: int = option(80, ge=8, doc="generator=llm: longest answer, in tokens")
        llm_device: str = "auto"
        llm_cache_dir: Any = option(None, doc="generator=llm: where answers are cached; null: the run's cache_dir")
        field_separator: str = "|"

        def check(self) -> None:
            if not self.fields or len(set(self.fields)) != len(self.fields):
                raise invalid("fields", self.fields, "a list naming at least one field, each once")
            unknown = [f for f in self.fields if f not in ROLES]
            if self.generator in ("parser", "llm") and unknown:
                role = "uses" if self.generator == "parser" else "falls back to (its examples fill the same)"
                raise ConfigError(
                    f"scheme.fields {unknown} are unknown to the parser that generator={self.generator} {role}: it "
                    f"fills {', '.join(ROLES)}; use scheme.generator=mllm for free-form fields"
                )
            for name in ("generator_path", "llm_cache_dir"):
                value = getattr(self, name)
                if value is not None and (not isinstance(value, str) or not value.strip()):
                    raise invalid(name, value, "a path (or hub name), or null")

    def __init__(self, seed: int = 0, **options: Any):
        super().__init__(seed=seed, **options)
        self.spellable: Spellable = lambda word: True
        #: ``answerer(targets, prompts) -> answers``: the run's backbone (``mllm``), or the writer (``llm``,
        #: loaded on first use); tests may set it to a scripted function at this same seam.
        self.answerer: Answerer | None = None
        self._writer: Any = None
        self._cache_dir: str | None = self.llm_cache_dir  # prepare() adds the run's cache_dir when unset
        self._extractor: Any = None
        self._df: Counter = Counter()
        self._num_fitted = 0
        self._taken = PrefixCounter()
        self._rationales: list[str] = []
        self._stats: dict[str, Any] = {}

    def reserved_words(self) -> list[str]:
        return [*self.fields, *TEMPLATE_WORDS]

    def bind_tokenizer(self, tokenizer: Any) -> None:
        self.spellable = tokenizer_spelling(tokenizer)
        for symbol in (":", ",", self.field_separator, *self.fields):
            if not self.spellable(symbol):
                raise ConfigError(f"the model's tokenizer cannot spell {symbol!r}, which ssi identifiers use")

    # -- fitting ------------------------------------------------------------------------------
    def fit(self, targets: Sequence[Target], features: np.ndarray | None = None) -> list[str]:
        descriptions = self._descriptions(targets)
        self._extractor = build_extractor(self.parser, descriptions)
        self._stats = {"generator": self.generator,
                       "parser": type(self._extractor).__name__.removesuffix("Concepts").lower()}
        generated = self._generate(targets, descriptions)
        concepts = [self._normalize(fields) for fields, _ in generated]
        self._df = Counter(c for fields in concepts for c in {w for words in fields.values() for w in words})
        self._num_fitted = len(targets)
        self._taken = PrefixCounter()
        self._rationales = []
        return self._identifiers(concepts, generated)

    def assign(self, targets: Sequence[Target], features: np.ndarray | None = None) -> list[str]:
        if self._extractor is None:
            raise ConfigError("ssi.assign needs a fitted scheme; call fit (or load the index) first")
        descriptions = self._descriptions(targets)
        generated = self._generate(targets, descriptions)
        return self._identifiers([self._normalize(fields) for fields, _ in generated], generated)

    def _descriptions(self, targets: Sequence[Target]) -> list[str]:
        return require_descriptions(targets, "ssi")

    def _generate(self, targets: Sequence[Target], descriptions: list[str]) -> list[Generated]:
        """Fields (and rationale) per target: from the parser, or from a model with retries and the parser
        as fallback."""
        if self.generator == "parser":
            return [(fields, None) for fields in self._extractor.extract(descriptions)]
        start = time.perf_counter()
        if self.generator == "llm":
            outcome = self._ask_llm(targets, descriptions)
        else:
            outcome = self._ask_mllm(targets, descriptions)
        prefix = self.generator
        counts = outcome.counts(prefix)
        pending = [i for i, answer in enumerate(outcome.answers) if answer is None]
        fallback = dict(zip(pending, self._extractor.extract([descriptions[i] for i in pending])))
        out: list[Generated] = [(a.fields, a.rationale) if a is not None else (fallback[i], None)
                                for i, a in enumerate(outcome.answers)]
        self._stats.update(counts)
        self._stats[f"{prefix}_ungrounded_concepts"] = sum(a.ungrounded for a in outcome.answers if a is not None)
        self._stats["rationale_template"] = counts[f"{prefix}_fields_only"] + counts[f"{prefix}_fallback"]
        self._stats[f"{prefix}_seconds"] = round(time.perf_counter() - start, 2)
        log.info("ssi: %s wrote %d of %d identifiers at the first prompt, %d after a retry, %d without a "
                 "rationale (templated); %d fell back to the parser", self._stats.get("generator_model", prefix),
                 counts[f"{prefix}_first_try"], len(targets), counts[f"{prefix}_after_retry"],
                 counts[f"{prefix}_fields_only"], counts[f"{prefix}_fallback"])
        if pending:
            log.warning("ssi: %d of %d %s answers were unusable after %d attempts; their fields come from the "
                        "parser", len(pending), len(targets), prefix, self.llm_attempts)
        return out

    def _ask_mllm(self, targets, descriptions):
        if self.answerer is None:
            raise ConfigError("ssi.generator=mllm needs an MLLM backbone that writes text (model=smol|hf); "
                              "or use scheme.generator=llm, which brings its own model")
        example = " | ".join(f"{f} : ..." for f in self.fields)

        def ask(attempt: int, pending: list[int]) -> list[str]:
            template = PROMPTS[min(attempt, len(PROMPTS) - 1)]
            prompts = [template.format(description=descriptions[i], fields=" , ".join(self.fields), example=example)
                       for i in pending]
            return self.answerer([targets[i] for i in pending], prompts)

        validate = lambda i, answer: validate_answer(answer, self.fields, self.spellable)  # noqa: E731 (sees the image)
        return answer_with_retries(len(targets), ask, validate, self.llm_attempts)

    def writer(self) -> Any:
        """The ``generator=llm`` model (:class:`~gcr.schemes.helpers.llm_writer.FieldWriter`), not yet loaded."""
        if self._writer is None:
            from gcr.schemes.helpers.llm_writer import FieldWriter

            self._writer = FieldWriter(self.generator_path, batch_size=self.llm_batch_size,
                                       max_new_tokens=self.llm_max_new_tokens, device=self.llm_device)
        return self._writer

    def _ask_llm(self, targets, descriptions):
        writer = self.writer()
        reads_images = writer.kind == "image-text-to-text"
        self._stats["grounded"] = not reads_images
        self._stats.update({"generator_model": writer.name, "reads": writer.reads})
        ids = [t.target_id for t in targets]
        images = [t.content.value if reads_images and t.content.modality == "image" else None for t in targets]
        attempts = range(self.llm_attempts)
        spec = {"writer": writer.signature(), "fields": list(self.fields),
                "prompts": [field_prompt("{description}", self.fields, strict=a > 0) for a in attempts]}
        cache = AnswerCache(self._cache_dir, targets_fingerprint(ids, descriptions, images), answers_key(spec), spec)
        answerer = self.answerer or writer

        def ask(attempt: int, pending: list[int]) -> list[str]:
            prompts = [field_prompt(descriptions[i], self.fields, strict=attempt > 0) for i in pending]
            return cache.ask(answerer, attempt, [ids[i] for i in pending], [targets[i] for i in pending], prompts)

        def validate(i: int, answer: str):  # a text-only writer may only name what its description says
            return validate_answer(answer, self.fields, self.spellable, None if reads_images else descriptions[i])

        outcome = answer_with_retries(len(targets), ask, validate, self.llm_attempts)
        self._stats.update({"llm_generated": cache.generated, "llm_cached": cache.reused})
        if cache.path is not None:
            self._stats["llm_cache"] = str(cache.path)
        return outcome

    def _normalize(self, fields: dict[str, list[str]]) -> dict[str, list[str]]:
        """Lemmas, lower case, words the tokenizer can spell, each concept once (first field wins)."""
        out: dict[str, list[str]] = {}
        seen: set[str] = set()
        for field in self.fields:
            kept = []
            for concept in fields.get(field, []):
                words = [self._extractor.lemma(w) for w in concept.lower().split()]
                words = [w for w in words if w.isalpha() and self.spellable(w)]
                concept = " ".join(words)
                if concept and concept not in seen:
                    seen.add(concept)
                    kept.append(concept)
            out[field] = kept
        return out

    # -- identifiers --------------------------------------------------------------------------
    def _specificity(self, concept: str) -> float:
        """Rarer concepts are more specific: inverse document frequency over the fitted targets."""
        return math.log((1 + self._num_fitted) / (1 + self._df[concept]))

    def _ranked(self, concepts: list[str]) -> list[str]:
        order = {c: i for i, c in enumerate(concepts)}
        return sorted(concepts, key=lambda c: (-self._specificity(c), order[c]))

    def _join(self, chosen: dict[str, list[str]]) -> str:
        parts = [f"{f} : {' , '.join(sorted(chosen[f]))}" for f in self.fields if chosen.get(f)]
        return f" {self.field_separator} ".join(parts)

    def _identifiers(self, concepts: list[dict[str, list[str]]], generated: list[Generated]) -> list[str]:
        out, suffixed, wordless = [], 0, 0
        for fields, (_, sentence) in zip(concepts, generated):
            ranked = {f: self._ranked(fields.get(f, [])) for f in self.fields}
            chosen = {f: ranked[f][: self.max_per_field] for f in self.fields}
            spare = self._ranked([c for f in self.fields for c in ranked[f][self.max_per_field:]])
            field_of = {c: f for f in self.fields for c in ranked[f]}
            sid = self._join(chosen)
            wordless += not sid
            for extra in spare:  # the next most specific concept first: a suffix that still means something
                if sid and not self._taken[sid]:
                    break
                chosen[field_of[extra]] = [*chosen[field_of[extra]], extra]
                sid = self._join(chosen)
            if not sid or self._taken[sid]:
                sid, suffixed = self._taken.numbered(sid, self._number_suffix), suffixed + 1
            self._taken.take(sid)
            out.append(sid)
            self._rationales.append(_clean_sentence(sentence or template_rationale(chosen), self.spellable))
        self._stats.update({"number_suffixed": suffixed, "wordless": wordless})
        if wordless > 0.1 * max(1, len(out)):
            log.warning("ssi: %d of %d descriptions gave no concept; check the descriptions and the parser",
                        wordless, len(out))
        return out

    def _number_suffix(self, base: str, n: int) -> str:
        number = spelled_number(n, self.spellable)
        return f"{base} {self.field_separator} {number}" if base else number

    # -- rationales, stats, state -------------------------------------------------------------
    def rationales(self) -> list[str]:
        """One sentence per target of the last :meth:`fit` (then :meth:`assign`), in the same order."""
        return list(self._rationales)

    def stats(self) -> dict[str, Any]:
        return dict(self._stats)

    def state_dict(self) -> dict[str, Any]:
        roles = self._extractor.roles if isinstance(self._extractor, LexiconConcepts) else None
        return {"df": dict(self._df), "num_fitted": self._num_fitted, "taken": dict(self._taken.counts), "lexicon": roles}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._df = Counter(state.get("df", {}))
        self._num_fitted = int(state.get("num_fitted", 0))
        self._taken = PrefixCounter(state.get("taken", {}))
        if state.get("lexicon") is not None:
            self._extractor = LexiconConcepts()
            self._extractor.roles = dict(state["lexicon"])
        elif self._num_fitted:
            self._extractor = build_extractor("spacy", [])  # the lexicon is saved above; spaCy is stateless


def template_rationale(fields: dict[str, list[str]]) -> str:
    """A one-sentence rationale from the identifier's fields (the ``parser`` generator's RGS target)."""
    objects = " and ".join(sorted(fields.get("objects", []))) or "it"
    sentence = f"it shows {objects}" if objects != "it" else "it matches"
    if fields.get("attributes"):
        sentence += f" that is {' and '.join(sorted(fields['attributes']))}"
    if fields.get("action"):
        sentence += f" , {' and '.join(sorted(fields['action']))}"
    if fields.get("scene"):
        sentence += f" , on {' '.join(sorted(fields['scene']))}"
    for field, words in fields.items():
        if field not in ROLES and words:
            sentence += f" , {field} {' and '.join(sorted(words))}"
    return sentence


def _clean_sentence(text: str, spellable: Spellable) -> str:
    """An MLLM rationale cut to its first sentence, keeping words the tokenizer can spell."""
    sentence = text.strip().split(".")[0] or "it matches"
    words = [w for w in sentence.lower().replace(",", " , ").split() if spellable(w)]
    return " ".join(words)
