"""Words for natural-language identifiers: tokenizing descriptions, spelling checks, naming clusters.

Shared by the schemes whose identifiers are plain words (``semcore``, ``ssi``). Descriptions are split
into lower-case words with scikit-learn's analyzer and its English stop-word list, the same analyzer
KeyBERT uses for its candidates, so cluster names and keywords are drawn from one vocabulary.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from functools import cache
from typing import Any

from sklearn.feature_extraction.text import CountVectorizer

from gcr.errors import ConfigError

Spellable = Callable[[str], bool]


def word_analyzer() -> Callable[[str], list[str]]:
    """Lower-cased words of two or more letters/digits, English stop words removed (KeyBERT's candidates)."""
    return CountVectorizer(stop_words="english").build_analyzer()


def require_descriptions(targets: Sequence[Any], scheme: str) -> list[str]:
    """Every target's ``text`` (its description), or a ConfigError naming the empty ones and where they come from."""
    empty = [t.target_id for t in targets if not t.text.strip()]
    if empty:
        raise ConfigError(
            f"{scheme} needs a description for every target; {len(empty)} are empty (e.g. {empty[:3]}); "
            "check the description source (description=heldout|generated) and the captions"
        )
    return [t.text for t in targets]


def spelled_number(n: int, spellable: Spellable) -> str:
    """``n`` as one word where the tokenizer spells it, else digit by digit (collision suffixes)."""
    return str(n) if spellable(str(n)) else " ".join(str(n))


def tokenizer_spelling(tokenizer: Any) -> Spellable:
    """``word -> bool``: True when ``tokenizer`` encodes ``word`` without its unknown token.

    Sub-word tokenizers (no ``unk`` in practice) spell everything; a word-level tokenizer built from
    the training captions cannot spell words it never saw.
    """
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return lambda word: True

    @cache
    def spellable(word: str) -> bool:
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        return bool(ids) and unk not in ids

    return spellable


def cluster_word_weights(words_per_item: Sequence[Sequence[str]], labels: Sequence[int]) -> dict[int, Counter]:
    """SemCORE's cluster-naming weight ``w(x, c) = tf(x, c) * log(1 + A / f_x)`` for every word of every cluster.

    ``tf(x, c)``: the count of word ``x`` in cluster ``c``; ``f_x``: its count over all clusters;
    ``A``: the average number of words per cluster. A word frequent in one cluster but rare overall
    (a class-based TF-IDF) names that cluster.
    """
    tf: dict[int, Counter] = {}
    for words, label in zip(words_per_item, labels):
        tf.setdefault(int(label), Counter()).update(words)
    total = Counter()
    for counts in tf.values():
        total.update(counts)
    average = sum(total.values()) / max(1, len(tf))
    return {
        c: Counter({x: n * math.log(1.0 + average / total[x]) for x, n in counts.items()})
        for c, counts in tf.items()
    }


def name_clusters(
    words_per_item: Sequence[Sequence[str]], labels: Sequence[int], num_words: int
) -> dict[int, tuple[str, ...]]:
    """``num_words`` highest-weight words per cluster (best first), distinct between clusters.

    Clusters are named largest first; when a name is already taken, its last word is replaced by the
    cluster's next best word until it is new (a cluster with too few words keeps a shared name, and
    its identifiers are told apart by the lexical part).
    """
    weights = cluster_word_weights(words_per_item, labels)
    sizes = Counter(int(label) for label in labels)
    names: dict[int, tuple[str, ...]] = {}
    taken: set[tuple[str, ...]] = set()
    for cluster in sorted(weights, key=lambda c: (-sizes[c], c)):
        ranked = [w for w, _ in sorted(weights[cluster].items(), key=lambda kv: (-kv[1], kv[0]))]
        name = tuple(ranked[:num_words])
        spare = iter(ranked[num_words:])
        while name in taken and name:
            replacement = next(spare, None)
            if replacement is None:
                break
            name = (*name[:-1], replacement)
        names[cluster] = name
        taken.add(name)
    return names
