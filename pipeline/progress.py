"""Progress bars for long stages (rich): rate, throughput and ETA, quiet when not wanted.

Every stage draws its bar through here: ``progress_bar`` for counted items
(pairs, prompts), ``byte_progress`` for input read in bytes (ingest).
"""

from __future__ import annotations

import contextlib
import re
import sys
from typing import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)


class _Null:
    def update(self, *args, **kwargs) -> None:
        pass

    def advance(self, *args, **kwargs) -> None:
        pass


@contextlib.contextmanager
def progress_bar(description: str, total: int, enabled: bool = True, extra: str = "", unit: str = "") -> Iterator:
    """Yield an object with ``advance(n, **fields)``; draws on stderr only when enabled.

    ``extra`` is a rich format string over task fields (for example
    ``"{task.fields[tps]}"``) so a stage can show tokens/s beside pairs/s.
    """
    if not enabled or total <= 0:
        yield _Null()
        return
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]}"),
    ]
    if extra:
        columns.append(TextColumn(extra))
    columns += [TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    console = Console(file=sys.stderr)
    with Progress(*columns, console=console, transient=False) as progress:
        blank = {name: "" for name in re.findall(r"task\.fields\[(\w+)\]", extra)}
        task = progress.add_task(description, total=total, rate="", **blank)

        class _Bar:
            def advance(self, n: int = 1, **fields) -> None:
                progress.advance(task, n)
                speed = progress.tasks[task].speed
                fields.setdefault("rate", f"{speed:.2f} {unit}/s".replace(" /", "/") if speed else "")
                progress.update(task, **fields)

        yield _Bar()


def byte_progress(description: str) -> Progress:
    """A transient bar over bytes read (size, transfer rate, ETA), on stderr; the caller starts and stops it."""
    return Progress(TextColumn(description), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn(), console=Console(file=sys.stderr), transient=True)
