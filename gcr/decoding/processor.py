"""Trie-constrained decoding inside Hugging Face ``generate()``.

``generate()`` hands a logits processor only ``input_ids`` and the next-token scores. Beam search reorders its
rows between calls without saying how, so the processor remembers the previous call's generated tokens and trie
states, finds each new row's parent by comparing prefixes within its batch item, and advances the parent's state
by one token: no walk from the root, and no host<->device sync (errors are recorded on the device and raised by
:meth:`TrieLogitsProcessor.check` once generation is over).

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

from gcr.decoding.trie import DEAD, TokenTrie
from gcr.errors import DecodingError

__all__ = ["TrieLogitsProcessor"]

_OFF_TRIE_SCORE = -1e9  # an off-trie row may only end (EOS), at about the score HF gives dummy beams


class TrieLogitsProcessor(LogitsProcessor):
    """Masks every token that would leave the identifier trie.

    Args:
        trie: the identifiers to decode into.
        prompt_length: column of ``input_ids`` where generated tokens start (the prompt length with left
            padding; 1 for encoder-decoder models, whose decoder input starts with the decoder start token).
        eos_token_id: the EOS id; it must match ``trie.eos_token_id``.
        pad_token_id: what ``generate()`` writes after a finished row (defaults to EOS). Rows that completed an
            identifier may only continue with pad or EOS.
        num_beams: rows per batch item (``num_beams`` for beam search, ``num_return_sequences`` for sampling).
            Parents are looked up within each group of rows, which is how ``generate()`` reorders them;
            ``None`` compares every row with every previous row (cost quadratic in the number of rows).
        inplace: mask ``scores`` in place (the default: on CPU a fresh ``(rows, vocab)`` tensor per step costs
            more than the masking). ``generate()`` hands processors a tensor of its own, but with greedy search
            and ``output_logits=True`` the returned logits are then the masked ones; pass ``False`` to keep them.

    A row that leaves the trie (a token outside it was forced, e.g. by another processor or a wrong
    ``prompt_length``) is only allowed EOS, at score -1e9, so that decoding still ends; :meth:`check` then raises.
    """

    def __init__(
        self,
        trie: TokenTrie,
        prompt_length: int,
        eos_token_id: int,
        pad_token_id: int | None = None,
        num_beams: int | None = None,
        *,
        inplace: bool = True,
    ) -> None:
        if eos_token_id != trie.eos_token_id:
            raise ValueError(f"eos_token_id {eos_token_id} differs from the trie's EOS {trie.eos_token_id}")
        self.trie = trie
        self.prompt_length = prompt_length
        self.eos_token_id = eos_token_id
        self.pad_token_id = eos_token_id if pad_token_id is None else pad_token_id
        self.num_beams = num_beams
        self.inplace = inplace
        self._buffer: torch.Tensor | None = None
        self.reset()

    def reset(self) -> None:
        """Forget the previous step and any recorded error (done automatically for a new ``generate()``)."""
        self._previous_tokens: torch.Tensor | None = None
        self._previous_states: torch.Tensor | None = None
        self._off_trie_rows: torch.Tensor | None = None  # per call: how many rows were off the trie

    def check(self) -> None:
        """Raise :class:`DecodingError` if any row left the trie during the last ``generate()`` (one host sync)."""
        if self._off_trie_rows is None:
            return
        count = int(self._off_trie_rows)
        if count:
            raise DecodingError(
                f"constrained decoding left the identifier trie in {count} row-step(s): a token outside the trie "
                "was generated (forced by another logits processor, or prompt_length does not point at the first "
                "generated token); those rows were ended with EOS and are not valid identifiers"
            )

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.shape[1] < self.trie.vocab_size:
            raise ValueError(
                f"scores have {scores.shape[1]} columns but the trie's vocab is {self.trie.vocab_size}"
            )
        generated = input_ids[:, self.prompt_length :]
        states = self._states_from_previous(generated)
        if states is None:  # first step, or a new generate() call
            self.reset()
            states = self._walk(generated)
        masked = self._mask(states, scores)
        self._previous_tokens = generated.clone()  # generate() may reuse the buffer behind input_ids
        self._previous_states = states
        return masked

    def _states_from_previous(self, generated: torch.Tensor) -> torch.Tensor | None:
        """States of the rows via their parents in the previous call (``DEAD`` where none matches).

        ``None`` when the previous call cannot be this call's previous step (the shapes do not follow on).
        """
        rows, length = generated.shape
        previous = self._previous_tokens
        group = self.num_beams or rows
        if previous is None or previous.shape != (rows, length - 1) or rows % group:
            return None
        groups = rows // group
        prefix = generated[:, :-1].reshape(groups, group, 1, length - 1)
        same = (prefix == previous.reshape(groups, 1, group, length - 1)).all(-1)  # (groups, new, old)
        found = same.any(-1)
        # Any matching old row will do: a state is a function of the prefix.
        parent = same.byte().argmax(-1) + torch.arange(groups, device=generated.device)[:, None] * group
        states = self._step(self._previous_states[parent.reshape(-1)], generated[:, -1])
        return torch.where(found.reshape(-1), states, DEAD)

    def _walk(self, generated: torch.Tensor) -> torch.Tensor:
        states = torch.zeros(generated.shape[0], dtype=torch.long, device=generated.device)
        for column in generated.T:
            states = self._step(states, column)
        return states

    def _step(self, states: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        # A finished row stays finished whatever generate() pads it with.
        return torch.where(TokenTrie.is_finished(states), states, self.trie.advance(states, tokens))

    def _mask(self, states: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        rows, V = states.numel(), self.trie.vocab_size
        if scores.device.type != "cpu" and (
            self._buffer is None or self._buffer.shape[0] != rows or self._buffer.device != scores.device
        ):
            self._buffer = torch.empty(rows, V + 1, dtype=torch.bool, device=scores.device)
        out = scores if self.inplace else scores.clone()
        if scores.device.type == "cpu" and not bool((states < 0).any()):
            # Every row is at a node (the usual step): nothing to keep for finished or off-trie rows. On the CPU
            # reading the flag back is free, and skipping a dozen small ops matters on a busy machine.
            return self.trie.mask_scores_(out, states, self._buffer)
        finished = TokenTrie.is_finished(states)
        off_trie = states == DEAD
        eos_scores = scores[:, self.eos_token_id].clone()
        pad_scores = scores[:, self.pad_token_id].clone()
        self.trie.mask_scores_(out, states, self._buffer)
        # A finished row may only continue with EOS or pad (what generate() appends); an off-trie row must end.
        out[:, self.pad_token_id] = torch.where(finished, pad_scores, out[:, self.pad_token_id])
        out[:, self.eos_token_id] = torch.where(
            off_trie, _OFF_TRIE_SCORE, torch.where(finished, eos_scores, out[:, self.eos_token_id])
        )
        count = off_trie.sum()
        self._off_trie_rows = count if self._off_trie_rows is None else self._off_trie_rows + count
        return out
