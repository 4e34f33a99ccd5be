"""The Lightning ``Trainer`` every gcr stage uses, built from the ``trainer`` config group."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from omegaconf import DictConfig

from gcr.train.progress_bar import StageProgress
from gcr.train.reproducible import AtomicCheckpointIO


def build_trainer(cfg: DictConfig, *, max_epochs: int, run_dir: Path | None, name: str = "the model", callbacks=(),
                  loggers=False) -> L.Trainer:
    """A trainer for one stage (``name`` labels its progress); gcr's callbacks write checkpoints and progress."""
    t = cfg.trainer
    every = int(t.check_val_every_n_epoch)
    # A batch of text queries leaves the vision tower unused (and vice versa), which plain DDP rejects.
    strategy = "ddp_find_unused_parameters_true" if t.strategy == "ddp" else t.strategy
    return L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        strategy=strategy,
        precision=t.precision,
        max_epochs=max_epochs,
        callbacks=[*callbacks, StageProgress(name)],
        enable_progress_bar=False,  # StageProgress: a bar at a terminal, periodic lines in a log
        logger=loggers,
        default_root_dir=str(run_dir) if run_dir else None,
        enable_checkpointing=False,  # gcr's own EpochEndCheckpoint writes last.ckpt (see gcr.train.reproducible)
        check_val_every_n_epoch=every if every > 0 else None,
        limit_train_batches=t.get("limit_train_batches", 1.0),
        limit_val_batches=1.0 if every > 0 else 0,
        num_sanity_val_steps=0,
        log_every_n_steps=int(t.log_every_n_steps),
        deterministic=False,
        enable_model_summary=False,
        plugins=[AtomicCheckpointIO()],
    )
