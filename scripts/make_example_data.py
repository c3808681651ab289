"""Generate the shipped example data: arithmetic word problems with worked solutions.

Writes (deterministically, from ``--seed``):
- ``data/preference_data/reasoning_prefs.jsonl``: ``{"prompt", "chosen", "rejected",
  "flaw", "template"}``; chosen is a correct step-by-step solution ending
  ``#### N``; rejected is a plausible flawed one of a named kind
  (``wrong_operation``, ``dropped_step``, ``arithmetic_slip``,
  ``unit_confusion``) that ends with its own wrong ``#### M``.
- ``data/benchmarks/arithmetic_heldout.jsonl``: ``{"question", "answer"}`` (answer
  an integer) from the same generator; no question appears in both files.

Run from the repository root: ``python scripts/make_example_data.py``.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

NAMES = [
    "Ava", "Ben", "Chloe", "Diego", "Emma", "Farah", "Gabe", "Hana", "Ivan", "Jade", "Kofi", "Lena",
    "Mateo", "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tara", "Umar", "Vera", "Wes", "Yuki", "Zane",
]
ITEMS = [
    ("notebook", "notebooks"), ("apple", "apples"), ("pencil", "pencils"), ("ticket", "tickets"),
    ("sticker", "stickers"), ("muffin", "muffins"), ("comic", "comics"), ("candle", "candles"),
]


def _solution(lines: list[str], answer: int) -> str:
    return "\n".join(lines) + f"\n#### {answer}"


# Each template returns (question, correct_lines, answer, [(flaw, lines, wrong_answer), ...]).


def t_change(r: random.Random):
    name, (item, items) = r.choice(NAMES), r.choice(ITEMS)
    n, price = r.randint(3, 12), r.randint(2, 9)
    cost = n * price
    bill = r.choice([b for b in (20, 50, 100) if b > cost] or [200])
    change = bill - cost
    q = f"{name} buys {n} {items} at ${price} each and pays with a ${bill} bill. How much change does {name} get, in dollars?"
    ok = [f"The {items} cost {n} * {price} = ${cost}.", f"The change is {bill} - {cost} = ${change}."]
    flaws = [
        ("wrong_operation", [f"The {items} cost {n} + {price} = ${n + price}.", f"The change is {bill} - {n + price} = ${bill - n - price}."], bill - n - price),
        ("dropped_step", [f"Each {item} costs ${price}.", f"The change is {bill} - {price} = ${bill - price}."], bill - price),
        ("arithmetic_slip", [f"The {items} cost {n} * {price} = ${cost + 10}.", f"The change is {bill} - {cost + 10} = ${change - 10}."], change - 10),
    ]
    return q, ok, change, flaws


def t_wage(r: random.Random):
    name = r.choice(NAMES)
    rate, hours, days = r.randint(8, 25), r.randint(2, 6), r.randint(3, 7)
    minutes = hours * 60
    per_day, total = rate * hours, rate * hours * days
    q = f"{name} earns ${rate} per hour and works {minutes} minutes a day for {days} days. How many dollars does {name} earn in total?"
    ok = [f"{minutes} minutes is {minutes} / 60 = {hours} hours.", f"Each day {name} earns {rate} * {hours} = ${per_day}.", f"Over {days} days that is {per_day} * {days} = ${total}."]
    flaws = [
        ("unit_confusion", [f"Each day {name} earns {rate} * {minutes} = ${rate * minutes}.", f"Over {days} days that is {rate * minutes} * {days} = ${rate * minutes * days}."], rate * minutes * days),
        ("dropped_step", [f"{minutes} minutes is {minutes} / 60 = {hours} hours.", f"{name} earns {rate} * {hours} = ${per_day}."], per_day),
        ("arithmetic_slip", [f"{minutes} minutes is {minutes} / 60 = {hours} hours.", f"Each day {name} earns {rate} * {hours} = ${per_day + rate}.", f"Over {days} days that is {per_day + rate} * {days} = ${(per_day + rate) * days}."], (per_day + rate) * days),
    ]
    return q, ok, total, flaws


def t_discount(r: random.Random):
    name = r.choice(NAMES)
    pct = r.choice([10, 20, 25, 30, 40, 50])
    price = r.randint(2, 30) * 20
    off = price * pct // 100
    final = price - off
    thing = r.choice(["jacket", "bicycle", "lamp", "backpack", "guitar", "printer"])
    q = f"A {thing} costs ${price}. {name} buys it during a sale with {pct}% off. How many dollars does {name} pay?"
    ok = [f"The discount is {pct}% of {price} = {price} * {pct} / 100 = ${off}.", f"{name} pays {price} - {off} = ${final}."]
    flaws = [
        ("unit_confusion", [f"The discount is ${pct}.", f"{name} pays {price} - {pct} = ${price - pct}."], price - pct),
        ("dropped_step", [f"The discount is {pct}% of {price} = {price} * {pct} / 100 = ${off}.", f"So {name} pays ${off}."], off),
        ("wrong_operation", [f"The discount is {pct}% of {price} = {price} * {pct} / 100 = ${off}.", f"{name} pays {price} + {off} = ${price + off}."], price + off),
    ]
    return q, ok, final, flaws


def t_reading(r: random.Random):
    name = r.choice(NAMES)
    per_day, days = r.randint(8, 40), r.randint(3, 9)
    read = per_day * days
    pages = read + r.randint(10, 200)
    left = pages - read
    q = f"A book has {pages} pages. {name} reads {per_day} pages every day for {days} days. How many pages are left to read?"
    ok = [f"{name} reads {per_day} * {days} = {read} pages.", f"{pages} - {read} = {left} pages are left."]
    flaws = [
        ("wrong_operation", [f"{name} reads {per_day} + {days} = {per_day + days} pages.", f"{pages} - {per_day + days} = {pages - per_day - days} pages are left."], pages - per_day - days),
        ("dropped_step", [f"{name} reads {per_day} pages.", f"{pages} - {per_day} = {pages - per_day} pages are left."], pages - per_day),
        ("arithmetic_slip", [f"{name} reads {per_day} * {days} = {read - days} pages.", f"{pages} - {read - days} = {left + days} pages are left."], left + days),
    ]
    return q, ok, left, flaws


def t_fence(r: random.Random):
    length, width, cost = r.randint(5, 30), r.randint(3, 20), r.randint(2, 12)
    perim = 2 * (length + width)
    total = perim * cost
    q = f"A rectangular garden is {length} meters long and {width} meters wide. Fencing costs ${cost} per meter. How many dollars does it cost to fence the whole garden?"
    ok = [f"The perimeter is 2 * ({length} + {width}) = {perim} meters.", f"The fence costs {perim} * {cost} = ${total}."]
    flaws = [
        ("wrong_operation", [f"The garden measures {length} * {width} = {length * width} square meters.", f"The fence costs {length * width} * {cost} = ${length * width * cost}."], length * width * cost),
        ("dropped_step", [f"The two sides add to {length} + {width} = {length + width} meters.", f"The fence costs {length + width} * {cost} = ${(length + width) * cost}."], (length + width) * cost),
        ("arithmetic_slip", [f"The perimeter is 2 * ({length} + {width}) = {perim + 2} meters.", f"The fence costs {perim + 2} * {cost} = ${(perim + 2) * cost}."], (perim + 2) * cost),
    ]
    return q, ok, total, flaws


def t_savings(r: random.Random):
    name = r.choice(NAMES)
    weekly, weeks, start = r.randint(5, 40), r.randint(4, 16), r.randint(0, 100)
    spent = r.randint(1, weekly * weeks // 2)
    saved = weekly * weeks
    total = start + saved - spent
    q = f"{name} has ${start} and saves ${weekly} every week for {weeks} weeks, then spends ${spent} on a gift. How many dollars does {name} have now?"
    ok = [f"{name} saves {weekly} * {weeks} = ${saved}.", f"With the starting money that is {start} + {saved} = ${start + saved}.", f"After the gift {start + saved} - {spent} = ${total} is left."]
    flaws = [
        ("dropped_step", [f"{name} saves {weekly} * {weeks} = ${saved}.", f"After the gift {saved} - {spent} = ${saved - spent} is left."], saved - spent),
        ("wrong_operation", [f"{name} saves {weekly} * {weeks} = ${saved}.", f"With the starting money that is {start} + {saved} = ${start + saved}.", f"After the gift {start + saved} + {spent} = ${start + saved + spent}."], start + saved + spent),
        ("arithmetic_slip", [f"{name} saves {weekly} * {weeks} = ${saved + weekly}.", f"With the starting money that is {start} + {saved + weekly} = ${start + saved + weekly}.", f"After the gift {start + saved + weekly} - {spent} = ${total + weekly} is left."], total + weekly),
    ]
    return q, ok, total, flaws


def t_trip(r: random.Random):
    name = r.choice(NAMES)
    speed, hours, extra_min = r.randint(30, 90), r.randint(1, 5), r.choice([30, 60, 90, 120])
    extra_h = extra_min / 60
    dist = int(speed * (hours + extra_h))
    if speed * extra_min % 60:
        speed += 1  # keep the answer whole
        dist = int(speed * (hours + extra_h))
    q = f"{name} drives at {speed} km per hour for {hours} hours and then {extra_min} more minutes at the same speed. How many kilometers does {name} drive?"
    first, second = speed * hours, speed * extra_min // 60
    ok = [f"In the first {hours} hours {name} drives {speed} * {hours} = {first} km.", f"{extra_min} minutes is {extra_min} / 60 = {extra_h:g} hours, so {speed} * {extra_h:g} = {second} km more.", f"In total {first} + {second} = {dist} km."]
    flaws = [
        ("unit_confusion", [f"In the first {hours} hours {name} drives {speed} * {hours} = {first} km.", f"Then {speed} * {extra_min} = {speed * extra_min} km more.", f"In total {first} + {speed * extra_min} = {first + speed * extra_min} km."], first + speed * extra_min),
        ("dropped_step", [f"{name} drives {speed} * {hours} = {first} km."], first),
        ("wrong_operation", [f"In the first {hours} hours {name} drives {speed} + {hours} = {speed + hours} km.", f"{extra_min} minutes is {extra_h:g} hours, so {speed} * {extra_h:g} = {second} km more.", f"In total {speed + hours} + {second} = {speed + hours + second} km."], speed + hours + second),
    ]
    return q, ok, dist, flaws


def t_legs(r: random.Random):
    name = r.choice(NAMES)
    chickens, cows = r.randint(3, 30), r.randint(2, 20)
    legs = 2 * chickens + 4 * cows
    q = f"{name}'s farm has {chickens} chickens and {cows} cows. How many legs do the animals have altogether?"
    ok = [f"The chickens have {chickens} * 2 = {2 * chickens} legs.", f"The cows have {cows} * 4 = {4 * cows} legs.", f"Altogether {2 * chickens} + {4 * cows} = {legs} legs."]
    flaws = [
        ("wrong_operation", [f"There are {chickens} + {cows} = {chickens + cows} animals.", f"Each has 4 legs, so {chickens + cows} * 4 = {4 * (chickens + cows)} legs."], 4 * (chickens + cows)),
        ("dropped_step", [f"The cows have {cows} * 4 = {4 * cows} legs."], 4 * cows),
        ("arithmetic_slip", [f"The chickens have {chickens} * 2 = {2 * chickens} legs.", f"The cows have {cows} * 4 = {4 * cows + 4} legs.", f"Altogether {2 * chickens} + {4 * cows + 4} = {legs + 4} legs."], legs + 4),
    ]
    return q, ok, legs, flaws


def t_recipe(r: random.Random):
    name = r.choice(NAMES)
    grams = r.choice([125, 200, 250, 400, 500, 750])
    batches = r.choice([b for b in range(2, 25) if grams * b % 1000 == 0])
    total_g = grams * batches
    kg = total_g // 1000
    q = f"A bread recipe uses {grams} grams of flour. {name} bakes {batches} loaves. How many kilograms of flour does {name} use?"
    ok = [f"{name} uses {grams} * {batches} = {total_g} grams of flour.", f"That is {total_g} / 1000 = {kg} kilograms."]
    flaws = [
        ("unit_confusion", [f"{name} uses {grams} * {batches} = {total_g} grams of flour.", f"So {name} uses {total_g} kilograms."], total_g),
        ("wrong_operation", [f"{name} uses {grams} + {batches} = {grams + batches} grams of flour.", f"That is {grams + batches} / 1000, about {(grams + batches) // 1000} kilograms."], (grams + batches) // 1000),
        ("arithmetic_slip", [f"{name} uses {grams} * {batches} = {total_g + 1000} grams of flour.", f"That is {total_g + 1000} / 1000 = {kg + 1} kilograms."], kg + 1),
    ]
    return q, ok, kg, flaws


TEMPLATES = [t_change, t_wage, t_discount, t_reading, t_fence, t_savings, t_trip, t_legs, t_recipe]


def generate(seed: int, n_questions: int, n_bench: int, second_pair_rate: float = 0.25):
    """Unique questions; the first ``n_bench`` go to the benchmark, the rest make preference pairs."""
    r = random.Random(seed)
    seen: set[str] = set()
    prefs, bench = [], []
    attempts = 0
    while len(seen) < n_questions + n_bench:
        attempts += 1
        if attempts > 50 * (n_questions + n_bench):
            raise RuntimeError("generator ran out of distinct questions")
        template = r.choice(TEMPLATES)
        q, ok, answer, flaws = template(r)
        if q in seen:
            continue
        seen.add(q)
        if len(bench) < n_bench:
            bench.append({"question": q, "answer": answer})
            continue
        flaws = [f for f in flaws if f[2] != answer]
        r.shuffle(flaws)
        k = 2 if r.random() < second_pair_rate and len(flaws) > 1 else 1
        for flaw, lines, wrong in flaws[:k]:
            prefs.append(
                {
                    "prompt": q,
                    "chosen": _solution(ok, answer),
                    "rejected": _solution(lines, wrong),
                    "flaw": flaw,
                    "template": template.__name__[2:],
                }
            )
    return prefs, bench


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=20241128)
    ap.add_argument("--questions", type=int, default=2000, help="questions for preference pairs")
    ap.add_argument("--bench", type=int, default=300, help="held-out benchmark questions")
    ap.add_argument("--root", type=Path, default=Path("data"))
    args = ap.parse_args()
    prefs, bench = generate(args.seed, args.questions, args.bench)
    _write_jsonl(args.root / "preference_data" / "reasoning_prefs.jsonl", prefs)
    _write_jsonl(args.root / "benchmarks" / "arithmetic_heldout.jsonl", bench)
    print(f"{len(prefs)} pairs ({args.questions} questions), {len(bench)} benchmark questions")


if __name__ == "__main__":
    main()
