"""A word-level tokenizer built from the corpus captions with HF ``tokenizers``.

Used by the ``tiny`` backbone and the dense baseline, so that both run the same
code path as a pretrained HF tokenizer (``PreTrainedTokenizerFast``). The
vocabulary is counted and ordered here (by frequency, then alphabetically)
rather than by a ``tokenizers`` trainer: the trainers break frequency ties in
hash order, so the same captions would get different ids from run to run.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

#: Special tokens in id order. EOS is not id 2 on purpose: HF CLIP's text pooling treats
#: eos_token_id == 2 as a legacy config and pools at the highest token id instead.
SPECIAL_TOKENS = {"pad": "<pad>", "unk": "<unk>", "bos": "<s>", "eos": "</s>", "sep": "<ret>", "image": "<image>"}
#: Always in the vocabulary, even when no caption uses them: natural-language identifiers (SemCORE, SSI)
#: separate their fields with punctuation and number colliding identifiers with digits.
RESERVED_WORDS = (*",;:|-", *"0123456789")


def train_corpus_tokenizer(
    texts: Iterable[str], vocab_size: int = 1000, min_frequency: int = 1, reserved_words: Iterable[str] = ()
) -> PreTrainedTokenizerFast:
    """Lower-cased word-level tokenizer of the ``vocab_size`` most frequent words; the rest map to ``<unk>``.

    Special tokens, :data:`RESERVED_WORDS` and ``reserved_words`` (e.g. an identifier scheme's field names)
    come first and count towards ``vocab_size``.
    """
    normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts = Counter(
        word for text in texts for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))
    )
    specials = list(SPECIAL_TOKENS.values())
    words = sorted((w for w, n in counts.items() if n >= min_frequency and w not in specials), key=lambda w: (-counts[w], w))
    reserved = list(dict.fromkeys(w.lower() for w in (*RESERVED_WORDS, *reserved_words) if w not in specials))
    words = [w for w in words if w not in reserved]
    head = [*specials, *reserved]
    vocab = {t: i for i, t in enumerate([*head, *words[: max(0, vocab_size - len(head))]])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk"]))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.WordPiece()  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=SPECIAL_TOKENS["pad"],
        unk_token=SPECIAL_TOKENS["unk"],
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        sep_token=SPECIAL_TOKENS["sep"],
        extra_special_tokens={"image_token": SPECIAL_TOKENS["image"]},
        padding_side="left",
    )


def corpus_tokenizer(corpus: Any, vocab_size: int, reserved_words: Iterable[str] = ()) -> Any:
    """The word-level tokenizer of a corpus's train captions (deterministic, so rebuilding it is cheap)."""
    return train_corpus_tokenizer((c.text for c in corpus.captions("train")), vocab_size,
                                  reserved_words=reserved_words)
