"""Leakage-free descriptions of retrieval targets: where they come from, the captioners, the caption cache.

- :mod:`gcr.descriptions.sources` -- which text describes an image target (``description=generated``,
  ``heldout``, ``ground_truth``), the task every method is scored on, and :func:`describe_targets`;
- :mod:`gcr.descriptions.captioners` -- :class:`BackboneCaptioner` (a gcr backbone that writes captions)
  and :class:`HFZeroShotCaptioner` (a pretrained checkpoint, zero-shot), and the train-split caption pairs;
- :mod:`gcr.descriptions.cache` -- the resumable caption cache on disk.

None of these imports Lightning: training a captioner is :func:`gcr.train.captioner.fit_captioner`, and
the pipeline wires the captioner to the run (:func:`gcr.train.captioner.generated_captions`). The
dependency points one way, training layer -> this package. This ``__init__`` imports nothing, so reading
the description sources while a config is checked pulls in no torch.
"""
