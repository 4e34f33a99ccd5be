"""Constrained generative retrieval: queries -> ranked target ids.

:class:`ConstrainedRetriever` joins a backbone, an identifier index (restricted
to the targets being searched, e.g. the test split) and the trie built from
their exact token ids. Beam search can only emit identifiers in that set; every
returned identifier is checked and mapped back to its targets.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from transformers import LogitsProcessorList

from gcr.data.corpus import Content
from gcr.decoding import TokenTrie, TrieLogitsProcessor
from gcr.errors import DecodingError
from gcr.index import IdentifierIndex

_FILLER_SCORE = -1e8  # HF starts spare beams at -1e9; no real identifier scores this low


@dataclass
class Retrieved:
    """Ranked target ids (best first) and their identifier scores, per query."""

    targets: list[list[str]]
    scores: list[list[float]]
    seconds: float


class ConstrainedRetriever:
    """Generate identifiers under a trie of the searchable targets and map them back."""

    def __init__(
        self,
        backbone,
        index: IdentifierIndex,
        target_ids: Iterable[str] | None = None,
        *,
        num_beams: int = 10,
    ):
        if index.token_ids is None:
            raise DecodingError("the index has no token ids; call index.tokenize(tokenizer) first")
        index.check_tokenizer(backbone.tokenizer)
        self.backbone = backbone
        self.index = index
        self.positions = index.subset(target_ids) if target_ids is not None else list(range(len(index)))
        sequences = [index.token_ids[p] for p in self.positions]
        self.eos = backbone.tokenizer.eos_token_id
        self.trie = TokenTrie.build(sequences, vocab_size=len(backbone.tokenizer), eos_token_id=self.eos)
        self._position_of = {tuple(s): p for s, p in zip(sequences, self.positions)}
        self.max_new_tokens = max(len(s) for s in sequences)
        # beam search cannot return more distinct identifiers than exist
        self.num_beams = max(1, min(num_beams, len(sequences)))

    def to(self, device: torch.device | str) -> ConstrainedRetriever:
        self.trie = self.trie.to(device)
        return self

    @torch.no_grad()
    def __call__(self, contents: Sequence[Content]) -> Retrieved:
        """Retrieve for a batch of query contents."""
        start = time.perf_counter()
        device = next(self.backbone.parameters()).device
        inputs = {k: v.to(device) for k, v in self.backbone.batch(contents).items()}
        if self.trie.device != device:
            self.trie = self.trie.to(device)
        processor = TrieLogitsProcessor(
            self.trie,
            prompt_length=inputs["input_ids"].shape[1],
            eos_token_id=self.eos,
            pad_token_id=self.backbone.tokenizer.pad_token_id,
            num_beams=self.num_beams,
        )
        tokens, scores = self.backbone.generate(
            inputs,
            logits_processor=LogitsProcessorList([processor]),
            num_beams=self.num_beams,
            max_new_tokens=self.max_new_tokens,
        )
        targets, target_scores = self._to_targets(
            tokens.view(len(contents), self.num_beams, -1), scores.view(len(contents), -1)
        )
        return Retrieved(targets, target_scores, time.perf_counter() - start)

    def _to_targets(self, tokens: torch.Tensor, scores: torch.Tensor) -> tuple[list[list[str]], list[list[float]]]:
        out_targets, out_scores = [], []
        for beams, beam_scores in zip(tokens.tolist(), scores.tolist()):
            targets, target_scores = [], []
            for seq, score in zip(beams, beam_scores):
                if score < _FILLER_SCORE:
                    continue  # fewer reachable identifiers than beams: HF fills with dead beams (~ -1e9)
                ident = tuple(seq[: seq.index(self.eos) + 1]) if self.eos in seq else tuple(seq)
                position = self._position_of.get(ident)
                if position is None:
                    raise DecodingError(
                        f"constrained decoding produced {list(ident)}, which is not an identifier in the "
                        "searched set; this is a bug in the trie constraint, please report it"
                    )
                for t in self.index.targets[position]:
                    if t not in targets:
                        targets.append(t)
                        target_scores.append(score)
            out_targets.append(targets)
            out_scores.append(target_scores)
        return out_targets, out_scores
