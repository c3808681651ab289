"""The CLI shell: version, help, and one-line errors."""

from __future__ import annotations

from typer.testing import CliRunner

from pipeline import __version__
from pipeline.cli import COMMANDS, app


def test_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == __version__


def test_help_lists_registered_commands():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    registered = {c.name for c in app.registered_commands}
    assert registered <= {name for name, _ in COMMANDS}
    for name in registered:
        assert name in result.output
