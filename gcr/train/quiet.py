"""Keep third-party chatter out of gcr's output: a user sees gcr's stages, its progress and its table.

Lightning's banners ("GPU available", tips, "Seed set to"), transformers' info lines and its shard-writing
bars, and a few known warnings say nothing about a gcr run. Warnings and errors of those libraries still
come through; ``gcr -v`` (debug logging) shows everything.
"""

from __future__ import annotations

import logging
import os
import warnings

_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric")
_WARNINGS = (
    r".*LeafSpec.*",
    r"You have overridden `transfer_batch_to_device`.*",
    r".*does not have many workers which may be a bottleneck.*",  # gcr's loaders are in-process on purpose
    r".*The number of training batches \(\d+\) is smaller than the logging interval.*",
    r"Found \d+ module\(s\) in eval mode at the start of training.*",  # frozen pretrained towers, on purpose
)


def silence_third_party(verbose: bool = False) -> None:
    """Raise the noisy libraries' log levels to WARNING and drop their info-only warnings (unless ``verbose``)."""
    if verbose:
        return
    for name in _LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a core dependency
        pass
    else:
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    for pattern in _WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
