"""The ``lldm-dpo`` command line: a thin layer over each stage's ``run(cfg)``.

Commands parse flags into the stage's config dataclass (defaults < --config
YAML < flags), call the stage, and print a summary (a rich table, or JSON with
``--json``). Errors the user can fix print one line and exit 1.

It lives among the stages because it imports them (by name, so that one command
loads only its own stage): the library (pipeline/) never imports it.
"""

from __future__ import annotations

import errno
import functools
import importlib
import importlib.util
import itertools
import json
import os
import sys

import typer

from pipeline import __version__
from pipeline.cli.commands import help_markup_mode
from pipeline.cli.flag_values import PlainFirstCommand, PlainFirstGroup
from pipeline.core.errors import UserError

# Each command lives beside its stage as a plain function; registered here by
# name so this file stays the one index of the command line.
COMMANDS: list[tuple[str, str]] = [
    ("ingest", "stages.ingest:command"),
    ("score-ref", "stages.score_ref:command"),
    ("train", "stages.train:command"),
    ("sft", "stages.sft:command"),
    ("merge", "stages.merge:command"),
    ("eval", "stages.evaluate:command"),
    ("generate", "stages.generate:command"),
    ("make-pairs", "stages.make_pairs:command"),
    ("query", "stages.query:command"),
    ("report", "stages.report:command"),
    ("run", "stages.run_all:command"),
    ("init-model", "stages.init_model:command"),
    ("plan", "stages.plan:command"),
]


_USER_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EISDIR,
                errno.ENOENT, errno.EEXIST}


def _one_line_errors(func):
    """Turn a ``UserError`` into ``error: <one line>`` on stderr and exit code 1; under ``--json`` stdout
    also gets it as JSON (``{"error": ..., "exit_code": 1}``), so a program reading the summary reads the error."""

    def fail(message: str, as_json: bool):
        if as_json:
            typer.echo(json.dumps({"error": message, "exit_code": 1}))
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(1)

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        as_json = bool(kwargs.get("as_json"))
        try:
            return func(*args, **kwargs)
        except UserError as exc:
            fail(str(exc), as_json)
        except OSError as exc:
            # The machine's answer about a file (permission, full disk, read-only file system):
            # the user's to fix, so one line naming the file; other OS errors keep their traceback.
            if exc.errno not in _USER_ERRNOS or exc.filename is None:
                raise
            fail(f"{exc.filename}: {exc.strerror}", as_json)

    return wrapper


def _root(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True),
    online: bool = typer.Option(False, "--online", help="Allow downloading hub models (default: offline; "
                                "or set LLDM_DPO_ONLINE=1)."),
) -> None:
    if online:
        set_environment(True)
    if version:
        typer.echo(__version__)
        raise typer.Exit()
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        raise typer.Exit()


def build_app(only: str | None = None) -> typer.Typer:
    """The Typer app with every command present in this build, or just ``only``.

    Importing a stage imports its dependencies (torch, transformers: seconds), so
    ``main`` registers only the command being run; ``--help`` registers all.
    """
    app = typer.Typer(
        name="lldm-dpo",
        cls=PlainFirstGroup,
        help="Direct Preference Optimization for masked diffusion language models.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode=help_markup_mode(),
    )
    app.callback(invoke_without_command=True)(_root)
    for name, target in COMMANDS:
        if only is not None and name != only:
            continue
        module_name, func_name = target.split(":")
        # A stage whose module is not in this build is simply not a command
        # (it never pretends to work); one that exists but fails to import raises.
        try:
            present = importlib.util.find_spec(module_name) is not None
        except ModuleNotFoundError:  # its parent package is not there either
            present = False
        if not present:
            continue
        func = getattr(importlib.import_module(module_name), func_name)
        # A command taking another command's options (plan) declares its context settings on itself.
        # PlainFirstCommand: plain flag values without importing pydantic (Typer's adapters cost 0.1 s).
        app.command(name, cls=PlainFirstCommand,
                    context_settings=getattr(func, "context_settings", None))(_one_line_errors(func))
    return app


@functools.cache
def _full_app() -> typer.Typer:
    return build_app()


def __getattr__(name: str):
    # `from stages.cli import app` (tests, docs) gets every command, built on first use.
    if name == "app":
        return _full_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _requested_command(argv: list[str]) -> str | None:
    """The one command to register for this invocation; None means all of them."""
    if argv[:1] == ["--version"]:
        return ""  # no command needed
    first = next((arg for arg in argv if arg != "--online"), None)
    # an option before any command (--help, --version) shows everything, and so does an unknown command
    return first if first in {name for name, _ in COMMANDS} else None


ONLINE_ENV = "LLDM_DPO_ONLINE"
"""Set to 1 (or pass ``--online`` before the command) to let hub ids be downloaded."""


def set_environment(online: bool) -> None:
    """The CLI's environment, set before anything reads it (the library sets nothing on import).

    Offline by default: a model not on disk fails at once instead of waiting on
    the network; ``--online`` lets a hub id be downloaded. transformers' own
    progress bars and advisories would interleave with ours.
    """
    online = online or os.environ.get(ONLINE_ENV, "") not in ("", "0", "false")
    if not online:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    elif os.environ.get("HF_HUB_OFFLINE") == "1":
        del os.environ["HF_HUB_OFFLINE"]
    for name, value in (("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1"),
                        ("TRANSFORMERS_VERBOSITY", "error"), ("TQDM_DISABLE", "1")):
        os.environ.setdefault(name, value)


def main() -> None:
    argv = sys.argv[1:]
    set_environment(_leading_online(argv))
    try:
        build_app(_requested_command(argv))()
    except SystemExit as exc:  # Typer's standalone mode ends every command this way
        if exc.code in (0, None):
            close_process_group()
        raise


def close_process_group() -> None:
    """After a command that succeeded under ``accelerate launch``: wait for every process, then destroy the
    process group, as torch.distributed asks. Left to interpreter exit, the group's threads can be torn down
    while still joinable, which aborts a finished worker (``terminate called without an active exception``,
    SIGABRT). Nothing happens where torch was never imported or no group exists; after a failure nothing is
    waited for (the launcher stops the other processes)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _leading_online(argv: list[str]) -> bool:
    """``--online`` given before the command (a root option, applied before any import reads the environment)."""
    return "--online" in itertools.takewhile(lambda arg: arg.startswith("-"), argv)


if __name__ == "__main__":
    main()
