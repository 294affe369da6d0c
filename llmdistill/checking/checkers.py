r"""Checkers: is a response's answer right? One registry for ``build`` and ``eval``.

:func:`check` takes the **whole** response, think block included. Stripping the think block is
part of checking: the answer is what follows the last ``</think>``; a response whose think block
never closed has no answer (an answer inside ``<think>`` only is not an answer); a response
that never thinks is all answer. Then the checker named in :data:`CHECKERS` extracts the answer
and compares it with the :class:`Reference`:

* ``math`` -- math-verify, called as its README prescribes. The gold is parsed with LaTeX +
  expression extraction, a bare LaTeX gold wrapped in ``$...$`` (math-verify's LaTeX extraction
  only sees LaTeX inside a math environment: unwrapped, ``2\sqrt{3}`` parses as ``2``). The
  prediction is parsed with LaTeX (``\boxed{}`` first, ``boxed_match_priority=0``) + expression
  extraction, then ``verify(gold, prediction)`` (gold first: it is not symmetric). Only the **last**
  ``\boxed{}`` counts: math-verify would read ``\boxed{3} ... \boxed{4}`` as the set {3, 4}, so a
  self-corrected answer is passed to it alone. Without a box, math-verify's own extraction of
  the final answer ("final answer is", "answer:", the last LaTeX or expression) applies.
* ``numeric`` -- the last ``\boxed{}`` is exactly the reference number (rules in
  :mod:`llmdistill.checking.numbers`: ``60`` = ``60.0`` = ``120/2``, ``100000000001`` !=
  ``100000000000``). Only a boxed answer counts.
* ``exact`` -- the last ``\boxed{}`` is the reference string (surrounding spaces aside).
* ``choice`` -- the committed letter (boxed, "answer is X", or a line holding only the letter)
  is the reference letter.
* ``code`` -- the last code block runs with the reference's tests in the sandbox. A pass needs
  exit status 0 **and** a random per-run token that the program prints after the tests, so a
  program that exits early with status 0 (``sys.exit(0)``, ``os._exit(0)``) before the tests
  ran fails, as it does in HumanEval's own checker. (This guards against early exits, not
  against code written to read its own program file and print the token.)
* ``none`` -- accepts every response (traces without checkable answers).

:attr:`Verdict.extracted` is the answer in normalised form where the checker normalises
(``numeric``: :func:`~llmdistill.checking.numbers.canonical_number`; ``math``: the value of an
assignment or percent, as math-verify compares them, as a canonical number, else SymPy's printing
of the parsed answer; ``choice``: the upper-case letter), so maj@k votes on answers, not
spellings: ``60``, ``60.0`` and ``x = 60`` are one vote.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from typing import Any

from llmdistill.checking.extract import choice_letter, code_block, last_boxed, strip_think
from llmdistill.checking.numbers import canonical_number, parse_number
from llmdistill.checking.sandbox import run_python

CHOICE_LETTERS = "ABCDEFGHIJ"
MATH_TIMEOUT_S = 5  # math-verify's own per-parse / per-comparison limit (signal.alarm: main thread only)


@dataclass(frozen=True)
class Reference:
    """What a response is checked against.

    Attributes:
        answer: gold answer text (number, LaTeX, or choice letter).
        tests: code: test code defining ``check(candidate)`` (HumanEval style, with
            ``entry_point``) or plain statements such as asserts (``entry_point`` None).
        entry_point: code: the function under test, passed to ``check``; None: ``tests`` are
            plain statements.
        code_prefix: code: code the completion is appended to (HumanEval's prompt).
    """

    answer: str | None = None
    tests: str | None = None
    entry_point: str | None = None
    code_prefix: str = ""


@dataclass(frozen=True)
class Verdict:
    """The extracted (normalised where the checker normalises) answer, ``None`` when nothing was
    found, and whether it is correct."""

    extracted: str | None
    correct: bool


@dataclass(frozen=True)
class Limits:
    """Resource limits of one code run."""

    timeout_s: float = 10
    memory_mb: int = 1024


@dataclass(frozen=True)
class Checker:
    """One entry of :data:`CHECKERS`.

    Attributes:
        judge: ``judge(answer, reference, limits) -> Verdict``; ``answer`` is the part of the
            response after its think block, ``None`` when the think block never closed.
        needs: the :class:`Reference` field it compares against (``"answer"`` or ``"tests"``),
            None when it needs none. ``build`` checks its input has that column up front.
        help: one line for help texts.
        extractor: what it reads from the answer: ``math-verify`` (the last ``\\boxed{}`` alone, else
            math-verify's extraction), ``boxed`` (the last ``\\boxed{}``), ``choice-letter``,
            ``code-block`` (the last fenced block), or None (reads nothing).
        parallel: runs in a thread pool (waits on subprocesses, not on math-verify's signals).
        votes: its extracted answers are meaningful maj@k votes.
    """

    judge: Callable[[str | None, Reference, Limits], Verdict]
    needs: str | None
    help: str
    extractor: str | None
    parallel: bool = False
    votes: bool = True


# ---------------------------------------------------------------------------------------
# math


def _math_timeout() -> int | None:
    """math-verify times out with ``signal.alarm``, which only works in the main thread."""
    return MATH_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def _has_math_env(text: str) -> bool:
    """Whether a gold is already inside a math environment (``$..$``, ``\\(..\\)``, ``\\[..\\]``, a box)."""
    wrapped = any(text.startswith(o) and text.endswith(c) and len(text) > len(o) + len(c) - 1
                  for o, c in (("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")))
    return wrapped or "\\boxed" in text


@lru_cache(maxsize=65536)
def parse_gold(answer: str) -> tuple[Any, ...]:
    """math-verify's parse of a gold answer: LaTeX + expression extraction, bare LaTeX in ``$...$``.

    Cached: many samples share one reference.
    """
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    text = answer.strip()
    if not _has_math_env(text):
        text = f"${text}$"
    return tuple(parse(text, extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
                       parsing_timeout=_math_timeout()))


def parse_prediction(answer: str) -> list[Any]:
    r"""math-verify's parse of a response's final answer: the last ``\boxed{}`` alone when there is
    one, else math-verify's own extraction from the whole answer (boxed first, then anchors)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    boxed = last_boxed(answer)
    text = f"\\boxed{{{boxed}}}" if boxed is not None else answer
    return parse(text, extraction_config=[LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()],
                 parsing_timeout=_math_timeout())


def _math_key(parsed: list[Any], boxed: str | None) -> str | None:
    r"""The normalised answer for votes, so that answers the checker judges equal share a key where
    that is cheap: the parse is first reduced as math-verify compares it with a plain gold, then
    written as a canonical number, else SymPy's printing, else the raw text.

    * an assignment votes as its value: ``x = 2`` -> ``2`` (math-verify: ``x = 2`` equals the gold ``2``);
    * a percent of an integer votes as the integer, any other percent as its value:
      ``10\%`` -> ``10``, ``12.5\%`` -> ``0.125`` (math-verify: ``9\%`` equals ``9``; ``12.5\%``
      equals ``0.125``, not ``12.5``);
    * an expression without variables votes as its value: ``1+1``, ``\sqrt{4}`` -> ``2``
      (evaluated within math-verify's time limit).
    """
    import sympy
    from math_verify.errors import TimeoutException
    from math_verify.grader import get_pct_val, is_assignment_relation, safe_sympy_doit, take_last_relation
    from math_verify.utils import timeout

    if not parsed:
        return boxed
    first = parsed[0]
    if is_assignment_relation(first):
        first = take_last_relation(first).rhs
    percent = get_pct_val(first)
    if percent is not None:
        first = percent if isinstance(percent, sympy.Integer) else percent / 100
    if isinstance(first, sympy.Basic) and not first.free_symbols:
        try:
            first = timeout(_math_timeout())(safe_sympy_doit)(first)
        except TimeoutException:
            pass
    if isinstance(first, sympy.Number) and first.is_finite:
        if isinstance(first, sympy.Float):
            value = parse_number(str(first))
        else:
            value = Fraction(int(first.p), int(first.q))
        if value is not None:
            return canonical_number(value)
    return str(first).strip() or None


def check_math(answer: str | None, reference: Reference, limits: Limits) -> Verdict:
    """math-verify equivalence of the final answer with the gold (see the module docstring)."""
    from math_verify import verify

    if answer is None or not answer.strip():
        return Verdict(None, False)
    pred = parse_prediction(answer)
    extracted = _math_key(pred, last_boxed(answer))
    if not pred or not reference.answer:
        return Verdict(extracted, False)
    gold = list(parse_gold(reference.answer))
    return Verdict(extracted, bool(gold) and bool(verify(gold, pred, timeout_seconds=_math_timeout())))


# ---------------------------------------------------------------------------------------
# numeric, exact, choice


def check_numeric(answer: str | None, reference: Reference, limits: Limits) -> Verdict:
    """The last boxed answer is exactly the reference number (see :mod:`llmdistill.checking.numbers`).

    When the reference is not a number, the boxed text must equal it (spaces aside).
    """
    boxed = last_boxed(answer) if answer is not None else None
    if boxed is None:
        return Verdict(None, False)
    value, gold = parse_number(boxed), parse_number(reference.answer)
    extracted = canonical_number(value) if value is not None else " ".join(boxed.split())
    if gold is None:
        return Verdict(extracted, bool(reference.answer) and extracted == " ".join(reference.answer.split()))
    return Verdict(extracted, value is not None and value == gold)


def check_exact(answer: str | None, reference: Reference, limits: Limits) -> Verdict:
    """The last boxed answer is the reference string (surrounding spaces aside)."""
    boxed = last_boxed(answer) if answer is not None else None
    if boxed is None:
        return Verdict(None, False)
    return Verdict(boxed, reference.answer is not None and boxed == reference.answer.strip())


def check_choice(answer: str | None, reference: Reference, limits: Limits) -> Verdict:
    """The committed choice letter is the reference letter (A-D, or up to the reference's letter)."""
    gold = (reference.answer or "").strip().upper()
    if answer is None:
        return Verdict(None, False)
    span = max(4, CHOICE_LETTERS.find(gold) + 1) if len(gold) == 1 else 4
    letter = choice_letter(answer, CHOICE_LETTERS[:span])
    return Verdict(letter, letter is not None and letter == gold)


# ---------------------------------------------------------------------------------------
# code


def code_program(reference: Reference, code: str, sentinel: str) -> str:
    """The program run for a code answer: prefix + code + tests (+ ``check(entry_point)``) + sentinel.

    A completion holding the whole function simply redefines the prefix's stub. The sentinel
    is printed only when every statement before it ran.
    """
    call = f"\n\ncheck({reference.entry_point})\n" if reference.entry_point else "\n"
    return f"{reference.code_prefix}{code}\n\n{reference.tests}{call}\nprint({sentinel!r}, flush=True)\n"


def check_code(answer: str | None, reference: Reference, limits: Limits) -> Verdict:
    """The last code block passes the tests: exit status 0 and the run's sentinel on stdout."""
    code = code_block(answer) if answer is not None else None
    if code is None or not reference.tests:
        return Verdict(code, False)
    sentinel = f"llmdistill-tests-done-{secrets.token_hex(16)}"
    result = run_python(code_program(reference, code, sentinel), timeout_s=limits.timeout_s,
                        memory_mb=limits.memory_mb)
    return Verdict(code, result.passed and sentinel in result.stdout.splitlines())


def check_none(answer: str | None, reference: Reference, limits: Limits) -> Verdict:
    """Accepts every response."""
    return Verdict(None, True)


CHECKERS: dict[str, Checker] = {
    "math": Checker(check_math, "answer", "math-verify equivalence with the reference, LaTeX or number",
                    "math-verify"),
    "numeric": Checker(check_numeric, "answer", "the boxed answer is exactly the reference number", "boxed"),
    "exact": Checker(check_exact, "answer", "the boxed answer is the reference string", "boxed"),
    "choice": Checker(check_choice, "answer", "the committed letter is the reference letter", "choice-letter"),
    "code": Checker(check_code, "tests", "the last code block passes the tests in the sandbox", "code-block",
                    parallel=True, votes=False),
    "none": Checker(check_none, None, "accept every response", None, votes=False),
}


def get_checker(name: str) -> Checker:
    """The registered checker ``name``; a ValueError listing the valid names otherwise."""
    if name not in CHECKERS:
        raise ValueError(f"unknown checker '{name}'; valid names: {', '.join(CHECKERS)}")
    return CHECKERS[name]


def checker_help() -> str:
    """``name (what it checks) | ...`` for help texts."""
    return " | ".join(f"{name} ({c.help})" for name, c in CHECKERS.items())


def check(checker: str, response: str, reference: Reference, *, think_in_prompt: bool = False,
          timeout_s: float = 10, memory_mb: int = 1024) -> Verdict:
    """The verdict on one whole response (think block included).

    Args:
        checker: a key of :data:`CHECKERS`.
        response: the generated text.
        reference: what it is checked against.
        think_in_prompt: the prompt already opened ``<think>``, so the response starts inside the
            think block (and has no answer unless it closes it).
        timeout_s: per-program wall-clock limit (``code``).
        memory_mb: per-program address-space limit (``code``).
    """
    return get_checker(checker).judge(strip_think(response, think_in_prompt), reference, Limits(timeout_s, memory_mb))


def check_many(checker: str, responses: Sequence[str], references: Sequence[Reference], *,
               think_in_prompt: bool | Sequence[bool] = False, workers: int = 2, timeout_s: float = 10,
               memory_mb: int = 1024) -> list[Verdict]:
    """:func:`check` of every (response, reference) pair, in order.

    Code runs ``workers`` sandboxes at a time; the other checkers run in the calling thread
    (math-verify's timeouts need the main thread).

    Args:
        think_in_prompt: one flag for all responses, or one per response.
    """
    spec = get_checker(checker)
    if len(responses) != len(references):
        raise ValueError(f"{len(responses)} responses but {len(references)} references")
    flags = [think_in_prompt] * len(responses) if isinstance(think_in_prompt, bool) else list(think_in_prompt)
    if len(flags) != len(responses):
        raise ValueError(f"{len(responses)} responses but {len(flags)} think_in_prompt flags")

    def one(response: str, reference: Reference, think: bool) -> Verdict:
        return check(checker, response, reference, think_in_prompt=think, timeout_s=timeout_s, memory_mb=memory_mb)

    if spec.parallel and len(responses) > 1:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            return list(pool.map(one, responses, references, flags))
    return [one(r, ref, t) for r, ref, t in zip(responses, references, flags, strict=True)]


def missing_references(checker: str, references: Sequence[Reference]) -> list[int]:
    """Indices of references without the field ``checker`` needs (empty when it needs none)."""
    field = get_checker(checker).needs
    if field is None:
        return []
    return [i for i, ref in enumerate(references) if not getattr(ref, field)]
