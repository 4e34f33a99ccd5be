"""Batched beam search constrained to a :class:`TokenTrie`, for backbones that do not use ``generate()``.

The selection rule is the one of Hugging Face / fairseq beam search: at each step the ``K`` best candidates
over all ``K * vocab`` continuations are taken; those that end with EOS become finished hypotheses, and the ``K``
best continuations that do not end with EOS stay running. With ``length_penalty=0`` (raw log-prob sums) this
returns what ``generate(num_beams=K, length_penalty=0.0)`` under :class:`TrieLogitsProcessor` returns.

A batch item stops as soon as no running beam can beat its K-th finished hypothesis (an exact bound, like
``early_stopping="never"``). When ``num_beams`` is at least the number of identifiers nothing is ever pruned, so
the result is every identifier ranked by its exact score.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from gcr.decoding.trie import TokenTrie

__all__ = ["BeamSearchOutput", "StepFn", "ReorderFn", "constrained_beam_search"]

StepFn = Callable[[torch.Tensor, Any], tuple[torch.Tensor, Any]]
"""``(tokens (B*K, t), state) -> (log_probs (B*K, V), state)``; row ``b * K + k`` is beam ``k`` of item ``b``."""
ReorderFn = Callable[[Any, torch.Tensor], Any]
"""``(state, beam_idx (B*K,)) -> state`` whose row ``i`` is the old row ``beam_idx[i]``."""


@dataclass
class BeamSearchOutput:
    """Finished hypotheses of each batch item, best first.

    Attributes:
        sequences: per batch item, the token lists (EOS included) of its found identifiers, best first.
        scores: ``(B, K)`` summed log-probs, divided by ``length ** length_penalty``; -inf for empty slots.
        identifiers: ``(B, K)`` identifier indices in the trie; -1 for empty slots.
    """

    sequences: list[list[list[int]]]
    scores: torch.Tensor
    identifiers: torch.Tensor


def constrained_beam_search(
    step_fn: StepFn,
    trie: TokenTrie,
    batch_size: int,
    num_beams: int,
    max_length: int | None = None,
    *,
    state: Any = None,
    reorder_fn: ReorderFn | None = None,
    length_penalty: float = 0.0,
) -> BeamSearchOutput:
    """Find the ``num_beams`` best identifiers of each batch item.

    Args:
        step_fn: scores the next token of every beam given the tokens generated so far (no prompt; the
            first call gets ``t = 0`` columns). Its log-probs are used as they are: masking does not renormalise.
        trie: the identifiers; ``step_fn`` must return tensors on ``trie.device``.
        batch_size, num_beams: ``B`` and ``K``; ``step_fn`` always sees ``B * K`` rows.
        max_length: most tokens to generate (EOS included); defaults to the longest identifier. Unlike
            ``generate()``, beams cut off by it are dropped, never returned unfinished.
        state: initial state passed to ``step_fn`` (for instance ``None`` or a KV cache of the prompts, with
            each prompt repeated ``K`` times).
        reorder_fn: applied to the state after every step to follow the surviving beams' parents.
        length_penalty: finished scores are divided by ``length ** length_penalty`` (0 keeps raw sums).
    """
    if batch_size < 1 or num_beams < 1:
        raise ValueError(f"batch_size and num_beams must be positive, got {batch_size} and {num_beams}")
    B, K, V, eos, device = batch_size, num_beams, trie.vocab_size, trie.eos_token_id, trie.device
    max_length = trie.max_length if max_length is None else min(max_length, trie.max_length)
    neg_inf = float("-inf")
    batch_offset = torch.arange(B, device=device)[:, None] * K

    tokens = torch.empty(B * K, 0, dtype=torch.long, device=device)
    states = torch.zeros(B, K, dtype=torch.long, device=device)
    running = torch.full((B, K), neg_inf, device=device)
    running[:, 0] = 0.0  # the other beams start dead so the first step does not pick duplicates
    best_scores = torch.full((B, K), neg_inf, device=device)
    best_ids = torch.full((B, K), -1, dtype=torch.long, device=device)
    best_tokens = torch.full((B, K, max_length), -1, dtype=torch.long, device=device)
    mask_buffer = torch.empty(B * K, V + 1, dtype=torch.bool, device=device) if device.type != "cpu" else None
    all_done = _LaggedFlag(device)

    for t in range(max_length):
        log_probs, state = step_fn(tokens, state)
        if log_probs.shape[0] != B * K or log_probs.shape[1] < V:
            raise ValueError(
                f"step_fn returned log-probs of shape {tuple(log_probs.shape)}, expected ({B * K}, >= {V})"
            )
        candidates = running.view(-1, 1) + log_probs[:, :V].float()
        trie.mask_scores_(candidates, states.view(-1), mask_buffer)
        candidates = candidates.view(B, K, V)

        # Finished: EOS candidates among this step's K best candidates.
        top_scores, top_index = candidates.view(B, K * V).topk(K, dim=1)
        top_parent, top_token = top_index // V, top_index % V
        ends = (top_token == eos) & (top_scores > neg_inf)
        finished = trie.advance(states.gather(1, top_parent), top_token)
        new_scores = torch.where(ends, top_scores / (t + 1) ** length_penalty, neg_inf)
        new_ids = torch.where(ends, trie.identifier_of(finished), -1)
        new_tokens = torch.full((B, K, max_length), -1, dtype=torch.long, device=device)
        new_tokens[:, :, :t] = tokens.view(B, K, t).gather(1, top_parent[..., None].expand(B, K, t))
        new_tokens[:, :, t] = eos
        best_scores, keep = torch.cat([best_scores, new_scores], 1).topk(K, dim=1)
        best_ids = torch.cat([best_ids, new_ids], 1).gather(1, keep)
        best_tokens = torch.cat([best_tokens, new_tokens], 1).gather(1, keep[..., None].expand(B, K, max_length))

        # Running: the K best candidates that do not end with EOS.
        candidates[..., eos] = neg_inf
        running, run_index = candidates.view(B, K * V).topk(K, dim=1)
        parent, token = run_index // V, run_index % V
        states = torch.where(running > neg_inf, trie.advance(states.gather(1, parent), token), -1)

        # Log-probs are <= 0, so a running beam's final score is at most its current sum, divided by the most
        # favourable length it can still reach.
        best_length = max_length if length_penalty > 0 else t + 1
        bound = running[:, 0] / best_length**length_penalty
        done = (running[:, 0] == neg_inf) | (bound <= best_scores[:, -1])
        running = running.masked_fill(done[:, None], neg_inf)
        if all_done.update(done.all()):
            break
        beam_idx = (parent + batch_offset).view(-1)
        tokens = torch.cat([tokens[beam_idx], token.view(-1, 1)], dim=1)
        if reorder_fn is not None:
            state = reorder_fn(state, beam_idx)

    found = (best_ids >= 0).tolist()
    sequences = [
        [[tok for tok in row if tok >= 0] for row, ok in zip(item_rows, item_found) if ok]
        for item_rows, item_found in zip(best_tokens.tolist(), found)
    ]
    return BeamSearchOutput(sequences=sequences, scores=best_scores, identifiers=best_ids)


class _LaggedFlag:
    """A device bool read on the host without stalling: on CUDA each step reads the value copied one step
    earlier (the copy runs asynchronously), so stopping may come one step late but never waits for the GPU.
    Sound here because ``done`` never goes back to False once every batch item is done."""

    def __init__(self, device: torch.device) -> None:
        self._async = device.type == "cuda"
        if self._async:
            self._host = torch.zeros((), dtype=torch.bool).pin_memory()
            self._event = torch.cuda.Event()
            self._pending = False

    def update(self, flag: torch.Tensor) -> bool:
        if not self._async:
            return bool(flag)
        ready = self._pending and self._event.query() and bool(self._host)
        self._host.copy_(flag, non_blocking=True)
        self._event.record()
        self._pending = True
        return ready
