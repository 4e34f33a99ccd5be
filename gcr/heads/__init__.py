"""Optional parts of the one training module, each a paper's mechanism:

- :mod:`gcr.heads.verification` — SemCORE's Generative Semantic Verification (``gsv.enabled``);
- :mod:`gcr.heads.rationales` — SSI's Rationale-Guided Supervision (``rgs.enabled``) and the MLLM answerer
  that writes structured identifiers (``scheme.generator=mllm``).
"""
