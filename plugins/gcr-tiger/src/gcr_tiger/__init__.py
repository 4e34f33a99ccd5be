"""gcr-tiger: TIGER-style semantic identifiers for gcr, shipped as a separate, pip-installable plugin."""

from gcr_tiger.scheme import TigerScheme

__all__ = ["TigerScheme"]
__version__ = "0.1.0"
