"""Batched beam search constrained to a :class:`TokenTrie`, for backbones that do not use ``generate()``.

The selection rule is the one of Hugging Face / fairseq beam search: at each step the ``K`` best candidates
over all ``K * vocab`` continuations are taken; those that end with EOS become finished hypotheses, and the ``K``
best continuations that do not end with EOS stay running. With ``length_penalty=0`` (raw log-prob sums) this
returns what ``generate(num_beams=K, length_penalty=0.0)`` under :class:`TrieLogitsProcessor` returns.

A batch item stops as soon as no running beam can beat its K-th finished hypothesis (an exact bound, like
``early_stopping="never"``). When ``num_beams`` is at least the number of identifiers nothing is ever pruned, so
the result is every identifier ranked by its exact score.

**Scoring only the allowed children** (``output_embedding``). A compact backbone can hand the search its last
hidden states instead of log-probs, with its output embedding (the rows of its LM head). A step then scores, per
beam, only the tokens the trie allows after it, so it never writes, masks or ranks a ``(beams, vocab)`` matrix:

* ``normalize="full"`` (the default, exact): the log-probs of the model as trained. A model trained with
  full-vocabulary cross-entropy defines ``log p(t) = logit_t - logsumexp(all logits)``; the normaliser needs every
  logit, so the head is applied to the full vocabulary, but only for the beams still alive, and only reduced
  (``logsumexp``) and gathered at the allowed tokens: no ``log_softmax`` matrix, no mask over it, and a top-k over
  ``beams x allowed`` instead of ``beams x vocab``. Scores and rankings are those of the full-vocabulary path
  (up to float rounding). There is no cheaper exact normaliser: ``logsumexp`` over the allowed set only bounds it
  from below, and proving a ranking from that bound needs the full sums of nearly every beam anyway.
* ``normalize="allowed"`` (an approximation, opt-in): log-softmax over each beam's allowed children only, i.e. the
  model's distribution renormalised over the trie (exact for a model trained with a trie-restricted softmax).
  The head is applied only to the union of the allowed tokens (one gather of output-embedding rows per step), so
  its cost follows the trie's width, not the vocabulary. Scores are higher than the full ones (each step's
  normaliser is smaller) and rankings can differ.

A step where a live beam sits at a node allowing more than a quarter of the vocabulary (e.g. the root of
natural-language identifiers) falls back to the whole matrix, with the same normalisation. This path reads the
widest live node's degree and the live rows back to the host once per step (free on a CPU; a small sync on an
accelerator, where the full-vocabulary path needs none).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.nn import functional as F

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
    output_embedding: torch.Tensor | None = None,
    output_bias: torch.Tensor | None = None,
    normalize: Literal["full", "allowed"] = "full",
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
        output_embedding: ``(vocab, hidden)`` rows of the model's output layer (``lm_head.weight``). When given,
            ``step_fn`` returns the final hidden states ``(B*K, hidden)`` instead of log-probs, and each step
            scores only the allowed children of every beam (see the module docstring).
        output_bias: the output layer's bias ``(vocab,)``, if it has one.
        normalize: with ``output_embedding``: ``"full"`` (exact log-probs of a model trained with
            full-vocabulary cross-entropy) or ``"allowed"`` (log-softmax over each beam's allowed children; an
            approximation unless the model was trained that way).
    """
    if batch_size < 1 or num_beams < 1:
        raise ValueError(f"batch_size and num_beams must be positive, got {batch_size} and {num_beams}")
    if normalize not in ("full", "allowed"):
        raise ValueError(f"normalize must be 'full' or 'allowed', got {normalize!r}")
    head = None
    if output_embedding is not None:
        if output_embedding.shape[0] < trie.vocab_size:
            raise ValueError(
                f"output_embedding has {output_embedding.shape[0]} rows but the trie's vocab is {trie.vocab_size}"
            )
        head = _AllowedChildren(trie, output_embedding, output_bias, normalize)
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
        out, state = step_fn(tokens, state)
        if head is not None:
            if out.dim() != 2 or out.shape[0] != B * K or out.shape[1] != output_embedding.shape[1]:
                raise ValueError(
                    f"step_fn returned hidden states of shape {tuple(out.shape)}, expected "
                    f"({B * K}, {output_embedding.shape[1]}) to match output_embedding"
                )
            candidates, cand_tokens = head(out, states.view(-1), running.view(-1), mask_buffer)
        else:
            if out.shape[0] != B * K or out.shape[1] < V:
                raise ValueError(f"step_fn returned log-probs of shape {tuple(out.shape)}, expected ({B * K}, >= {V})")
            candidates = running.view(-1, 1) + out[:, :V].float()
            trie.mask_scores_(candidates, states.view(-1), mask_buffer)
            cand_tokens = None
        C = candidates.shape[1]  # candidates per beam: the vocabulary, or the widest allowed set this step
        candidates = candidates.view(B, K, C)

        # Finished: EOS candidates among this step's K best candidates.
        top_scores, top_index = candidates.view(B, K * C).topk(min(K, K * C), dim=1)
        top_scores, top_index = _pad_to(top_scores, top_index, K)
        top_parent, top_token = top_index // C, _token_at(top_index, cand_tokens, C)
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
        if cand_tokens is None:
            candidates[..., eos] = neg_inf
        else:
            candidates = candidates.masked_fill(cand_tokens.view(B, K, C) == eos, neg_inf)
        running, run_index = candidates.view(B, K * C).topk(min(K, K * C), dim=1)
        running, run_index = _pad_to(running, run_index, K)
        parent, token = run_index // C, _token_at(run_index, cand_tokens, C)
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


def _token_at(index: torch.Tensor, cand_tokens: torch.Tensor | None, width: int) -> torch.Tensor:
    """Token of each flat candidate ``index`` into ``(B, K * width)``."""
    if cand_tokens is None:
        return index % width
    return cand_tokens.view(index.shape[0], -1).gather(1, index)


def _pad_to(scores: torch.Tensor, index: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad top-k results to ``k`` columns (scores -inf, index 0) when there were fewer candidates."""
    missing = k - scores.shape[1]
    if missing <= 0:
        return scores, index
    return F.pad(scores, (0, missing), value=float("-inf")), F.pad(index, (0, missing), value=0)


class _AllowedChildren:
    """Scores of each beam's allowed children from its hidden state (see the module docstring)."""

    def __init__(self, trie: TokenTrie, weight: torch.Tensor, bias: torch.Tensor | None, normalize: str) -> None:
        self.trie, self.normalize = trie, normalize
        self.weight = weight[: trie.vocab_size]
        self.bias = None if bias is None else bias[: trie.vocab_size]

    def logits(self, hidden: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The output layer (the model's own op and dtype), then float32: over all tokens or ``rows`` of them."""
        if rows is None:
            return F.linear(hidden, self.weight, self.bias).float()
        bias = None if self.bias is None else self.bias[rows]
        return F.linear(hidden, self.weight[rows], bias).float()

    def __call__(
        self, hidden: torch.Tensor, states: torch.Tensor, running: torch.Tensor, buffer: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(running + log-probs (N, C), tokens (N, C))``; ``tokens`` is ``None`` when C is the vocabulary."""
        trie, V, neg_inf = self.trie, self.trie.vocab_size, float("-inf")
        live = (running > neg_inf) & (states >= 0)
        node = states.clamp(min=0)
        degree = torch.where(live, trie.degree[node].long(), 0)
        width = max(1, int(degree.max()))
        if 4 * width > V:  # a wide node: score the whole vocabulary this step
            logits = self.logits(hidden)
            if self.normalize == "full":
                candidates = running[:, None] + logits.log_softmax(-1)
                return trie.mask_scores_(candidates, states, buffer), None
            masked = trie.mask_scores_(logits, states, buffer)
            lse = masked.logsumexp(-1, keepdim=True)
            return running[:, None] + (masked - lse.masked_fill(lse == neg_inf, 0.0)), None
        offsets = torch.arange(width, device=states.device)
        valid = offsets < degree[:, None]
        slots = (trie.edge_start[node].long()[:, None] + offsets).clamp_(max=trie.child_token.numel() - 1)
        tokens = torch.where(valid, trie.child_token[slots].long(), 0)
        rows = torch.nonzero(live).squeeze(1)
        live_tokens, live_valid = tokens[rows], valid[rows]
        h = hidden[rows]
        if self.normalize == "full":
            logits = self.logits(h)
            scores = logits.gather(1, live_tokens) - logits.logsumexp(-1, keepdim=True)
            scores = scores.masked_fill(~live_valid, neg_inf)
        else:
            union = torch.unique(live_tokens[live_valid])
            scores = self.logits(h, union).gather(1, torch.searchsorted(union, live_tokens).clamp_(max=union.numel() - 1))
            scores = scores.masked_fill(~live_valid, neg_inf)
            scores = scores - scores.logsumexp(-1, keepdim=True)
        candidates = torch.full((states.numel(), width), neg_inf, device=states.device)
        candidates[rows] = running[rows, None] + scores
        return candidates, tokens


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
