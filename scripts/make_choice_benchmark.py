"""Write data/benchmarks/arithmetic_choice.jsonl: generated multiple-choice arithmetic questions.

Each item is {"question", "options", "answer"} (answer = index of the right
option), the LogiQA/MMLU-style shape that `lldm-dpo eval --choices` scores by
the ELBO of each option. Generated from templates with a fixed seed, so the
file is reproducible: `python scripts/make_choice_benchmark.py`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "data" / "benchmarks" / "arithmetic_choice.jsonl"
NAMES = ["Ada", "Bo", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivo", "Jun", "Kemi", "Lars"]
THINGS = ["apples", "stamps", "marbles", "books", "shells", "coins", "cards", "pencils"]


def item(rng: random.Random) -> dict:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(5, 60), rng.randint(2, 30)
    kind = rng.choice(["add", "sub", "mul"])
    if kind == "add":
        q, right = f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?", a + b
        wrong = [a - b, a * b, a + b + rng.choice([1, 10])]
    elif kind == "sub":
        a = a + b
        q, right = f"{name} has {a} {thing} and gives away {b}. How many {thing} are left?", a - b
        wrong = [a + b, a - b - rng.choice([1, 10]), b]
    else:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        q, right = f"{name} buys {a} boxes with {b} {thing} in each. How many {thing} is that?", a * b
        wrong = [a + b, a * b + b, a * (b - 1)]
    options = [right] + [w for w in dict.fromkeys(wrong) if w != right and w > 0][:3]
    while len(options) < 4:
        options.append(right + len(options) * 7)
    rng.shuffle(options)
    return {"question": q, "options": [str(o) for o in options], "answer": options.index(right)}


def main(n: int = 200, seed: int = 7) -> None:
    rng = random.Random(seed)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("".join(json.dumps(item(rng)) + "\n" for _ in range(n)), encoding="utf-8")
    print(f"wrote {n} items to {OUT}")


if __name__ == "__main__":
    main()
