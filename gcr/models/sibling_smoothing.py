"""Prefix-aware label smoothing: the smoothed mass goes to the target's *siblings* in the identifier trie.

Plain label smoothing spreads ``epsilon`` over the whole vocabulary, most of which can never follow the
prefix. Here, at each identifier position, ``epsilon`` is shared by the tokens the trie allows after the gold
prefix other than the gold token (the codes of the neighbouring clusters), so the decoder learns that a near
miss is nearer than a token that leaves the trie. A position with no sibling keeps its one-hot target.
"""

from __future__ import annotations

import torch

from gcr.decoding.trie import TokenTrie


def sibling_targets(labels: torch.Tensor, trie: TokenTrie, vocab_size: int, ignore_index: int) -> torch.Tensor:
    """``(N, T, V)`` bool mask of each label's siblings: tokens the trie allows after ``labels[:, :t]``, minus
    ``labels[:, t]``. Rows whose prefix leaves the trie (and ignored positions) have none."""
    N, T = labels.shape
    siblings = torch.zeros(N, T, vocab_size, dtype=torch.bool, device=labels.device)
    states = torch.zeros(N, dtype=torch.long, device=labels.device)
    rows = torch.arange(N, device=labels.device)
    for t in range(T):
        column = labels[:, t]
        valid = column != ignore_index
        allowed = trie.allowed_mask(states)[:, :vocab_size]
        token = column.clamp(min=0)
        inside = token.clamp(max=allowed.shape[1] - 1)
        on_path = valid & (token < allowed.shape[1]) & allowed[rows, inside]
        allowed[rows, inside] = False
        siblings[:, t, : allowed.shape[1]] = allowed & on_path[:, None]
        states = torch.where(valid, trie.advance(states, token), states)
    return siblings


def sibling_smoothed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, trie: TokenTrie, epsilon: float,
                                   ignore_index: int) -> torch.Tensor:
    """Mean over non-ignored positions of ``-sum_v q(v) log p(v)``, ``q`` = ``1 - epsilon`` on the label and
    ``epsilon`` shared equally by its siblings (all on the label when it has none)."""
    log_probs = logits.float().log_softmax(-1)
    valid = labels != ignore_index
    gold = log_probs.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    siblings = sibling_targets(labels, trie, logits.shape[-1], ignore_index)
    count = siblings.sum(-1)
    sibling_mean = (log_probs * siblings).sum(-1) / count.clamp(min=1)
    smoothed = torch.where(count > 0, (1.0 - epsilon) * gold + epsilon * sibling_mean, gold)
    return -(smoothed[valid]).mean()
