"""The CLI shell: version, help, and one-line errors."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from pipeline import __version__
from stages.cli import COMMANDS, app


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


def test_only_the_requested_command_is_imported():
    """`lldm-dpo query ...` must not pay for torch: only that command's module is loaded."""
    import subprocess
    import sys

    code = ("import sys\nsys.argv = ['lldm-dpo', 'query', '--help']\nfrom stages.cli import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print('heavy:', sorted(m for m in ('torch', 'pyarrow', 'yaml') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "lldm-dpo query" in out and out.strip().endswith("heavy: []")  # start-up well under a second


def test_help_and_refusals_of_the_pipeline_commands_do_not_import_torch():
    """`--help`, an unknown flag and an out-of-range value of every command are answered from the config class
    alone: torch, transformers and accelerate (seconds of start-up) are imported only by a run, and pyarrow and
    numpy (a tenth or two) only once a file is read."""
    import ast
    import subprocess
    import sys

    # (argv, exit code): help 0, a click usage error 2, a refused value 1
    calls = [(["ingest", "--help"], 0), (["score-ref", "--help"], 0), (["train", "--help"], 0), (["sft", "--help"], 0),
             (["train", "cache", "--no-such-flag"], 2),
             (["score-ref", "pairs.arrow", "--samples", "0"], 1), (["train", "cache", "--learning-rate", "-1"], 1),
             (["ingest", "x.jsonl", "--eval-fraction", "2"], 1),
             (["merge", "--help"], 0), (["merge", "adapter", "--dtype", "int3"], 1),
             (["eval", "--help"], 0), (["eval", "--limit-task", "-3"], 1),
             (["generate", "--help"], 0), (["generate", "--prompts", "p.jsonl", "--remasking", "entropy"], 1),
             (["make-pairs", "--help"], 0), (["make-pairs", "q.jsonl", "--pairs-per-question", "0"], 1),
             (["sft", "data.jsonl", "--weight-decay", "-1"], 1), (["init-model", "--help"], 0),
             (["init-model", "tiny", "out", "--dtype", "int3"], 1), (["query", "--help"], 0),
             (["query", "--preset", "nosuch"], 1), (["report", "--help"], 0), (["run", "--help"], 0),
             (["run", "--rounds", "-1"], 1), (["plan", "--help"], 0), (["plan", "nosuch"], 1),
             (["plan", "train", "--gpu-memory", "-3GiB"], 1),
             (["report", "no-such-run"], 1)]  # last: it reads the file system (the report's modules), not a flag
    code = ("import sys\nfrom stages.cli import main\n"
            f"for argv in {[argv for argv, _ in calls]!r}:\n    sys.argv = ['lldm-dpo', *argv]\n"
            "    try:\n        main()\n    except SystemExit as exc:\n        code = exc.code\n"
            "    heavy = [m for m in ('torch', 'transformers', 'accelerate', 'pyarrow', 'numpy') if m in sys.modules]\n"
            "    print('after', ' '.join(argv), '->', code, heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("after ")]
    assert len(lines) == len(calls), out.stdout[-2000:] + out.stderr[-2000:]
    for line, (argv, want) in zip(lines, calls):
        prefix = f"after {' '.join(argv)} -> {want} "
        assert line.startswith(prefix), (line, out.stderr[-2000:])
        heavy = set(ast.literal_eval(line[len(prefix):]))
        assert not heavy & {"torch", "transformers", "accelerate"}, line
        assert not heavy or argv == ["report", "no-such-run"], line
    assert "samples" in out.stderr and "learning_rate" in out.stderr and "eval_fraction" in out.stderr
    for field in ("dtype", "limit_task", "remasking", "pairs_per_question", "weight_decay", "unknown preset",
                  "run directory not found", "rounds", "stage must be one of", "gpu_memory '-3GiB'"):
        assert field in out.stderr, (field, out.stderr[-2000:])


def test_requested_command_parsing():
    from stages.cli import _requested_command

    assert _requested_command(["train", "cache", "--out", "x"]) == "train"
    assert _requested_command(["--help"]) is None  # everything, for the listing
    assert _requested_command(["--version"]) == ""
    assert _requested_command(["nope"]) is None  # Typer reports the unknown command
    assert _requested_command([]) is None


def test_a_finished_command_destroys_its_process_group_and_a_failed_one_leaves_it(monkeypatch, tmp_path):
    """Under `accelerate launch` the group is destroyed after a command that succeeded (left to interpreter exit,
    its threads can abort a finished worker); none is touched after a failure, and none is made where there is
    none."""
    import torch.distributed as dist

    from stages import cli

    cli.close_process_group()  # no group: nothing to do
    assert not dist.is_initialized()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    for argv, destroyed in ((["lldm-dpo", "--version"], True), (["lldm-dpo", "ingest", str(tmp_path / "nothing")],
                                                                 False)):
        dist.init_process_group("gloo", rank=0, world_size=1)
        monkeypatch.setattr("sys.argv", argv)
        with pytest.raises(SystemExit):
            cli.main()
        assert dist.is_initialized() is not destroyed, argv
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
