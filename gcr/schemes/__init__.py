"""Identifier schemes. Built-ins are registered lazily in :mod:`gcr.registry`."""

from gcr.schemes.base import IdentifierScheme, SchemeContext
from gcr.schemes.options import SchemeOptions, SchemeRequirements, invalid, option
from gcr.schemes.suffixes import PrefixCounter

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
