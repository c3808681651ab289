"""Flag values turned into Python values without importing pydantic, where the answer is plain.

Typer (0.29 and later) coerces every parameter's value with a pydantic ``TypeAdapter``,
built on the first value it sees, even ``None`` for a flag not given: importing pydantic
and building the adapters costs a command about 0.1 s of CPU before it does anything
(a tenth of ``lldm-dpo ingest`` on 200k pairs). The generated flags take strings,
integers, decimals and lists of strings, whose values from the command line are settled
here exactly as the adapter settles them (a decimal integer, a plain decimal fraction, a
string as it is), and ``None`` (a flag not given) of any type is answered as Typer's own
code answers it. Every other value, and every value of another annotation (paths, choices,
numbers with bounds, a custom parser), goes to Typer's own coercion, built on first use, so
its results and error messages are Typer's. On a Typer without this machinery (before 0.29)
or of a version it was not tested against (``TESTED_TYPER``) the command class is Typer's own.
"""

from __future__ import annotations

from typing import Any

import typer
import typer.core

TESTED_TYPER = ("0.29.",)
"""Typer versions whose private coercion layer (``typer._coercion``) this module was written and tested against;
on any other version the commands are Typer's own, so a change in those internals can cost 0.1 s, never a flag."""

RuntimeParam = None
if typer.__version__.startswith(TESTED_TYPER):
    try:
        from typer._coercion import RuntimeParam, build_runtime_param
    except ImportError:  # pragma: no cover - a tested version without it
        RuntimeParam = None

_UNSETTLED = object()


def _is_integer(text: str) -> bool:
    """A plain decimal integer: an optional minus, then 0 or up to 18 digits without a leading zero."""
    digits = text[1:] if text.startswith("-") else text
    return 0 < len(digits) <= 18 and digits.isascii() and digits.isdigit() and (digits == "0" or digits[0] != "0")


def _is_decimal(text: str) -> bool:
    """A plain decimal integer, or one followed by a point and 1 to 17 digits."""
    whole, point, fraction = text.partition(".")
    return _is_integer(whole) and (not point or (0 < len(fraction) <= 17 and fraction.isascii() and fraction.isdigit()))


def plain_value(annotation: Any, value: Any) -> Any:
    """``value`` as ``annotation`` when the answer is plain (the same as Typer's adapter gives), else
    ``_UNSETTLED``."""
    kind = type(value)
    if annotation is str:
        return value if kind is str else _UNSETTLED
    if annotation is int:
        return int(value) if kind is str and _is_integer(value) else _UNSETTLED
    if annotation is float:
        return float(value) if kind is str and _is_decimal(value) else _UNSETTLED
    if annotation is bool:
        return value if kind is bool else _UNSETTLED
    if annotation == list[str] and kind in (tuple, list) and all(type(item) is str for item in value):
        return list(value)
    return _UNSETTLED


def _plain_annotation(param: Any) -> bool:
    """Whether Typer's adapter for ``param`` is the bare type's (no parser, bounds or custom type)."""
    info = param.type_descriptor.parameter_info
    return (getattr(info, "parser", None) is None and getattr(info, "min", None) is None
            and getattr(info, "max", None) is None
            and param.type_descriptor.annotation in (str, int, float, bool, list[str]))


if RuntimeParam is not None:

    class PlainFirst(RuntimeParam):  # type: ignore[misc, valid-type]
        """One parameter's coercion: plain values here, the rest by Typer's own (built when first needed)."""

        def __init__(self, descriptor: Any, plain: bool):
            super().__init__(parameter_info=descriptor.parameter_info, annotation=descriptor.annotation)
            object.__setattr__(self, "descriptor", descriptor)  # (a frozen dataclass's fields, set once)
            object.__setattr__(self, "plain", plain)  # whether the annotation's plain values are settled here
            object.__setattr__(self, "full", [])  # Typer's coercion, once built

        def _coerce_value(self, value: Any, param: Any, ctx: Any) -> Any:
            # (None, a flag not given, never gets here: RuntimeParam.coerce answers it, as for Typer's own)
            plain = plain_value(self.annotation, value) if self.plain else _UNSETTLED
            if plain is not _UNSETTLED:
                return plain
            if not self.full:
                self.full.append(build_runtime_param(self.descriptor))
            return self.full[0]._coerce_value(value, param=param, ctx=ctx)

    def _plain_first(params: list) -> None:
        for param in params:
            if getattr(param, "_runtime_param", False) is None:  # Typer's parameter, coercion not built yet
                desc = param.type_descriptor
                param._runtime_param = PlainFirst(desc, _plain_annotation(param))

    class PlainFirstCommand(typer.core.TyperCommand):
        """A command whose parameters coerce plain values without pydantic (see the module's docstring)."""

        def parse_args(self, ctx, args):
            _plain_first(self.get_params(ctx))
            return super().parse_args(ctx, args)

    class PlainFirstGroup(typer.core.TyperGroup):
        """The root command's options (``--version``, ``--online``), likewise."""

        def parse_args(self, ctx, args):
            _plain_first(self.get_params(ctx))
            return super().parse_args(ctx, args)
else:  # pragma: no cover - an older or untested Typer
    PlainFirstCommand, PlainFirstGroup = typer.core.TyperCommand, typer.core.TyperGroup
