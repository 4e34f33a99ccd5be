"""A prefix trie over identifier token sequences, stored as flat tensors for batched decoding.

Every identifier is a sequence of token ids that ends with EOS and contains no other EOS, so no identifier is
a prefix of another one: ``[5, 7, EOS]`` and ``[5, 7, 9, EOS]`` share the node for ``[5, 7]``, and EOS is just
one more edge out of it. The node reached by an identifier's EOS is a leaf that records the identifier's index.

Layout (compressed sparse rows, as in STATIC constrained decoding):

* nodes are numbered ``0..N-1`` breadth first, ``0`` is the root;
* the edges out of node ``n`` are ``indptr[n]:indptr[n + 1]``; ``child_token`` holds their tokens (sorted
  within each node) and ``child_node`` the nodes they lead to;
* ``leaf_of_node[n]`` is the identifier index of leaf ``n``, or ``-1`` for inner nodes.

All batched queries take a 1-D LongTensor of node ids (``-1`` means "not in the trie" and is propagated) and
run as a handful of tensor ops on the trie's device, with no Python loop over rows.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from gcr.errors import ArtifactError, IdentifierError

__all__ = ["TokenTrie"]

_FORMAT = "gcr.TokenTrie/1"
_TENSOR_KEYS = ("indptr", "child_token", "child_node", "leaf_of_node")


class TokenTrie:
    """Prefix trie of identifiers (token-id sequences ending with EOS), held as CSR tensors.

    Build one with :meth:`build`; the constructor takes already-built tensors (see :meth:`from_state_dict`).
    """

    def __init__(
        self,
        indptr: torch.Tensor,
        child_token: torch.Tensor,
        child_node: torch.Tensor,
        leaf_of_node: torch.Tensor,
        *,
        vocab_size: int,
        eos_token_id: int,
        max_length: int,
    ) -> None:
        self.indptr = indptr.long()
        self.child_token = child_token.long()
        self.child_node = child_node.long()
        self.leaf_of_node = leaf_of_node.long()
        self.vocab_size = int(vocab_size)
        self.eos_token_id = int(eos_token_id)
        self.max_length = int(max_length)  # tokens in the longest identifier, EOS included
        self.version = 0  # bumped by insert(); node ids of older versions are meaningless
        self._derive()

    def _derive(self) -> None:
        """Compute the lookup tables that follow from the CSR arrays (not saved in the state dict)."""
        n, device = self.num_nodes, self.indptr.device
        degree = self.indptr[1:] - self.indptr[:-1]
        edge_parent = torch.repeat_interleave(torch.arange(n, device=device), degree)
        # Edges are sorted by (parent, token), so this key is globally sorted: advance() is one searchsorted.
        self._edge_key = edge_parent * self.vocab_size + self.child_token
        self._degree = degree
        self._node_parent = torch.full((n,), -1, dtype=torch.long, device=device)
        self._node_parent[self.child_node] = edge_parent
        self._node_token = torch.full((n,), -1, dtype=torch.long, device=device)
        self._node_token[self.child_node] = self.child_token
        leaves = torch.nonzero(self.leaf_of_node >= 0).squeeze(1)
        self._leaf_node = torch.empty(leaves.numel(), dtype=torch.long, device=device)
        self._leaf_node[self.leaf_of_node[leaves]] = leaves
        # Dense first level: the root may have up to vocab_size children, far more than any deeper node, so
        # its mask is precomputed and allowed_mask() only needs a window as wide as the widest deeper node.
        self._root_mask = torch.zeros(self.vocab_size, dtype=torch.bool, device=device)
        self._root_mask[self.child_token[: int(self.indptr[1])]] = True
        self._max_inner_degree = int(degree[1:].max()) if n > 1 else 0

    # ------------------------------------------------------------------ building

    @classmethod
    def build(
        cls,
        sequences: Sequence[Sequence[int]],
        vocab_size: int,
        eos_token_id: int,
        device: torch.device | str | None = None,
    ) -> TokenTrie:
        """Build the trie of ``sequences``; identifier ``i`` is ``sequences[i]``.

        Raises:
            IdentifierError: the set is empty, has duplicates, or a sequence is not ``tokens... EOS`` with
                every token in ``[0, vocab_size)``.
        """
        if not 0 <= eos_token_id < vocab_size:
            raise IdentifierError(f"eos_token_id {eos_token_id} is outside the vocabulary [0, {vocab_size})")
        flat, offsets = _flatten(sequences)
        _validate(flat, offsets, vocab_size, eos_token_id)
        indptr, child_token, leaf_of_node = _build_csr(flat, offsets, vocab_size)
        num_nodes = len(indptr) - 1
        return cls(
            torch.from_numpy(indptr).to(device),
            torch.from_numpy(child_token).to(device),
            torch.arange(1, num_nodes, device=device),  # breadth-first numbering: edge e leads to node e + 1
            torch.from_numpy(leaf_of_node).to(device),
            vocab_size=vocab_size,
            eos_token_id=eos_token_id,
            max_length=int(np.diff(offsets).max()),
        )

    def insert(self, sequences: Sequence[Sequence[int]]) -> range:
        """Add new identifiers in place and return their indices (they follow the existing ones).

        This simple version rebuilds the whole trie from the merged set, so it costs as much as :meth:`build`;
        node ids change, which is why :attr:`version` is bumped (holders of node ids must re-walk).

        Raises:
            IdentifierError: a new sequence is invalid or duplicates an existing or another new one.
        """
        start = self.num_identifiers
        merged = self.sequences() + [list(s) for s in sequences]
        rebuilt = TokenTrie.build(merged, self.vocab_size, self.eos_token_id, device=self.device)
        version = self.version
        self.__dict__.update(rebuilt.__dict__)
        self.version = version + 1
        return range(start, self.num_identifiers)

    # ------------------------------------------------------------------ properties

    @property
    def num_nodes(self) -> int:
        return self.indptr.numel() - 1

    @property
    def num_identifiers(self) -> int:
        return self._leaf_node.numel()

    @property
    def device(self) -> torch.device:
        return self.indptr.device

    def __repr__(self) -> str:
        return (
            f"TokenTrie(identifiers={self.num_identifiers}, nodes={self.num_nodes}, "
            f"vocab_size={self.vocab_size}, eos_token_id={self.eos_token_id}, device={self.device})"
        )

    # ------------------------------------------------------------------ batched queries

    def advance(self, nodes: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Child of each node along each token, or ``-1`` where there is no such edge (or ``nodes`` is -1)."""
        keys = nodes * self.vocab_size + tokens
        pos = torch.searchsorted(self._edge_key, keys).clamp_(max=self._edge_key.numel() - 1)
        hit = (self._edge_key[pos] == keys) & (nodes >= 0) & (tokens >= 0) & (tokens < self.vocab_size)
        return torch.where(hit, self.child_node[pos], -1)

    def allowed_mask(self, nodes: torch.Tensor) -> torch.Tensor:
        """``(B, vocab_size)`` bool mask of the tokens that have an edge out of each node (none for -1)."""
        safe = nodes.clamp(min=0)
        offsets = torch.arange(self._max_inner_degree, device=nodes.device)
        in_range = (offsets < self._degree[safe, None]) & (nodes[:, None] > 0)
        edges = (self.indptr[safe, None] + offsets).clamp_(max=self.child_token.numel() - 1)
        # Out-of-range slots scatter into an extra dump column that is cut off afterwards.
        tokens = torch.where(in_range, self.child_token[edges], self.vocab_size)
        mask = torch.zeros(nodes.numel(), self.vocab_size + 1, dtype=torch.bool, device=nodes.device)
        mask.scatter_(1, tokens, True)
        return torch.where((nodes == 0)[:, None], self._root_mask, mask[:, : self.vocab_size])

    def walk(self, prefixes: torch.Tensor, pad: int = -1) -> torch.Tensor:
        """Node reached from the root by each row of ``prefixes`` ``(B, L)``; ``-1`` if it leaves the trie.

        Entries equal to ``pad`` are skipped, so right-padded prefixes of different lengths can share a batch.
        """
        nodes = torch.zeros(prefixes.shape[0], dtype=torch.long, device=prefixes.device)
        for column in prefixes.T:  # a loop over positions, each step batched over rows
            nodes = torch.where(column == pad, nodes, self.advance(nodes, column))
        return nodes

    def is_leaf(self, nodes: torch.Tensor) -> torch.Tensor:
        """True where the node is a leaf, i.e. a complete identifier (EOS included)."""
        return (nodes >= 0) & (self.leaf_of_node[nodes.clamp(min=0)] >= 0)

    def identifier_of(self, nodes: torch.Tensor) -> torch.Tensor:
        """Identifier index of each leaf node, ``-1`` for inner nodes and ``-1`` inputs."""
        return torch.where(nodes >= 0, self.leaf_of_node[nodes.clamp(min=0)], -1)

    def tokens_of(self, identifiers: torch.Tensor) -> torch.Tensor:
        """``(n, max_length)`` tokens of the given identifier indices, right-padded with ``-1``."""
        nodes = self._leaf_node[identifiers]
        reversed_tokens = torch.full(
            (nodes.numel(), self.max_length), -1, dtype=torch.long, device=self.device
        )
        for j in range(self.max_length):  # climb towards the root, one level per step
            inner = nodes > 0
            reversed_tokens[:, j] = torch.where(inner, self._node_token[nodes], -1)
            nodes = torch.where(inner, self._node_parent[nodes], 0)
        lengths = (reversed_tokens >= 0).sum(1, keepdim=True)
        positions = torch.arange(self.max_length, device=self.device)
        source = (lengths - 1 - positions).clamp(min=0)
        return torch.where(positions < lengths, reversed_tokens.gather(1, source), -1)

    def sequences(self) -> list[list[int]]:
        """All identifiers as Python lists, in index order (for tests and rebuilding; not for hot paths)."""
        rows = self.tokens_of(torch.arange(self.num_identifiers, device=self.device)).tolist()
        return [[t for t in row if t >= 0] for row in rows]

    # ------------------------------------------------------------------ devices and persistence

    def to(self, device: torch.device | str) -> TokenTrie:
        """A copy of the trie on ``device`` (like ``Tensor.to``, this returns a new object)."""
        moved = TokenTrie.from_state_dict(
            {k: v.to(device) if torch.is_tensor(v) else v for k, v in self.state_dict().items()}
        )
        moved.version = self.version
        return moved

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and ints, loadable with ``torch.load(..., weights_only=True)``."""
        return {
            "format": _FORMAT,
            **{key: getattr(self, key) for key in _TENSOR_KEYS},
            "vocab_size": self.vocab_size,
            "eos_token_id": self.eos_token_id,
            "max_length": self.max_length,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> TokenTrie:
        """Inverse of :meth:`state_dict`.

        Raises:
            ArtifactError: the dict is not a saved TokenTrie or its arrays are inconsistent.
        """
        if state.get("format") != _FORMAT:
            raise ArtifactError(
                f"not a saved TokenTrie: format is {state.get('format')!r}, expected {_FORMAT!r}"
            )
        missing = [k for k in (*_TENSOR_KEYS, "vocab_size", "eos_token_id", "max_length") if k not in state]
        if missing:
            raise ArtifactError(f"saved TokenTrie lacks {missing}; re-save it with TokenTrie.state_dict()")
        n = state["indptr"].numel() - 1
        e = state["child_token"].numel()
        if (
            n < 1
            or state["leaf_of_node"].numel() != n
            or state["child_node"].numel() != e
            or int(state["indptr"][-1]) != e
        ):
            raise ArtifactError(
                "saved TokenTrie is corrupt: indptr, child_token, child_node and leaf_of_node "
                "sizes disagree; rebuild it with TokenTrie.build()"
            )
        return cls(
            *(state[k] for k in _TENSOR_KEYS),
            vocab_size=state["vocab_size"],
            eos_token_id=state["eos_token_id"],
            max_length=state["max_length"],
        )


# ---------------------------------------------------------------------- build helpers (numpy, host side)


def _flatten(sequences: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate the sequences into one int64 array plus ``offsets`` (``len(sequences) + 1``)."""
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter(itertools.chain.from_iterable(sequences), dtype=np.int64, count=int(offsets[-1]))
    return flat, offsets


def _validate(flat: np.ndarray, offsets: np.ndarray, vocab_size: int, eos: int) -> None:
    """Raise IdentifierError unless every sequence is ``tokens... EOS`` over ``[0, vocab_size)``."""
    lengths = np.diff(offsets)
    if len(lengths) == 0:
        raise IdentifierError("no identifiers: cannot build a trie from an empty identifier set")
    empty = np.flatnonzero(lengths == 0)
    if len(empty):
        raise IdentifierError(f"identifier {empty[0]} is empty; every identifier must end with EOS ({eos})")

    def owner(position: int) -> int:
        return int(np.searchsorted(offsets, position, side="right") - 1)

    bad = np.flatnonzero((flat < 0) | (flat >= vocab_size))
    if len(bad):
        i = owner(bad[0])
        raise IdentifierError(
            f"identifier {i} has token {flat[bad[0]]} outside the vocabulary [0, {vocab_size}): "
            f"{flat[offsets[i] : offsets[i + 1]].tolist()}"
        )
    last = offsets[1:] - 1
    no_eos = np.flatnonzero(flat[last] != eos)
    if len(no_eos):
        i = int(no_eos[0])
        raise IdentifierError(
            f"identifier {i} does not end with EOS ({eos}): {flat[offsets[i] : offsets[i + 1]].tolist()}"
        )
    is_eos = flat == eos
    is_eos[last] = False
    inner = np.flatnonzero(is_eos)
    if len(inner):
        i = owner(inner[0])
        raise IdentifierError(
            f"identifier {i} has EOS ({eos}) before its end: {flat[offsets[i] : offsets[i + 1]].tolist()}"
        )


def _build_csr(flat: np.ndarray, offsets: np.ndarray, vocab_size: int) -> tuple[np.ndarray, ...]:
    """Level-by-level construction: the nodes at depth d + 1 are the distinct (node at depth d, token d).

    Returns ``indptr``, ``child_token`` and ``leaf_of_node``. ``np.unique`` sorts the (parent, token) keys,
    so the children of each node come out contiguous and sorted, and nodes are numbered breadth first.
    """
    lengths = np.diff(offsets)
    order = np.argsort(-lengths, kind="stable")  # longest first: the sequences still going are a prefix
    starts = offsets[:-1][order]
    neg_sorted_lengths = -lengths[order]
    node = np.zeros(len(order), dtype=np.int64)  # node of each sequence's prefix so far, in `order`
    parents, tokens = [], []
    next_node = 1
    for depth in range(int(lengths.max())):
        active = int(np.searchsorted(neg_sorted_lengths, -depth, side="left"))  # lengths > depth
        keys = node[:active] * vocab_size + flat[starts[:active] + depth]
        unique_keys, inverse = np.unique(keys, return_inverse=True)
        node[:active] = next_node + inverse.reshape(-1)
        parents.append(unique_keys // vocab_size)
        tokens.append(unique_keys % vocab_size)
        next_node += len(unique_keys)

    leaf = np.empty_like(node)
    leaf[order] = node  # every sequence ends at the leaf its EOS led to
    _check_duplicates(leaf, flat, offsets)
    edge_parent = np.concatenate(parents)
    indptr = np.zeros(next_node + 1, dtype=np.int64)
    np.cumsum(np.bincount(edge_parent, minlength=next_node), out=indptr[1:])
    leaf_of_node = np.full(next_node, -1, dtype=np.int64)
    leaf_of_node[leaf] = np.arange(len(leaf))
    return indptr, np.concatenate(tokens), leaf_of_node


def _check_duplicates(leaf: np.ndarray, flat: np.ndarray, offsets: np.ndarray, shown: int = 5) -> None:
    """Raise IdentifierError naming the indices of identical sequences (they share a leaf)."""
    order = np.argsort(leaf, kind="stable")
    same_as_previous = leaf[order[1:]] == leaf[order[:-1]]
    if not same_as_previous.any():
        return
    groups = []
    for leaf_node in np.unique(leaf[order[1:]][same_as_previous])[:shown]:
        indices = np.flatnonzero(leaf == leaf_node).tolist()
        i = indices[0]
        groups.append(f"indices {indices} are all {flat[offsets[i] : offsets[i + 1]].tolist()}")
    total = len(np.unique(leaf[order[1:]][same_as_previous]))
    more = f" (and {total - shown} more groups)" if total > shown else ""
    raise IdentifierError("duplicate identifiers: " + "; ".join(groups) + more)
