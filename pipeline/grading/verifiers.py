"""Verifiers: the grade of one completion against a reference (make-pairs' pairing, eval's task accuracy).

A verifier is anything with ``grade(completion, reference, question) -> Grade``: ``reference`` is the
normalised reference answer (``pipeline.grading.answers.reference_answer``), ``question`` the question text (a
verifier of the working may read its numbers). ``VERIFIERS`` holds them by name; ``get_verifier`` builds one:

- ``answer`` (the default): the final answer only, read by ``pipeline.grading.answers`` and compared exactly as
  rational numbers; ``working_correct`` is None (not checked).
- ``arithmetic``: the final answer, and the working of the skill family (``scripts/make_skill_data.py``):
  one ``a op b = c`` line per step, then ``#### N`` on its own line. The working is right when there is at
  least one step, every line before the answer is such a step whose arithmetic is exact, every operand is a
  number of the question or the result of an earlier step (when the question is given), the answer line
  follows on its own line with nothing after it, and the answer is the last step's result.
  ``9 + 7 = 16\\n15 - 5 = 113#### 11`` has wrong working (15 - 5 is not 113, and 15 is no number of the
  question nor an earlier result); ``9 + 7 = 16\\n16 - 5 = 11\\n#### 11`` has right working.
- ``math-verify``: answer equivalence by Hugging Face's ``math-verify`` (symbolic: ``\\sqrt{4}`` equals 2,
  ``\\frac{1}{2}`` equals 0.5), after the project's own reader where it adds: an exact match by the
  project's reader is correct without a symbolic check; under the strict format only the ``#### N`` line is
  given to math-verify (it would otherwise read any number of the text); and a token the project's reader
  refuses as a number (``12,34``: commas that are not thousands groups, which math-verify reads as 12.34) is
  no answer. Needs ``pip install math-verify`` (the ``math`` extra); without it the verifier is a one-line
  error when built.

Answer format (``answer_format``): ``####`` is strict, the answer is the number after the first ``####``
and a completion without one has no answer (no fallback to ``\\boxed``, ``A:`` or the last number of the
text); ``any`` accepts the module's every style down to the last number (``pipeline.grading.answers``); ``auto``
(the default) is ``####`` for a reference written as ``#### N`` or as a bare number (GSM8K's and the skill
family's convention: the project writes a bare number's solution as ``#### N``), else ``any``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Optional, Protocol

from pipeline.core.errors import ConfigError, UserError
from pipeline.grading.answers import (
    _HASH_RE,
    _NUMBER,
    _NUMBER_RE,
    extract_answer_with_style,
    normalize_number,
    parse_number,
    same_number,
)

ANSWER_FORMATS = ("auto", "####", "any")
"""``answer_format`` values (see the module docstring)."""


@dataclass(frozen=True)
class Grade:
    answer: Optional[str]
    """The completion's normalised final answer (None: none could be read)."""
    answer_correct: bool
    working_correct: Optional[bool]
    """Whether the working is right; None when this verifier does not check working."""
    reason: str
    """Why, in a few words: 'ok', 'no #### answer', 'line 2: 15 - 5 is 10, not 113', ..."""

    @property
    def chosen_ok(self) -> bool:
        """A sample good enough to be chosen: right answer, and right working where it is checked."""
        return self.answer_correct and self.working_correct is not False


class Verifier(Protocol):
    name: str

    def grade(self, completion: str, reference: str, question: str = "") -> Grade: ...


def check_answer_format(answer_format: str) -> None:
    if answer_format not in ANSWER_FORMATS:
        raise ConfigError(f"answer_format: unknown value {answer_format!r}; expected one of {', '.join(ANSWER_FORMATS)}")


def resolve_format(answer_format: str, reference_text: object) -> str:
    """``####`` or ``any`` for one reference (``auto`` decided by how the reference is written)."""
    check_answer_format(answer_format)
    if answer_format != "auto":
        return answer_format
    if isinstance(reference_text, (int, float)) and not isinstance(reference_text, bool):
        return "####"
    text = str(reference_text)
    return "####" if "####" in text or normalize_number(text) is not None else "any"


def read_answer(completion: str, answer_format: str) -> tuple[Optional[str], str]:
    """(normalised answer, style) under a resolved format; strict ``####`` reads nothing else."""
    if answer_format == "####":
        found = _HASH_RE.findall((completion or "").replace("\u2212", "-"))
        return (normalize_number(found[0]), "####") if found else (None, "no #### answer")
    value, style = extract_answer_with_style(completion)
    return value, style or "no answer"


class AnswerVerifier:
    """The final answer only (today's grader), under an answer format."""

    name = "answer"

    def __init__(self, answer_format: str = "any"):
        self.answer_format = answer_format

    def answer_grade(self, completion: str, reference: str) -> Grade:
        got, style = read_answer(completion, self.answer_format)
        if got is None:
            return Grade(None, False, None, style if style.startswith("no ") else f"unreadable {style} answer")
        ok = same_number(got, reference)
        return Grade(got, ok, None, "ok" if ok else f"answer {got}, reference {reference}")

    def grade(self, completion: str, reference: str, question: str = "") -> Grade:
        return self.answer_grade(completion, reference)


_OPS: dict[str, Callable[[Fraction, Fraction], Optional[Fraction]]] = {
    "+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "x": lambda a, b: a * b,
    "\u00d7": lambda a, b: a * b, "/": lambda a, b: a / b if b else None, "\u00f7": lambda a, b: a / b if b else None,
}
_STEP_RE = re.compile(r"^\s*(" + _NUMBER + r")\s*([-+*x\u00d7/\u00f7])\s*(" + _NUMBER + r")\s*=\s*(" + _NUMBER
                      + r")\s*$")
_ANSWER_LINE_RE = re.compile(r"^####\s*(" + _NUMBER + r")\s*$")


def _numbers(text: str) -> set[Fraction]:
    return {v for v in (parse_number(t) for t in _NUMBER_RE.findall(text or "")) if v is not None}


def check_working(completion: str, question: str = "") -> tuple[bool, str]:
    """(right, reason) of the skill family's working (see the module docstring)."""
    text = (completion or "").replace("\u2212", "-").strip()
    cut = text.find("####")
    if cut < 0:
        return False, "no #### answer line"
    lines = [line for line in text[:cut].splitlines() if line.strip()]
    if not lines:
        return False, "no working before the answer"
    known = _numbers(question) if question else None
    result = None
    for i, line in enumerate(lines, 1):
        step = _STEP_RE.match(line)
        if not step:
            return False, f"line {i} is not 'a op b = c': {line.strip()[:40]!r}"
        a, op, b, c = parse_number(step.group(1)), step.group(2), parse_number(step.group(3)), parse_number(step.group(4))
        if None in (a, b, c):
            return False, f"line {i}: unreadable number"
        value = _OPS[op](a, b)
        if value != c:
            shown = "undefined" if value is None else normalize_number(str(value)) or str(value)
            return False, f"line {i}: {step.group(1)} {op} {step.group(3)} is {shown}, not {step.group(4)}"
        if known is not None:
            stray = [t for t, v in ((step.group(1), a), (step.group(3), b)) if v not in known]
            if stray:
                return False, f"line {i}: {stray[0]} is neither a number of the question nor an earlier result"
            known.add(c)
        result = c
    if text[cut - 1] != "\n":
        return False, "the #### answer is not on its own line"
    answer_line = text[cut:].strip()
    m = _ANSWER_LINE_RE.match(answer_line)
    if not m:
        return False, "text after the #### answer" if _HASH_RE.match(answer_line) else "unreadable #### answer"
    answer = parse_number(m.group(1))
    if answer != result:
        return False, f"the answer {m.group(1)} is not the last step's result {normalize_number(str(result))}"
    return True, "ok"


class ArithmeticVerifier(AnswerVerifier):
    """The final answer and the skill family's ``a op b = c`` working."""

    name = "arithmetic"

    def grade(self, completion: str, reference: str, question: str = "") -> Grade:
        answer = self.answer_grade(completion, reference)
        right, why = check_working(completion, question)
        reason = why if answer.answer_correct else answer.reason if right else f"{answer.reason}; {why}"
        return Grade(answer.answer, answer.answer_correct, right, reason)


class MathVerifyVerifier(AnswerVerifier):
    """Answer equivalence by ``math-verify``, after the project's reader (``####``, thousands groups)."""

    name = "math-verify"

    def __init__(self, answer_format: str = "any"):
        super().__init__(answer_format)
        try:
            import math_verify
        except ImportError:
            raise UserError("verifier 'math-verify' needs the math-verify package: pip install math-verify "
                            "(or pip install 'lldm-dpo[math]')") from None
        self._mv = math_verify

    def _equivalent(self, gold: str, text: str) -> bool:
        import threading

        mv = self._mv
        # math-verify's timeouts are SIGALRM-based: the main thread only (elsewhere none, as it allows)
        timeout = 5 if threading.current_thread() is threading.main_thread() else None
        try:
            parsed_gold = mv.parse(f"${gold}$", parsing_timeout=timeout)
            parsed = mv.parse(text, parsing_timeout=timeout)
            return bool(parsed) and bool(mv.verify(parsed_gold, parsed, timeout_seconds=timeout))
        except Exception:  # math-verify raises on some inputs (sympy); an unreadable answer is not correct
            return False

    def grade(self, completion: str, reference: str, question: str = "") -> Grade:
        own = self.answer_grade(completion, reference)
        if own.answer_correct or own.reason.startswith("unreadable"):  # the project's reader decides these
            return own
        if self.answer_format == "####":  # only the #### line is the answer: math-verify reads that line
            found = re.search(r"####\s*([^\n]*)", completion or "")
            if not found or not found.group(1).strip():
                return own
            candidate = found.group(1).strip()
            if self._equivalent(reference, f"${candidate}$") or self._equivalent(reference, candidate):
                return Grade(own.answer or candidate, True, None, "ok (math-verify)")
            return own
        if self._equivalent(reference, completion or ""):
            return Grade(own.answer, True, None, "ok (math-verify)")
        return own


VERIFIERS: dict[str, type] = {"answer": AnswerVerifier, "arithmetic": ArithmeticVerifier,
                              "math-verify": MathVerifyVerifier}
"""Verifiers by name (make-pairs' and eval's ``verifier`` setting)."""


def check_verifier_name(name: str) -> None:
    if name not in VERIFIERS:
        raise ConfigError(f"verifier: unknown verifier {name!r}; expected one of {', '.join(VERIFIERS)}")


class FormatResolving:
    """A verifier per resolved format, picked by how each reference is written (``auto``)."""

    def __init__(self, name: str, answer_format: str):
        check_verifier_name(name)
        check_answer_format(answer_format)
        self.name, self.answer_format = name, answer_format
        self._by_format: dict[str, Verifier] = {}

    def for_reference(self, reference_text: object) -> Verifier:
        fmt = resolve_format(self.answer_format, reference_text)
        if fmt not in self._by_format:
            self._by_format[fmt] = VERIFIERS[self.name](fmt)
        return self._by_format[fmt]

    def grade(self, completion: str, reference: str, question: str = "", reference_text: object = None) -> Grade:
        """Grade against ``reference`` (normalised), the format decided by ``reference_text`` (the reference as
        the data writes it; default ``reference``)."""
        verifier = self.for_reference(reference if reference_text is None else reference_text)
        return verifier.grade(completion, reference, question)


def get_verifier(name: str = "answer", answer_format: str = "auto") -> FormatResolving:
    """The verifier ``name`` under ``answer_format`` (``auto`` resolved per reference); errors name the setting."""
    verifier = FormatResolving(name, answer_format)
    if name == "math-verify":
        verifier.for_reference("any text")  # built now: a missing package is an error before any sampling
    return verifier
