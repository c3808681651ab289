"""A stage's config loaded from its three layers: defaults < a YAML file (or a section of one) < the flags, in our
names or TRL's (pipeline/cli/trl_names.py), every key that cannot apply reported at once."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, TypeVar

from pipeline.cli.trl_names import overlay, translate
from pipeline.core.config import (
    COMMAND_LINE,
    GIVEN_AS,
    check_keys,
    check_output_names,
    coerce_values,
    in_users_words,
    read_config_file,
    unknown_keys,
)
from pipeline.core.errors import ConfigError

C = TypeVar("C")


def load_config(
    cls: type[C],
    config_file: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    values: Mapping[str, Any] | None = None,
    origin: str | None = None,
) -> C:
    """Build ``cls`` from defaults < ``values``/``config_file`` < ``overrides``.

    ``overrides`` holding ``None`` mean "flag not given" and are skipped, so a
    CLI can pass every option straight through. ``values`` is an already-read
    mapping (a section of a larger file); ``origin`` names it in errors.
    """
    merged: dict[str, Any] = {}
    given_as: dict[str, str] = {}
    where = origin
    if config_file is not None:
        merged.update(_layer(cls, read_config_file(config_file), str(config_file), given_as, whole_file=True))
        where = str(config_file)
    if values is not None:
        merged.update(_layer(cls, dict(values), where or "config", given_as))
    merged = coerce_values(cls, merged, where or "config")
    given = _layer(cls, {k: v for k, v in (overrides or {}).items() if v is not None}, COMMAND_LINE, given_as)
    merged.update(coerce_values(cls, given, COMMAND_LINE))
    try:
        cfg = cls(**merged)
    except ConfigError as exc:
        message = in_users_words(str(exc), given_as)
        raise ConfigError(f"{where}: {message}" if where and not message.startswith(str(where)) else message) from None
    except TypeError as exc:  # a value of a type the dataclass cannot take
        raise ConfigError(f"{where or 'config'}: {exc}") from None
    check_output_names(cfg, where or COMMAND_LINE)
    if given_as and dataclasses.is_dataclass(cfg):
        object.__setattr__(cfg, GIVEN_AS, dict(given_as))
    return cfg


def _layer(cls: type, data: dict[str, Any], where: str, given_as: dict[str, str], whole_file: bool = False
           ) -> dict[str, Any]:
    """One layer (a file, a section, the flags) in our names; every key that cannot apply is reported in one
    error (TRL's names by the user's own name, unknown keys all at once)."""
    problems: list[str] = []
    out = translate(cls, data, where, problems=problems, given_as=given_as, whole_file=whole_file)
    unknown = unknown_keys(cls, out)
    if unknown:
        problems.append(unknown)
    if problems:
        count = f"{len(problems)} problems: " if len(problems) > 1 else ""
        raise ConfigError(f"{where}: {count}{'; '.join(problems)}")
    return out


def merge_sections(base: dict[str, Any], sections: tuple[str, ...], *layers: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with each layer over it in order (a composer's file, then its section flags): a section's mapping
    adds to the one before key by key, any other key replaces."""
    merged = dict(base)
    for layer in layers:
        for key, value in layer.items():
            if key in sections and isinstance(value, dict):
                merged[key] = overlay(merged.get(key, {}), value)
            else:
                merged[key] = value
    return merged


def check_section_keys(classes: Mapping[str, type], sections: Mapping[str, dict], where: str) -> None:
    """Every section's keys known to its stage's config (TRL's names too), each section named in the error."""
    for name, cls in classes.items():
        at = f"{where}: {name}"
        check_keys(cls, translate(cls, dict(sections[name]), at), at)
