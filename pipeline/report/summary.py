"""What ``lldm-dpo run`` returns and prints: the single pass's result and the rounds', each summary a table when
the terminal shows it whole (every figure uncut), else one (metric, value) a line."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Column, Table

from pipeline.evaluation.intervals import print_intervals
from pipeline.report.rounds import COLUMNS, format_figure, headline


@dataclass
class RunResult:
    out: str
    seconds: float
    stage_seconds: dict[str, float]
    pairs: dict[str, int]
    preference_accuracy: dict[str, float]
    elbo_accuracy: dict[str, float]
    task_accuracy: dict[str, float]
    choice_accuracy: dict[str, float]
    final_train_loss: float
    final_train_reward_accuracy: float
    artefacts: dict[str, str]
    example_query: str
    intervals: dict[str, dict[str, Any]] = field(default_factory=dict)
    """eval's intervals block: per figure the count and 95% Wilson interval of before and after, and the paired
    interval of after - before (eval's EvalResult.intervals)."""
    mc_spread: dict[str, dict[str, Any]] = field(default_factory=dict)
    """eval's figures under several mask seeds (eval: mc_seeds > 1)."""


@dataclass
class RoundsResult:
    out: str
    seconds: float
    rounds: list[dict[str, Any]]
    """One summary per round (also in OUT/round-r/round.json)."""
    initial_task_accuracy: float | None
    """Task accuracy of the original model (round 1's `before`)."""
    report: str
    """OUT/rounds.md: the table across rounds."""
    resumed_rounds: int
    """Rounds found finished and skipped."""
    example_query: str


def run_result(out, seconds: float, stage_seconds: dict[str, float], results, paths) -> RunResult:
    """The single pass's result from its stages' results (``results``: ingest, score-ref, train and eval's) and
    the report's paths (None: no report)."""
    ing, sc, tr, ev = results
    artefacts = {"pairs": ing.out, "quarantine": ing.quarantine, "reference_cache": sc.out, "run": tr.out,
                 "final_model": tr.final_model, "metrics": tr.metrics, "eval": ev.eval_json}
    if paths is not None:
        artefacts.update(report_html=str(paths.html), report_png=str(paths.png))
    query = (f"lldm-dpo query --pairs {ing.out} --scores {sc.out} --run {tr.out} "
             "\"SELECT pairs.split, count(*) AS pairs, avg(ref_margin) AS mean_ref_margin "
             "FROM pairs JOIN scores USING (pair_id) GROUP BY pairs.split ORDER BY 1\"")
    return RunResult(
        out=str(out), seconds=round(seconds, 2), stage_seconds=stage_seconds,
        pairs={"read": ing.read, "accepted": ing.accepted, "quarantined": ing.quarantined, "scored": sc.pairs},
        preference_accuracy=ev.preference_accuracy, elbo_accuracy=ev.elbo_accuracy, task_accuracy=ev.task_accuracy,
        choice_accuracy=ev.choice_accuracy,
        final_train_loss=tr.final_loss, final_train_reward_accuracy=tr.final_reward_accuracy,
        artefacts=artefacts, example_query=query, intervals=ev.intervals, mc_spread=ev.mc_spread,
    )


def fits_wide(headers: list[str], rows: list[list[str]], width: int) -> bool:
    """Whether a table of ``rows`` under ``headers`` shows every cell whole in ``width`` columns (headers may
    wrap at their spaces, a figure may not); else a summary is laid out vertically, one (metric, value) a line."""
    need = 1
    for i, header in enumerate(headers):
        cells = [len(r[i]) for r in rows] + [max((len(w) for w in header.split()), default=0)]
        need += max(cells) + 3  # a cell's padding and its border
    return need <= width


def figure_table(title: str, rows: list[tuple[str, str]]) -> Table:
    """A (metric, value) table: the metric folds onto more lines when the terminal is narrow, the value never."""
    table = Table(Column(title, overflow="fold", ratio=1), Column("", justify="right", no_wrap=True),
                  show_header=bool(title), title_justify="left")
    for name, value in rows:
        table.add_row(name, value)
    return table


def print_run_summary(result: RunResult, console: Console | None = None) -> None:
    """The held-out figures (a table when the terminal shows it whole, else one (metric, value) a line), their
    intervals as eval prints them, the training's last figures, the artefacts and a query to try."""
    console = console or Console()
    title = f"lldm-dpo run: done in {result.seconds:.0f}s"
    rows = []
    for key, name, values in (("preference_accuracy", "preference accuracy", result.preference_accuracy),
                              ("elbo_accuracy", "ELBO accuracy (B(chosen) > B(rejected))", result.elbo_accuracy),
                              ("task_accuracy", "task accuracy (generation)", result.task_accuracy),
                              ("choice_accuracy", "multiple-choice accuracy (option ELBO)", result.choice_accuracy)):
        if values and key not in result.intervals:  # those with counts and intervals are listed below
            rows.append([name, f"{values.get('before', float('nan')):.3f}", f"{values.get('after', float('nan')):.3f}"])
    headers = ["held-out evaluation", "before", "after"]
    if not rows:
        console.print(title)
    elif fits_wide(headers, rows, console.width):
        table = Table(headers[0], Column("before", justify="right"), Column("after", justify="right"),
                      title=title, title_justify="left")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    else:  # narrow: one (metric, value) a line
        console.print(title)
        console.print(figure_table("held-out evaluation", [(f"{name}, {side}", value) for name, *values in rows
                                                           for side, value in zip(("before", "after"), values)]))
    print_intervals(result.intervals, result.mc_spread, title="held-out evaluation, 95% intervals")
    console.print(f"train: final loss {result.final_train_loss:.4f}, "
                  f"reward accuracy {result.final_train_reward_accuracy:.3f}")
    for key, path in result.artefacts.items():
        console.print(f"  {key:16} {path}", soft_wrap=True, markup=False)
    console.print("try:", result.example_query, soft_wrap=True, markup=False)


def print_rounds_summary(result: RoundsResult, console: Console | None = None) -> None:
    """The headline, then the table across rounds when the terminal shows it whole (about 120 columns and up),
    else each round's figures one (metric, value) a line."""
    console = console or Console()
    title = (f"lldm-dpo run --rounds: done in {result.seconds:.0f}s "
             f"(original model's task accuracy {format_figure(result.initial_task_accuracy)})")
    console.print(headline(result.rounds), markup=False)  # the result leads, wrapped at its spaces
    cells = [[format_figure(s.get(k)) for k, _ in COLUMNS] for s in result.rounds]
    if fits_wide([header for _, header in COLUMNS], cells, console.width):
        table = Table(*(Column(header, justify="right") for _, header in COLUMNS), title=title, title_justify="left")
        for row in cells:
            table.add_row(*row)
        console.print(table)
    else:
        console.print(title, soft_wrap=True, markup=False)
        for row in cells:
            console.print(figure_table(f"round {row[0]}", [(header, value) for (_, header), value
                                                           in zip(COLUMNS[1:], row[1:])]))
    console.print(f"report: {result.report}", soft_wrap=True, markup=False)
    console.print("try:", result.example_query, soft_wrap=True, markup=False)
