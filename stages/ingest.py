"""``lldm-dpo ingest``: preference records from any input into one validated pairs file and a quarantine.

The work is ``pipeline.data.ingesting``'s (every record read ends in the pairs file or the quarantine, and the same
inputs give the same bytes); here are the config, the report and the command line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from pipeline.cli.commands import emit_json, stage_command
from pipeline.core.config import check_ranges, require
from pipeline.core.errors import UserError
from pipeline.core.lock import output_lock
from pipeline.core.paths import quarantine_path_for

if TYPE_CHECKING:  # the library's ingest (pyarrow, numpy) loads when the command runs, not when it is parsed
    from pipeline.data.ingesting import IngestResult

DEFAULT_OUT = "data/out/pairs.arrow"
RANGES = {"max_chars": "[0, inf)", "eval_fraction": "[0, 1)", "workers": "[1, inf)"}
"""The valid interval of every numeric field (checked first in __post_init__)."""


@dataclass
class IngestConfig:
    inputs: list[str] = field(default_factory=lambda: ["data/preference_data/reasoning_prefs.jsonl"])
    """Input files: .jsonl, .jsonl.gz, .json or .json.gz (array or lines), .parquet, or datasets.save_to_disk folders (a DatasetDict keeps its splits)."""
    out: str = DEFAULT_OUT
    """The pairs file to write (Arrow IPC)."""
    quarantine: str | None = None
    """The quarantine JSONL; default: beside `out`, named <out stem>.quarantine.jsonl."""
    prompt_field: str = "prompt"
    """Input field holding the prompt (string or message list); absent for an implicit conversational prompt."""
    chosen_field: str = "chosen"
    """Input field holding the preferred response (string or message list)."""
    rejected_field: str = "rejected"
    """Input field holding the dispreferred response (string or message list)."""
    keep_fields: list[str] = field(default_factory=list)
    """Extra input fields kept as string columns (strings as they are, other values as JSON; null when absent)."""
    max_chars: int = 0
    """Quarantine a record whose prompt, chosen or rejected text is longer than this (0: no limit)."""
    eval_fraction: float = 0.0
    """Fraction of prompts held out as split 'eval', chosen by a hash of the prompt (all pairs of a prompt on one side). Records the input already puts in an eval split stay there; this draws from the rest."""
    split_field: str = "split"
    """Input field naming a record's own split, used like a DatasetDict's split names: train... is 'train', test.../validation.../valid.../eval.../dev... is 'eval' (other names are an error); '' ignores the field."""
    strict: bool = False
    """Any quarantined record is an error (exit 1); both files and the report are still written."""
    progress: bool = True
    """Show a progress bar on large inputs."""
    workers: int = 1
    """Processes parsing JSONL inputs; more than 1 starts a process pool (worth it for inputs of hundreds of MB on idle cores). The output does not depend on it."""

    def __post_init__(self) -> None:
        self.inputs = [str(p) for p in ([self.inputs] if isinstance(self.inputs, str) else self.inputs)]
        self.keep_fields = [self.keep_fields] if isinstance(self.keep_fields, str) else list(self.keep_fields)
        check_ranges(self, RANGES)
        for name in ("prompt_field", "chosen_field", "rejected_field"):
            require(isinstance(getattr(self, name), str) and getattr(self, name), f"{name} must be a non-empty string")
        mapped = (self.prompt_field, self.chosen_field, self.rejected_field)
        require(len(set(mapped)) == 3, f"prompt_field, chosen_field and rejected_field must differ, got {mapped}")
        require(isinstance(self.split_field, str), f"split_field must be a string ('' to ignore), got {self.split_field!r}")
        require(self.split_field not in mapped, f"split_field '{self.split_field}' is also the prompt, chosen or rejected field")
        if self.keep_fields:
            from pipeline.core.schemas import PAIRS_SCHEMA  # pyarrow: only when there is something to check

            taken = set(PAIRS_SCHEMA.names)
            for name in self.keep_fields:
                require(name not in taken, f"keep_fields: '{name}' clashes with a pairs column ({', '.join(PAIRS_SCHEMA.names)})")
        require(len(set(self.keep_fields)) == len(self.keep_fields), "keep_fields lists a field twice")
        require(bool(self.out), "out must be a path")

    @property
    def quarantine_path(self) -> Path:
        return Path(self.quarantine) if self.quarantine else quarantine_path_for(self.out)


def run(cfg: IngestConfig) -> IngestResult:
    """Ingest ``cfg.inputs`` into ``cfg.out`` and the quarantine; return the counts. The stage holds its output's lock
    (a second run into the same place refuses, naming the first)."""
    from pipeline.data.ingesting import (
        NothingAccepted,
        check_inputs,
        check_outputs,
        chunk_rules,
        ingest_files,
        nothing_accepted_message,
    )
    from pipeline.data.pairs import FieldMap

    with output_lock(cfg.out, "ingest", folder=False, what="pairs file (--out)"):
        example = IngestConfig.__dataclass_fields__["inputs"].default_factory()[0]
        paths = check_inputs(cfg.inputs, example)
        out, qpath = Path(cfg.out), cfg.quarantine_path
        check_outputs(paths, out, qpath)
        fields = FieldMap(cfg.prompt_field, cfg.chosen_field, cfg.rejected_field)
        rules = chunk_rules(fields, cfg.max_chars, cfg.eval_fraction, tuple(cfg.keep_fields), cfg.split_field)
        result = ingest_files(paths, out, qpath, rules, workers=cfg.workers, progress=cfg.progress)
        if not result.accepted:  # README: no record accepted exits 1 (an empty input too)
            raise NothingAccepted(nothing_accepted_message(cfg.inputs, fields, cfg.max_chars, result), result)
        return result


def print_report(result: IngestResult) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="ingest", show_header=True)
    table.add_column("")
    table.add_column("records", justify="right")
    splits = [(f"  split {split}", n) for split, n in result.splits.items() if n]
    reasons = [(f"  {reason}", n) for reason, n in result.by_reason.items() if n]
    for label, n in [("read", result.read), ("accepted", result.accepted), *splits, ("quarantined", result.quarantined),
                     *reasons]:
        table.add_row(label, str(n))
    console = Console()
    console.print(table)
    console.print(f"pairs: {result.out}\nquarantine: {result.quarantine}")


def _ingest_action(cfg: IngestConfig, as_json: bool) -> None:
    from pipeline.data.ingesting import NothingAccepted

    try:
        result, failure = run(cfg), None
    except NothingAccepted as exc:  # the report still shows what happened, then the one-line error
        result, failure = exc.result, exc
    if failure is None and cfg.strict and result.quarantined:
        failure = UserError(f"--strict: {result.quarantined} of {result.read} records quarantined "
                            f"(see {result.quarantine})")
    if failure is None and result.quarantined * 2 > result.read:  # most of the data is not in the pairs file
        reasons = ", ".join(f"{reason} {n}" for reason, n in result.by_reason.items() if n)
        typer.echo(f"warning: {result.quarantined} of {result.read} records ({result.quarantined / result.read:.0%}) "
                   f"were quarantined ({reasons}); see {result.quarantine}", err=True)
    if as_json:  # one JSON document: the report, with the error when there is one
        emit_json({**result.to_dict(), **({"error": str(failure), "exit_code": 1} if failure else {})})
        if failure is not None:
            typer.echo(f"error: {failure}", err=True)
            raise typer.Exit(1)
        return
    print_report(result)
    if failure is not None:
        raise failure


command = stage_command(IngestConfig, _ingest_action, positional={"inputs": False},
                        extra_names={"out": ("-o",), "keep_fields": ("--keep-field",)},
                        doc="Validate preference pairs from JSONL/JSON/Parquet/datasets inputs into an Arrow pairs file.")
