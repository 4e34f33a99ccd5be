"""The one learning-rate schedule of gcr: linear warm-up, then cosine (or linear) decay, for any step count.

Every trained part (the generative module, hence GSV and the description captioner, and the dense
baseline) steps this schedule once per optimizer step. It is a plain function of the step, wrapped in
:class:`torch.optim.lr_scheduler.LambdaLR`, and is defined for every budget of one step or more:
``torch``'s ``OneCycleLR`` divides by the warm-up length and fails when ``pct_start * total`` rounds it to
nothing (10 steps at ``pct_start=0.1``), and a ``LinearLR``/``CosineAnnealingLR`` chain needs its own
special cases at tiny totals.

Shape, for ``total`` optimizer steps numbered ``0 .. total-1`` and ``w = warmup_steps(total, ratio)``:

* warm-up, steps ``0 .. w-1``: ``(step + 1) / (w + 1)`` of the base LR (never 0: no step is wasted);
* peak at step ``w``: exactly the base LR (``w <= total - 1``, so the peak is always reached);
* decay, steps ``w .. total-1``: cosine (or linear) from the base LR towards ``final_ratio`` x base LR,
  reached one step *after* the last, so the last step still learns.
"""

from __future__ import annotations

import math

import torch

from gcr.errors import ConfigError

DECAYS = ("cosine", "linear")


def warmup_steps(total: int, ratio: float) -> int:
    """``round(ratio * total)``, kept within ``0 .. total - 1`` so the peak LR is reached inside the budget."""
    total = _check_total(total)
    if not 0.0 <= ratio <= 1.0:
        raise ConfigError(f"warm-up ratio must be within [0, 1] (e.g. trainer.warmup_ratio=0.05), got {ratio}")
    return max(0, min(round(ratio * total), total - 1))


def lr_factor(step: int, total: int, warmup: int, *, final_ratio: float = 0.0, decay: str = "cosine") -> float:
    """The multiplier of the base LR at optimizer step ``step`` (0-based) of ``total``, after ``warmup`` warm-up steps.

    Defined for every ``step >= 0``: past the budget it stays at ``final_ratio``.
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if decay == "cosine" else 1.0 - progress
    return final_ratio + (1.0 - final_ratio) * shape


def warmup_decay(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    *,
    warmup_ratio: float = 0.05,
    final_ratio: float = 0.0,
    decay: str = "cosine",
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` stepping :func:`lr_factor` once per optimizer step over ``total_steps`` (>= 1)."""
    total = _check_total(total_steps)
    if decay not in DECAYS:
        raise ConfigError(f"unknown decay {decay!r}; choose one of {', '.join(DECAYS)}")
    if not 0.0 <= final_ratio <= 1.0:
        raise ConfigError(f"final_ratio must be within [0, 1], got {final_ratio}")
    warmup = warmup_steps(total, warmup_ratio)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total, warmup, final_ratio=final_ratio, decay=decay)
    )


def lightning_optimizers(optimizer: torch.optim.Optimizer, trainer, **schedule) -> dict:
    """``configure_optimizers``' answer: ``optimizer`` with :func:`warmup_decay` over the trainer's whole budget."""
    total = trainer.estimated_stepping_batches
    if not math.isfinite(total):
        raise ConfigError("the learning-rate schedule needs a finite budget; set trainer.max_epochs (or max_steps) >= 1")
    scheduler = warmup_decay(optimizer, max(1, int(total)), **schedule)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _check_total(total: int) -> int:
    if isinstance(total, bool) or int(total) != total or total < 1:
        raise ValueError(f"a schedule needs a whole number of steps >= 1, got {total!r}")
    return int(total)
