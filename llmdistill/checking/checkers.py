"""Scorers: is a response's answer correct?

Each scorer takes the part of a response after its think block (``None`` when the think block
never closed) and the :class:`~llmdistill.benchmarks.Item`, and returns a
:class:`Score` holding the extracted answer (used for maj@k votes and the details table) and
its correctness.

* ``numeric`` (tiny world): the boxed answer equals the gold number.
* ``math``: math-verify -- the gold is parsed first, then ``verify(gold, prediction)``, so
  ``0.5``, ``\\frac12`` and ``\\dfrac{1}{2}`` all match ``\\frac{1}{2}``.
* ``choice``: the committed letter equals the gold letter.
* ``code``: the last code block runs with the item's tests in the sandbox.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from llmdistill.benchmarks import Item
from llmdistill.checking.extract import choice_letter, code_block, last_boxed
from llmdistill.checking.sandbox import run_python


@dataclass(frozen=True)
class Score:
    """The extracted answer (``None``: nothing found) and whether it is correct."""

    extracted: str | None
    correct: bool


def _as_number(text: str) -> Decimal | None:
    try:
        return Decimal(text.replace(",", "").strip().rstrip("."))
    except InvalidOperation:
        return None


def score_numeric(answer: str | None, item: Item) -> Score:
    """The boxed answer equals the gold number (``"60"`` == ``"60.0"``; exact string otherwise).

    Only a boxed answer counts, as in the tiny world's own checker: a model that never learned
    the answer format gets no credit for a stray digit.
    """
    pred = last_boxed(answer) if answer is not None else None
    if pred is None:
        return Score(None, False)
    gold_num, pred_num = _as_number(item.answer), _as_number(pred)
    if gold_num is not None and pred_num is not None:
        return Score(pred, gold_num == pred_num)
    return Score(pred, pred.strip() == item.answer.strip())


def _parse_gold(answer: str) -> list:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    text = answer.strip().strip("$")
    gold = parse(f"${text}$", extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()])
    return gold or parse(text, extraction_config=[ExprExtractionConfig()])


def score_math(answer: str | None, item: Item) -> Score:
    """math-verify equivalence of the response's (boxed, else last) expression with the gold.

    Must run in the main thread: math-verify times out with ``signal.alarm``.
    """
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    if answer is None:
        return Score(None, False)
    gold = _parse_gold(item.answer)
    pred = parse(answer, extraction_config=[LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()])
    if not pred:
        return Score(None, False)
    extracted = last_boxed(answer) or str(pred[-1])
    return Score(extracted, bool(gold) and verify(gold, pred))


def score_choice(answer: str | None, item: Item) -> Score:
    """The committed choice letter equals the gold letter."""
    letter = choice_letter(answer) if answer is not None else None
    return Score(letter, letter is not None and letter == item.answer)


def code_program(item: Item, code: str) -> str:
    """HumanEval's program: prompt + completion + tests + ``check(entry_point)``.

    A completion holding the whole function simply redefines it after the prompt's stub.
    """
    return f"{item.code_prefix}{code}\n\n{item.tests}\n\ncheck({item.entry_point})\n"


def score_code(answer: str | None, item: Item, timeout_s: float = 10, memory_mb: int = 1024) -> Score:
    """Run the response's last code block against the item's tests in the sandbox."""
    code = code_block(answer) if answer is not None else None
    if code is None:
        return Score(None, False)
    return Score(code, run_python(code_program(item, code), timeout_s=timeout_s, memory_mb=memory_mb).passed)


SCORERS: dict[str, Callable[..., Score]] = {
    "numeric": score_numeric,
    "math": score_math,
    "choice": score_choice,
    "code": score_code,
}


def score_all(
    kind: str,
    answers: Sequence[str | None],
    items: Sequence[Item],
    workers: int = 2,
    timeout_s: float = 10,
    memory_mb: int = 1024,
) -> list[Score]:
    """Score many (answer, item) pairs; code runs ``workers`` sandboxes at a time.

    Args:
        kind: a key of :data:`SCORERS`.
        answers: the post-think part of each response (``None``: no answer).
        items: the item of each response (same length as ``answers``).
        workers: concurrent sandboxes for ``code``.
        timeout_s: per-program timeout for ``code``.
        memory_mb: per-program memory limit for ``code``.
    """
    if kind == "code":
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            return list(pool.map(lambda a, i: score_code(a, i, timeout_s, memory_mb), answers, items))
    scorer = SCORERS[kind]
    return [scorer(a, i) for a, i in zip(answers, items, strict=True)]
