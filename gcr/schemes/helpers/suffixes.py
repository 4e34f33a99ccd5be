"""Unique identifiers from shared prefixes: a per-prefix counter (used by hkmeans, cart, semcore, ssi).

Schemes whose semantic part may collide number the targets that share it: the n-th target with prefix
``p`` gets number ``n`` (``<u_n>``, a leaf position, a spelled number). :class:`PrefixCounter` keeps those
counts; it survives ``state_dict`` as a plain dict so :meth:`assign` continues the numbering after reload.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Any

Key = tuple[int, ...]


class PrefixCounter:
    """How many identifiers each prefix (or whole identifier) has given out."""

    def __init__(self, counts: dict[Any, int] | None = None):
        self.counts: Counter = Counter(counts or {})

    def __len__(self) -> int:
        return len(self.counts)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.counts)

    def __getitem__(self, prefix: Hashable) -> int:
        return self.counts[prefix]

    def next(self, prefix: Hashable) -> int:
        """The next number for ``prefix`` (0, 1, ...), counted as taken."""
        n = self.counts[prefix]
        self.counts[prefix] = n + 1
        return n

    def take(self, identifier: Hashable) -> None:
        """Count ``identifier`` as given out."""
        self.counts[identifier] += 1

    def numbered(self, base: str, number: Callable[[str, int], str]) -> str:
        """``number(base, n)`` for the first ``n >= max(1, uses of base)`` not yet given out (not taken here)."""
        n = max(1, self.counts[base])
        while self.counts[candidate := number(base, n)]:
            n += 1
        self.counts[base] += 1
        return candidate

    def most(self) -> int:
        """The largest count (e.g. how many unique tokens are needed)."""
        return max(self.counts.values(), default=0)

    # -- plain-JSON state for tuple-of-int keys ("" for the empty tuple, else "3.0.1") --------------------
    def int_state(self) -> dict[str, int]:
        return {".".join(map(str, k)): int(n) for k, n in self.counts.items()}

    @classmethod
    def from_int_state(cls, state: dict[str, int]) -> PrefixCounter:
        return cls({_key(s): int(n) for s, n in state.items()})

    def items(self) -> Iterable[tuple[Any, int]]:
        return self.counts.items()


def _key(s: str) -> Key:
    return tuple(int(v) for v in s.split(".")) if s else ()
