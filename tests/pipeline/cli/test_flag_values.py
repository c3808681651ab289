"""pipeline.cli.flag_values: plain flag values settled without pydantic, exactly as Typer's own coercion settles
them; everything else is still Typer's (its values and its error messages)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from pipeline.cli import flag_values
from stages.cli import app, build_app

ROOT = Path(__file__).resolve().parents[3]
typer_coercion = pytest.importorskip("typer._coercion", reason="Typer before 0.29 has no pydantic coercion")


@pytest.mark.parametrize("annotation, value", [
    (str, "text"), (str, ""), (str, " 12 "), (int, "0"), (int, "12"), (int, "-7"), (int, "123456789012345678"),
    (float, "0"), (float, "0.5"), (float, "-3.25"), (float, "1"), (float, "0.30000000000000004"),
    (bool, True), (bool, False), (list[str], ("a", "b")), (list[str], []),
])
def test_plain_values_are_what_typers_adapter_gives(annotation, value):
    from typer.models import OptionInfo

    full = typer_coercion.build_runtime_param(typer_coercion.resolve_type_descriptor(annotation, OptionInfo()))
    mine = flag_values.plain_value(annotation, value)
    assert mine is not flag_values._UNSETTLED
    theirs = full._coerce_value(value, param=None, ctx=None)
    assert (mine, type(mine)) == (theirs, type(theirs))


@pytest.mark.parametrize("annotation, value", [
    (int, " 12"), (int, "1_000"), (int, "007"), (int, "12.0"), (int, "1" * 19), (float, "1e-4"), (float, ".5"),
    (float, "nan"), (float, "5."), (float, "1.2.3"), (float, "-"), (int, ""), (int, "-"), (int, "１２"), (bool, "yes"), (list[str], ("a", 1)), (Path, "x"), (str, b"bytes"),
])
def test_other_values_are_left_to_typer(annotation, value):
    assert flag_values.plain_value(annotation, value) is flag_values._UNSETTLED


def test_every_command_coerces_through_the_plain_first_layer():
    group = typer.main.get_command(app)
    assert isinstance(group, flag_values.PlainFirstGroup)
    assert all(isinstance(cmd, flag_values.PlainFirstCommand) for cmd in group.commands.values())


def test_flags_and_refusals_are_unchanged(tmp_path):
    """The values a command receives, and the refusal of a bad value (Typer's pydantic message), are as before."""
    got = {}
    ingest = build_app("ingest")
    command = typer.main.get_command(ingest).commands["ingest"]
    command.callback = lambda **kw: got.update(kw)  # the values the command function is called with
    command.main(["a.jsonl", "b.jsonl", "--max-chars", "12", "--eval-fraction", "0.25", "--keep-field", "x",
                  "--no-progress", "--config", str(tmp_path)], standalone_mode=False)
    assert got["inputs"] == ["a.jsonl", "b.jsonl"] and got["keep_fields"] == ["x"]
    assert (got["max_chars"], got["eval_fraction"], got["progress"], got["workers"]) == (12, 0.25, False, None)
    assert got["config"] == tmp_path and isinstance(got["config"], Path)  # a path: Typer's own coercion
    command.main(["--eval-fraction", "1e-1"], standalone_mode=False)  # not plain: Typer's pydantic parses it
    assert got["eval_fraction"] == 0.1 and not got["inputs"] and got["config"] is None
    result = CliRunner().invoke(app, ["ingest", "--max-chars", "abc"])
    assert result.exit_code == 2
    assert "Invalid value for '--max-chars': Input should be a valid integer" in result.output


def test_an_ingest_command_imports_no_pydantic(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}\n', encoding="utf-8")
    code = ("import sys\nfrom stages.cli import main\n"
            f"sys.argv = ['lldm-dpo', 'ingest', {str(src)!r}, '--out', {str(tmp_path / 'o.arrow')!r}, '--json', "
            "'--max-chars', '100', '--eval-fraction', '0.5']\n"
            "try:\n    main()\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
            "print('pydantic' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.split()[-1] == "False"
