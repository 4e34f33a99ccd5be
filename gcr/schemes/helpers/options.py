"""A scheme's contract, declared once: its options (a dataclass) and its requirements.

Every scheme declares ``Options``, a dataclass subclass of :class:`SchemeOptions`: one field per option, with
its type, default and (through :func:`option`) its allowed range. The base class derives everything else from
it: type coercion and range checks (a :class:`~gcr.errors.ConfigError` naming ``scheme.<option>`` and the
allowed range), the "unknown option(s) ..., valid: ..." error, and ``config()``. Checks that relate several
options go in :meth:`SchemeOptions.check`.

:class:`SchemeRequirements` is what a scheme needs from the run and promises about its identifiers; the
pipeline and the up-front config checks read it instead of testing a scheme's name.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from gcr.errors import ConfigError


@dataclass(frozen=True)
class SchemeRequirements:
    """What a scheme needs and declares (all false by default).

    - ``features``: :meth:`fit` needs the targets' feature vectors (``features.name``).
    - ``descriptions``: identifiers are built from ``Target.text``, which the pipeline first replaces with a
      leakage-free description (``description=heldout|generated``).
    - ``words``: identifiers are words the backbone's tokenizer must spell (no new tokens).
    - ``rationales``: :meth:`rationales` returns one sentence per target (Rationale-Guided Supervision).
    - ``shares_identifiers``: several targets may share one identifier (resolved later, e.g. by verification).
    - ``text_generator``: identifiers are written by a text-generating model (``SchemeContext.generator``).
    - ``code_vectors``: :meth:`code_vectors` gives each code token's vector, by group and level.
    """

    features: bool = False
    descriptions: bool = False
    words: bool = False
    rationales: bool = False
    shares_identifiers: bool = False
    #: :meth:`fit` asks a model that writes text (``SchemeContext.generator``) to write the identifiers.
    text_generator: bool = False
    #: :meth:`~gcr.schemes.base.IdentifierScheme.code_vectors` says what each code token means (e.g. cart's
    #: centroids and RQ-VAE codebooks); a decoder that fuses with the candidate (``model.fusion=candidate``) needs it.
    code_vectors: bool = False


def option(default: Any = dataclasses.MISSING, *, ge: float | None = None, gt: float | None = None,
           doc: str = "", default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with its allowed range: ``ge`` (>=) or ``gt`` (>) and a few words on what it is."""
    meta = {"ge": ge, "gt": gt, "doc": doc}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass
class SchemeOptions:
    """Base of every scheme's ``Options``: coerces each field to its annotated type, checks its range, then
    runs :meth:`check`. Annotations: ``bool``, ``int``, ``float``, ``str``, ``Literal[...]``, ``list[str]``."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f, hints[f.name], getattr(self, f.name)))
        self.check()

    def check(self) -> None:
        """Checks that relate several options; raise :class:`ConfigError` (see :func:`invalid`)."""

    @classmethod
    def names(cls) -> list[str]:
        """The option names, in declaration order."""
        return [f.name for f in dataclasses.fields(cls)]

    def to_dict(self) -> dict[str, Any]:
        """The options as plain JSON values (lists, not tuples)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


def invalid(name: str, value: Any, rule: str) -> ConfigError:
    """The one error shape for a bad option: ``scheme.NAME=VALUE is not valid: it must be RULE``."""
    return ConfigError(f"scheme.{name}={value!r} is not valid: it must be {rule}; set scheme.{name}")


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _range_rule(f: dataclasses.Field) -> str:
    ge, gt, doc = f.metadata.get("ge"), f.metadata.get("gt"), f.metadata.get("doc", "")
    bound = f"{f.name} >= {ge}" if ge is not None else f"{f.name} > {gt}" if gt is not None else ""
    return ", ".join(p for p in (bound, doc) if p)


def _coerce(f: dataclasses.Field, hint: Any, value: Any) -> Any:
    rule = _range_rule(f)
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise invalid(f.name, value, f"one of {', '.join(map(str, choices))}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str) or not isinstance(value, list | tuple):
            raise invalid(f.name, value, "a list, e.g. [a,b]")
        return [str(v) for v in value]
    if hint is bool:
        if not isinstance(value, bool | np.bool_):
            raise invalid(f.name, value, "true or false")
        return bool(value)
    if hint is int:
        if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer):
            raise invalid(f.name, value, f"an integer{', ' + rule if rule else ''}")
        value = int(value)
    elif hint is float:
        ok = not isinstance(value, bool | np.bool_) and isinstance(value, int | float | np.integer | np.floating)
        if not ok or not math.isfinite(float(value)):
            raise invalid(f.name, value, f"a number{', ' + rule if rule else ''}")
        value = float(value)
    elif hint is str:
        if isinstance(value, bool | np.bool_) or not isinstance(value, str | int | float):
            raise invalid(f.name, value, "text")
        return str(value)
    else:
        return value
    ge, gt = f.metadata.get("ge"), f.metadata.get("gt")
    if (ge is not None and value < ge) or (gt is not None and value <= gt):
        raise invalid(f.name, value, rule)
    return value
