"""Stage commands generated from their config dataclasses, and what they share.

One declaration per option: a stage's config field (its name, type and
docstring) is its flag (``--kebab-case``, ``--x/--no-x`` for booleans, a
repeatable option for lists, a YAML mapping for dict fields). Every command
also takes the shared ``--config FILE``, ``--print-config`` and ``--json``;
``--progress/--no-progress``, ``--device`` and ``--dtype`` are fields where
the stage has them, so they are spelled the same everywhere. TRL's names
(pipeline/cli/trl_names.py) are accepted as hidden flags too.

Resolution order: dataclass defaults < ``--config`` YAML < flags; values are
coerced to the field types on both paths (pipeline/core/config.py).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import typer

from pipeline.cli.loading import load_config
from pipeline.cli.trl_names import aliases_for
from pipeline.core.config import config_to_yaml, field_default, field_docs, field_types, unwrap_optional
from pipeline.core.errors import ConfigError

_KEYWORD = inspect.Parameter.KEYWORD_ONLY


def emit_json(obj: Any) -> None:
    """Print a machine-readable summary on stdout."""
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def summary_dict(result: Any) -> dict[str, Any]:
    data = dataclasses.asdict(result) if dataclasses.is_dataclass(result) and not isinstance(result, type) else result
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dict(data).items()}


def print_summary(title: str, data: Mapping[str, Any], as_json: bool) -> None:
    """JSON on stdout with ``--json``, else a two-column table."""
    if as_json:
        emit_json(dict(data))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value")
    for key, value in data.items():
        table.add_row(str(key), _cell(value))
    Console().print(table)


def _cell(value: Any) -> str:
    """A summary value as the table shows it: floats to 6 significant digits, a mapping of numbers (a
    breakdown such as phase_seconds) as "name value, ..." on one line."""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, Mapping) and value and all(isinstance(v, (int, float)) for v in value.values()):
        return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in value.items())
    return str(value)


def summarize(title: str, run: Callable[[Any], Any], *, main_process_only: bool = False,
              table: Callable[[dict], dict] | None = None) -> Callable[[Any, bool], None]:
    """The usual command body: run the stage, print its result; with ``main_process_only`` (under ``accelerate
    launch``) once, from the main process. ``table`` rewrites the summary's rows for the table (not for --json)."""

    def action(cfg: Any, as_json: bool) -> None:
        result = run(cfg)
        if main_process_only:
            from accelerate import PartialState  # imported where used: the CLI's start-up stays light

            if not PartialState().is_main_process:
                return
        data = summary_dict(result)
        print_summary(title, table(data) if table and not as_json else data, as_json)

    return action


WIDE_HELP = 100
"""Terminal columns from which ``--help`` is drawn as rich's panels; below, as click's plain two columns."""


def help_markup_mode() -> str | None:
    """Typer's rich help on a wide terminal; on a narrow one (80 columns) click's plain layout, where each flag
    gets its own line when long and its description wraps in the remaining width, rather than rich's table of
    four flag columns (``--x`` and ``--no-x`` apart) that squeezes descriptions to a few characters."""
    import shutil

    return "rich" if shutil.get_terminal_size().columns >= WIDE_HELP else None


# --- the generator --------------------------------------------------------------


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def _flag_type(tp: Any) -> tuple[Any, str]:
    """(annotation Typer sees, kind) for a field type; kind is scalar, list, bool or mapping."""
    base, _ = unwrap_optional(tp)
    origin = typing.get_origin(base)
    if origin in (list, tuple):
        item = (typing.get_args(base) or (str,))[0]
        if item in (int, float):  # `--loss-weights 1,2` as `--loss sigmoid,sft`: commas or repeats
            return Optional[list[str]], f"list:{item.__name__}"
        return Optional[list[item]], "list"  # type: ignore[valid-type]
    if base is dict or origin is dict:
        return Optional[str], "mapping"
    if base is bool:
        return Optional[bool], "bool"
    if base is Path:  # as text: an empty value (`--scores ''`: skip) reaches the config as '', not as '.'
        return Optional[str], "path"
    return Optional[base if base in (int, float, str) else str], "scalar"


def _default_text(value: Any) -> str | bool:
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value)) if value else False
    if isinstance(value, dict):
        return False
    return "none" if value is None else str(value)


def stage_command(
    cls: type,
    action: Callable[[Any, bool], None],
    *,
    doc: str,
    positional: Mapping[str, bool] | None = None,
    extra_names: Mapping[str, tuple[str, ...]] | None = None,
    load: Callable[[Path | None, dict[str, Any]], Any] | None = None,
) -> Callable[..., None]:
    """A Typer command function for config class ``cls``.

    ``positional`` maps fields taken as arguments to whether they are required
    (a list field takes any number); every other field is an option.
    ``extra_names`` adds short or older spellings of a field's flag. The
    command resolves the config (``load(config_file, flags)`` when given, else
    defaults < file < flags) and calls ``action(cfg, as_json)``.
    """
    positional, extra_names = dict(positional or {}), dict(extra_names or {})
    params, kinds = _field_params(cls, positional, extra_names)
    trl_params, trl_names = _trl_params(cls)
    params += trl_params + _common_params()

    def command(**kwargs: Any) -> None:
        config, print_config, as_json = (kwargs.pop(name) for name in ("config", "print_config", "as_json"))
        flags = _given_flags(kwargs, kinds, trl_names)
        if as_json and "progress" in kinds and not {"progress", "disable_tqdm"} & set(flags):
            flags["progress"] = False  # a JSON summary is for programs: no bar unless asked for
        cfg = _resolve(cls, config, flags, load)
        if print_config:
            typer.echo(config_to_yaml(cfg, with_docs=True), nl=False)
            return
        action(cfg, as_json)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__doc__ = doc
    command.__name__ = f"{cls.__name__}_command"
    command.config_class = cls  # type: ignore[attr-defined]
    return command


def _field_params(cls: type, positional: dict[str, bool],
                  extra_names: dict[str, tuple[str, ...]]) -> tuple[list[inspect.Parameter], dict[str, str]]:
    """One parameter per config field (positional ones first), and each field's flag kind."""
    docs = field_docs(cls)
    types_ = field_types(cls)
    params: list[inspect.Parameter] = []
    kinds: dict[str, str] = {}
    for f in sorted((f for f in dataclasses.fields(cls) if f.init), key=lambda f: f.name not in positional):
        annotation, kind = _flag_type(types_[f.name])
        kinds[f.name] = kind
        help_text = docs.get(f.name, "")
        if f.name in positional:
            info = typer.Argument(... if positional[f.name] else None, help=help_text, show_default=False,
                                  metavar=f.name.upper())
        else:
            decls = [f"{flag_name(f.name)}/--no-{f.name.replace('_', '-')}" if kind == "bool" else flag_name(f.name),
                     *extra_names.get(f.name, ())]
            if kind == "mapping":
                help_text += " (a YAML mapping, e.g. '{key: value}')"
            info = typer.Option(None, *decls, help=help_text, show_default=_default_text(field_default(f)))
        params.append(inspect.Parameter(f.name, _KEYWORD, default=info, annotation=annotation))
    return params, kinds


def _trl_params(cls: type) -> tuple[list[inspect.Parameter], dict[str, str]]:
    """Hidden parameters for TRL's names of the config's fields, and each one's TRL name by parameter name."""
    types_ = field_types(cls)
    params: list[inspect.Parameter] = []
    trl_names: dict[str, str] = {}
    for trl_name, alias in aliases_for(cls).items():
        if trl_name == alias.field or trl_name in types_:
            continue
        annotation = (_flag_type(types_[alias.field])[0] if alias.convert is None
                      else Optional[getattr(alias.convert, "flag_type", str)])
        info = typer.Option(None, flag_name(trl_name), f"--{trl_name}", hidden=True)  # a bool: --bf16/--no-bf16
        trl_names[f"trl__{trl_name}"] = trl_name
        params.append(inspect.Parameter(f"trl__{trl_name}", _KEYWORD, default=info, annotation=annotation))
    return params, trl_names


def _common_params() -> list[inspect.Parameter]:
    """--config, --print-config and --json, which every stage command takes."""
    return [
        inspect.Parameter("config", _KEYWORD, annotation=Optional[Path],
                          default=typer.Option(None, "--config", help="YAML config file (our or TRL's key names); "
                                               "flags override it.")),
        inspect.Parameter("print_config", _KEYWORD, annotation=bool,
                          default=typer.Option(False, "--print-config", help="Print the resolved config and exit.")),
        inspect.Parameter("as_json", _KEYWORD, annotation=bool,
                          default=typer.Option(False, "--json", help="Print a JSON summary.")),
    ]


def _given_flags(kwargs: dict[str, Any], kinds: dict[str, str], trl_names: dict[str, str]) -> dict[str, Any]:
    """The flags given on the command line, converted by kind, by config key (TRL's names as TRL's keys)."""
    flags: dict[str, Any] = {}
    for name, value in kwargs.items():
        kind = kinds.get(name, "")
        if value is None or (kind.startswith("list") and not value):
            continue  # not given: the file's value or the default stands
        if name in trl_names:
            flags[trl_names[name]] = value
        elif kind == "mapping":
            flags[name] = _mapping_flag(name, value)
        elif kind == "path":
            flags[name] = Path(value) if value != "" else ""
        elif kind.startswith("list:"):
            flags[name] = _number_list(name, value, int if kind == "list:int" else float)
        else:
            flags[name] = list(value) if kind == "list" else value
    return flags


def _resolve(cls: type, config: Path | None, flags: dict[str, Any], load) -> Any:
    """The command's config from its file and flags (one function, so tests can see what the flags became)."""
    return load(config, flags) if load is not None else load_config(cls, config, flags)


def _number_list(name: str, values: list[str], kind: type) -> list:
    """Numbers given comma-separated, repeated, or both (``--loss-weights 1,0.5`` = ``--loss-weights 1
    --loss-weights 0.5``); a one-line error naming the flag otherwise."""
    out = []
    for text in values:
        for piece in str(text).split(","):
            try:
                out.append(kind(piece.strip()))
            except ValueError:
                raise ConfigError(f"{flag_name(name)}: {piece.strip()!r} is not a number "
                                  f"(give {kind.__name__}s, comma-separated: e.g. 1,0.5)") from None
    return out


def _mapping_flag(name: str, text: str) -> dict:
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{flag_name(name)}: not a YAML mapping: {exc}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{flag_name(name)}: expected a YAML mapping such as '{{key: value}}', got {text!r}")
    return value
