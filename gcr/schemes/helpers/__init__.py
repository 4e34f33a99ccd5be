"""Helpers that identifier schemes share; none of these modules is a scheme.

* :mod:`~gcr.schemes.helpers.options`: a scheme's contract (``SchemeOptions``, ``SchemeRequirements``,
  ``option``, ``invalid``), re-exported by :mod:`gcr.schemes`;
* :mod:`~gcr.schemes.helpers.suffixes`: ``PrefixCounter``, unique identifiers from shared prefixes
  (re-exported by :mod:`gcr.schemes`);
* :mod:`~gcr.schemes.helpers.clustering`: the seeded K-Means (``hkmeans``, ``semcore``, ``cart``);
* :mod:`~gcr.schemes.helpers.words`: words for natural-language identifiers (``semcore``, ``ssi``);
* :mod:`~gcr.schemes.helpers.concepts`: concept words in fixed fields (``ssi``);
* :mod:`~gcr.schemes.helpers.keywords`: KeyBERT keyword extraction (``semcore``).
"""
