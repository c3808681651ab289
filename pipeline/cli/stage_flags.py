"""A stage's own flags given after another command's positional (``lldm-dpo plan train --lora-r 16``), parsed as
the stage's own command parses them."""

from __future__ import annotations

from typing import Any

import typer

from pipeline.cli.commands import stage_command
from pipeline.core.errors import UserError


def parse_stage_flags(cls, args: list[str], stage: str, within: str) -> dict[str, Any]:
    """A stage's own flags given to another command (``lldm-dpo {within} STAGE ...``), parsed by the stage's
    generated command (pipeline.cli.commands): the same spellings, types, ``--x/--no-x`` booleans and TRL names as
    ``lldm-dpo STAGE``. Returns the flags given (by field name; TRL names as written), for the stage's config to
    resolve."""
    given: dict[str, Any] = {}
    command = stage_command(cls, lambda cfg, as_json: None, doc=f"{stage}'s options",
                            load=lambda config_file, flags: given.update(flags))
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(command)
    try:
        typer.main.get_command(app).main(list(args), prog_name=f"lldm-dpo {within} {stage}", standalone_mode=False)
    except typer.TyperException as exc:  # click's usage errors (typer's own copy of click)
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        raise UserError(f"{within} {stage}: {message}") from None
    return given
