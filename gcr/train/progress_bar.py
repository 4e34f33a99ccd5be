"""gcr's own progress for Lightning stages: one bar (or periodic log lines) per training and evaluation.

Replaces Lightning's progress bar, which in a log file shows only its final state and between stages
prints nothing at all.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L

from gcr.progress import Progress


class StageProgress(L.Callback):
    """Training: one stage over every epoch's batches (``loss`` beside it); testing: one stage over batches."""

    def __init__(self, name: str):
        self.name = name
        self._bar: Progress | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        per_epoch = trainer.num_training_batches
        epochs = trainer.max_epochs or 1
        total = int(per_epoch * (epochs - trainer.current_epoch)) if math.isfinite(per_epoch) else None
        self._bar = Progress(f"training {self.name} ({epochs} epochs)", total, unit="batches")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._bar is not None:
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            info = {"epoch": f"{trainer.current_epoch + 1}/{trainer.max_epochs}"}
            if loss is not None:
                info["loss"] = float(loss)
            self._bar.update(**info)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            batches = sum(trainer.num_test_batches) if trainer.num_test_batches else None
            total = int(batches) if batches is not None and math.isfinite(batches) else None
            self._bar = Progress(f"evaluating {self.name}", total, unit="batches")

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._bar is not None:
            self._bar.update()

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.on_train_end(trainer, pl_module)
