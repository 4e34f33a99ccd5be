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

from gcr.data.corpus import Content
from gcr.errors import DecodingError
from gcr.index import IdentifierIndex

_FILLER_SCORE = -1e8  # HF starts spare beams at -1e9; no real identifier scores this low


@dataclass
class Retrieved:
    """Ranked target ids (best first) and their identifier scores, per query."""

    targets: list[list[str]]
    scores: list[list[float]]
    seconds: float
    verified: Retrieved | None = None  # the same candidates re-ranked by GSV, when the module verifies


class ConstrainedRetriever:
    """Generate identifiers under a trie of the searchable targets and map them back."""

    def __init__(
        self,
        backbone,
        index: IdentifierIndex,
        target_ids: Iterable[str] | None = None,
        *,
        num_beams: int = 10,
        synced_gpus: bool = False,
    ):
        if index.token_ids is None:
            raise DecodingError("the index has no token ids; call index.tokenize(tokenizer) first")
        index.check_tokenizer(backbone.tokenizer)
        if index.vocab_size is None:  # saved by gcr 0.1, before the index recorded them
            index.vocab_size, index.eos_token_id = len(backbone.tokenizer), backbone.tokenizer.eos_token_id
        self.backbone = backbone
        self.index = index
        if target_ids is None:
            self.positions = list(range(len(index)))
            self.searched: frozenset[str] | None = None
        else:
            target_ids = list(target_ids)
            self.positions = index.subset(target_ids)
            # An identifier may name targets outside the searched set (schemes that share identifiers:
            # a test target's SID may also name train targets); only searched targets are returned.
            self.searched = frozenset(target_ids)
        self.eos = backbone.tokenizer.eos_token_id if index.eos_token_id is None else index.eos_token_id
        self.trie = index.trie(self.positions)
        if self.trie.vocab_size > len(backbone.tokenizer):
            raise DecodingError(
                f"the index's vocabulary ({self.trie.vocab_size}) is larger than the model's "
                f"({len(backbone.tokenizer)}); re-tokenize the index with this model's tokenizer"
            )
        self.max_new_tokens = self.trie.max_length
        self.synced_gpus = synced_gpus  # sharded weights (FSDP): ranks step generate() together
        # beam search cannot return more distinct identifiers than exist
        self.num_beams = max(1, min(num_beams, len(self.positions)))

    def to(self, device: torch.device | str) -> ConstrainedRetriever:
        self.trie = self.trie.to(device)
        return self

    @torch.no_grad()
    def __call__(self, contents: Sequence[Content]) -> Retrieved:
        """Retrieve for a batch of query contents: the backbone searches, the retriever maps ids to targets."""
        start = time.perf_counter()
        device = next(self.backbone.parameters()).device
        inputs = {k: v.to(device) for k, v in self.backbone.batch(contents).items()}
        if self.trie.device != device:
            self.trie = self.trie.to(device)
        identifiers, scores = self.backbone.search(
            inputs, self.trie, num_beams=self.num_beams, max_new_tokens=self.max_new_tokens,
            eos_token_id=self.eos, synced_gpus=self.synced_gpus,
        )
        targets, target_scores = self._to_targets(identifiers, scores)
        return Retrieved(targets, target_scores, time.perf_counter() - start)

    def _to_targets(
        self, identifiers: torch.Tensor, scores: torch.Tensor
    ) -> tuple[list[list[str]], list[list[float]]]:
        out_targets, out_scores = [], []
        for beam_ids, beam_scores in zip(identifiers.tolist(), scores.tolist()):
            targets, target_scores = [], []
            for ident, score in zip(beam_ids, beam_scores):
                if score < _FILLER_SCORE:
                    continue  # fewer reachable identifiers than beams: HF fills with dead beams (~ -1e9)
                if ident < 0:
                    raise DecodingError(
                        "constrained decoding produced a sequence that is not an identifier in the searched "
                        "set; this is a bug in the trie constraint, please report it"
                    )
                for t in self.index.targets[self.positions[ident]]:
                    if self.searched is not None and t not in self.searched:
                        continue
                    if t not in targets:
                        targets.append(t)
                        target_scores.append(score)
            out_targets.append(targets)
            out_scores.append(target_scores)
        return out_targets, out_scores
