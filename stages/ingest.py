"""``lldm-dpo ingest``: preference records from any input into one validated pairs file.

Every record read ends in exactly one place: the pairs file (Arrow IPC, schema
``PAIRS_SCHEMA`` plus kept fields) or the quarantine (JSONL, one object per
rejected record with source, line/row, reason code, message and raw text).
The report counts both; ``read == accepted + quarantined`` always.

Output is a pure function of the inputs and the config: rows keep input order,
no timestamps or absolute paths are added, so re-ingesting gives identical
bytes. Both files are written under temporary names and renamed at the end.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import typer

from pipeline.atomic import atomic_path
from pipeline.config import config_to_yaml, load_config, require
from pipeline.errors import ConfigError, UserError
from pipeline.pairs import FieldMap, Invalid, kept_value, split_of, validate_record
from pipeline.readers import input_size, iter_records
from pipeline.schemas import PAIRS_SCHEMA, REASON_CODES, SPLITS

DEFAULT_OUT = "data/out/pairs.arrow"
_BATCH_ROWS = 4096
_PROGRESS_MIN_BYTES = 16 << 20  # smaller inputs finish before a bar is worth drawing


def quarantine_path_for(out: str | Path) -> Path:
    """Where the quarantine goes by default: beside the pairs file (``pairs.arrow`` -> ``pairs.quarantine.jsonl``)."""
    out = Path(out)
    stem = out.name[: -len(out.suffix)] if out.suffix else out.name
    return out.with_name(f"{stem}.quarantine.jsonl")


@dataclass
class IngestConfig:
    inputs: list[str] = field(default_factory=lambda: ["data/preference_data/reasoning_prefs.jsonl"])
    """Input files: .jsonl, .jsonl.gz, .json (array or lines), .parquet, or datasets.save_to_disk folders."""
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
    """Fraction of prompts held out as split 'eval', chosen by a hash of the prompt (all pairs of a prompt on one side)."""
    strict: bool = False
    """Any quarantined record is an error (exit 1); both files and the report are still written."""
    progress: bool = True
    """Show a progress bar on large inputs."""

    def __post_init__(self) -> None:
        if isinstance(self.inputs, str):
            self.inputs = [self.inputs]
        if isinstance(self.keep_fields, str):
            self.keep_fields = [self.keep_fields]
        self.inputs = [str(p) for p in self.inputs]
        self.keep_fields = list(self.keep_fields)
        require(isinstance(self.max_chars, int) and self.max_chars >= 0, f"max_chars must be an integer >= 0, got {self.max_chars!r}")
        require(
            isinstance(self.eval_fraction, (int, float)) and 0.0 <= self.eval_fraction < 1.0,
            f"eval_fraction must be in [0, 1), got {self.eval_fraction!r}",
        )
        self.eval_fraction = float(self.eval_fraction)
        for name in ("prompt_field", "chosen_field", "rejected_field"):
            require(isinstance(getattr(self, name), str) and getattr(self, name), f"{name} must be a non-empty string")
        mapped = (self.prompt_field, self.chosen_field, self.rejected_field)
        require(len(set(mapped)) == 3, f"prompt_field, chosen_field and rejected_field must differ, got {mapped}")
        taken = set(PAIRS_SCHEMA.names)
        for name in self.keep_fields:
            require(name not in taken, f"keep_fields: '{name}' clashes with a pairs column ({', '.join(PAIRS_SCHEMA.names)})")
        require(len(set(self.keep_fields)) == len(self.keep_fields), "keep_fields lists a field twice")
        require(bool(self.out), "out must be a path")

    @property
    def quarantine_path(self) -> Path:
        return Path(self.quarantine) if self.quarantine else quarantine_path_for(self.out)


@dataclass
class IngestResult:
    read: int
    accepted: int
    quarantined: int
    by_reason: dict[str, int]
    out: str
    quarantine: str
    splits: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return {
            "read": self.read,
            "accepted": self.accepted,
            "quarantined": self.quarantined,
            "by_reason": dict(self.by_reason),
            "out": self.out,
            "quarantine": self.quarantine,
            "splits": dict(self.splits),
        }


def pairs_schema(keep_fields: list[str]) -> pa.Schema:
    return pa.schema(list(PAIRS_SCHEMA) + [pa.field(name, pa.string()) for name in keep_fields])


class _PairsWriter:
    """Buffers accepted rows column-wise and writes fixed-size record batches (fixed size: identical bytes)."""

    def __init__(self, path: Path, schema: pa.Schema):
        self.schema = schema
        self.sink = pa.OSFile(str(path), "wb")
        self.writer = pa.ipc.new_file(self.sink, schema)
        self.columns: dict[str, list] = {name: [] for name in schema.names}

    def add(self, row: dict[str, Any]) -> None:
        for name, col in self.columns.items():
            col.append(row.get(name))
        if len(self.columns["pair_id"]) >= _BATCH_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self.columns["pair_id"]:
            return
        arrays = [pa.array(self.columns[f.name], type=f.type) for f in self.schema]
        self.writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=self.schema))
        for col in self.columns.values():
            col.clear()

    def close(self) -> None:
        self.flush()
        self.writer.close()
        self.sink.close()


def _check_inputs(inputs: list[str]) -> list[Path]:
    if not inputs:
        raise UserError("ingest: no input given (pass one or more INPUT files)")
    paths = []
    for p in inputs:
        path = Path(p)
        if not path.exists():
            raise UserError(f"{path}: input not found")
        paths.append(path)
    return paths


def _make_progress(total: int, enabled: bool):
    if not enabled or total < _PROGRESS_MIN_BYTES:
        return None
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    return Progress(
        TextColumn("ingest"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )


def run(cfg: IngestConfig) -> IngestResult:
    """Ingest ``cfg.inputs`` into ``cfg.out`` and the quarantine; return the counts."""
    paths = _check_inputs(cfg.inputs)
    out = Path(cfg.out)
    qpath = cfg.quarantine_path
    if out.resolve() == qpath.resolve():
        raise ConfigError(f"out and quarantine are the same file: {out}")
    for p in paths:
        if p.resolve() in (out.resolve(), qpath.resolve()):
            raise UserError(f"{p}: input is also an output of this run")
    fields = FieldMap(cfg.prompt_field, cfg.chosen_field, cfg.rejected_field)
    schema = pairs_schema(cfg.keep_fields)
    by_reason = {code: 0 for code in REASON_CODES}
    splits = {s: 0 for s in SPLITS}
    seen: set[str] = set()
    read = accepted = 0
    total = sum(input_size(p) for p in paths)
    progress = _make_progress(total, cfg.progress)

    with atomic_path(out) as out_tmp, atomic_path(qpath) as q_tmp:
        writer = _PairsWriter(out_tmp, schema)
        try:
            with open(q_tmp, "w", encoding="utf-8", newline="\n") as qfh:
                if progress is not None:
                    progress.start()
                    task = progress.add_task("ingest", total=total)
                    advance = lambda n: progress.update(task, advance=n)  # noqa: E731
                else:
                    advance = None
                for path in paths:
                    for rec in iter_records(path, advance):
                        read += 1
                        reason, message = rec.reason, rec.message
                        if reason is None:
                            try:
                                pair = validate_record(rec.value, fields, cfg.max_chars)
                                if pair.pair_id in seen:
                                    raise Invalid("duplicate_pair", f"duplicate of an earlier pair (pair_id {pair.pair_id})")
                            except Invalid as bad:
                                reason, message = bad.reason, bad.message
                        if reason is not None:
                            by_reason[reason] += 1
                            qfh.write(
                                json.dumps(
                                    {"source": rec.source, "line": rec.line, "reason": reason, "message": message, "raw": rec.raw},
                                    ensure_ascii=False,
                                )
                                + "\n"
                            )
                            continue
                        seen.add(pair.pair_id)
                        split = split_of(pair.prompt_key, cfg.eval_fraction)
                        splits[split] += 1
                        accepted += 1
                        row = {
                            "pair_id": pair.pair_id,
                            "prompt": pair.prompt,
                            "chosen": pair.chosen,
                            "rejected": pair.rejected,
                            "prompt_messages": pair.prompt_messages,
                            "chosen_messages": pair.chosen_messages,
                            "rejected_messages": pair.rejected_messages,
                            "split": split,
                            "source": rec.location,
                        }
                        if cfg.keep_fields:
                            value = rec.value
                            for name in cfg.keep_fields:
                                row[name] = kept_value(value.get(name))
                        writer.add(row)
        finally:
            if progress is not None:
                progress.stop()
            writer.close()

    quarantined = sum(by_reason.values())
    assert read == accepted + quarantined  # the accounting identity the report promises
    return IngestResult(read, accepted, quarantined, by_reason, str(out), str(qpath), splits)


def print_report(result: IngestResult) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="ingest", show_header=True)
    table.add_column("")
    table.add_column("records", justify="right")
    table.add_row("read", str(result.read))
    table.add_row("accepted", str(result.accepted))
    for split, n in result.splits.items():
        if n:
            table.add_row(f"  split {split}", str(n))
    table.add_row("quarantined", str(result.quarantined))
    for reason, n in result.by_reason.items():
        if n:
            table.add_row(f"  {reason}", str(n))
    console = Console()
    console.print(table)
    console.print(f"pairs: {result.out}\nquarantine: {result.quarantine}")


def command(
    inputs: list[str] = typer.Argument(None, help="Input files: .jsonl, .jsonl.gz, .json, .parquet, datasets folders.", show_default=False),
    out: str = typer.Option(None, "--out", "-o", help=f"Pairs file to write (Arrow IPC). [default: {DEFAULT_OUT}]"),
    quarantine: str = typer.Option(None, "--quarantine", help="Quarantine JSONL. [default: beside --out]"),
    prompt_field: str = typer.Option(None, "--prompt-field", help="Input field with the prompt. [default: prompt]"),
    chosen_field: str = typer.Option(None, "--chosen-field", help="Input field with the chosen response. [default: chosen]"),
    rejected_field: str = typer.Option(None, "--rejected-field", help="Input field with the rejected response. [default: rejected]"),
    keep_field: list[str] = typer.Option(None, "--keep-field", help="Extra input field to keep as a column (repeatable)."),
    max_chars: int = typer.Option(None, "--max-chars", help="Quarantine texts longer than this (0: no limit)."),
    eval_fraction: float = typer.Option(None, "--eval-fraction", help="Fraction of prompts held out as split 'eval'."),
    strict: bool = typer.Option(None, "--strict/--no-strict", help="Exit 1 if any record is quarantined."),
    progress: bool = typer.Option(None, "--progress/--no-progress", help="Progress bar on large inputs."),
    config: Path = typer.Option(None, "--config", help="YAML config file (flags override it)."),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved config and exit."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Validate preference pairs from JSONL/JSON/Parquet/datasets inputs into an Arrow pairs file."""
    cfg = load_config(
        IngestConfig,
        config_file=config,
        overrides={
            "inputs": list(inputs) if inputs else None,
            "out": out,
            "quarantine": quarantine,
            "prompt_field": prompt_field,
            "chosen_field": chosen_field,
            "rejected_field": rejected_field,
            "keep_fields": list(keep_field) if keep_field else None,
            "max_chars": max_chars,
            "eval_fraction": eval_fraction,
            "strict": strict,
            "progress": progress,
        },
    )
    if print_config:
        typer.echo(config_to_yaml(cfg, with_docs=True), nl=False)
        return
    result = run(cfg)
    if json_out:
        from pipeline.cli import emit_json

        emit_json(result.to_dict())
    else:
        print_report(result)
    if cfg.strict and result.quarantined:
        raise UserError(f"--strict: {result.quarantined} of {result.read} records quarantined (see {result.quarantine})")
