"""A cache row's values by name: the reference's terms and mean per side and draw, a side's length, the split.

Rows are the dicts ``ScoresCache.rows``, ``SplitRows`` and ``read_whole_part`` give (SCORES_SCHEMA's columns);
these read them, so a reader never spells a column.
"""

from __future__ import annotations

from typing import Any

from pipeline.core.schemas import IDS_COLUMNS, LEN_COLUMNS, REF_ELBO_COLUMNS, REF_TERM_COLUMNS, SPLIT_COLUMN, split_of

Row = dict[str, Any]


def reference_terms(row: Row, side: str, draw: int) -> list[float]:
    """The reference's per-sample terms of ``side`` on the masks of ``draw``."""
    return row[REF_TERM_COLUMNS[side]][draw]


def reference_mean(row: Row, side: str, draw: int) -> float:
    """The reference's ELBO of ``side`` on ``draw``'s masks: the mean of its terms, summed in their order."""
    terms = row[REF_TERM_COLUMNS[side]][draw]
    return sum(terms) / len(terms)


def reference_elbo(row: Row, side: str) -> float:
    """The reference's ELBO of ``side``: the mean over every draw's terms, as score-ref recorded it."""
    return row[REF_ELBO_COLUMNS[side]]


def length(row: Row, part: str) -> int:
    """Tokens of ``part`` (prompt, chosen or rejected) as scored (after truncation)."""
    return row[LEN_COLUMNS[part]]


def row_split(row: Row) -> str:
    """The row's split (an unset one is ``schemas.DEFAULT_SPLIT``)."""
    return split_of(row.get(SPLIT_COLUMN))


def responses_differ(row: Row) -> bool:
    """Whether the two responses are different ids (truncation can make them the same: no preference left)."""
    return list(row[IDS_COLUMNS["chosen"]]) != list(row[IDS_COLUMNS["rejected"]])
