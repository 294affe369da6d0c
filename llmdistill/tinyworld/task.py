"""The tiny world's task family: 1-3 step arithmetic word problems with checkable answers.

A problem reads ``"Ann has 23 coins. She gets 7 more. Then it doubles. How many coins does
Ann have now?"`` and its reference completion is ``<think>23+7=30 30*2=60</think>\\boxed{60}``:
one ``a<op>b=c`` equation per step, then the boxed integer. The difficulty of a problem is its
number of steps. Operations are add, subtract, double, triple and halve; every intermediate
value is a non-negative integer below 200.

Train and held-out problems are split by a hash of the question text, so the two splits can
never share a question whatever seeds are used, and a decontamination step has real work to do
only when someone mixes them on purpose.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "heldout")
DIFFICULTIES = (1, 2, 3)
HELDOUT_BUCKETS = 1  # out of 10 hash buckets of the question text

NAMES = (("Ann", "She"), ("Ben", "He"), ("Cara", "She"), ("Dev", "He"), ("Eva", "She"),
         ("Finn", "He"), ("Gia", "She"), ("Hugo", "He"), ("Ivy", "She"), ("Jon", "He"),
         ("Kim", "She"), ("Leo", "He"), ("Mia", "She"), ("Omar", "He"), ("Pia", "She"), ("Raj", "He"))
OBJECTS = ("coins", "apples", "stamps", "marbles", "books", "shells", "cards", "pens",
           "stickers", "beads", "eggs", "nuts")
OPENINGS = ("{name} has {a} {obj}.", "{name} owns {a} {obj}.", "{name} starts with {a} {obj}.",
            "There are {a} {obj} in {name}'s bag.")
ADD = ("{pron} gets {n} more.", "{pron} finds {n} more.", "{pron} buys {n} more.",
       "A friend gives {name} {n} more.")
SUB = ("{pron} gives away {n}.", "{pron} loses {n}.", "{pron} sells {n}.", "{pron} uses {n}.")
DOUBLE = ("Then the number doubles.", "Then it doubles.", "Then {pron_lower} doubles them.")
TRIPLE = ("Then the number triples.", "Then it triples.")
HALVE = ("Then {pron_lower} gives half away.", "Then it halves.", "Then half of them are lost.")
QUESTIONS = ("How many now?", "How many {obj} does {name} have now?", "How many {obj} are there now?",
             "How many {obj} are left?")

START_MAX = 60  # first value: 2..START_MAX
OPERAND_MAX = 30  # added or subtracted amounts: 1..OPERAND_MAX
MAX_VALUE = 199  # every intermediate value stays in 0..MAX_VALUE


@dataclass(frozen=True)
class Problem:
    """One word problem.

    Attributes:
        id: stable content id (``tw-`` + hash of the question).
        question: the problem text, used as the user prompt.
        answer: the final integer, as a string.
        steps: one ``a<op>b=c`` equation per step, e.g. ``("23+7=30", "30*2=60")``.
        difficulty: the number of steps (1-3).
    """

    id: str
    question: str
    answer: str
    steps: tuple[str, ...]
    difficulty: int


def _digest(question: str) -> str:
    return hashlib.sha256(question.encode()).hexdigest()


def split_of(question: str) -> str:
    """The split (``train`` or ``heldout``) a question belongs to, from a hash of its text."""
    return "heldout" if int(_digest(question)[:8], 16) % 10 < HELDOUT_BUCKETS else "train"


def _step(rng: random.Random, value: int) -> tuple[str, str, int]:
    """Pick an operation that keeps the value in range; return (equation, template, new value)."""
    ops = ["add", "add", "sub", "sub"] if value + OPERAND_MAX <= MAX_VALUE else ["sub", "sub"]
    if 2 * value <= MAX_VALUE:
        ops.append("double")
    if 3 * value <= MAX_VALUE:
        ops.append("triple")
    if value % 2 == 0 and value >= 4:
        ops.append("halve")
    op = rng.choice(ops)
    if op == "sub" and value < 2:
        op = "add"
    if op == "add":
        n = rng.randint(1, OPERAND_MAX)
        return f"{value}+{n}={value + n}", rng.choice(ADD).replace("{n}", str(n)), value + n
    if op == "sub":
        n = rng.randint(1, min(OPERAND_MAX, value - 1))
        return f"{value}-{n}={value - n}", rng.choice(SUB).replace("{n}", str(n)), value - n
    if op == "double":
        return f"{value}*2={value * 2}", rng.choice(DOUBLE), value * 2
    if op == "triple":
        return f"{value}*3={value * 3}", rng.choice(TRIPLE), value * 3
    return f"{value}/2={value // 2}", rng.choice(HALVE), value // 2


def _sample_problem(rng: random.Random, difficulty: int) -> Problem:
    name, pron = rng.choice(NAMES)
    obj = rng.choice(OBJECTS)
    value = rng.randint(2, START_MAX)
    sentences = [rng.choice(OPENINGS).replace("{a}", str(value))]
    steps = []
    for _ in range(difficulty):
        equation, sentence, value = _step(rng, value)
        steps.append(equation)
        sentences.append(sentence)
    sentences.append(rng.choice(QUESTIONS))
    question = " ".join(sentences)
    question = (question.replace("{name}", name).replace("{pron}", pron)
                .replace("{pron_lower}", pron.lower()).replace("{obj}", obj))
    return Problem(id=f"tw-{_digest(question)[:12]}", question=question, answer=str(value),
                   steps=tuple(steps), difficulty=difficulty)


def generate_problems(
    n: int,
    seed: int,
    difficulties: Sequence[int] = DIFFICULTIES,
    split: str = "train",
) -> list[Problem]:
    """Sample ``n`` distinct problems of one split, deterministically from ``seed``.

    Difficulties are drawn uniformly from ``difficulties``. The same ``(n, seed, difficulties,
    split)`` always gives the same list, and a longer list starts with the shorter one.

    Args:
        n: number of problems.
        seed: random seed.
        difficulties: allowed numbers of steps, each in 1-3.
        split: ``"train"`` or ``"heldout"``; the two never share a question.

    Returns:
        ``n`` problems with distinct questions.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    bad = [d for d in difficulties if d not in DIFFICULTIES]
    if bad or not difficulties:
        raise ValueError(f"difficulties must be a non-empty subset of {DIFFICULTIES}, got {tuple(difficulties)}")
    rng = random.Random(f"tinyworld-{seed}-{split}")
    seen: set[str] = set()
    problems: list[Problem] = []
    while len(problems) < n:
        problem = _sample_problem(rng, rng.choice(tuple(difficulties)))
        if problem.question in seen or split_of(problem.question) != split:
            continue
        seen.add(problem.question)
        problems.append(problem)
    return problems


def benchmark_rows(n: int, seed: int, limit: int | None = None) -> list[dict]:
    """The held-out set as benchmark rows ``{"id", "question", "answer"}``: the source of the ``tiny``
    benchmark (``llmdistill/benchmarks/definitions/tiny.yaml``), as any benchmark names its loader.

    Args:
        n: the benchmark's size.
        seed: generation seed.
        limit: generate this many instead of ``n`` (a longer list starts with the shorter one).
    """
    return [{"id": p.id, "question": p.question, "answer": p.answer}
            for p in generate_problems(limit or n, seed=seed, split="heldout")]


def reference_completion(problem: Problem) -> str:
    """The gold completion, e.g. ``<think>23+7=30 30*2=60</think>\\boxed{60}``."""
    return f"<think>{' '.join(problem.steps)}</think>\\boxed{{{problem.answer}}}"


def to_records(problems: Iterable[Problem]) -> list[dict]:
    """Prompt records for the generate stage: ``{"id", "prompt", "answer", "difficulty"}``."""
    return [{"id": p.id, "prompt": p.question, "answer": p.answer, "difficulty": p.difficulty}
            for p in problems]


def write_jsonl(path: str | Path, records: Iterable[dict]) -> Path:
    """Write one JSON object per line, via a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w") as fh:
        for record in records:
            fh.write(json.dumps(record) + "\n")
    os.replace(tmp, path)
    return path
