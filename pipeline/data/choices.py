"""Multiple-choice items (``eval --choices``): ``question``, ``options`` (a list of strings), ``answer`` (the
index of the right option). A record that breaks this is a one-line error naming the file, line and field: an
answer out of range is not scored as a wrong guess, an options string is not split into its characters."""

from __future__ import annotations

from pathlib import Path

from pipeline.core.errors import UserError
from pipeline.data.readers import jsonl_objects


def check_choice_item(where: str, item: dict) -> dict:
    for key in ("question", "options", "answer"):
        if key not in item:
            raise UserError(f"{where}: missing field '{key}'")
    if not isinstance(item["question"], str):
        raise UserError(f"{where}: field 'question' must be a string, got {type(item['question']).__name__}")
    options = item["options"]
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        got = type(options).__name__ if not isinstance(options, list) else "a list with " + next(
            type(o).__name__ for o in options if not isinstance(o, str))
        raise UserError(f"{where}: field 'options' must be a list of strings, got {got}")
    if not options:
        raise UserError(f"{where}: field 'options' is empty")
    answer = item["answer"]
    if isinstance(answer, bool) or not isinstance(answer, int):
        raise UserError(f"{where}: field 'answer' must be the index of the right option (an integer "
                        f"0..{len(options) - 1}), got {answer!r}")
    if not 0 <= answer < len(options):
        raise UserError(f"{where}: field 'answer' is {answer}, out of range for {len(options)} options "
                        f"(0..{len(options) - 1})")
    return item


def read_choices(path: str | Path) -> list[dict]:
    """The items of a multiple-choice JSONL file, each checked."""
    return [check_choice_item(where, item) for where, item in jsonl_objects(path)]
