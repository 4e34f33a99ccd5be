"""GRACE-style atomic identifiers: one new vocabulary token per target."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gcr.data.corpus import Target
from gcr.schemes.base import IdentifierScheme
from gcr.schemes.helpers.options import SchemeOptions


class AtomicScheme(IdentifierScheme):
    """Atomic ID: one new token per target (GRACE); no semantics, one decoding step."""

    name = "atomic"

    @dataclass
    class Options(SchemeOptions):
        prefix: str = "id"  # tokens are <{prefix}_{n}>

    def __init__(self, seed: int = 0, **options: Any):
        super().__init__(seed=seed, **options)
        self._count = 0

    def _token(self, n: int) -> str:
        return f"<{self.options.prefix}_{n}>"

    def fit(self, targets: Sequence[Target], features: np.ndarray | None = None) -> list[str]:
        self._count = 0
        return self.assign(targets)

    def assign(self, targets: Sequence[Target], features: np.ndarray | None = None) -> list[str]:
        start, self._count = self._count, self._count + len(targets)
        return [self._token(n) for n in range(start, self._count)]

    def new_tokens(self) -> list[str]:
        return [self._token(n) for n in range(self._count)]

    def state_dict(self) -> dict[str, Any]:
        return {"count": self._count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._count = int(state["count"])
