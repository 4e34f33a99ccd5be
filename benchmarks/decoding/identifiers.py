"""Deterministic synthetic identifier sets for the decoding benchmark.

Token ids (vocabulary of 32,000 by default): ``0`` is pad, ``1`` is reserved (BOS), ``2`` is EOS; identifier
tokens are ``3 .. vocab_size - 1``. Every identifier ends with exactly one EOS, and the sets are deduplicated,
so no identifier is a prefix of another.

Two kinds:

* **fixed** (semantic-ID codes, like RQ-VAE / hierarchical k-means ``<c{level}_{code}>``): ``L`` levels, each a
  code drawn uniformly from a 256-entry codebook; level ``l``'s codebook occupies its own block of the vocab,
  ``CODE_BASE + 256 * l + code`` with ``CODE_BASE = vocab_size - 8 * 256`` (the last 2,048 ids, as if the code
  tokens were added to the end of a 32k tokenizer). Each identifier is ``L`` code tokens + EOS, i.e. ``L + 1``
  tokens in all.
* **variable** (natural-language-like titles): ``5 .. 24`` tokens **EOS included** (4 .. 23 content tokens,
  log-normal length with median 9). The first token is drawn from a Zipf unigram distribution over the
  content vocab (``p(rank r) ~ r ** -1.1``, ranks mapped to ids by a fixed random permutation); each next
  token is, with probability 0.7, one of the previous token's 16 "usual successors" (themselves drawn from the
  unigram, chosen with weight ``(j + 1) ** -1.5``), else a fresh unigram draw. This bigram structure makes
  prefixes share the way titles do ("The ...", "List of ...").

Everything is numpy, vectorised over identifiers and seeded, so a set is a pure function of
``(kind, n, code_length, vocab_size, seed)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["IdentifierSet", "PAD", "EOS", "fixed_codes", "variable_titles", "make_identifiers", "CODEBOOK"]

PAD = 0
EOS = 2
FIRST_CONTENT = 3
CODEBOOK = 256
MAX_LEVELS = 8


@dataclass
class IdentifierSet:
    """``n`` identifiers as one flat int64 array (``flat[offsets[i]:offsets[i + 1]]`` is identifier ``i``)."""

    name: str
    flat: np.ndarray  # int64, all identifiers concatenated (each ends with EOS)
    offsets: np.ndarray  # int64, n + 1
    vocab_size: int
    eos_token_id: int = EOS
    pad_token_id: int = PAD

    @property
    def n(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def max_length(self) -> int:
        return int(self.lengths.max())

    def sequences(self) -> list[list[int]]:
        """List of token-id lists (for the Python baselines and ``TokenTrie.build``)."""
        flat = self.flat.tolist()
        offsets = self.offsets.tolist()
        return [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:])]

    def summary(self) -> dict:
        lengths = self.lengths
        return {
            "name": self.name,
            "n": self.n,
            "tokens": int(len(self.flat)),
            "length_min": int(lengths.min()),
            "length_mean": round(float(lengths.mean()), 3),
            "length_max": int(lengths.max()),
            "distinct_first_tokens": int(len(np.unique(self.flat[self.offsets[:-1]]))),
            "eos_included_in_length": True,
        }


def _seed(*parts: int | str) -> np.random.Generator:
    """A generator seeded by a stable hash of ``parts`` (Python's hash() is salted, so not that)."""
    text = "/".join(str(p) for p in parts).encode()
    return np.random.default_rng(list(text))


def _first_unique_rows(rows: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Indices of the first occurrence of each distinct (row, length), in original order."""
    key = np.concatenate([rows, lengths[:, None].astype(rows.dtype)], axis=1)
    key = np.ascontiguousarray(key)
    void = key.view(np.dtype((np.void, key.dtype.itemsize * key.shape[1]))).ravel()
    _, first = np.unique(void, return_index=True)
    return np.sort(first)


def _pack(rows: np.ndarray, lengths: np.ndarray, eos: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ``rows`` (content only) + ``lengths`` (content tokens) -> flat with EOS appended, offsets."""
    n, width = rows.shape
    total = lengths + 1
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(total, out=offsets[1:])
    flat = np.empty(int(offsets[-1]), dtype=np.int64)
    keep = np.arange(width)[None, :] < lengths[:, None]
    row_of = np.repeat(np.arange(n), lengths)
    col_of = np.nonzero(keep)[1]
    flat[offsets[:-1][row_of] + col_of] = rows[keep]
    flat[offsets[1:] - 1] = eos
    return flat, offsets


def fixed_codes(n: int, code_length: int = 4, vocab_size: int = 32000, seed: int = 0) -> IdentifierSet:
    """``n`` distinct codes of ``code_length`` levels (uniform per level) + EOS."""
    if not 1 <= code_length <= MAX_LEVELS:
        raise ValueError(f"code_length must be in 1..{MAX_LEVELS}")
    base = vocab_size - MAX_LEVELS * CODEBOOK
    if base < FIRST_CONTENT:
        raise ValueError(f"vocab_size {vocab_size} is too small for {MAX_LEVELS} codebooks of {CODEBOOK}")
    if n > CODEBOOK**code_length:
        raise ValueError(f"only {CODEBOOK**code_length} codes of length {code_length} exist")
    rng = _seed("fixed", n, code_length, vocab_size, seed)
    chunks, have = [], 0
    while have < n:
        draw = rng.integers(0, CODEBOOK, size=(int((n - have) * 1.05) + 16, code_length), dtype=np.int64)
        chunks.append(draw)
        rows = np.concatenate(chunks)
        keep = _first_unique_rows(rows, np.full(len(rows), code_length))
        chunks, have = [rows[keep]], len(keep)
    rows = chunks[0][:n] + base + CODEBOOK * np.arange(code_length)
    flat, offsets = _pack(rows, np.full(n, code_length, dtype=np.int64), EOS)
    return IdentifierSet(f"fixed-L{code_length}", flat, offsets, vocab_size)


def variable_titles(
    n: int,
    vocab_size: int = 32000,
    seed: int = 0,
    zipf_exponent: float = 1.1,
    bigram_prob: float = 0.7,
    successors: int = 16,
    min_length: int = 5,
    max_length: int = 24,
) -> IdentifierSet:
    """``n`` distinct natural-language-like sequences of ``min_length..max_length`` tokens, EOS included."""
    content = vocab_size - FIRST_CONTENT
    vocab_rng = _seed("vocab", vocab_size, zipf_exponent, successors, seed)  # the "language", shared by all n
    rank_to_token = vocab_rng.permutation(content) + FIRST_CONTENT
    weights = np.arange(1, content + 1, dtype=np.float64) ** -zipf_exponent
    unigram_cdf = np.cumsum(weights / weights.sum())
    # successors[t - FIRST_CONTENT] = the usual next tokens after t, themselves Zipf-distributed
    succ = rank_to_token[
        np.minimum(np.searchsorted(unigram_cdf, vocab_rng.random((content, successors))), content - 1)
    ]
    succ_w = np.arange(1, successors + 1, dtype=np.float64) ** -1.5
    succ_cdf = np.cumsum(succ_w / succ_w.sum())

    rng = _seed(
        "variable", n, vocab_size, zipf_exponent, bigram_prob, successors, min_length, max_length, seed
    )
    width = max_length - 1  # content tokens, EOS excluded

    def draw(count: int) -> tuple[np.ndarray, np.ndarray]:
        lengths = np.clip(np.rint(rng.lognormal(np.log(9.0), 0.45, count)), min_length - 1, width).astype(
            np.int64
        )
        rows = np.zeros((count, width), dtype=np.int64)
        unigram = rank_to_token[
            np.minimum(np.searchsorted(unigram_cdf, rng.random((count, width))), content - 1)
        ]
        use_bigram = rng.random((count, width)) < bigram_prob
        slot = np.minimum(np.searchsorted(succ_cdf, rng.random((count, width))), successors - 1)
        rows[:, 0] = unigram[:, 0]
        for j in range(1, width):
            follow = succ[rows[:, j - 1] - FIRST_CONTENT, slot[:, j]]
            rows[:, j] = np.where(use_bigram[:, j], follow, unigram[:, j])
        rows[np.arange(width)[None, :] >= lengths[:, None]] = PAD
        return rows, lengths

    rows_all, lengths_all = draw(int(n * 1.1) + 16)
    while True:
        keep = _first_unique_rows(rows_all, lengths_all)
        if len(keep) >= n:
            break
        more_rows, more_lengths = draw(int((n - len(keep)) * 1.5) + 16)
        rows_all = np.concatenate([rows_all[keep], more_rows])
        lengths_all = np.concatenate([lengths_all[keep], more_lengths])
    keep = keep[:n]
    flat, offsets = _pack(rows_all[keep], lengths_all[keep], EOS)
    return IdentifierSet("variable", flat, offsets, vocab_size)


def make_identifiers(name: str, n: int, vocab_size: int = 32000, seed: int = 0) -> IdentifierSet:
    """``name`` is ``fixed-L<k>`` or ``variable``."""
    if name.startswith("fixed-L"):
        return fixed_codes(n, int(name[len("fixed-L") :]), vocab_size, seed)
    if name == "variable":
        return variable_titles(n, vocab_size, seed)
    raise ValueError(f"unknown identifier kind {name!r}: expected fixed-L<k> or variable")
