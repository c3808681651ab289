"""pipeline.sampling.selfpairs: reading questions, seeds, grading and the pairing policy (pure functions)."""

from __future__ import annotations

import json

import pytest

from pipeline.core.errors import UserError
from pipeline.sampling.selfpairs import (
    PairingPolicy,
    Question,
    grade,
    pair_question,
    question_id_of,
    read_questions,
    sample_seed,
    solution_text,
)

Q = Question(0, "q.jsonl:1", "q-1", "What is 2 + 2?", "4", "2 + 2 = 4\n#### 4")


def samples(*texts):
    rows = []
    for j, text in enumerate(texts):
        extracted, correct = grade(text, Q.reference_answer)
        rows.append({"sample": j, "completion": text, "extracted_answer": extracted, "correct": correct})
    return rows


def write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_grade_uses_the_answer_checker():
    assert grade("2 + 2 = 4. #### 4", "4") == ("4", True)
    assert grade("The answer is $4.00", "4") == ("4", True)
    assert grade("#### 5", "4") == ("5", False)
    assert grade("no number", "4") == (None, False)


def test_sample_seed_depends_on_seed_question_and_index_only():
    seeds = {sample_seed(s, q, j) for s in (0, 1) for q in ("a", "b") for j in range(3)}
    assert len(seeds) == 12 and all(0 <= x < 2**63 for x in seeds)
    assert sample_seed(0, "a", 2) == sample_seed(0, "a", 2)


def test_question_ids_are_stable_hashes_of_the_normalised_text():
    assert question_id_of("What is 2 + 2?") == question_id_of("  What is 2 + 2?\r\n")
    assert question_id_of("What is 2 + 2?") != question_id_of("What is 2 + 3?")


def test_solution_text_makes_bare_numbers_a_final_answer_line():
    assert solution_text(160) == "#### 160"
    assert solution_text("$1,200") == "#### 1200"
    assert solution_text("x = 3\n#### 3") == "x = 3\n#### 3"


def test_read_questions_fields_ids_and_duplicates(tmp_path):
    path = write(tmp_path / "q.jsonl", [
        {"question": "What is 2 + 2?", "answer": "2 + 2 = 4\n#### 4"},
        "",
        {"prompt": "What is 3 + 3?", "answer": 6, "id": 17},
        {"question": "What is 2 + 2?", "answer": "#### 4"},  # same question, same answer: skipped
    ])
    qs = read_questions(path)
    assert [q.question_id for q in qs.questions] == [question_id_of("What is 2 + 2?"), "17"]
    assert [q.reference_answer for q in qs.questions] == ["4", "6"]
    assert qs.questions[1].solution == "#### 6" and qs.questions[1].where.endswith("q.jsonl:3")
    assert qs.duplicates == 1
    # a fraction is kept whole ("3/4" was once stored as "4"), and graded exactly
    from pipeline.sampling.selfpairs import grade

    frac = read_questions(write(tmp_path / "f.jsonl", [{"question": "x?", "answer": "3/4"},
                                                       {"question": "y?", "answer": "\\frac{1}{3}"}]))
    assert [q.reference_answer for q in frac.questions] == ["0.75", "1/3"]
    assert grade("#### 0.75", "0.75") == ("0.75", True) and grade("so 2/6", "1/3") == ("1/3", True)
    assert grade("So x = 1/4", "0.75") == ("0.25", False)


@pytest.mark.parametrize("line, message", [
    ('{"question": "x?"}', r"q\.jsonl:1: no 'answer' field"),
    ('{"question": "x?", "answer": "many"}', r"q\.jsonl:1: field 'answer' holds no number"),
    # MATH-style answers that are not numbers are refused, not graded against their last digit
    ('{"question": "x?", "answer": "3\\\\sqrt{2}"}', r"q\.jsonl:1: field 'answer' holds no number"),
    ('{"question": "x?", "answer": "12,34"}', r"q\.jsonl:1: field 'answer' holds no number"),
    ('{"question": "  ", "answer": 1}', r"q\.jsonl:1: field 'question' is empty"),
    ('{"question": ["x"], "answer": 1}', r"q\.jsonl:1: field 'question' is a list"),
    ('{"question": "x?", "answer": 1', r"q\.jsonl:1: invalid JSON"),
    ('[1, 2]', r"q\.jsonl:1: expected a JSON object"),
])
def test_read_questions_errors_name_file_line_and_field(tmp_path, line, message):
    with pytest.raises(UserError, match=message):
        read_questions(write(tmp_path / "q.jsonl", [line]))


def test_a_reused_id_with_another_question_is_an_error(tmp_path):
    path = write(tmp_path / "q.jsonl", [{"question": "a?", "answer": 1, "id": 1}, {"question": "b?", "answer": 2, "id": 1}])
    with pytest.raises(UserError, match=r"q\.jsonl:2: question id '1' already used by .*q\.jsonl:1"):
        read_questions(path)


def test_pairs_take_diagonals_so_the_first_pairs_use_distinct_samples():
    rows = samples("#### 4", "#### 5", "4, so 4", "#### 6", "#### 7")  # correct 0, 2; wrong 1, 3, 4
    out = pair_question(Q, rows, PairingPolicy(pairs_per_question=3))
    assert out.kind == "mixed"
    assert [(p["chosen_sample"], p["rejected_sample"]) for p in out.pairs] == [(0, 1), (2, 3), (0, 3)]
    every = pair_question(Q, rows, PairingPolicy(pairs_per_question=100)).pairs
    assert len(every) == 6 and len({(p["chosen_sample"], p["rejected_sample"]) for p in every}) == 6
    first = out.pairs[0]
    assert first["prompt"] == Q.prompt and first["chosen"] == "#### 4" and first["rejected"] == "#### 5"
    assert (first["chosen_answer"], first["rejected_answer"], first["reference_answer"]) == ("4", "5", "4")
    assert first["chosen_from"] == "sample" and first["question_id"] == "q-1"


def test_empty_and_repeated_samples_are_never_paired():
    rows = samples("#### 4", "", "  #### 4\n", "#### 5", "#### 5")
    out = pair_question(Q, rows, PairingPolicy(pairs_per_question=10))
    assert (out.empty, out.repeated) == (1, 2)
    assert [(p["chosen_sample"], p["rejected_sample"]) for p in out.pairs] == [(0, 3)]


def test_all_wrong_skips_or_falls_back_to_the_reference_solution():
    rows = samples("#### 5", "#### 6", "", "#### 6")
    skip = pair_question(Q, rows, PairingPolicy(pairs_per_question=4))
    assert skip.kind == "all_wrong" and skip.pairs == []
    fallback = pair_question(Q, rows, PairingPolicy(pairs_per_question=4, reference_solution_fallback=True))
    assert [(p["chosen"], p["rejected_sample"], p["chosen_from"], p["chosen_sample"]) for p in fallback.pairs] == [
        (Q.solution, 0, "reference", None), (Q.solution, 1, "reference", None)]
    assert fallback.pairs[0]["chosen_answer"] == "4"


def test_all_correct_gives_no_pair_even_with_the_fallback():
    out = pair_question(Q, samples("#### 4", "it is 4"), PairingPolicy(4, True))
    assert out.kind == "all_correct" and out.pairs == []
