"""A stub sampler for make-pairs tests: each (question, sample index) has a scripted completion.

Also runnable as a script (``python selfpairs_stub.py CONFIG.json``) so a test
can SIGKILL a make-pairs run in another process: with ``delay`` each batch
sleeps first, so the kill lands between batches or inside one.
"""

from __future__ import annotations

import json
import sys
import time

# question -> one completion per sample index; answers: 5 + 3 = 8, 10 - 4 = 6, 7 * 6 = 42, 9 + 9 = 18.
SCRIPT = {
    "What is 5 + 3?": ["5 + 3 = 8. #### 8", "5 + 3 = 9. #### 9", "It is 8.", "5 + 3 = 2. #### 2"],
    "What is 10 - 4?": ["#### 6", "10 - 4 = 6, so 6", "The answer is 6.", "6"],  # all correct
    "What is 7 * 6?": ["7 * 6 = 13. #### 13", "#### 48", "", "#### 48"],  # all wrong, one empty, one repeat
    "What is 9 + 9?": ["#### 18", "#### 18 ", "9 + 9 = 19. #### 19", "#### 17"],  # a repeat after normalisation
}
QUESTIONS = [
    {"question": "What is 5 + 3?", "answer": "5 + 3 = <<5+3=8>>8\n#### 8"},
    {"question": "What is 10 - 4?", "answer": 6},
    {"question": "What is 7 * 6?", "answer": "7 * 6 = 42.\nA: 42"},
    {"question": "What is 9 + 9?", "answer": "18", "id": "nine-plus-nine"},
]


class ScriptedSampler:
    """Returns SCRIPT[prompt][sample] for each item; records every item it was asked for."""

    def __init__(self, script=SCRIPT, delay: float = 0.0, name: str = "stub-v1"):
        self.script, self.delay = script, delay
        self.identity = {"kind": "stub", "name": name}
        self.calls: list[tuple[str, int]] = []

    def __call__(self, items):
        if self.delay:
            time.sleep(self.delay)
        out = []
        for item in items:
            self.calls.append((item.question.question_id, item.sample))
            text = self.script[item.question.prompt][item.sample % len(self.script[item.question.prompt])]
            out.append({"completion": text, "completion_tokens": len(text.split()), "stopped": True})
        return out


def write_questions(path, rows=QUESTIONS):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


if __name__ == "__main__":
    from stages.make_pairs import MakePairsConfig, run

    spec = json.loads(open(sys.argv[1]).read())
    run(MakePairsConfig(**spec["config"]), sampler=ScriptedSampler(delay=spec["delay"]))
