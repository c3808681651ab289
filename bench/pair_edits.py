"""Diagnostic: how far a run's chosen and rejected responses are apart, and what kind of error eval counts.

For each finished `lldm-dpo run` folder (one round or several; ``--round K``, default 1) it prints

- pairs: how many tokens separate the chosen from the rejected response (an edit distance over number and
  single-character tokens, ``difflib`` opcodes: a replaced run counts its longer side), as a histogram and the
  share at 1-2 tokens. On the `skill` family almost every pair is a *minimal pair*: the same working with one
  result, and its copy in the answer, changed (``13 + 14 = 27`` / ``13 + 14 = 26``), the case in which DPO is
  known to lower the chosen response with the rejected one (Pal et al. 2024, DPO-Positive; Razin et al. 2025,
  likelihood displacement), since the two gradients share almost every token's context;
- eval: the held-out (or tuning) answers before and after, by the `arithmetic` verifier's reason
  (pipeline/grading/verifiers.py, the ``grade_reason`` column eval writes): right; right answer over wrong
  working; an arithmetic slip (a wrong ``a op b = c`` line); the answer not copied from the last line; a number
  that is neither the question's nor an earlier result; no ``#### N`` answer; anything else.

No model is loaded. Run from the repository root:

    python bench/pair_edits.py RUN [RUN ...] [--round K]
"""

from __future__ import annotations

import argparse
import collections
import difflib
import re
from pathlib import Path

TOKEN_RE = re.compile(r"\d+|\S|\n")
CLASSES = ("right", "right answer, wrong working", "arithmetic slip", "answer not the last result",
           "stray number", "no #### answer", "other")


def edit_tokens(chosen: str, rejected: str) -> int:
    """Tokens that differ between two responses (number and single-character tokens; a replaced run: its longer side)."""
    a, b = TOKEN_RE.findall(chosen), TOKEN_RE.findall(rejected)
    ops = difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes()
    return sum(max(i2 - i1, j2 - j1) for op, i1, i2, j1, j2 in ops if op != "equal")


def error_class(correct: bool, working_correct: bool | None, reason: str) -> str:
    """One of ``CLASSES`` from eval's grade (the arithmetic verifier's reason string)."""
    if correct:
        return "right" if working_correct is not False else "right answer, wrong working"
    if re.search(r"line \d+: \S+ \S \S+ is \S+, not ", reason):
        return "arithmetic slip"
    if "is not the last step's result" in reason:
        return "answer not the last result"
    if "neither a number of the question" in reason:
        return "stray number"
    if "no #### answer" in reason:
        return "no #### answer"
    return "other"


def summarize(run: Path, round_k: int) -> None:
    import pyarrow.ipc as ipc
    import pyarrow.parquet as pq

    folder = run / f"round-{round_k}"
    if not folder.is_dir():
        raise SystemExit(f"{run}: no round-{round_k} folder (a finished `lldm-dpo run` with rounds)")
    with ipc.open_file(folder / "pairs.arrow") as reader:
        pairs = reader.read_all().select(["chosen", "rejected"]).to_pylist()
    edits = collections.Counter(min(edit_tokens(p["chosen"], p["rejected"]), 6) for p in pairs)
    n = len(pairs)
    hist = ", ".join(f"{k if k < 6 else '6+'}: {v}" for k, v in sorted(edits.items()))
    print(f"{run} round {round_k}: {n} pairs; tokens apart {hist}; "
          f"1-2 tokens apart {sum(v for k, v in edits.items() if 1 <= k <= 2) / max(n, 1):.1%}")
    rows = pq.read_table(folder / "run" / "task_results.parquet",
                         columns=["model", "correct", "working_correct", "grade_reason"]).to_pylist()
    for label in ("before", "after"):
        counts = collections.Counter(error_class(r["correct"], r["working_correct"], r["grade_reason"] or "")
                                     for r in rows if r["model"] == label)
        total = sum(counts.values())
        print(f"  {label:6s} ({total}): " + "; ".join(f"{c} {counts[c]}" for c in CLASSES if counts[c]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="finished `lldm-dpo run` folders")
    ap.add_argument("--round", type=int, default=1, help="which round's pairs and eval (default 1)")
    args = ap.parse_args()
    for run in args.runs:
        summarize(run, args.round)


if __name__ == "__main__":
    main()
