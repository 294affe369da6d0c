"""Step 2: rejection sampling — drop traces a student should not learn from.

Each filter returns a boolean keep-mask over the traces, so the pipeline can count what
every rule removed.
"""

from __future__ import annotations

import numpy as np

from llmdistill.checking.extract import THINK_CLOSE, THINK_OPEN


def well_formed(completion: str) -> bool:
    """Exactly one ``<think>…</think>`` block, opened before it is closed, then a non-empty answer."""
    if completion.count(THINK_OPEN) != 1 or completion.count(THINK_CLOSE) != 1:
        return False
    head, _, answer = completion.partition(THINK_CLOSE)
    return THINK_OPEN in head and bool(answer.strip())


def not_truncated(finish_reasons: list[str]) -> np.ndarray:
    """False for completions that stopped on the token limit (``finish_reason == "length"``)."""
    return np.asarray([r != "length" for r in finish_reasons], dtype=bool)


def well_formed_mask(completions: list[str]) -> np.ndarray:
    """:func:`well_formed` of every completion."""
    return np.fromiter((well_formed(c) for c in completions), dtype=bool, count=len(completions))


def length_mask(n_tokens: np.ndarray, min_tokens: int, max_tokens: int | None) -> np.ndarray:
    """True for completions with ``min_tokens <= n <= max_tokens`` tokens."""
    n = np.asarray(n_tokens)
    keep = n >= min_tokens
    return keep & (n <= max_tokens) if max_tokens is not None else keep


def pass_rates(prompt_ids: list[str], correct: np.ndarray) -> dict[str, float]:
    """Fraction of correct samples per prompt."""
    codes, inverse = np.unique(np.asarray(prompt_ids, dtype=object), return_inverse=True)
    solved = np.bincount(inverse, weights=correct.astype(np.float64), minlength=len(codes))
    total = np.bincount(inverse, minlength=len(codes))
    return dict(zip(codes.tolist(), (solved / total).tolist(), strict=True))


def pass_rate_mask(prompt_ids: list[str], correct: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """True for samples of prompts the teacher solves with a rate in ``[lo, hi]``.

    The rate counts every sample of the prompt (truncated and malformed ones as failures),
    so it is the teacher's real solve rate, not the rate among survivors.
    """
    rates = pass_rates(prompt_ids, correct)
    return np.asarray([lo <= rates[p] <= hi for p in prompt_ids], dtype=bool)


def cap_per_prompt(prompt_ids: list[str], sample_index: list[int], m: int | None) -> np.ndarray:
    """Keep at most ``m`` samples per prompt: the ones with the lowest ``sample_index``."""
    if m is None:
        return np.ones(len(prompt_ids), dtype=bool)
    order = sorted(range(len(prompt_ids)), key=lambda i: (prompt_ids[i], sample_index[i]))
    keep = np.zeros(len(prompt_ids), dtype=bool)
    taken: dict[str, int] = {}
    for i in order:
        if taken.get(prompt_ids[i], 0) < m:
            taken[prompt_ids[i]] = taken.get(prompt_ids[i], 0) + 1
            keep[i] = True
    return keep
