"""What makes an interrupted run end exactly like an uninterrupted one.

* :class:`EpochShuffleSampler` -- the training order of epoch ``e`` is a permutation drawn from
  ``(seed, e)`` alone, not from a global RNG whose state a restart loses.
* :class:`EpochSeed` -- reseeds torch, numpy and ``random`` at every epoch start (dropout, R-Drop,
  sampling), for the same reason.
* :class:`EpochEndCheckpoint` -- ``last.ckpt`` after every training epoch. (Lightning's ``ModelCheckpoint``
  with ``save_last=True`` writes it only when training ends if there is no validation loop or no top-k
  checkpoint, which is gcr's default: a killed run would restart from scratch.)
* :class:`AtomicCheckpointIO` -- a checkpoint is written to a temporary file and renamed, so a process
  killed while saving leaves the previous ``last.ckpt`` whole instead of a truncated one.

``gcr fit`` resumes from ``last.ckpt`` when it exists.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.utils.data import Sampler


class EpochShuffleSampler(Sampler[int]):
    """A fresh permutation every epoch, a function of ``(seed, epoch)`` only (Lightning calls ``set_epoch``)."""

    def __init__(self, size: int, seed: int = 0):
        self.size, self.seed, self.epoch = int(size), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


class EpochSeed(L.Callback):
    """Seeds every RNG at each training epoch's start from ``(seed, epoch, rank)``."""

    def __init__(self, seed: int):
        self.seed = int(seed)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        value = (self.seed * 1_000_003 + trainer.current_epoch * 7919 + trainer.global_rank) % 2**31
        random.seed(value)
        np.random.seed(value)
        torch.manual_seed(value)


class EpochEndCheckpoint(L.Callback):
    """Saves the full training state to ``path`` at the end of every training epoch."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # weights_only=False keeps the optimizer and loop state that resuming needs (all tensors and plain
        # values: resume loads it back with torch.load(weights_only=True)); every rank calls it, rank 0 writes.
        trainer.save_checkpoint(self.path, weights_only=False)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that writes ``path.tmp`` and renames it over ``path``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".tmp")
        super().save_checkpoint(checkpoint, partial, storage_options)
        os.replace(partial, path)
