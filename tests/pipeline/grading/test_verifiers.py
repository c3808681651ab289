"""Verifiers: the working checker on hand-written right and wrong solutions, the strict #### format, the registry,
math-verify's equivalence where the project's reader gives up (and the reader's refusals kept)."""

from __future__ import annotations

import pytest

from pipeline.core.errors import ConfigError
from pipeline.grading.verifiers import (
    VERIFIERS,
    ArithmeticVerifier,
    check_working,
    get_verifier,
    read_answer,
    resolve_format,
)

Q = "Ava has 9 pens, gets 7 more and gives 5 away. How many are left?"


def test_the_issues_two_examples():
    v = ArithmeticVerifier("####")
    wrong = v.grade("9 + 7 = 16\n15 - 5 = 113#### 11", "11", Q)
    assert wrong.answer_correct and wrong.working_correct is False and not wrong.chosen_ok
    assert wrong.reason == "line 2: 15 - 5 is 10, not 113"
    right = v.grade("9 + 7 = 16\n16 - 5 = 11\n#### 11", "11", Q)
    assert right.answer_correct and right.working_correct is True and right.chosen_ok and right.reason == "ok"
    # The issue's rejected side: wrong working and a wrong answer.
    rejected = v.grade("9 + 7 = 17\n16 - 5 = 12\n#### 12", "11", Q)
    assert not rejected.answer_correct and rejected.working_correct is False
    assert rejected.reason == "answer 12, reference 11; line 1: 9 + 7 is 16, not 17"


@pytest.mark.parametrize("text, reason", [
    ("9 + 7 = 16\n16 - 5 = 11\n#### 11", "ok"),
    ("9 + 7 = 16\n16 - 5 = 11\n\n#### 11\n", "ok"),  # blank lines and a trailing newline are fine
    ("16 - 5 = 11\n#### 11", "line 1: 16 is neither a number of the question nor an earlier result"),
    ("9 + 7 = 16\n15 - 4 = 11\n#### 11", "line 2: 15 is neither a number of the question nor an earlier result"),
    ("#### 11", "no working before the answer"),
    ("9 + 7 = 16\n16 - 5 = 11", "no #### answer line"),
    ("9 + 7 = 16\n16 - 5 = 11 #### 11", "the #### answer is not on its own line"),
    ("9 + 7 = 16\n16 - 5 = 11\n#### 11\n2 + 2 = 4", "text after the #### answer"),
    ("9 + 7 = 16\nso 16 - 5 = 11\n#### 11", "line 2 is not 'a op b = c': 'so 16 - 5 = 11'"),
    ("9 + 7 = 16\n#### 11", "the answer 11 is not the last step's result 16"),
    ("9 / 0 = 0\n#### 0", "line 1: 9 / 0 is undefined, not 0"),
])
def test_the_working_checker_on_hand_written_solutions(text, reason):
    right, why = check_working(text, Q)
    assert (right, why) == (reason == "ok", reason)


def test_products_and_chained_results():
    q = "Kim buys 2 boxes of 4 toys and has 8 more. How many in all?"
    assert check_working("2 * 4 = 8\n8 + 8 = 16\n#### 16", q) == (True, "ok")
    assert check_working("2 * 4 = 9\n9 + 8 = 17\n#### 17", q) == (False, "line 1: 2 * 4 is 8, not 9")
    # Without the question only the arithmetic, the layout and the answer's link are checked.
    assert check_working("3 * 4 = 12\n#### 12") == (True, "ok")


def test_strict_format_reads_only_the_hash_answer():
    assert read_answer("so the answer is 11", "####") == (None, "no #### answer")
    assert read_answer("so the answer is 11", "any") == ("11", "answer is")
    assert read_answer("9 + 7 = 16\n16 - 5 = 11", "any") == ("11", "last number")
    assert read_answer("9 + 7 = 16\n16 - 5 = 11", "####") == (None, "no #### answer")
    assert read_answer("#### 1,200 then #### 5", "####") == ("1200", "####")
    v = get_verifier("answer", "####")
    assert not v.grade("16 - 5 = 11", "11").answer_correct  # the last-number fallback is off
    assert get_verifier("answer", "any").grade("16 - 5 = 11", "11").answer_correct
    assert v.grade("#### 12,34", "1234").reason == "unreadable #### answer"


def test_auto_format_follows_how_the_reference_is_written():
    assert resolve_format("auto", 27) == "####"  # a bare number: GSM8K's and the skill family's convention
    assert resolve_format("auto", "27") == "####"
    assert resolve_format("auto", "13 + 14 = 27\n#### 27") == "####"
    assert resolve_format("auto", "The answer is \\boxed{27}") == "any"
    assert resolve_format("any", 27) == "any"
    v = get_verifier("answer", "auto")
    assert not v.grade("the answer is 27", "27", reference_text=27).answer_correct
    assert v.grade("the answer is 27", "27", reference_text="A: 27").answer_correct
    with pytest.raises(ConfigError, match="answer_format: unknown value 'hash'"):
        get_verifier("answer", "hash")
    with pytest.raises(ConfigError, match="verifier: unknown verifier 'nope'; expected one of answer, arithmetic"):
        get_verifier("nope")
    assert set(VERIFIERS) == {"answer", "arithmetic", "math-verify"}


def test_the_answer_verifier_does_not_check_working():
    g = get_verifier("answer", "####").grade("9 + 7 = 16\n15 - 5 = 113\n#### 11", "11", Q)
    assert g.answer_correct and g.working_correct is None and g.chosen_ok


def test_math_verify_adds_symbolic_equivalence_and_keeps_the_projects_reader():
    pytest.importorskip("math_verify")
    any_ = get_verifier("math-verify", "any")
    assert any_.grade("so x = \\boxed{\\sqrt{4}}", "2").answer_correct  # the project's reader cannot read it
    assert not get_verifier("answer", "any").grade("so x = \\boxed{\\sqrt{4}}", "2").answer_correct
    assert any_.grade("The answer is \\boxed{\\frac{1}{2}}", "0.5").answer_correct
    assert not any_.grade("The answer is \\boxed{3}", "0.5").answer_correct
    strict = get_verifier("math-verify", "####")
    assert strict.grade("steps\n#### \\sqrt{4}", "2").answer_correct
    assert not strict.grade("\\boxed{2}", "2").answer_correct  # no #### line: no answer under the strict format
    assert strict.grade("#### 1,200", "1200").answer_correct
    # 12,34 is no number to the project's reader (math-verify would read 12.34): it stays no answer.
    assert not strict.grade("#### 12,34", "12.34").answer_correct
