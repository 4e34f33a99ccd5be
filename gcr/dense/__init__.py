"""The dense baseline: the non-generative reference every table shows beside the schemes.

- :mod:`gcr.dense.models` — ``DualEncoder``: a CLIP-style dual encoder (tiny HF CLIP config, random init);
- :mod:`gcr.dense.frozen` — ``FrozenTowerDualEncoder``: frozen pretrained towers + trained projections;
- :mod:`gcr.dense.training` — contrastive training and exact-search scoring (Lightning);
- :mod:`gcr.dense.setup` — train once per (corpus, dense config, seed), cached, and its result rows.

Importing this package imports none of them (the models import without Lightning; training does not).
"""
