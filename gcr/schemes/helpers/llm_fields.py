"""Identifier fields that a language model writes: the few-shot prompt, the validator, retries and fallback.

SSI's summary: the model is *prompted* to write concept-level structured identifiers, and a one-sentence
explanation is produced alongside each identifier. This module is the model-independent half of that:

* :func:`field_prompt` -- a chat conversation: a system instruction naming the fields, a few worked examples
  (description -> one ``field: concept, concept`` line per field, then ``because: <one sentence>``), the
  target's description, and an assistant turn pre-filled with the first field name. The stricter retry
  (``strict=True``) repeats the exact line format and forbids anything else.
* :func:`validate_answer` -- an answer parsed (leniently, :func:`~gcr.schemes.helpers.concepts.parse_fields`)
  and checked against the field schema: only the configured field names count, every concept is one to
  :data:`MAX_CONCEPT_WORDS` content words the tokenizer can spell, and at least one field is non-empty. The
  ``because:`` line is the rationale (first sentence, at least :data:`MIN_RATIONALE_WORDS` words).
* :func:`answer_with_retries` -- asks, validates, re-asks the targets whose answer is incomplete, and
  reports each target's outcome (:class:`Outcome`); the caller fills the rest from its fallback.

Which model answers is the caller's business (:mod:`gcr.schemes.helpers.llm_writer` for ``generator=llm``,
the run's backbone for ``generator=mllm``): every answerer has the signature
``answerer(targets, prompts) -> answers``.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from gcr.schemes.helpers.concepts import FUNCTION_WORDS, ROLES, SPATIAL, parse_fields, words_of
from gcr.schemes.helpers.words import Spellable

#: Longest concept kept from an answer, in words ("dotted background"); longer ones are copied sentences.
MAX_CONCEPT_WORDS = 3
#: Fewest words a rationale needs to count as a sentence.
MIN_RATIONALE_WORDS = 3
#: Most words kept of a rationale (a small model may not stop).
MAX_RATIONALE_WORDS = 32
#: The line that carries the rationale, after the fields.
RATIONALE_KEY = "because"
#: Answers the parser reads as "nothing here".
PLACEHOLDERS = frozenset({"none", "nothing", "unknown", "word", "words", "concept", "concepts", "n", "a", "na"})

#: Worked examples of the few-shot prompt: (description, {field: concepts}, rationale). They cover the
#: built-in fields (:data:`~gcr.schemes.helpers.concepts.ROLES`); one is a diagram-like scene, one a photo.
EXAMPLES: tuple[tuple[str, dict[str, list[str]], str], ...] = (
    ("a brown dog leaps to catch a red frisbee on the grass of a park",
     {"objects": ["dog", "frisbee"], "action": ["leap", "catch"], "attributes": ["brown", "red"],
      "scene": ["park", "grass"]},
     "the dog and the frisbee are what the picture is about, and the grass says it happens in a park."),
    ("two small white boats float next to a wooden pier on a calm lake",
     {"objects": ["boat", "pier"], "action": ["float", "next to"], "attributes": ["small", "white", "wooden"],
      "scene": ["calm lake"]},
     "the white boats beside the wooden pier are the subject, and the calm water places them on a lake."),
    ("a large blue square above a tiny yellow circle on a dotted background",
     {"objects": ["square", "circle"], "action": ["above"], "attributes": ["large", "blue", "tiny", "yellow"],
      "scene": ["dotted background"]},
     "a big blue square sits over a small yellow circle, and the dots fill the background."),
)

#: A chat message: ``{"role": "system" | "user" | "assistant", "content": text}``.
Message = dict[str, str]
#: ``answerer(targets, prompts) -> answers``: a prompt is a conversation (list of messages) or plain text.
Answerer = Callable[[Sequence[Any], Sequence[Any]], list[str]]


@dataclass
class FieldAnswer:
    """A validated answer: concepts per field (only the configured fields) and the rationale, if any."""

    fields: dict[str, list[str]]
    rationale: str | None = None
    #: concepts dropped because no word of them is in the description (``source`` given)
    ungrounded: int = 0

    @property
    def complete(self) -> bool:
        """True when the answer has the rationale as well as the fields."""
        return bool(self.rationale)


@dataclass
class Outcome:
    """What :func:`answer_with_retries` got for every target: an answer (or ``None``) and on which attempt."""

    answers: list[FieldAnswer | None]
    attempt: list[int | None]  # attempt (0-based) of the answer kept; None: no usable answer
    raw: list[list[str]] = field(default_factory=list)  # every answer the model gave, per target

    def counts(self, prefix: str) -> dict[str, int]:
        """``{prefix}_first_try``, ``_after_retry`` (complete answers), ``_fields_only`` (fields without a
        rationale: the rationale is templated) and ``_fallback`` (no usable fields: the caller's fallback)."""
        counts = Counter()
        for answer, attempt in zip(self.answers, self.attempt):
            if answer is None:
                counts["fallback"] += 1
            elif not answer.complete:
                counts["fields_only"] += 1
            else:
                counts["first_try" if attempt == 0 else "after_retry"] += 1
        return {f"{prefix}_{k}": int(counts[k]) for k in ("first_try", "after_retry", "fields_only", "fallback")}


def _example_answer(fields: Sequence[str], values: dict[str, list[str]], rationale: str) -> str:
    lines = [f"{f}: {', '.join(values.get(f, [])) or 'none'}" for f in fields]
    return "\n".join([*lines, f"{RATIONALE_KEY}: {rationale}"])


def field_prompt(description: str, fields: Sequence[str], *, strict: bool = False) -> list[Message]:
    """The few-shot conversation that asks for ``fields`` and a rationale of one ``description``.

    The last message is an assistant turn that already holds ``"<first field>:"``: the model continues it,
    so even a small model starts in the format. ``strict`` is the retry: the format is spelled out line by
    line and anything else is forbidden.
    """
    fields = list(fields)
    names = ", ".join(fields)
    system = (f"You turn an image description into a structured identifier. Write one line per field ({names}), "
              f"each as 'field: concept, concept' with short concepts of one or two words taken from the "
              f"description, then one line '{RATIONALE_KEY}: <one sentence>' that explains why these concepts "
              "identify the image.")
    if strict:
        template = "\n".join([*(f"{f}: <concepts>" for f in fields), f"{RATIONALE_KEY}: <one sentence>"])
        system += (" Answer with exactly these lines, in this order, and nothing else; write 'none' for a field "
                   f"the description does not fill:\n{template}")
    messages: list[Message] = [{"role": "system", "content": system}]
    for text, values, rationale in EXAMPLES:
        messages.append({"role": "user", "content": f"description: {text}"})
        messages.append({"role": "assistant", "content": _example_answer(fields, values, rationale)})
    messages.append({"role": "user", "content": f"description: {description.strip()}"})
    messages.append({"role": "assistant", "content": f"{fields[0]}:"})
    return messages


def prompt_text(messages: Sequence[Message]) -> str:
    """A conversation as plain text, for a model without a chat template (ends inside the last turn)."""
    parts = [f"{m['role']}: {m['content']}" if m["role"] != "assistant" else m["content"] for m in messages]
    return "\n\n".join(parts)


def _concept(text: str, spellable: Spellable) -> str:
    words = [w for w in words_of(text) if w.isalpha()]
    if not words or len(words) > MAX_CONCEPT_WORDS:
        return ""
    words = [w for w in words if spellable(w)]
    if not words or all((w in FUNCTION_WORDS and w not in SPATIAL) or w in PLACEHOLDERS for w in words):
        return ""  # spatial relations ("above", "next to") are the action of a diagram
    return " ".join(words)


def _sentence(text: str, spellable: Spellable) -> str | None:
    line = text.strip().splitlines()[0] if text.strip() else ""
    sentence = re.split(r"(?<=[a-z])[.!?](?:\s|$)", line.strip(), maxsplit=1)[0].strip(" .")
    words = [w for w in sentence.lower().replace(",", " , ").split() if spellable(w)]
    content = [w for w in words if w.isalpha()]
    if len(content) < MIN_RATIONALE_WORDS or "<" in sentence:
        return None
    return " ".join(words[:MAX_RATIONALE_WORDS])


def _stem(word: str) -> str:
    """A crude stem, so that "leaps", "leaping" and "leap" meet (grounding only, not identifiers)."""
    for suffix in ("ing", "ies", "es", "ed", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            stem = word[: -len(suffix)]
            return stem[:-1] if suffix in ("ing", "ed") and stem[-1] == stem[-2] else stem  # sitting -> sit
    return word


def validate_answer(answer: str, fields: Sequence[str], spellable: Spellable = lambda w: True,
                    source: str | None = None) -> FieldAnswer | None:
    """The fields and rationale of ``answer``, or ``None`` when it fills no field with a valid concept.

    A valid concept has 1 to :data:`MAX_CONCEPT_WORDS` alphabetic words, keeps the words ``spellable``
    accepts, and is not only function words or a placeholder (``none``, ``<concepts>``). Names that are not
    one of ``fields`` (or an alias of one) are ignored; a concept named twice is kept once. With ``source``
    (the text the model read, for a model that reads nothing else), a concept none of whose words occurs in
    it is a hallucination -- a small model copies the worked examples -- and is dropped (counted).
    """
    parsed = parse_fields(answer, list(fields))
    if parsed is None:
        return None
    grounds = {_stem(w) for w in words_of(source)} if source is not None else None
    out: dict[str, list[str]] = {}
    ungrounded = 0
    for name in fields:
        kept = []
        for concept in parsed.get(name, []):
            concept = _concept(concept, spellable)
            if concept and grounds is not None and not any(_stem(w) in grounds for w in concept.split()):
                ungrounded += 1
                continue
            if concept and concept not in kept and concept not in fields:
                kept.append(concept)
        if kept:
            out[name] = kept
    if not out:
        return None
    rationale = parsed.get("rationale", [""])[0]
    return FieldAnswer(out, _sentence(rationale, spellable) if rationale else None, ungrounded)


def answer_with_retries(
    count: int,
    ask: Callable[[int, list[int]], list[str]],
    validate: Callable[[int, str], FieldAnswer | None],
    attempts: int,
) -> Outcome:
    """Ask for every target, then re-ask those whose answer is not complete, ``attempts`` times in all.

    ``ask(attempt, indices) -> answers`` (one per index; attempt 0 is the first prompt, later ones the
    stricter retry); ``validate(index, answer)`` reads one. A complete answer (fields and rationale) is kept at once; an answer with fields but no
    rationale is kept only if no later attempt completes it. Targets without any usable answer get ``None``.
    """
    outcome = Outcome([None] * count, [None] * count, [[] for _ in range(count)])
    pending = list(range(count))
    for attempt in range(attempts):
        if not pending:
            break
        answers = ask(attempt, pending)
        if len(answers) != len(pending):
            raise ValueError(f"the answerer gave {len(answers)} answers for {len(pending)} prompts")
        still = []
        for i, text in zip(pending, answers):
            outcome.raw[i].append(text)
            parsed = validate(i, text)
            if parsed is not None and (outcome.answers[i] is None or parsed.complete):
                outcome.answers[i], outcome.attempt[i] = parsed, attempt
            if parsed is None or not parsed.complete:
                still.append(i)
        pending = still
    return outcome


def known_fields(fields: Sequence[str]) -> list[str]:
    """The fields of ``fields`` that the worked examples (and the parser fallback) fill."""
    return [f for f in fields if f in ROLES]
