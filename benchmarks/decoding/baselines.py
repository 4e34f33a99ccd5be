"""Baselines for constrained decoding: Python tries behind HF's ``prefix_allowed_tokens_fn``.

This is how GENRE (facebookresearch/GENRE, ``genre/trie.py``) and most generative-retrieval code constrain
``generate()``: a trie answers ``get(prefix) -> allowed next tokens`` for one beam, and
``transformers.PrefixConstrainedLogitsProcessor`` calls it once per beam per step, then writes the lists into a
``-inf`` mask row by row.

* :class:`DictTrie` - GENRE's ``Trie``: nested dicts keyed by token id. Our ``add``/``get`` walk iteratively
  (GENRE recurses), which is, if anything, faster than the original.
* :class:`MarisaTokenTrie` - GENRE's ``MarisaTrie``: every identifier becomes a string, one character per token
  (``chr(token)``, shifted past the surrogate block for ids >= 0xD800), stored in a ``marisa_trie.Trie``. The
  root's children are cached (GENRE's ``cache_fist_branch``); for any other prefix ``get`` enumerates every
  key that starts with the prefix and collects the character that follows it, so its cost grows with the
  number of identifiers below the prefix (that is the original's cost model too).

Both return ``[]`` for a finished beam (its prefix already contains EOS) and for a prefix outside the trie;
:func:`prefix_allowed_tokens_fn` turns ``[]`` into ``[eos, pad]``, which is what :class:`gcr.decoding.
TrieLogitsProcessor` allows after EOS (recent transformers raise on an empty list, GENRE's era did not).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import marisa_trie
import torch
from transformers import PrefixConstrainedLogitsProcessor

__all__ = ["DictTrie", "MarisaTokenTrie", "prefix_allowed_tokens_fn", "prefix_processor"]

_SURROGATES = 0xD800
_SURROGATE_SPAN = 0x800


class DictTrie:
    """Nested-dict trie (GENRE ``Trie``): ``get(prefix)`` lists the tokens that may follow ``prefix``."""

    def __init__(self, sequences: Iterable[Sequence[int]] = ()) -> None:
        self.trie_dict: dict = {}
        self.len = 0
        for sequence in sequences:
            self.add(sequence)

    def add(self, sequence: Sequence[int]) -> None:
        node = self.trie_dict
        for token in sequence:
            node = node.setdefault(token, {})
        self.len += 1

    def get(self, prefix: Sequence[int]) -> list[int]:
        node = self.trie_dict
        for token in prefix:
            node = node.get(token)
            if node is None:
                return []
        return list(node.keys())

    def __len__(self) -> int:
        return self.len


def _char(token: int) -> str:
    return chr(token if token < _SURROGATES else token + _SURROGATE_SPAN)


def _token(char: str) -> int:
    code = ord(char)
    return code if code < _SURROGATES else code - _SURROGATE_SPAN


class MarisaTokenTrie:
    """``marisa_trie.Trie`` over identifiers encoded one character per token (GENRE ``MarisaTrie``)."""

    def __init__(self, sequences: Iterable[Sequence[int]]) -> None:
        keys = ["".join(map(_char, sequence)) for sequence in sequences]
        self.trie = marisa_trie.Trie(keys)
        self.root_tokens = sorted({_token(key[0]) for key in keys if key})
        self.len = len(keys)

    def get(self, prefix: Sequence[int]) -> list[int]:
        if len(prefix) == 0:
            return self.root_tokens
        key = "".join(map(_char, prefix))
        depth = len(key)
        return list({_token(k[depth]) for k in self.trie.keys(key) if len(k) > depth})

    def __len__(self) -> int:
        return self.len


def prefix_allowed_tokens_fn(
    trie: DictTrie | MarisaTokenTrie, prompt_length: int, eos_token_id: int, pad_token_id: int
) -> Callable[[int, torch.Tensor], list[int]]:
    """The ``prefix_allowed_tokens_fn(batch_id, input_ids_row)`` for ``generate()`` (GENRE's recipe)."""
    finished = sorted({eos_token_id, pad_token_id})

    def fn(batch_id: int, sent: torch.Tensor) -> list[int]:
        allowed = trie.get(sent[prompt_length:].tolist())
        return allowed if allowed else finished

    return fn


def prefix_processor(
    trie: DictTrie | MarisaTokenTrie, prompt_length: int, eos_token_id: int, pad_token_id: int, num_beams: int
) -> PrefixConstrainedLogitsProcessor:
    """What ``generate(prefix_allowed_tokens_fn=fn, num_beams=num_beams)`` builds internally."""
    return PrefixConstrainedLogitsProcessor(
        prefix_allowed_tokens_fn(trie, prompt_length, eos_token_id, pad_token_id), num_beams
    )
