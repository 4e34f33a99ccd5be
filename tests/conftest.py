"""Suite-wide settings."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """One intra-op thread. On a busy 2-core machine two OpenMP threads wait on each other at every op:
    measured here, a SmolLM2 training step took ~40 s with 2 threads and ~1.6 s with 1 (tiny models: ~10x)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
