"""Identifier schemes. Built-ins are registered lazily in :mod:`gcr.registry`.

The schemes: :mod:`~gcr.schemes.atomic`, :mod:`~gcr.schemes.hkmeans`, :mod:`~gcr.schemes.semcore`,
:mod:`~gcr.schemes.ssi` and :mod:`~gcr.schemes.cart`, each a subclass of
:class:`~gcr.schemes.base.IdentifierScheme` (:mod:`~gcr.schemes.base`, the interface). What they share
lives in :mod:`gcr.schemes.helpers` (options and requirements, prefix counter, K-Means, words, concepts,
keywords); plugins import the public names from here.
"""

from gcr.schemes.base import IdentifierScheme, SchemeContext
from gcr.schemes.helpers.options import SchemeOptions, SchemeRequirements, invalid, option
from gcr.schemes.helpers.suffixes import PrefixCounter

__all__ = [
    "IdentifierScheme", "PrefixCounter", "SchemeContext", "SchemeOptions", "SchemeRequirements", "build_scheme", "invalid", "option",
]


def build_scheme(name: str, **options) -> IdentifierScheme:
    """Instantiate the scheme registered as ``name`` (built-in or plugin) with ``options``."""
    from gcr.errors import ConfigError
    from gcr.registry import SCHEMES

    cls = SCHEMES.get(name)
    if not (isinstance(cls, type) and issubclass(cls, IdentifierScheme)):
        raise ConfigError(f"scheme {name!r} resolves to {cls!r}, which is not an IdentifierScheme subclass")
    return cls(**options)
