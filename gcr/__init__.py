"""gcr: generative cross-modal retrieval.

The core (data, schemes, index, decoding) imports without Lightning or W&B;
training lives in :mod:`gcr.train`.
"""

__version__ = "0.1.0"
