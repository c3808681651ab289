"""Final-answer extraction and comparison for numeric tasks (GSM8K, MATH-style answers).

The answer of a solution is, in order of precedence:

1. ``#### N``            the FIRST ``####`` followed by a number, as lm-eval's
                         GSM8K strict match (regex ``#### (\\-?[0-9\\.\\,]+)``,
                         first match) reads it: a model that runs on past its
                         answer into a new "Question: ... #### M" is graded on N;
2. ``\\boxed{N}``         (math-tuned models), the last one;
3. a line ``A: N``       (GSM8K's published model solutions), the last one;
4. ``the answer is N``   (chain-of-thought prompting, lm-eval's GSM8K), the last one;
5. the last number in the text, calculator annotations ``<<a*b=c>>`` removed.

A number is read whole, in any of these forms: ``1200``, ``-3.5``, ``$1,200``
(thousands groups of exactly three digits after a first group of one to three),
``1 000`` (groups separated by a space, no-break or thin space), ``25%`` (25),
``1e3`` / ``2.5E-2`` / ``3 \\times 10^{4}`` (scientific notation), ``3/4`` (two
integers and a slash, no spaces) and ``\\frac{3}{4}`` (also ``\\dfrac``,
``\\tfrac``). Digits joined by commas that are not thousands groups (``12,34``,
``1,2345``) are not a number: such a token gives no answer rather than one of
its pieces (``12,34`` is not 34). A minus right after a word or number is the
operator of ``16-3``, not a sign.

Answers are compared exactly as rational numbers, so ``0.75``, ``3/4``,
``6/8`` and ``\\frac{3}{4}`` are equal. The canonical text of a number
(``normalize_number``) is its decimal form when it has one (``0.75``, ``1200``)
and ``p/q`` in lowest terms otherwise (``1/3``); ``same_number`` compares two
canonical texts.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction

_SPACES = " \u00a0\u202f\u2009"
_SIGN = r"(?:(?<![\w)\]}])-)?"
# digits joined by commas (validated as thousands groups after matching, so "12,34" is one bad token),
# digits grouped by single spaces in threes, or plain digits
_INT = r"(?:\d+(?:,\d+)+|\d{1,3}(?:[" + _SPACES + r"]\d{3})+(?![\d,])|\d+)"
_DEC = r"(?:\.\d+)?"
_EXP = r"(?:[eE][-+]?\d+(?![\w.])|\s*(?:\\times|\\cdot|\u00d7)\s*10\^\{?[-+]?\d+\}?)?"
_SIMPLE = r"-?\d+(?:\.\d+)?"
_FRAC = r"\\[dt]?frac\s*\{\s*" + _SIMPLE + r"\s*\}\s*\{\s*" + _SIMPLE + r"\s*\}"
_SLASH = r"\d+/\d+(?![\d/.])"
_NUMBER = _SIGN + r"\$?(?:" + _FRAC + "|" + _SLASH + "|" + _INT + _DEC + _EXP + r")%?"
_NUMBER_RE = re.compile(_NUMBER)

_HASH_RE = re.compile(r"####\s*(" + _NUMBER + ")")
_BOXED_RE = re.compile(r"\\boxed\{\s*(?:\\text\{[^}]*\}\s*)?(" + _NUMBER + r")\s*\}")
_A_LINE_RE = re.compile(r"(?mi)^\s*A\s*:\s*(" + _NUMBER + ")")
_ANSWER_IS_RE = re.compile(r"(?i)\banswer\s*(?:is|:)\s*[:=]?\s*(?:\*\*)?\s*(" + _NUMBER + ")")
_ANNOTATION_RE = re.compile(r"<<[^<>]*>>")
_FRAC_PARTS = re.compile(r"^(-?)\\[dt]?frac\s*\{\s*(" + _SIMPLE + r")\s*\}\s*\{\s*(" + _SIMPLE + r")\s*\}$")
_TIMES_TEN = re.compile(r"\s*(?:\\times|\\cdot|\u00d7)\s*10\^\{?([-+]?\d+)\}?$")
_MAX_EXPONENT = 10000  # 1e400 is a number; 1e99999999 is not worth the memory


def _canonical(value: Fraction) -> str:
    """Decimal text when the value has a finite decimal expansion, else ``p/q`` in lowest terms."""
    if value.denominator == 1:
        return str(value.numerator)
    d, twos, fives = value.denominator, 0, 0
    while d % 2 == 0:
        d, twos = d // 2, twos + 1
    while d % 5 == 0:
        d, fives = d // 5, fives + 1
    if d != 1:
        return f"{value.numerator}/{value.denominator}"
    places = max(twos, fives)
    scaled = abs(value.numerator) * 10 ** places // value.denominator
    digits = str(scaled).rjust(places + 1, "0")
    text = f"{digits[:-places]}.{digits[-places:]}".rstrip("0")
    return ("-" if value < 0 else "") + text


def _grouped(digits: str, sep: str) -> str | None:
    groups = digits.split(sep)
    if not (1 <= len(groups[0]) <= 3 and all(len(g) == 3 for g in groups[1:])):
        return None
    return "".join(groups)


def parse_number(text: str) -> Fraction | None:
    """The exact value of a number written in one of the module's forms; ``None`` if ``text`` is not one."""
    cleaned = text.strip().replace("\u2212", "-").rstrip(".").strip()
    if cleaned.endswith("%"):
        cleaned = cleaned[:-1].rstrip()
    sign = ""
    if cleaned.startswith("-"):
        sign, cleaned = "-", cleaned[1:].lstrip()
    cleaned = cleaned.replace("$", "", 1) if cleaned.startswith("$") else cleaned
    m = _FRAC_PARTS.match(cleaned)
    try:
        if m:
            num, den = Fraction(m.group(2)), Fraction(m.group(3))
            value = None if den == 0 else num / den
            return None if value is None else (-value if (sign or m.group(1)) and not (sign and m.group(1))
                                               else value)
        if re.fullmatch(r"\d+/\d+", cleaned):
            num, den = (int(x) for x in cleaned.split("/"))
            return None if den == 0 else Fraction(int(sign + str(num)), den)
        exponent = 0
        t = _TIMES_TEN.search(cleaned)
        if t:
            exponent, cleaned = int(t.group(1)), cleaned[:t.start()]
        m = re.fullmatch(r"([\d, \u00a0\u202f\u2009]+?)(\.\d+)?(?:[eE]([-+]?\d+))?", cleaned)
        if not m:
            return None
        whole = m.group(1)
        for sep in ",", *_SPACES:
            if sep in whole:
                whole = _grouped(whole, sep)
                if whole is None:
                    return None
        if not whole.isdigit():
            return None
        exponent += int(m.group(3) or 0)
        if abs(exponent) > _MAX_EXPONENT:
            return None
        value = Fraction(Decimal(sign + whole + (m.group(2) or "")))
    except (InvalidOperation, ValueError, ZeroDivisionError):
        return None
    return value * Fraction(10) ** exponent


def normalize_number(text: str) -> str | None:
    """Canonical text of a number (``"$1,200.50"`` -> ``"1200.5"``, ``"\\frac{6}{8}"`` -> ``"0.75"``,
    ``"2/6"`` -> ``"1/3"``); ``None`` if not a number."""
    value = parse_number(text)
    return None if value is None else _canonical(value)


def same_number(a: str | None, b: str | None) -> bool:
    """Whether two canonical answers (``normalize_number``'s texts) are the same number."""
    if a is None or b is None:
        return False
    x, y = parse_number(a), parse_number(b)
    return x is not None and x == y


def extract_answer_with_style(text: str) -> tuple[str | None, str | None]:
    """(normalised answer, style that found it), or (None, None) when the text has no readable number.

    A style whose chosen occurrence is not a number (``#### 12,34``) gives (None, style): the text's
    answer is unreadable, not some other number of the text.
    """
    if not text:
        return None, None
    text = text.replace("\u2212", "-")
    hashes = _HASH_RE.findall(text)
    if hashes:
        return normalize_number(hashes[0]), "####"
    for style, regex in (("boxed", _BOXED_RE), ("A:", _A_LINE_RE), ("answer is", _ANSWER_IS_RE)):
        matches = regex.findall(text)
        if matches:
            return normalize_number(matches[-1]), style
    numbers = _NUMBER_RE.findall(_ANNOTATION_RE.sub(" ", text))
    if numbers:
        return normalize_number(numbers[-1]), "last number"
    return None, None


def extract_answer(text: str) -> str | None:
    """The normalised final answer of a solution, or ``None``."""
    return extract_answer_with_style(text)[0]


def reference_answer(reference: str | int | float) -> str | None:
    """The normalised answer of a reference, or ``None`` when it cannot be read.

    A reference is a bare number (``18``, ``"3/4"``, ``"\\frac{3}{4}"``, ``"1 000"``), or a solution whose
    answer is marked (``#### N``, ``\\boxed{N}``, ``A: N``, ``the answer is N``). Unlike a model's
    completion, a reference is never read by its last number: ``"\\sqrt{2}"`` or ``"x + 1"`` is unreadable
    (callers raise an error naming the record) rather than graded against 2 or 1.
    """
    if isinstance(reference, bool):
        return None
    if isinstance(reference, int):
        return str(reference)
    if isinstance(reference, float):
        return normalize_number(repr(reference))
    text = str(reference)
    direct = normalize_number(text)
    if direct is not None:
        return direct
    value, style = extract_answer_with_style(text)
    return value if style not in (None, "last number") else None


def is_correct(completion: str, reference: str | int | float) -> bool:
    """Whether the completion's final answer equals the reference's, as exact numbers."""
    return same_number(extract_answer(completion), reference_answer(reference))
