"""Exceptions raised by gcr. Each message names the problem and the fix."""


class GcrError(Exception):
    """Base class of every error gcr raises on purpose."""


class DataError(GcrError, ValueError):
    """The corpus on disk is malformed (missing image, empty caption, duplicate id, ...)."""


class ConfigError(GcrError, ValueError):
    """A configuration value or name is unknown or inconsistent."""


class IdentifierError(GcrError, ValueError):
    """Identifiers are invalid: collisions, empty sets, unknown tokens."""


class ArtifactError(GcrError, ValueError):
    """A saved artifact is stale, foreign (another scheme or corpus) or corrupt."""


class DecodingError(GcrError, RuntimeError):
    """Constrained decoding reached a state with no valid continuation."""
