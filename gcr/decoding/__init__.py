"""Constrained decoding: the identifier trie, a Hugging Face logits processor, and gcr's own beam search."""

from gcr.decoding.beam_search import BeamSearchOutput, constrained_beam_search
from gcr.decoding.processor import TrieLogitsProcessor
from gcr.decoding.trie import TokenTrie

__all__ = ["BeamSearchOutput", "TokenTrie", "TrieLogitsProcessor", "constrained_beam_search"]
