"""bench/pair_edits.py: tokens apart of a pair, and eval's error classes from the arithmetic verifier's reasons."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import pair_edits  # noqa: E402

from pipeline.grading.verifiers import get_verifier  # noqa: E402


@pytest.mark.parametrize("chosen, rejected, apart", [
    ("13 + 14 = 27\n#### 27", "13 + 14 = 26\n#### 26", 2),  # the minimal pair: a result and its copy
    ("13 + 14 = 27\n#### 27", "13 + 14 = 27\n#### 26", 1),
    ("13 + 14 = 27\n#### 27", "13 + 14 = 27\n#### 27", 0),
    ("2 * 4 = 8\n8 + 8 = 16\n#### 16", "2 * 4 = 8\n#### 8", 7),  # a dropped line (6 with its newline), the answer
])
def test_edit_tokens_by_hand(chosen, rejected, apart):
    assert pair_edits.edit_tokens(chosen, rejected) == apart


@pytest.mark.parametrize("completion, reference, expected", [
    ("13 + 14 = 27\n#### 27", "27", "right"),
    ("13 + 14 = 26\n#### 27", "27", "right answer, wrong working"),
    ("13 + 14 = 26\n#### 26", "27", "arithmetic slip"),
    ("13 + 14 = 27\n#### 26", "27", "answer not the last result"),
    ("13 + 15 = 28\n#### 28", "27", "stray number"),
    ("13 + 14 = 27", "27", "no #### answer"),
])
def test_error_class_reads_the_verifiers_reasons(completion, reference, expected):
    grade = get_verifier("arithmetic", "####").grade(completion, reference, "Ben has 13 coins and gets 14 more.")
    assert pair_edits.error_class(grade.answer_correct, grade.working_correct, grade.reason) == expected
