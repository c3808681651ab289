"""Generate the skill data: short arithmetic word problems (one or two operations on small numbers).

An easier family than ``make_example_data.py``'s, sized for a small LLaDA to
learn on two CPU cores: prompts of about twenty tokens, solutions of one or
two lines ``a op b = c`` ending ``#### N``.

The questions are unique and split once, by position in one seeded stream,
into disjoint sets (no question text appears in two of them):

- ``heldout`` (first ``--heldout``, default 1,000): the benchmark,
  ``data/benchmarks/skill_heldout.jsonl``; fixed before any tuning and never
  trained or tuned on;
- ``dev`` (next ``--dev``): the training script's stopping rule reads these;
- ``pairs`` (next ``--pairs``): the questions ``make-pairs`` samples and grades
  (``data/questions/skill_train.jsonl``);
- ``sft`` (the rest, ``--sft``): the supervised fine-tuning set (prompt,
  completion), written by ``scripts/train_skilled_model.py`` itself.

Run from the repository root: ``python scripts/make_skill_data.py`` (writes the
held-out and the pairs questions; the shipped files are its output with the
default seed).

``--family skill-hard`` adds five templates whose errors are not one-number
slips: a difference of two people's counts, a number the answer does not use,
equal shares (division), "k times as many" then a sum that reuses a number of
the question, and bags given away before multiplying. It is another stream of
the same seed, so every split differs from the ``skill`` family's.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 20261201
NAMES = ["Ava", "Ben", "Eli", "Ivy", "Jo", "Kim", "Leo", "Max", "Mia", "Noa", "Sam", "Tom", "Zoe"]
ITEMS = ["apples", "pens", "cards", "eggs", "books", "coins", "cups", "toys"]


def _lines(*steps: tuple[int, str, int, int]) -> str:
    return "\n".join(f"{a} {op} {b} = {c}" for a, op, b, c in steps)


def t_add(r: random.Random):
    name, item = r.choice(NAMES), r.choice(ITEMS)
    a, b = r.randint(1, 15), r.randint(1, 15)
    q = f"{name} has {a} {item} and gets {b} more. How many now?"
    return q, _lines((a, "+", b, a + b)), a + b


def t_sub(r: random.Random):
    name, item = r.choice(NAMES), r.choice(ITEMS)
    a = r.randint(2, 20)
    b = r.randint(1, a - 1)
    q = f"{name} has {a} {item} and gives {b} away. How many are left?"
    return q, _lines((a, "-", b, a - b)), a - b


def t_mul(r: random.Random):
    name, item = r.choice(NAMES), r.choice(ITEMS)
    a, b = r.randint(2, 6), r.randint(2, 6)
    q = f"{name} buys {a} boxes of {b} {item}. How many {item}?"
    return q, _lines((a, "*", b, a * b)), a * b


def t_add_sub(r: random.Random):
    name, item = r.choice(NAMES), r.choice(ITEMS)
    a, b = r.randint(1, 10), r.randint(1, 10)
    c = r.randint(1, a + b - 1)
    q = f"{name} has {a} {item}, gets {b} more and gives {c} away. How many are left?"
    return q, _lines((a, "+", b, a + b), (a + b, "-", c, a + b - c)), a + b - c


def t_mul_add(r: random.Random):
    name, item = r.choice(NAMES), r.choice(ITEMS)
    a, b, c = r.randint(2, 5), r.randint(2, 5), r.randint(1, 10)
    q = f"{name} buys {a} boxes of {b} {item} and has {c} more. How many in all?"
    return q, _lines((a, "*", b, a * b), (a * b, "+", c, a * b + c)), a * b + c


def t_compare(r: random.Random):
    """Which number from which: the difference of two people's counts (errors: the wrong order, the wrong op)."""
    a_name, b_name = r.sample(NAMES, 2)
    item = r.choice(ITEMS)
    a = r.randint(3, 20)
    b = r.randint(1, a - 1)
    q = f"{a_name} has {a} {item} and {b_name} has {b}. How many more does {a_name} have?"
    return q, _lines((a, "-", b, a - b)), a - b


def t_distract(r: random.Random):
    """A number the answer does not use (errors: adding the distractor, an arithmetically right wrong line)."""
    name = r.choice(NAMES)
    item, other = r.sample(ITEMS, 2)
    a, b, d = r.randint(1, 15), r.randint(1, 15), r.randint(1, 15)
    q = f"{name} has {a} {item} and {d} {other}, and gets {b} more {item}. How many {item}?"
    return q, _lines((a, "+", b, a + b)), a + b


def t_share(r: random.Random):
    """Division: equal shares (errors: the wrong op, the quotient)."""
    name, item = r.choice(NAMES), r.choice(ITEMS)
    each, n = r.randint(2, 8), r.randint(2, 6)
    q = f"{name} shares {each * n} {item} equally among {n} friends. How many does each get?"
    return q, _lines((each * n, "/", n, each)), each


def t_times_more(r: random.Random):
    """Two steps whose second reuses a number of the question (errors: adding the wrong pair)."""
    a_name, b_name = r.sample(NAMES, 2)
    item = r.choice(ITEMS)
    a, k = r.randint(2, 8), r.randint(2, 4)
    q = f"{a_name} has {a} {item}. {b_name} has {k} times as many. How many do they have together?"
    return q, _lines((a, "*", k, a * k), (a, "+", a * k, a + a * k)), a + a * k


def t_bags_left(r: random.Random):
    """Order matters: subtract bags before multiplying (errors: a * b - c)."""
    name, item = r.choice(NAMES), r.choice(ITEMS)
    a = r.randint(3, 8)
    c, b = r.randint(1, a - 1), r.randint(2, 6)
    q = f"{name} has {a} bags of {b} {item} and gives away {c} bags. How many {item} are left?"
    return q, _lines((a, "-", c, a - c), (a - c, "*", b, (a - c) * b)), (a - c) * b


TEMPLATES = [t_add, t_sub, t_mul, t_add_sub, t_mul_add]
HARD_TEMPLATES = [t_compare, t_distract, t_share, t_times_more, t_bags_left]
FAMILIES = {"skill": TEMPLATES, "skill-hard": TEMPLATES + HARD_TEMPLATES}
"""``skill``: the shipped family. ``skill-hard``: the same five templates and five whose errors are not one-number
slips (an operand from the wrong place, the wrong operation or order): a different stream, so different splits."""
SPLITS = ("heldout", "dev", "pairs", "sft")


def generate(seed: int = SEED, heldout: int = 1000, dev: int = 150, pairs: int = 2000, sft: int = 20000,
             family: str = "skill") -> dict:
    """The four disjoint splits: ``{split: [{"question", "solution", "answer", "template"}, ...]}``."""
    templates = FAMILIES[family]
    sizes = dict(zip(SPLITS, (heldout, dev, pairs, sft)))
    total = sum(sizes.values())
    r = random.Random(seed)
    seen: set[str] = set()
    rows: list[dict] = []
    attempts = 0
    while len(rows) < total:
        attempts += 1
        if attempts > 50 * total:
            raise RuntimeError("generator ran out of distinct questions")
        template = r.choice(templates)
        q, solution, answer = template(r)
        if q in seen:
            continue
        seen.add(q)
        rows.append({"question": q, "solution": f"{solution}\n#### {answer}", "answer": answer,
                     "template": template.__name__[2:]})
    out, start = {}, 0
    for split in SPLITS:
        out[split] = rows[start : start + sizes[split]]
        start += sizes[split]
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


def question_rows(rows: list[dict]) -> list[dict]:
    """Benchmark / make-pairs rows: question, answer (integer) and the worked solution."""
    return [{"question": r["question"], "answer": r["answer"], "solution": r["solution"]} for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--root", type=Path, default=Path("data"))
    ap.add_argument("--family", choices=sorted(FAMILIES), default="skill")
    args = ap.parse_args()
    splits = generate(args.seed, family=args.family)
    write_jsonl(args.root / "benchmarks" / "skill_heldout.jsonl", question_rows(splits["heldout"]))
    write_jsonl(args.root / "questions" / "skill_train.jsonl", question_rows(splits["pairs"]))
    print(", ".join(f"{len(v)} {k}" for k, v in splits.items()))


if __name__ == "__main__":
    main()
