"""Stage configuration: one dataclass per stage, filled from three layers.

    defaults (the dataclass)  <  --config FILE.yaml  <  command-line flags

Field docstrings (a string literal right under each field, as litgpt does)
are the documentation: ``field_docs`` reads them for ``--help`` texts and the
stage YAML files. Unknown keys in a config file are an error naming the file
and the key; values are validated in each dataclass's ``__post_init__``,
which raises ``ConfigError``.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import math
import re
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

from pipeline.core.errors import ConfigError

C = TypeVar("C")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (or JSON, a YAML subset) mapping; a clear error otherwise."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc}") from None
    import yaml  # imported where used: `lldm-dpo query --help` never reads YAML

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} invalid YAML: {getattr(exc, 'problem', exc)}") from None
    require(data is None or isinstance(data, dict),
            f"{path}: config file must hold a mapping of keys to values, got {type(data).__name__}")
    return data or {}


OUTPUT_FIELDS = ("out", "quarantine")
"""Fields naming a file or folder a stage creates: a control character in one is a paste or quoting mistake."""


def check_output_names(cfg: Any, where: str) -> None:
    """A one-line error for an output path with a newline or another control character in its name (a file
    named so is hard to see, type or remove)."""
    for name in OUTPUT_FIELDS:
        value = getattr(cfg, name, None)
        if value is not None and any(ord(ch) < 32 or ord(ch) == 127 for ch in str(value)):
            raise ConfigError(f"{where}: {name} {str(value)!r} has a control character (a newline?) in its name; "
                              "give the path on one line")


GIVEN_AS = "_given_as"
"""Attribute of a loaded config: our field -> the name the user gave it by (``mixed_precision`` -> ``bf16``)."""


def option_name(cfg: Any, field: str) -> str:
    """How to name ``field`` to the user in a message: the key they wrote (``bf16``) when they set it by another
    name, else its flag (``--mixed-precision``)."""
    return getattr(cfg, GIVEN_AS, {}).get(field) or "--" + field.replace("_", "-")


def carry_given_as(old: Any, new: C) -> C:
    """``new`` (a ``dataclasses.replace`` of ``old``) keeps the names the user gave ``old``'s fields by."""
    if hasattr(old, GIVEN_AS):
        object.__setattr__(new, GIVEN_AS, getattr(old, GIVEN_AS))
    return new


def in_users_words(message: str, given_as: Mapping[str, str]) -> str:
    """A validation message about a field the user set by another name (TRL's) says so, in their words (a
    message that opens with the field, or names its flag)."""
    named = [f"{field} (given as {key})" for field, key in given_as.items()
             if re.search(rf"(^|: |; ){re.escape(field)}(?![\w-])|--{field.replace('_', '-')}(?![\w-])", message)]
    return message + (f" [{', '.join(named)}]" if named else "")


def coerce_values(cls: type, data: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Each value converted to its field's type (YAML 1.1 reads ``5e-6`` as a string; flags arrive typed)."""
    hints = field_types(cls)
    return {key: coerce(hints[key], value, key, where) if key in hints else value for key, value in data.items()}


@functools.lru_cache(maxsize=None)
def field_types(cls: type) -> dict[str, Any]:
    """Resolved type hints of the init fields (string annotations evaluated in the class's module)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """``Optional[X]`` / ``X | None`` -> (X, True); anything else -> (tp, False)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True
    return tp, False


COMMAND_LINE = "command line"
"""Where flags come from, in errors; an empty optional path there means "not given"."""

_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", Path: "a path"}


def coerce(tp: Any, value: Any, key: str, where: str) -> Any:
    """``value`` as type ``tp`` (int, float, bool, str, Path, list[...], dict, Optional of those)."""
    base, optional = unwrap_optional(tp)
    if optional and base is Path and value == "" and where == COMMAND_LINE:
        # a flag given empty (`--scores ''`, "empty to skip") is not given; in a config file an empty path is an
        # error (below): there it is a mistake found only after the stages before it ran ('' would be '.')
        value = None
    if value is None:
        require(optional, f"{where}: {key} must be {_TYPE_NAMES.get(base, base)}, got null")
        return None
    origin = typing.get_origin(base)
    if origin in (list, tuple):
        (item,) = typing.get_args(base)[:1] or (Any,)
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        return [coerce(item, v, key, where) for v in items]
    if origin is dict or base is dict:
        require(isinstance(value, dict), f"{where}: {key} must be a mapping, got {value!r}")
        return value
    converted = _scalar(base, value)
    none = " (null or leave the key out for none)" if optional else ""
    require(converted is not _EMPTY_PATH, f"{where}: {key} is an empty path{none}")
    hint = " (quote it: YAML reads yes/no/on/off as true/false)" if isinstance(value, bool) and base is str else ""
    require(converted is not _BAD, f"{where}: {key} must be {_TYPE_NAMES.get(base, base)}, got {value!r}{hint}")
    return converted


_BAD = object()
_EMPTY_PATH = object()


def _scalar(base: Any, value: Any) -> Any:
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.strip().lower() in ("true", "yes", "on", "1")
        return _BAD
    if isinstance(value, bool):  # True is an int to Python, never a number to a config
        return _BAD if base in (int, float, str, Path) else value
    if base in (int, float):
        if base is int and isinstance(value, (int, str)):
            try:
                return int(value)  # exact, however large (a float would round a 20-digit seed)
            except ValueError:
                pass
        try:
            number = float(value)
        except (TypeError, ValueError):
            return _BAD
        return number if base is float else int(number) if number.is_integer() else _BAD
    if base is str:
        return str(value) if isinstance(value, (str, int, float, Path)) else _BAD
    if base is Path:
        if isinstance(value, str) and not value.strip():
            return _EMPTY_PATH  # Path("") is ".", the current folder: never what an empty value meant
        return Path(value) if isinstance(value, (str, Path)) else _BAD
    return value  # Any, unions and other types: the dataclass checks them


def check_keys(cls: type, data: Mapping[str, Any], where: str) -> None:
    message = unknown_keys(cls, data)
    if message:
        raise ConfigError(f"{where}: {message}")


def unknown_keys(cls: type, data: Mapping[str, Any]) -> str:
    """'' when every key is a field of ``cls``; else one message naming them all."""
    known = list(field_types(cls))
    unknown = [key for key in data if key not in known]
    if not unknown:
        return ""
    named = f"key '{unknown[0]}'" if len(unknown) == 1 else "keys " + ", ".join(f"'{k}'" for k in unknown)
    return f"unknown {named} for {cls.__name__} (known keys: {', '.join(known)})"


def field_default(f: dataclasses.Field) -> Any:
    """A dataclass field's default (its factory's value; None when it has neither)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A plain mapping (paths and tuples made YAML/JSON friendly) of the fields a user sets (``init=False`` ones,
    fixed by the class, are no keys); a field marked ``metadata={"secret": True}`` (hub_token) is left out, so no
    file, model card or tracker records it."""
    return {f.name: _plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
            if f.init and not f.metadata.get("secret")}


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return config_to_dict(value)
    return value


def config_to_yaml(cfg: Any, with_docs: bool = False) -> str:
    """The resolved config as YAML; with ``with_docs`` each key gets its docstring as a comment."""
    import yaml

    data = config_to_dict(cfg)
    if not with_docs:
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    docs = field_docs(type(cfg))
    lines = []
    for key, value in data.items():
        lines += [f"# {doc_line}" for doc_line in textwrap.wrap(docs.get(key, ""), 76)]
        lines.append(yaml.safe_dump({key: value}, sort_keys=False, allow_unicode=True).rstrip())
    return "\n".join(lines) + "\n"


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """Docstrings written right under dataclass fields, keyed by field name."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = _class_body(klass)
        if body is None:
            continue
        for prev, node in zip(body, body[1:]):
            if isinstance(prev, ast.AnnAssign) and isinstance(prev.target, ast.Name) and isinstance(node, ast.Expr) \
                    and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
                docs[prev.target.id] = " ".join(node.value.value.split())
    return docs


def _class_body(klass: type) -> list[ast.stmt] | None:
    """The statements of ``klass``'s body; None when its source is not there.

    Every command's ``--help`` and flags need them at start-up: the class is found by its qualified name in its
    module's syntax tree (one parse of the file), as ``inspect.getsource`` finds it, without the tokenizing that
    follows there (about 25 ms more per command).
    """
    try:
        path = inspect.getsourcefile(klass)
    except TypeError:
        path = None
    found = _find_class(_module_tree(path), klass.__qualname__) if path else None
    if found is not None:
        return found.body
    try:
        return ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body  # type: ignore[attr-defined]
    except (OSError, TypeError, SyntaxError):
        return None


def _find_class(node: ast.AST, qualname: str, prefix: str = "") -> ast.ClassDef | None:
    """The first class statement named ``qualname`` under ``node``, in source order (inspect's ``_ClassFinder``:
    a function's classes are ``<function>.<locals>.<class>``), looking at statements only."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.ClassDef):
            name = prefix + child.name
            if name == qualname:
                return child
            found = _find_class(child, qualname, name + ".")
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found = _find_class(child, qualname, f"{prefix}{child.name}.<locals>.")
        elif isinstance(child, (ast.stmt, ast.excepthandler, ast.match_case)):
            found = _find_class(child, qualname, prefix)
        else:
            continue
        if found is not None:
            return found
    return None


@functools.lru_cache(maxsize=32)
def _module_tree(path: str) -> ast.Module:
    return ast.parse(Path(path).read_text(encoding="utf-8"))


def require(condition: bool, message: str) -> None:
    """Raise ``ConfigError(message)`` unless ``condition``; for ``__post_init__`` checks."""
    if not condition:
        raise ConfigError(message)


def require_choice(name: str, value: Any, choices: tuple) -> None:
    require(value in choices, f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")


DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_device(value: Any, name: str = "device") -> None:
    require(isinstance(value, str) and DEVICE_PATTERN.match(value) is not None,
            f"{name} must be auto, cpu, cuda or cuda:N, got {value!r}")


_INTERVAL = re.compile(r"^\s*([\[(])\s*([^,\s]+)\s*,\s*([^\]\s)]+)\s*([\])])\s*$")


def numeric_fields(cls: type) -> dict[str, str]:
    """Every int or float field (optional or not) of a config dataclass with its kind ('int' or 'float'); bools,
    unions and lists of numbers (loss_weights, checked by its class) are not numeric here."""
    bases = {name: unwrap_optional(tp)[0] for name, tp in field_types(cls).items()}
    return {name: base.__name__ for name, base in bases.items() if base in (int, float)}


def parse_interval(spec: str) -> tuple[float, float, bool, bool]:
    """'[0, 1)' -> (0.0, 1.0, low closed, high closed); 'inf' for no bound."""
    m = _INTERVAL.match(spec)
    if not m:
        raise ValueError(f"bad interval {spec!r}")
    return float(m.group(2)), float(m.group(3)), m.group(1) == "[", m.group(4) == "]"


def check_ranges(cfg: Any, ranges: Mapping[str, str]) -> None:
    """Every numeric field: the right kind of number, finite, inside its interval (``ranges``).

    Numbers written as strings (YAML reads ``1e-5`` as text) are converted. A field
    that may be None is skipped when None.
    """
    for name, kind in numeric_fields(type(cfg)).items():
        value = getattr(cfg, name)
        if value is None:
            continue
        if isinstance(value, str):
            try:
                value = int(value) if kind == "int" else float(value)
            except ValueError:
                raise ConfigError(f"{name} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        if kind == "int":
            if isinstance(value, float):
                require(value.is_integer(), f"{name} must be a whole number, got {value!r}")
                value = int(value)
            # Seeds, steps and counts go to torch, Arrow and DuckDB as signed 64-bit integers.
            require(-(2**63) <= value < 2**63, f"{name} must fit in a signed 64-bit integer (below 2**63 = "
                                               f"{2**63}), got {value}")
        else:
            require(math.isfinite(value), f"{name} must be a finite number, got {value!r}")
            value = float(value)
        setattr(cfg, name, value)
        spec = ranges.get(name)
        if spec is None:
            continue
        lo, hi, lo_closed, hi_closed = parse_interval(spec)
        inside = (value >= lo if lo_closed else value > lo) and (value <= hi if hi_closed else value < hi)
        bound = f"{'>=' if lo_closed else '>'} {lo:g}" if math.isinf(hi) else f"in {spec.strip()}"
        require(inside, f"{name} must be {bound}, got {value!r}")
