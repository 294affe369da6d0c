"""Step 1: verify each completion's final answer with a pluggable verifier.

``VERIFIERS`` is the plug-in point: a plain dict from the name used in the config
(``verifier: math``) to a :class:`Verifier`. Every verifier looks only at the answer after
``</think>``; a completion whose think block never closes has no answer and fails.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from llmdistill.checking.extract import code_block, last_boxed, strip_think
from llmdistill.config.base import ConfigError
from llmdistill.config.build import VerifyConfig
from llmdistill.log import get_logger
from llmdistill.tinyworld.task import extract_answer

logger = get_logger(__name__)


@dataclass(frozen=True)
class Verifier:
    """A verifier: ``check(completion, reference, cfg) -> bool`` and which column it needs.

    Attributes:
        check: the verdict for one completion.
        reference: the :class:`~llmdistill.builder.traces.Traces` column it compares against
            (``reference`` or ``tests``), or None when it needs none.
        parallel: runs in a thread pool (for checks that wait on subprocesses).
    """

    check: Callable[[str, str | None, VerifyConfig], bool]
    reference: str | None
    parallel: bool = False


@lru_cache(maxsize=65536)
def _parse_gold(reference: str):
    from math_verify import parse

    return parse(reference)


def verify_math(completion: str, reference: str | None, cfg: VerifyConfig) -> bool:
    r"""math-verify: the last ``\boxed{}`` after ``</think>`` is mathematically equal to the reference.

    The gold answer is parsed first (and cached: many samples share one reference), so
    ``\frac{1}{2}`` matches ``0.5`` and ``x = 2`` matches ``2``.
    """
    from math_verify import parse, verify

    answer = strip_think(completion)
    boxed = last_boxed(answer) if answer is not None else None
    if boxed is None or reference is None:
        return False
    gold = _parse_gold(reference)
    return bool(gold) and bool(verify(gold, parse(f"\\boxed{{{boxed}}}")))


def verify_exact(completion: str, reference: str | None, cfg: VerifyConfig) -> bool:
    """The tiny world's boxed answer after ``</think>`` equals the reference string."""
    got = extract_answer(completion)
    return got is not None and reference is not None and got == reference.strip()


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", "").strip())
    except ValueError:
        return None


def verify_numeric(completion: str, reference: str | None, cfg: VerifyConfig) -> bool:
    """The boxed answer after ``</think>`` and the reference are the same number (relative tolerance 1e-6)."""
    got = extract_answer(completion)
    a, b = (_number(got) if got is not None else None), (_number(reference) if reference is not None else None)
    return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


def verify_code(completion: str, reference: str | None, cfg: VerifyConfig) -> bool:
    """The last ```python block after ``</think>`` passes the row's tests in the sandbox.

    The tests are appended to the program; the run passes when it exits with code 0 within
    ``code_timeout_s`` and ``code_memory_mb`` (no network, temporary working directory).
    """
    from llmdistill.checking.sandbox import run_python

    answer = strip_think(completion)
    program = code_block(answer) if answer is not None else None
    if program is None or not reference:
        return False
    return run_python(f"{program}\n\n{reference}\n", timeout_s=cfg.code_timeout_s, memory_mb=cfg.code_memory_mb).passed


def verify_none(completion: str, reference: str | None, cfg: VerifyConfig) -> bool:
    """Accepts everything (traces without checkable answers)."""
    return True


VERIFIERS: dict[str, Verifier] = {
    "math": Verifier(verify_math, "reference"),
    "exact": Verifier(verify_exact, "reference"),
    "numeric": Verifier(verify_numeric, "reference"),
    "code": Verifier(verify_code, "tests", parallel=True),
    "none": Verifier(verify_none, None),
}


def check_references(columns: list[str], references: list[str | None] | None, cfg: VerifyConfig,
                     column_name: str, ids: list[str]) -> None:
    """Fail before any work when the verifier needs a column the input does not have (or has gaps in).

    Raises:
        ConfigError: naming the column and the first row without a value.
    """
    verifier = VERIFIERS[cfg.verifier]
    if verifier.reference is None:
        return
    if references is None:
        raise ConfigError(
            f"verifier '{cfg.verifier}' needs a '{column_name}' column; the input has {sorted(columns)}. "
            f"Set answer_column/tests_column to the right column, or use verifier: none."
        )
    missing = [i for i, ref in enumerate(references) if ref is None or ref == ""]
    if missing:
        raise ConfigError(
            f"verifier '{cfg.verifier}' needs a reference in column '{column_name}', but {len(missing)} row(s) have "
            f"none (first: row {missing[0]}, prompt_id {ids[missing[0]]}). Fill them, or use verifier: none."
        )


def verify_all(completions: list[str], references: list[str | None], cfg: VerifyConfig) -> np.ndarray:
    """Verdicts of every completion.

    Args:
        completions: the completion texts.
        references: per completion, the reference answer / tests (None entries for ``none``).
        cfg: the verify config.

    Returns:
        bool array, one verdict per completion.
    """
    verifier = VERIFIERS[cfg.verifier]
    if verifier.parallel:
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            verdicts = list(pool.map(lambda cr: verifier.check(cr[0], cr[1], cfg), zip(completions, references, strict=True)))
    else:
        verdicts = [verifier.check(c, r, cfg) for c, r in zip(completions, references, strict=True)]
    return np.asarray(verdicts, dtype=bool)
