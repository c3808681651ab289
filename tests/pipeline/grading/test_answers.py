"""Answer extraction: a table of answer styles, and GSM8K's real answers when ../shared is present."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.grading.answers import (
    extract_answer,
    extract_answer_with_style,
    is_correct,
    normalize_number,
    reference_answer,
    same_number,
)

GSM8K = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "gsm8k"


@pytest.mark.parametrize(
    "text,answer,style",
    [
        ("She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18", "18", "####"),
        ("So he made 200,000-130,000=$<<200000-130000=70000>>70,000\n#### 70,000", "70000", "####"),
        ("#### 5\nsome trailing words with 7 numbers", "5", "####"),
        ("It takes 2 + 1 = 3 bolts\nA: 3", "3", "A:"),
        ("Price 34.56 + 6.912 = 41.472\nA: 41.472", "41.472", "A:"),
        ("... A: not this\nA: -2.5", "-2.5", "A:"),
        ("3 + 4 = 7 eggs. The answer is 9.", "9", "answer is"),
        ("The answer is $1,234.50.", "1234.5", "answer is"),
        ("Final answer: 42", "42", "answer is"),
        ("Thus the result is \\boxed{1,200}.", "1200", "boxed"),
        ("So 16 - 3 - 4 = 9 eggs remain and she earns $18 per day", "18", "last number"),
        ("We get 48 - 2 =<<48-2=46>>", "2", "last number"),  # annotation removed, not read as the answer
        ("x = 16-3", "3", "last number"),  # a minus after a number is the operator
        ("It fell to \u22125 degrees", "-5", "last number"),  # unicode minus
        ("no digits at all", None, None),
        ("", None, None),
    ],
)
def test_answer_styles(text, answer, style):
    assert extract_answer_with_style(text) == (answer, style)


@pytest.mark.parametrize(
    "raw,norm",
    [("$1,200", "1200"), ("1200.", "1200"), ("1200.00", "1200"), ("18.50", "18.5"), ("-0.0", "0"), ("25%", "25"),
     ("abc", None), ("1e400", "1" + "0" * 400), ("1e99999", None)],
)
def test_normalize_number(raw, norm):
    assert normalize_number(raw) == norm


def test_is_correct_numeric_equality_and_reference_forms():
    assert is_correct("so the total is 1,200 dollars", "#### 1200")
    assert is_correct("The answer is 7.50", "7.5")
    assert is_correct("A: 3", 3)
    assert is_correct("The answer is 0.5", 0.5)
    assert not is_correct("The answer is 8", "#### 18")
    assert not is_correct("I don't know", "#### 18")
    assert not is_correct("The answer is 8", "")


# The checker's table: (completion, reference, correct). Fractions, digit groups, scientific notation and
# the first "####" line (lm-eval's strict match) are the cases the old checker got wrong.
CHECKER_CASES = [
    # fractions
    ("So x = 1/4", "3/4", False),
    ("#### 3/4", "3/4", True),
    ("#### 0.75", "3/4", True),
    ("#### 6/8", "3/4", True),
    ("The answer is \\frac{3}{4}.", "3/4", True),
    ("The answer is \\dfrac{3}{4}", "0.75", True),
    ("\\boxed{\\frac{1}{2}}", "0.5", True),
    ("\\boxed{\\tfrac{2}{3}}", "\\frac{2}{3}", True),
    ("#### 0.67", "2/3", False),
    ("#### 1/3", "0.333", False),
    ("#### -3/4", "-0.75", True),
    ("the result is -\\frac{3}{4}", "-3/4", True),
    ("#### 3/4", "4", False),
    ("#### 4/2", "2", True),
    ("#### 1/0", "1", False),
    # digit groups
    ("#### 1 000", "1000", True),
    ("It costs 1 000 dollars", "1000", True),
    ("It costs 1 000 dollars", "1", False),
    ("#### 12,34", "34", False),
    ("#### 12,34", "12", False),
    ("#### 12,34", "1234", False),
    ("#### 1,234", "1234", True),
    ("#### 1,234,567", "1234567", True),
    ("#### 1,2345", "12345", False),
    ("The answer is $1,200.50", "1200.5", True),
    ("so 70,000 in all", "#### 70,000", True),
    ("values 3,4", "4", False),
    ("I count 3, 4 and 5", "5", True),
    ("1\u202f000 people", "1000", True),
    # scientific notation
    ("#### 1e3", "1000", True),
    ("The answer is 2.5E-2", "0.025", True),
    ("The answer is 3 \\times 10^{4}", "30000", True),
    ("#### 1e3", "1", False),
    ("A: 5e2", "500", True),
    # first #### line (lm-eval strict match)
    ("#### 5\nQuestion: next one\n#### 7", "5", True),
    ("#### 5\nQuestion: next one\n#### 7", "7", False),
    ("reasoning 3 + 4\n#### 7\nmore text 9", "7", True),
    # other styles and plain numbers
    ("The answer is 7.50", "7.5", True),
    ("A: 3", 3, True),
    ("The answer is 0.5", 0.5, True),
    ("The answer is 8", "#### 18", False),
    ("I don't know", "#### 18", False),
    ("so 16-3 = 13 eggs", "13", True),
    ("It fell to \u22125 degrees", "-5", True),
    ("25% of them", "25", True),
    ("She pays $18.", "18", True),
]


@pytest.mark.parametrize("completion,reference,correct", CHECKER_CASES)
def test_checker_table(completion, reference, correct):
    assert is_correct(completion, reference) is correct


def test_checker_table_is_large():
    assert len(CHECKER_CASES) >= 40


@pytest.mark.parametrize("reference,value", [("3/4", "0.75"), ("\\frac{3}{4}", "0.75"), ("2/6", "1/3"),
                                             ("1 000", "1000"), ("#### 12", "12"), ("A: 4", "4"), (7, "7"),
                                             (0.25, "0.25")])
def test_reference_answers(reference, value):
    assert reference_answer(reference) == value


@pytest.mark.parametrize("reference", ["\\sqrt{2}", "x + 1", "12,34", "#### 12,34", "", "two", True, "1/0"])
def test_unreadable_references(reference):
    assert reference_answer(reference) is None


def test_same_number_and_canonical_forms():
    assert same_number("0.75", "3/4") and same_number("1/3", "2/6") and not same_number("1/3", "0.333")
    assert not same_number(None, "1") and not same_number("1", "abc")
    assert normalize_number("-\\frac{1}{8}") == "-0.125" and normalize_number("22/7") == "22/7"


def _rows(name):
    path = GSM8K / name
    if not path.exists():
        pytest.skip(f"{path} absent (shared data is only beside the project's own checkout)")
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("name", ["test.jsonl", "train.jsonl"])
def test_gsm8k_reference_answers_agree_with_hash_marker(name):
    rows = _rows(name)
    for i, row in enumerate(rows):
        marked = row["answer"].rsplit("####", 1)[1].strip()
        assert extract_answer_with_style(row["answer"]) == (normalize_number(marked), "####"), (name, i, marked)


def test_gsm8k_example_solutions_ground_truth_and_correctness_labels():
    rows = _rows("example_model_solutions.jsonl")
    assert len(rows) == 1319
    checked = 0
    for i, row in enumerate(rows):
        truth = row["ground_truth"]
        marked = truth.strip().splitlines()[-1]
        assert marked.startswith("A:")
        assert extract_answer_with_style(truth) == (normalize_number(marked[2:]), "A:"), (i, marked)
        # The published is_correct labels are reproduced by comparing final answers.
        for key, value in row.items():
            if key in ("question", "ground_truth"):
                continue
            assert is_correct(value["solution"], truth) == value["is_correct"], (i, key, value["solution"][-200:])
            checked += 1
    assert checked == 4 * 1319


def test_gsm8k_test_and_solutions_files_share_answers():
    tests, solutions = _rows("test.jsonl"), _rows("example_model_solutions.jsonl")
    for t, s in zip(tests, solutions):
        assert t["question"] == s["question"]
        assert extract_answer(t["answer"]) == extract_answer(s["ground_truth"])
