"""Trie-constrained decoding inside Hugging Face ``generate()``.

``generate()`` hands a logits processor only ``input_ids`` and the next-token scores. Beam search reorders its
rows between calls without saying how, so the processor remembers the previous call's generated tokens and trie
nodes and finds each new row's parent by comparing prefixes, then advances the parent's node by one token.

Notes on ``generate()`` (transformers 5):

* beam search calls processors on log-softmaxed scores, greedy search and sampling on raw logits; masking
  never renormalises, so beam scores are sums of the model's unconstrained log-probs over the allowed path;
* beam search pads dummy beams with score -1e9, not -inf: when ``num_return_sequences`` exceeds the number of
  identifiers that can be reached, the extra returned sequences are duplicates scored about -1e9;
* use ``length_penalty=0.0`` for raw sums (the default 1.0 divides by the generated length).
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

from gcr.decoding.trie import TokenTrie
from gcr.errors import DecodingError

__all__ = ["TrieLogitsProcessor"]

_UNMATCHED = -2  # node placeholder for a row whose parent was not found among the previous rows


class TrieLogitsProcessor(LogitsProcessor):
    """Masks every token that would leave the identifier trie.

    Args:
        trie: the identifiers to decode into.
        prompt_length: column of ``input_ids`` where generated tokens start (the prompt length with left
            padding; 1 for encoder-decoder models, whose decoder input starts with the decoder start token).
        eos_token_id: the EOS id; it must match ``trie.eos_token_id``.
        pad_token_id: what ``generate()`` writes after a finished row (defaults to EOS). Rows that reached a
            leaf may only continue with pad or EOS.
        num_beams: rows per batch item (``num_beams`` for beam search, ``num_return_sequences`` for sampling).
            Parents are then looked up within each group of rows, which is how ``generate()`` reorders them;
            ``None`` compares every row with every previous row (cost quadratic in the number of rows).

    Raises (when called):
        DecodingError: a row that has not finished has no allowed token with a finite score, e.g. another
            processor forbade every trie continuation or a token outside the trie was forced.
    """

    def __init__(
        self,
        trie: TokenTrie,
        prompt_length: int,
        eos_token_id: int,
        pad_token_id: int | None = None,
        num_beams: int | None = None,
    ) -> None:
        if eos_token_id != trie.eos_token_id:
            raise ValueError(f"eos_token_id {eos_token_id} differs from the trie's EOS {trie.eos_token_id}")
        self.trie = trie
        self.prompt_length = prompt_length
        self.eos_token_id = eos_token_id
        self.pad_token_id = eos_token_id if pad_token_id is None else pad_token_id
        self.num_beams = num_beams
        self.reset()

    def reset(self) -> None:
        """Forget the previous step (done automatically when the next call's shapes do not follow on)."""
        self._previous_tokens: torch.Tensor | None = None
        self._previous_nodes: torch.Tensor | None = None
        self._trie_version = self.trie.version

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.shape[1] < self.trie.vocab_size:
            raise ValueError(
                f"scores have {scores.shape[1]} columns but the trie's vocab is {self.trie.vocab_size}"
            )
        generated = input_ids[:, self.prompt_length :]
        nodes = self._nodes_from_previous(generated)
        if nodes is None:  # first step, or a new generate() call
            nodes = self._walk(generated)
        masked, stuck = self._mask(nodes, scores)
        # One host sync per step, for both the fallback decision and the error check.
        unmatched, any_stuck = torch.stack([(nodes == _UNMATCHED).any(), stuck.any()]).tolist()
        if unmatched:
            nodes = self._walk(generated)
            masked, stuck = self._mask(nodes, scores)
            any_stuck = bool(stuck.any())
        if any_stuck:
            raise self._stuck_error(generated, nodes, stuck)
        self._previous_tokens = generated.clone()
        self._previous_nodes = nodes
        return masked

    def _nodes_from_previous(self, generated: torch.Tensor) -> torch.Tensor | None:
        """Nodes of the rows via their parents in the previous call (``_UNMATCHED`` where none matches).

        ``None`` when the previous call cannot be this call's previous step (shapes or trie version differ).
        """
        rows, length = generated.shape
        previous = self._previous_tokens
        group = self.num_beams or rows
        if (
            previous is None
            or self._trie_version != self.trie.version
            or previous.shape != (rows, length - 1)
            or rows % group
        ):
            self._trie_version = self.trie.version
            return None
        groups = rows // group
        prefix = generated[:, :-1].reshape(groups, group, 1, length - 1)
        same = (prefix == previous.reshape(groups, 1, group, length - 1)).all(-1)  # (groups, new, old)
        found = same.any(-1)
        parent = same.byte().argmax(-1) + torch.arange(groups, device=generated.device)[:, None] * group
        nodes = self._step(self._previous_nodes[parent.reshape(-1)], generated[:, -1])
        return torch.where(found.reshape(-1), nodes, _UNMATCHED)

    def _walk(self, generated: torch.Tensor) -> torch.Tensor:
        nodes = torch.zeros(generated.shape[0], dtype=torch.long, device=generated.device)
        for column in generated.T:
            nodes = self._step(nodes, column)
        return nodes

    def _step(self, nodes: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        # A finished row (at a leaf) stays there whatever generate() pads it with.
        return torch.where(self.trie.is_leaf(nodes), nodes, self.trie.advance(nodes, tokens))

    def _mask(self, nodes: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores with disallowed tokens at -inf, and which unfinished rows have no finite score left."""
        finished = self.trie.is_leaf(nodes)
        allowed = self.trie.allowed_mask(nodes)
        if scores.shape[1] > allowed.shape[1]:  # model vocab padded beyond the identifier vocab
            allowed = torch.nn.functional.pad(allowed, (0, scores.shape[1] - allowed.shape[1]))
        allowed[:, self.eos_token_id] |= finished
        allowed[:, self.pad_token_id] |= finished
        masked = scores.masked_fill(~allowed, float("-inf"))
        stuck = ~finished & ~(masked > float("-inf")).any(-1)
        return masked, stuck

    def _stuck_error(
        self, generated: torch.Tensor, nodes: torch.Tensor, stuck: torch.Tensor
    ) -> DecodingError:
        row = int(torch.nonzero(stuck)[0])
        tokens = generated[row].tolist()
        if int(nodes[row]) < 0:
            reason = "its tokens are not a prefix of any identifier (a token outside the trie was forced)"
        else:
            reason = (
                "every token the trie allows there has score -inf (another logits processor forbade them?)"
            )
        return DecodingError(
            f"constrained decoding is stuck: row {row} with generated tokens {tokens} has no valid next token; "
            f"{reason}. {int(stuck.sum())} row(s) are stuck."
        )
