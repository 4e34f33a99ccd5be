"""A prefix trie over identifier token sequences, stored as flat tensors for batched decoding.

Every identifier is a sequence of token ids that ends with EOS and has no other EOS. ``[5, 7, EOS]`` and
``[5, 7, 9, EOS]`` share the node for ``[5, 7]``; EOS is one more edge out of it, so an identifier may be a
prefix of another one.

**Decoding state.** A beam's position in the trie is one int64:

* ``>= 0``: an inner node (``0`` is the root, i.e. nothing generated yet);
* ``-1``: off the trie (a token that no identifier continues with was generated);
* ``<= -2``: finished, the beam's EOS completed identifier ``-state - 2``.

Leaves are not nodes: the EOS edge stores ``-(identifier + 2)`` in place of a child node, so a finished beam
needs no table lookup to know its identifier.

**Layout.** Node ``n`` owns the edge slots ``edge_start[n] : edge_start[n] + degree[n]`` of ``child_token`` and
``child_node``, sorted by token (so :meth:`advance` is a batched binary search). :meth:`build` packs the slots
exactly (CSR); :meth:`insert` gives a node that outgrows its slots a new block of twice the size at the end
(amortised O(1) per new edge, no rebuild, node ids unchanged). Token ids are stored as int16 when the vocabulary
fits, node and edge ids as int32 when the trie fits.

**Dense rows.** :meth:`forbidden_mask` gathers each beam's children into a window as wide as the widest node, so
the few very wide nodes (the root, the first levels of natural-language identifiers) get a precomputed boolean
row instead: as many of the widest nodes as fit in an eighth of the CSR's bytes. Every other node is read from
the CSR window, which then only needs to be as wide as the widest *sparse* node.

Every batched query is a few tensor ops on the trie's device: no Python loop over beams and no host sync.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from gcr.decoding import _kernel
from gcr.errors import ArtifactError, IdentifierError

__all__ = ["TokenTrie", "DEAD", "finished_state"]

_FORMAT = "gcr.TokenTrie/2"
DEAD = -1
"""State of a beam that left the trie."""

_DENSE_BUDGET = 1 / 8  # dense rows may use at most this share of the CSR's bytes
_DENSE_MIN_DEGREE = 32  # narrower nodes are cheaper to read from the CSR window


def finished_state(identifier: int | torch.Tensor) -> Any:
    """The decoding state of a beam that completed ``identifier``."""
    return -identifier - 2


class TokenTrie:
    """Prefix trie of identifiers (token-id sequences ending with EOS), held as flat tensors.

    Build one with :meth:`build` (or :meth:`from_flat`); :meth:`from_state_dict` restores a saved one.
    """

    def __init__(
        self,
        indptr: torch.Tensor,
        child_token: torch.Tensor,
        child_node: torch.Tensor,
        *,
        vocab_size: int,
        eos_token_id: int,
        num_identifiers: int,
        max_length: int,
    ) -> None:
        self.vocab_size = int(vocab_size)
        self.eos_token_id = int(eos_token_id)
        self.max_length = int(max_length)  # tokens in the longest identifier, EOS included
        self.num_identifiers = int(num_identifiers)
        self.version = 0  # bumped by insert()
        self.cpu_kernel = True  # use gcr.decoding._kernel on the CPU when it builds (False: eager torch only)
        self._num_nodes = indptr.numel() - 1
        self._num_edges = child_token.numel()
        index_dtype = _index_dtype(max(self._num_edges, self._num_nodes, self.num_identifiers + 2))
        self.edge_start = indptr[:-1].to(index_dtype).clone()
        self.degree = (indptr[1:] - indptr[:-1]).to(index_dtype)
        self.child_token = child_token.to(_token_dtype(self.vocab_size))
        self.child_node = child_node.to(index_dtype)
        self.capacity: torch.Tensor | None = None  # slots per node; None while packed (capacity == degree)
        self._derive()

    def _derive(self) -> None:
        """Choose the dense rows and window widths (derived from the CSR, never saved)."""
        device, n = self.device, self._num_nodes
        degree = self.degree[:n].long()
        csr_bytes = self.nbytes(derived=False)
        row_bytes = self.vocab_size + 1
        affordable = max(1, int(csr_bytes * _DENSE_BUDGET) // row_bytes)
        widest = torch.argsort(degree, descending=True, stable=True)[:affordable]
        dense = widest[degree[widest] >= _DENSE_MIN_DEGREE].sort().values
        self._dense_nodes = dense
        # Rows of *forbidden* tokens. Row 0 forbids everything: sparse, dead and finished beams start from it.
        # The last column absorbs the padding slots of the sparse window (see forbidden_mask).
        self._dense_rows = torch.ones(dense.numel() + 1, row_bytes, dtype=torch.bool, device=device)
        if dense.numel():
            rows, tokens = self._edges_of(dense)
            self._dense_rows[rows + 1, tokens] = False
        is_dense = torch.zeros(n, dtype=torch.bool, device=device)
        is_dense[dense] = True
        self._sparse_width = int(degree.masked_fill(is_dense, 0).max()) if n else 0
        self._search_steps = int(degree.max()).bit_length() if n else 0
        self._derive_complement(torch.nonzero(2 * degree > self.vocab_size).squeeze(1))

    def _derive_complement(self, nodes: torch.Tensor) -> None:
        """Forbidden-token lists of ``nodes`` (sorted), the nodes that allow more than half the vocabulary.

        The CPU masking path writes ``-inf`` only at these tokens for a beam at such a node, instead of restoring
        most of the row after a fill.
        """
        device = self.device
        self._complement_nodes = nodes.long()
        table = torch.ones(nodes.numel(), self.vocab_size, dtype=torch.bool, device=device)
        if nodes.numel():
            rows, tokens = self._edges_of(nodes)
            table[rows, tokens] = False
        rows, tokens = torch.nonzero(table, as_tuple=True)
        self._complement_tokens = tokens.to(self.child_token.dtype)
        self._complement_len = torch.bincount(rows, minlength=nodes.numel()).long()
        self._complement_start = torch.cumsum(self._complement_len, 0) - self._complement_len

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
        flat, offsets = _flatten(sequences)
        return cls.from_flat(flat, offsets, vocab_size, eos_token_id, device=device)

    @classmethod
    def from_flat(
        cls,
        flat: np.ndarray,
        offsets: np.ndarray,
        vocab_size: int,
        eos_token_id: int,
        device: torch.device | str | None = None,
    ) -> TokenTrie:
        """Like :meth:`build`, from all sequences concatenated (``flat``) and their ``offsets`` (n + 1)."""
        if not 0 <= eos_token_id < vocab_size:
            raise IdentifierError(f"eos_token_id {eos_token_id} is outside the vocabulary [0, {vocab_size})")
        flat = np.asarray(flat, dtype=np.int64)
        offsets = np.asarray(offsets, dtype=np.int64)
        _validate(flat, offsets, vocab_size, eos_token_id)
        indptr, child_token, child_node = _build_csr(flat, offsets, vocab_size, eos_token_id)
        return cls(
            torch.from_numpy(indptr).to(device),
            torch.from_numpy(child_token).to(device),
            torch.from_numpy(child_node).to(device),
            vocab_size=vocab_size,
            eos_token_id=eos_token_id,
            num_identifiers=len(offsets) - 1,
            max_length=int(np.diff(offsets).max()),
        )

    def insert(self, sequences: Sequence[Sequence[int]]) -> range:
        """Add identifiers in place and return their indices (they follow the existing ones).

        Existing node ids and identifier indices do not change, so decoding states stay valid. A node that
        needs more edge slots moves to a block of twice the size at the end of the edge arrays; the old block
        is left unused until :meth:`compact` (or a save/load) packs the arrays again. Nodes that grow wide after
        :meth:`build` stay sparse (the window widens) until :meth:`compact` re-chooses the dense rows.

        Raises:
            IdentifierError: a new sequence is invalid or duplicates an existing or another new one; the trie
                is left unchanged.
        """
        start = self.num_identifiers
        if len(sequences) == 0:
            return range(start, start)
        flat, offsets = _flatten(sequences)
        _validate(flat, offsets, self.vocab_size, self.eos_token_id)
        self._check_new(sequences, flat, offsets)
        if self.capacity is None:
            self.capacity = self.degree.clone()
        device, V = self.device, self.vocab_size
        lengths = np.diff(offsets)
        order = np.argsort(-lengths, kind="stable")  # longest first: the sequences still going are a prefix
        starts = torch.from_numpy(offsets[:-1][order]).to(device)
        active_at = np.searchsorted(-lengths[order], -np.arange(int(lengths.max())), side="left")
        order_t = torch.from_numpy(order).to(device)
        flat_t = torch.from_numpy(flat).to(device)
        state = torch.zeros(len(order), dtype=torch.long, device=device)
        for depth, active in enumerate(active_at.tolist()):
            tokens = flat_t[starts[:active] + depth]
            nxt = self.advance(state[:active], tokens)
            missing = torch.nonzero(nxt == DEAD).squeeze(1)
            if missing.numel():
                keys = state[missing] * V + tokens[missing]
                unique_keys, inverse = torch.unique(keys, return_inverse=True)
                parents, new_tokens = unique_keys // V, unique_keys % V
                children = torch.empty_like(unique_keys)
                inner = new_tokens != self.eos_token_id
                children[inner] = self._new_nodes(int(inner.sum()))
                ends = tokens[missing] == self.eos_token_id
                children[inverse[ends]] = finished_state(start + order_t[missing[ends]])
                self._add_edges(parents, new_tokens, children)
                nxt[missing] = children[inverse]
            state[:active] = nxt
        self.num_identifiers += len(order)
        self.max_length = max(self.max_length, int(lengths.max()))
        self.version += 1
        return range(start, self.num_identifiers)

    def compact(self) -> TokenTrie:
        """Pack the edge arrays (drop the slack left by :meth:`insert`) and re-choose the dense rows."""
        state = self.state_dict()
        version = self.version
        self.__dict__.update(TokenTrie.from_state_dict(state).__dict__)
        self.version = version
        return self

    # ------------------------------------------------------------------ properties

    @property
    def num_nodes(self) -> int:
        """Inner nodes, the root included (leaves are EOS edges, not nodes)."""
        return self._num_nodes

    @property
    def num_edges(self) -> int:
        """Edges, one per distinct (prefix, next token); the EOS edges are the identifiers."""
        return int(self.degree[: self._num_nodes].sum())

    @property
    def device(self) -> torch.device:
        return self.child_token.device

    def nbytes(self, derived: bool = True) -> int:
        """Bytes held by the trie's tensors (slack from inserts included); ``derived`` adds the dense rows."""
        held = [self.edge_start, self.degree, self.child_token, self.child_node]
        if self.capacity is not None:
            held.append(self.capacity)
        if derived:
            held += [self._dense_rows, self._dense_nodes, self._complement_nodes, self._complement_tokens]
            held += [self._complement_start, self._complement_len]
        return sum(t.numel() * t.element_size() for t in held)

    def layout(self) -> dict[str, Any]:
        """How masks are computed (derived from the CSR, never saved): for inspection and tests.

        ``dense_nodes``: nodes with a precomputed row of forbidden tokens (the widest ones, within a memory
        budget); ``complement_nodes``: nodes allowing more than half the vocabulary, masked by their forbidden
        list on CPU; ``window``: the widest child list of any other node (the sparse path's window width).
        """
        return {
            "dense_nodes": self._dense_nodes.tolist(),
            "complement_nodes": self._complement_nodes.tolist(),
            "window": self._sparse_width,
        }

    def __repr__(self) -> str:
        return (
            f"TokenTrie(identifiers={self.num_identifiers}, nodes={self.num_nodes}, "
            f"vocab_size={self.vocab_size}, eos_token_id={self.eos_token_id}, "
            f"dense_rows={self._dense_nodes.numel()}, window={self._sparse_width}, device={self.device})"
        )

    # ------------------------------------------------------------------ batched queries

    def advance(self, states: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """State after appending ``tokens`` to beams in ``states``: a node, a finished state, or ``DEAD``.

        Finished and dead beams have no edges, so any token makes them ``DEAD``.
        """
        states, tokens = states.long(), tokens.long()
        if states.device.type == "cpu" and self.cpu_kernel and _kernel.available():
            return _kernel.advance(
                states, tokens.expand_as(states), self.edge_start, self.degree, self.child_node, self.child_token
            )
        inner = states >= 0
        node = states.clamp(min=0)
        lo = self.edge_start[node].long()
        end = torch.where(inner, lo + self.degree[node].long(), lo)
        hi = end.clone()
        last_slot = self.child_token.numel() - 1
        for _ in range(self._search_steps):  # lower bound of `tokens` in each node's sorted slots
            mid = (lo + hi) >> 1
            less = self.child_token[mid.clamp(max=last_slot)].long() < tokens
            searching = lo < hi
            lo = torch.where(searching & less, mid + 1, lo)
            hi = torch.where(searching & ~less, mid, hi)
        slot = lo.clamp(max=last_slot)
        hit = (lo < end) & (self.child_token[slot].long() == tokens)
        return torch.where(hit, self.child_node[slot].long(), DEAD)

    def allowed_mask(self, states: torch.Tensor) -> torch.Tensor:
        """``(B, vocab_size)`` bool mask of the tokens with an edge out of each state (none when not a node)."""
        return ~self.forbidden_mask(states)

    def forbidden_mask(self, states: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, vocab_size)`` bool mask of the tokens that would leave the trie (all of them when not a node).

        ``out``, a reusable ``(B, vocab_size + 1)`` bool buffer, saves allocating and page-faulting a fresh mask
        every step; the result is a view into it.
        """
        states = states.long()
        rows = states.numel()
        if out is None:
            out = torch.empty(rows, self.vocab_size + 1, dtype=torch.bool, device=states.device)
        elif out.shape != (rows, self.vocab_size + 1) or out.dtype != torch.bool:
            raise ValueError(f"out must be a ({rows}, {self.vocab_size + 1}) bool tensor, got {tuple(out.shape)}")
        is_dense, slot = self._dense_slots(states)
        if self._dense_nodes.numel():
            torch.index_select(self._dense_rows, 0, torch.where(is_dense, slot + 1, 0), out=out)
        else:
            out.fill_(True)
        if self._sparse_width:
            # Slots past a node's degree scatter into the extra last column, which is cut off.
            out.scatter_(1, self._window(torch.where(is_dense, DEAD, states)), False)
        return out[:, : self.vocab_size]

    def mask_scores_(
        self,
        scores: torch.Tensor,
        states: torch.Tensor,
        buffer: torch.Tensor | None = None,
        *,
        sync_free: bool | None = None,
    ) -> torch.Tensor:
        """Set ``scores[i, t]`` to -inf, in place, wherever token ``t`` would take beam ``i`` off the trie.

        ``scores`` is ``(B, >= vocab_size)``; columns past ``vocab_size`` are all forbidden.

        * Sync-free path (the default on accelerators): one ``masked_fill_`` with :meth:`forbidden_mask`
          (``buffer`` as its ``out``); no host sync, which is what matters there.
        * CPU path: every row on its own, in the same step: a row at an ordinary node keeps its few allowed scores
          (read them, fill the row with -inf, write them back); a row at a node that allows more than half the
          vocabulary gets -inf only at its forbidden tokens. A step thus costs about one ``fill_(-inf)`` of the
          matrix whichever nodes its rows sit at (no cliff when one row is at a wide node). With a C compiler
          this is one fused call (:mod:`gcr.decoding._kernel`); without one, a few eager ops over the allowed
          (token, row) pairs.
        """
        neg_inf = float("-inf")
        if sync_free is None:
            sync_free = scores.device.type != "cpu"
        if sync_free:
            scores[:, : self.vocab_size].masked_fill_(self.forbidden_mask(states, out=buffer), neg_inf)
            scores[:, self.vocab_size :] = neg_inf
            return scores
        if scores.device.type != "cpu" or scores.stride(-1) != 1:
            return self.mask_scores_(scores, states, buffer, sync_free=True)
        states = states.long()
        start, length, complement = self._row_lists(states)
        middle = None
        if self._dense_nodes.numel():
            # Rows at a dense node allowing neither few nor nearly all tokens: one select against its dense row.
            is_dense, slot = self._dense_slots(states)
            middle = is_dense & (torch.minimum(length, self.vocab_size - length) > self.vocab_size // 16)
            start = torch.where(middle, slot + 1, start)
        if scores.dtype == torch.float32 and self.cpu_kernel and _kernel.available():
            mode = complement.to(torch.uint8) if middle is None else torch.where(middle, 2, complement.long())
            _kernel.mask_rows(
                scores, start, length, mode.to(torch.uint8), self.child_token, self._complement_tokens,
                self._dense_rows, self.vocab_size,
            )
            return scores
        return self._mask_rows_eager(scores, start, length, complement, middle)

    def _row_lists(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per state, the token list the CPU path uses: ``(start, length, complement)``.

        ``complement`` False: allowed tokens ``child_token[start : start + length]`` (empty when not a node);
        True: forbidden tokens ``_complement_tokens[start : start + length]``.
        """
        node = states.clamp(min=0)
        inner = states >= 0
        start = self.edge_start[node].long()
        length = torch.where(inner, self.degree[node].long(), 0)
        if not self._complement_nodes.numel():
            return start, length, torch.zeros_like(inner)
        slot = torch.searchsorted(self._complement_nodes, node).clamp_(max=self._complement_nodes.numel() - 1)
        complement = inner & (self._complement_nodes[slot] == node)
        start = torch.where(complement, self._complement_start[slot], start)
        length = torch.where(complement, self._complement_len[slot], length)
        return start, length, complement

    def _mask_rows_eager(
        self,
        scores: torch.Tensor,
        start: torch.Tensor,
        length: torch.Tensor,
        complement: torch.Tensor,
        middle: torch.Tensor | None,
    ) -> torch.Tensor:
        """What the kernel does, as eager ops: over the listed (row, token) pairs, and the dense rows' masks."""
        neg_inf = float("-inf")
        dense_rows = None
        if middle is not None and bool(middle.any()):
            dense_rows = torch.nonzero(middle).squeeze(1)
            complement = complement & ~middle
            dense = scores[dense_rows, : self.vocab_size].masked_fill_(
                self._dense_rows[start[dense_rows], : self.vocab_size], neg_inf
            )
        keep = ~complement if dense_rows is None else ~complement & ~middle
        keep_rows, keep_tokens = _expand(start, length.masked_fill(~keep, 0), self.child_token)
        kept = scores[keep_rows, keep_tokens]
        if bool(keep.all()):
            scores.fill_(neg_inf)
        else:
            scores.index_fill_(0, torch.nonzero(keep).squeeze(1), neg_inf)
            forbid_rows, forbid_tokens = _expand(start, length.masked_fill(~complement, 0), self._complement_tokens)
            scores[forbid_rows, forbid_tokens] = neg_inf
            scores[~keep, self.vocab_size :] = neg_inf
        scores[keep_rows, keep_tokens] = kept
        if dense_rows is not None:
            scores[dense_rows, : self.vocab_size] = dense
        return scores

    def _dense_slots(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Which states are nodes with a dense row, and the row's index in ``_dense_nodes``."""
        node = states.clamp(min=0)
        if not self._dense_nodes.numel():
            return torch.zeros_like(states, dtype=torch.bool), torch.zeros_like(node)
        slot = torch.searchsorted(self._dense_nodes, node).clamp_(max=self._dense_nodes.numel() - 1)
        return (states >= 0) & (self._dense_nodes[slot] == node), slot

    def _window(self, states: torch.Tensor) -> torch.Tensor:
        """``(B, sparse_width)`` child tokens of each node state, padded with ``vocab_size`` (none for others)."""
        node = states.clamp(min=0)
        offsets = torch.arange(self._sparse_width, device=states.device)
        degree = torch.where(states >= 0, self.degree[node].long(), 0)
        slots = (self.edge_start[node].long()[:, None] + offsets).clamp_(max=self.child_token.numel() - 1)
        return torch.where(offsets < degree[:, None], self.child_token[slots].long(), self.vocab_size)

    def walk(self, prefixes: torch.Tensor, pad: int = -1) -> torch.Tensor:
        """State reached from the root by each row of ``prefixes`` ``(B, L)``.

        Entries equal to ``pad`` are skipped, so right-padded prefixes of different lengths can share a batch.
        """
        states = torch.zeros(prefixes.shape[0], dtype=torch.long, device=prefixes.device)
        for column in prefixes.T:  # a loop over positions, each step batched over rows
            states = torch.where(column == pad, states, self.advance(states, column))
        return states

    @staticmethod
    def is_finished(states: torch.Tensor) -> torch.Tensor:
        """True where the beam completed an identifier (its EOS was generated)."""
        return states <= -2

    is_leaf = is_finished

    @staticmethod
    def identifier_of(states: torch.Tensor) -> torch.Tensor:
        """Identifier index of each finished state, ``-1`` otherwise."""
        return torch.where(states <= -2, -states - 2, -1)

    def sequences(self) -> list[list[int]]:
        """All identifiers as token lists, in index order (walks the whole trie: for tests and export)."""
        out: list[list[int]] = [[] for _ in range(self.num_identifiers)]
        frontier = torch.zeros(1, dtype=torch.long, device=self.device)
        prefixes = torch.zeros(1, 0, dtype=torch.long, device=self.device)
        while frontier.numel():
            rows, tokens = self._edges_of(frontier)
            children = self.child_node[self._slots_of(frontier)].long()
            paths = torch.cat([prefixes[rows], tokens[:, None]], dim=1)
            finished = children <= -2
            for ident, path in zip((-children[finished] - 2).tolist(), paths[finished].tolist()):
                out[ident] = path
            frontier, prefixes = children[~finished], paths[~finished]
        return out

    def tokens_of(self, identifiers: torch.Tensor) -> torch.Tensor:
        """``(n, max_length)`` tokens of the given identifier indices, right-padded with ``-1``."""
        sequences = self.sequences()
        rows = [sequences[i] + [-1] * (self.max_length - len(sequences[i])) for i in identifiers.tolist()]
        return torch.tensor(rows, dtype=torch.long, device=self.device).view(-1, self.max_length)

    # ------------------------------------------------------------------ devices and persistence

    def to(self, device: torch.device | str) -> TokenTrie:
        """A packed copy of the trie on ``device`` (like ``Tensor.to``, this returns a new object)."""
        moved = TokenTrie.from_state_dict(
            {k: v.to(device) if torch.is_tensor(v) else v for k, v in self.state_dict().items()}
        )
        moved.version = self.version
        return moved

    def state_dict(self) -> dict[str, Any]:
        """Packed CSR tensors and ints, loadable with ``torch.load(..., weights_only=True)``."""
        nodes = torch.arange(self._num_nodes, device=self.device)
        slots = self._slots_of(nodes)
        indptr = torch.zeros(self._num_nodes + 1, dtype=torch.long, device=self.device)
        torch.cumsum(self.degree[: self._num_nodes].long(), 0, out=indptr[1:])
        return {
            "format": _FORMAT,
            "indptr": indptr,
            "child_token": self.child_token[slots].clone(),
            "child_node": self.child_node[slots].clone(),
            "vocab_size": self.vocab_size,
            "eos_token_id": self.eos_token_id,
            "num_identifiers": self.num_identifiers,
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
                f"not a saved TokenTrie: format is {state.get('format')!r}, expected {_FORMAT!r}; "
                "rebuild it with TokenTrie.build()"
            )
        keys = ("indptr", "child_token", "child_node", "vocab_size", "eos_token_id", "num_identifiers", "max_length")
        missing = [k for k in keys if k not in state]
        if missing:
            raise ArtifactError(f"saved TokenTrie lacks {missing}; re-save it with TokenTrie.state_dict()")
        indptr, child_token, child_node = state["indptr"], state["child_token"], state["child_node"]
        edges = child_token.numel()
        finished = child_node[child_node < 0]
        if (
            indptr.numel() < 2
            or child_node.numel() != edges
            or int(indptr[-1]) != edges
            or bool((indptr[1:] < indptr[:-1]).any())
            or int(child_node.max()) >= indptr.numel() - 1
            or finished.numel() != state["num_identifiers"]
            or bool((finished > -2).any())
        ):
            raise ArtifactError(
                "saved TokenTrie is corrupt: indptr, child_token, child_node and num_identifiers disagree; "
                "rebuild it with TokenTrie.build()"
            )
        return cls(
            indptr,
            child_token,
            child_node,
            vocab_size=state["vocab_size"],
            eos_token_id=state["eos_token_id"],
            num_identifiers=state["num_identifiers"],
            max_length=state["max_length"],
        )

    # ------------------------------------------------------------------ internals

    def _slots_of(self, nodes: torch.Tensor) -> torch.Tensor:
        """The edge slots of ``nodes``, concatenated in order."""
        degree = self.degree[nodes].long()
        first = torch.repeat_interleave(self.edge_start[nodes].long(), degree)
        group_start = torch.repeat_interleave(torch.cumsum(degree, 0) - degree, degree)
        return first + torch.arange(first.numel(), device=self.device) - group_start

    def _edges_of(self, nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(row, token)`` of every edge out of ``nodes``; ``row`` indexes ``nodes``."""
        degree = self.degree[nodes].long()
        rows = torch.repeat_interleave(torch.arange(nodes.numel(), device=self.device), degree)
        return rows, self.child_token[self._slots_of(nodes)].long()

    def _check_new(self, sequences: Sequence[Sequence[int]], flat: np.ndarray, offsets: np.ndarray) -> None:
        """Raise before any change if a new sequence repeats an existing or another new identifier."""
        seen: dict[tuple[int, ...], int] = {}
        for i, sequence in enumerate(sequences):
            previous = seen.setdefault(tuple(sequence), i)
            if previous != i:
                raise IdentifierError(f"duplicate identifiers: new indices {[previous, i]} are both {list(sequence)}")
        lengths = np.diff(offsets)
        padded = np.full((len(lengths), int(lengths.max())), -1, dtype=np.int64)
        padded[np.arange(len(lengths)).repeat(lengths), np.arange(len(flat)) - offsets[:-1].repeat(lengths)] = flat
        reached = self.identifier_of(self.walk(torch.from_numpy(padded).to(self.device)))
        existing = torch.nonzero(reached >= 0).squeeze(1).tolist()
        if existing:
            i = existing[0]
            raise IdentifierError(
                f"duplicate identifiers: new sequence {i} {list(sequences[i])} is already identifier "
                f"{int(reached[i])} ({len(existing)} new sequences already exist)"
            )

    def _new_nodes(self, count: int) -> torch.Tensor:
        """Allocate ``count`` nodes without edges; returns their ids."""
        first = self._num_nodes
        needed = first + count
        if needed > self.edge_start.numel():
            grown = max(needed, 2 * self.edge_start.numel())
            self.edge_start = _grow(self.edge_start, grown)
            self.degree = _grow(self.degree, grown)
            self.capacity = _grow(self.capacity, grown)
        self.edge_start[first:needed] = 0
        self.degree[first:needed] = 0
        self.capacity[first:needed] = 0
        self._num_nodes = needed
        self._ensure_index_dtype(needed)
        return torch.arange(first, needed, device=self.device)

    def _add_edges(self, parents: torch.Tensor, tokens: torch.Tensor, children: torch.Tensor) -> None:
        """Add edges, ``parents`` sorted; nodes whose slots are full move to a block twice the size."""
        assert self.capacity is not None
        nodes, counts = torch.unique_consecutive(parents, return_counts=True)
        degree = self.degree[nodes].long()
        needed = degree + counts
        moving = needed > self.capacity[nodes].long()
        if bool(moving.any()):
            movers, kept = nodes[moving], degree[moving]
            new_capacity = torch.clamp(2 ** torch.ceil(torch.log2(needed[moving].double())).long(), min=2)
            new_start = self._num_edges + torch.cumsum(new_capacity, 0) - new_capacity
            old_slots = self._slots_of(movers)
            new_slots = torch.repeat_interleave(new_start, kept) + (
                torch.arange(old_slots.numel(), device=self.device)
                - torch.repeat_interleave(torch.cumsum(kept, 0) - kept, kept)
            )
            self._reserve_edges(self._num_edges + int(new_capacity.sum()))
            self.child_token[new_slots] = self.child_token[old_slots]
            self.child_node[new_slots] = self.child_node[old_slots]
            self._num_edges += int(new_capacity.sum())
            self._ensure_index_dtype(self._num_edges)
            self.edge_start[movers] = new_start.to(self.edge_start.dtype)
            self.capacity[movers] = new_capacity.to(self.capacity.dtype)
        rank = torch.arange(parents.numel(), device=self.device) - torch.repeat_interleave(
            torch.cumsum(counts, 0) - counts, counts
        )
        slots = self.edge_start[parents].long() + self.degree[parents].long() + rank
        self.child_token[slots] = tokens.to(self.child_token.dtype)
        self.child_node[slots] = children.to(self.child_node.dtype)
        self.degree[nodes] += counts.to(self.degree.dtype)
        self._sort_slots(nodes)
        self._update_derived(nodes, parents, tokens)

    def _sort_slots(self, nodes: torch.Tensor) -> None:
        """Re-sort the edges of ``nodes`` by token (advance() binary-searches them)."""
        slots = self._slots_of(nodes)
        group = torch.repeat_interleave(torch.arange(nodes.numel(), device=self.device), self.degree[nodes].long())
        order = torch.argsort(group * (self.vocab_size + 1) + self.child_token[slots].long())
        self.child_token[slots] = self.child_token[slots[order]]
        self.child_node[slots] = self.child_node[slots[order]]

    def _update_derived(self, nodes: torch.Tensor, parents: torch.Tensor, tokens: torch.Tensor) -> None:
        degree = self.degree[nodes].long()
        self._search_steps = max(self._search_steps, int(degree.max()).bit_length())
        if self._dense_nodes.numel():
            slot = torch.searchsorted(self._dense_nodes, parents).clamp_(max=self._dense_nodes.numel() - 1)
            hit = self._dense_nodes[slot] == parents
            self._dense_rows[slot[hit] + 1, tokens[hit]] = False
            node_slot = torch.searchsorted(self._dense_nodes, nodes).clamp_(max=self._dense_nodes.numel() - 1)
            degree = degree.masked_fill(self._dense_nodes[node_slot] == nodes, 0)
        self._sparse_width = max(self._sparse_width, int(degree.max()))
        if self._complement_nodes.numel() and bool(torch.isin(nodes, self._complement_nodes).any()):
            self._derive_complement(self._complement_nodes)  # a wide node gained children: shorter lists
        if self._complement_tokens.dtype != self.child_token.dtype:
            self._complement_tokens = self._complement_tokens.to(self.child_token.dtype)

    def _reserve_edges(self, needed: int) -> None:
        if needed > self.child_token.numel():
            grown = max(needed, 2 * self.child_token.numel())
            self.child_token = _grow(self.child_token, grown)
            self.child_node = _grow(self.child_node, grown)

    def _ensure_index_dtype(self, size: int) -> None:
        """Widen the int32 index arrays to int64 once the trie outgrows them."""
        if _index_dtype(size) == torch.int64 and self.child_node.dtype != torch.int64:
            for name in ("edge_start", "degree", "capacity", "child_node"):
                setattr(self, name, getattr(self, name).long())


# ---------------------------------------------------------------------- helpers


def _index_dtype(size: int) -> torch.dtype:
    return torch.int32 if size < 2**31 - 1 else torch.int64


def _token_dtype(vocab_size: int) -> torch.dtype:
    return torch.int16 if vocab_size <= 2**15 - 1 else torch.int32


def _expand(start: torch.Tensor, length: torch.Tensor, pool: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(row, token)`` for every ``pool[start[r] : start[r] + length[r]]``, rows in order."""
    rows = torch.repeat_interleave(torch.arange(start.numel(), device=start.device), length)
    first = torch.cumsum(length, 0) - length
    slots = torch.repeat_interleave(start - first, length) + torch.arange(rows.numel(), device=start.device)
    return rows, pool[slots].long()


def _grow(tensor: torch.Tensor, size: int) -> torch.Tensor:
    grown = torch.zeros(size, dtype=tensor.dtype, device=tensor.device)
    grown[: tensor.numel()] = tensor
    return grown


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
    empty = np.flatnonzero(lengths <= 0)
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


def _build_csr(flat: np.ndarray, offsets: np.ndarray, vocab_size: int, eos: int) -> tuple[np.ndarray, ...]:
    """Level-by-level construction: the edges at depth d are the distinct (state at depth d, token d).

    Returns ``indptr``, ``child_token`` and ``child_node``. ``np.unique`` sorts the (parent, token) keys and the
    parents of one level are exactly the nodes created at the previous one, so concatenating the levels gives
    edges sorted by parent, then token, with nodes numbered breadth first.
    """
    lengths = np.diff(offsets)
    order = np.argsort(-lengths, kind="stable")  # longest first: the sequences still going are a prefix
    starts = offsets[:-1][order]
    neg_sorted_lengths = -lengths[order]
    state = np.zeros(len(order), dtype=np.int64)  # node of each sequence's prefix so far, in `order`
    parents, tokens, children = [], [], []
    next_node = 1
    for depth in range(int(lengths.max())):
        active = int(np.searchsorted(neg_sorted_lengths, -depth, side="left"))  # lengths > depth
        token = flat[starts[:active] + depth]
        keys = state[:active] * vocab_size + token
        unique_keys, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
        inverse = inverse.reshape(-1)
        unique_tokens = unique_keys % vocab_size
        is_end = unique_tokens == eos
        if (counts[is_end] > 1).any():
            _raise_duplicates(order[:active], inverse, np.flatnonzero(is_end & (counts > 1)), flat, offsets)
        child = np.empty(len(unique_keys), dtype=np.int64)
        n_inner = int((~is_end).sum())
        child[~is_end] = np.arange(next_node, next_node + n_inner)
        ends = token == eos
        child[inverse[ends]] = -order[:active][ends] - 2
        next_node += n_inner
        state[:active] = child[inverse]
        parents.append(unique_keys // vocab_size)
        tokens.append(unique_tokens)
        children.append(child)
    edge_parent = np.concatenate(parents)
    indptr = np.zeros(next_node + 1, dtype=np.int64)
    np.cumsum(np.bincount(edge_parent, minlength=next_node), out=indptr[1:])
    return indptr, np.concatenate(tokens), np.concatenate(children)


def _raise_duplicates(
    ids: np.ndarray, inverse: np.ndarray, groups: np.ndarray, flat: np.ndarray, offsets: np.ndarray, shown: int = 5
) -> None:
    """Raise IdentifierError naming the indices of identical sequences (they share an EOS edge)."""
    described = []
    for group in groups[:shown]:
        indices = sorted(ids[inverse == group].tolist())
        i = indices[0]
        listed = f"{indices[:10]}" if len(indices) <= 10 else f"{indices[:10]} (+{len(indices) - 10})"
        described.append(f"indices {listed} are all {flat[offsets[i] : offsets[i + 1]].tolist()}")
    more = f" (and {len(groups) - shown} more groups)" if len(groups) > shown else ""
    raise IdentifierError("duplicate identifiers: " + "; ".join(described) + more)
