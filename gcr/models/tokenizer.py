"""A word-piece tokenizer trained on the corpus captions with HF ``tokenizers``.

Used by the ``tiny`` backbone and the dense baseline, so that both run the same
code path as a pretrained HF tokenizer (``PreTrainedTokenizerFast``).
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

#: Special tokens in id order. EOS is not id 2 on purpose: HF CLIP's text pooling treats
#: eos_token_id == 2 as a legacy config and pools at the highest token id instead.
SPECIAL_TOKENS = {"pad": "<pad>", "unk": "<unk>", "bos": "<s>", "eos": "</s>", "sep": "<ret>", "image": "<image>"}


def train_corpus_tokenizer(texts: Iterable[str], vocab_size: int = 1000) -> PreTrainedTokenizerFast:
    """Train a lower-cased WordPiece tokenizer on ``texts``; returns an HF fast tokenizer."""
    tok = Tokenizer(models.WordPiece(unk_token=SPECIAL_TOKENS["unk"], max_input_chars_per_word=50))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()), show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
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
