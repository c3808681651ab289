"""Final-answer extraction for GSM8K-style numeric tasks.

The answer of a solution is, in order of precedence (the last occurrence of
the first style that appears):

1. ``#### N``            (GSM8K's reference answers)
2. ``\\boxed{N}``         (math-tuned models)
3. a line ``A: N``       (GSM8K's published model solutions)
4. ``the answer is N``   (chain-of-thought prompting, lm-eval's GSM8K)
5. the last number in the text, calculator annotations ``<<a*b=c>>`` removed.

Numbers are normalised so that ``$1,200``, ``1200.`` and ``1200.00`` compare
equal: currency signs and thousands separators dropped, a unicode minus made
ASCII, trailing zeros after the decimal point removed.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

# A number: optional sign and currency sign, either 1,234,567 (grouped) or plain digits,
# optional decimals. Grouping is only accepted with groups of three digits, so a
# list "3,4" stays two numbers. A minus right after a word or number is the
# operator of "16-3", not a sign.
_NUMBER = r"(?:(?<![\w)\]])-)?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_NUMBER_RE = re.compile(_NUMBER)

_HASH_RE = re.compile(r"####\s*(" + _NUMBER + ")")
_BOXED_RE = re.compile(r"\\boxed\{\s*(?:\\text\{[^}]*\}\s*)?(" + _NUMBER + r")\s*\}")
_A_LINE_RE = re.compile(r"(?mi)^\s*A\s*:\s*(" + _NUMBER + ")")
_ANSWER_IS_RE = re.compile(r"(?i)\banswer\s*(?:is|:)\s*[:=]?\s*(?:\*\*)?\s*(" + _NUMBER + ")")
_ANNOTATION_RE = re.compile(r"<<[^<>]*>>")

STYLES = ("####", "boxed", "A:", "answer is", "last number")


def normalize_number(text: str) -> str | None:
    """Canonical text of a number (``"$1,200.50"`` -> ``"1200.5"``); ``None`` if not a number."""
    cleaned = (
        text.strip()
        .replace("\u2212", "-")
        .replace("$", "")
        .replace(",", "")
        .replace(" ", "")
        .rstrip(".")
    )
    if cleaned.endswith("%"):
        cleaned = cleaned[:-1]
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_answer_with_style(text: str) -> tuple[str | None, str | None]:
    """(normalised answer, style that found it), or (None, None) when the text has no number."""
    if not text:
        return None, None
    text = text.replace("\u2212", "-")
    for style, regex in (("####", _HASH_RE), ("boxed", _BOXED_RE), ("A:", _A_LINE_RE), ("answer is", _ANSWER_IS_RE)):
        matches = regex.findall(text)
        if matches:
            value = normalize_number(matches[-1])
            if value is not None:
                return value, style
    numbers = _NUMBER_RE.findall(_ANNOTATION_RE.sub(" ", text))
    for candidate in reversed(numbers):
        value = normalize_number(candidate)
        if value is not None:
            return value, "last number"
    return None, None


def extract_answer(text: str) -> str | None:
    """The normalised final answer of a solution, or ``None``."""
    return extract_answer_with_style(text)[0]


def reference_answer(reference: str | int | float) -> str | None:
    """The normalised answer of a reference: a full GSM8K answer, ``A: N`` solution, or a bare number."""
    if isinstance(reference, bool):
        return None
    if isinstance(reference, (int, float)):
        return normalize_number(repr(reference))
    direct = normalize_number(str(reference))
    return direct if direct is not None else extract_answer(str(reference))


def is_correct(completion: str, reference: str | int | float) -> bool:
    """Whether the completion's final answer equals the reference's, numerically."""
    got = extract_answer(completion)
    want = reference_answer(reference)
    if got is None or want is None:
        return False
    return Decimal(got) == Decimal(want)
