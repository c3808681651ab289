"""What every stage command shares: resolving its config and printing its summary."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from pipeline.config import config_to_yaml, load_config

C = TypeVar("C")


def resolve_config(cls: type[C], config_file: Path | None, flags: Mapping[str, Any], print_config: bool) -> C | None:
    """defaults < --config < flags; with ``--print-config`` print the resolved YAML and return None."""
    cfg = load_config(cls, config_file, flags)
    if print_config:
        typer.echo(config_to_yaml(cfg, with_docs=True), nl=False)
        return None
    return cfg


def summary_dict(result: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        data = dataclasses.asdict(result)
    else:
        data = dict(result)
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in data.items()}


def print_summary(title: str, data: Mapping[str, Any], as_json: bool) -> None:
    """JSON on stdout with ``--json``, else a two-column table."""
    if as_json:
        from pipeline.cli import emit_json

        emit_json(dict(data))
        return
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value")
    for key, value in data.items():
        if isinstance(value, float):
            value = f"{value:.6g}"
        table.add_row(str(key), str(value))
    Console().print(table)
