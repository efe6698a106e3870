"""typer's parameter coercion, without pydantic for the values it would hand back as they are.

typer 0.29 coerces every parameter of the command line through a pydantic ``TypeAdapter``, built
the first time the parameter is processed, for its default as well: on every dbops run, importing
pydantic and building those adapters took 0.10 CPU-s (measured on `dbops config check`: 0.29 CPU-s
with them, 0.19 without), and dbops itself does not use pydantic. For the values typer's adapters
return unchanged or turn into the obvious value, the answer is given here: a string for a ``str``
parameter, a bool for a ``bool``, an int or a string of ASCII digits for an ``int`` without bounds,
a member of the Enum (or the exact value of one) for an Enum, a list of strings for ``list[str]``.
Anything else (another type, a sign or a space in a number, a value of no member, a custom parser,
bounds, files) goes to typer's own coercion, built the first time it is needed, so its checks and
its messages are unchanged. ``tests/unit/test_cli_params.py`` compares both on every parameter of
every dbops command; it fails when typer's coercion of these values changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, get_args, get_origin

from typer import _coercion
from typer import core as _core

_TYPERS_OWN = _coercion.build_runtime_param


def _plain(info: Any) -> bool:
    """No parser and no bounds: typer's adapter only converts."""
    return (getattr(info, "parser", None) is None and getattr(info, "min", None) is None
            and getattr(info, "max", None) is None and not getattr(info, "clamp", False))


def as_given(annotation: Any, info: Any, value: Any) -> tuple[bool, Any]:
    """(True, what typer's coercion returns for value) when that is known without it; else (False, None)."""
    if not _plain(info):
        return False, None
    kind = type(value)
    if annotation is str and kind is str:
        return True, value
    if annotation is bool and kind is bool:
        return True, value
    if annotation is int:
        if kind is int:
            return True, value
        if kind is str and value.isascii() and value.isdigit() and len(value) <= 18:  # longer: typer's bounds
            return True, int(value)
        return False, None
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        if isinstance(value, annotation):
            return True, value
        if kind is str and getattr(info, "case_sensitive", True):
            for member in annotation:
                if member.value == value:
                    return True, member
        return False, None
    if get_origin(annotation) is list and get_args(annotation) == (str,) and kind in (list, tuple) \
            and all(type(v) is str for v in value):
        return True, list(value)
    return False, None


@dataclass(frozen=True)
class AsGiven(_coercion.RuntimeParam):
    """A parameter's coercion: :func:`as_given`, else typer's own (built once, when first needed)."""

    descriptor: Any = None
    _own: list = field(default_factory=list)

    def _coerce_value(self, value: Any, param: Any, ctx: Any) -> Any:
        known, result = as_given(self.annotation, self.parameter_info, value)
        if known:
            return result
        if not self._own:
            self._own.append(_TYPERS_OWN(self.descriptor))
        return self._own[0]._coerce_value(value, param=param, ctx=ctx)


def runtime_param(descriptor: Any) -> Any:
    """What typer's ``_TyperParameter`` coerces its values with (files: typer's own, as they are)."""
    if descriptor.file_annotation is not None:
        return _TYPERS_OWN(descriptor)
    try:
        return AsGiven(parameter_info=descriptor.parameter_info, annotation=descriptor.annotation,
                       descriptor=descriptor)
    except Exception:  # noqa: BLE001  typer's RuntimeParam changed (a field more): typer's own, as it is
        return _TYPERS_OWN(descriptor)


def install() -> None:
    """Make typer's parameters coerce through :func:`runtime_param`."""
    _core.build_runtime_param = runtime_param
