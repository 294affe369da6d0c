"""Step 2: rejection sampling — drop traces a student should not learn from.

Each filter returns a boolean keep-mask over the traces, so the pipeline can count what
every rule removed. The teacher's pass-rate window per prompt needs every part's verdicts: phase C
applies it (:mod:`llmdistill.builder.decide`).
"""

from __future__ import annotations

import numpy as np

from llmdistill.checking.extract import THINK_CLOSE, THINK_OPEN
from llmdistill.formats import UNFINISHED


def well_formed(completion: str) -> bool:
    """Exactly one ``<think>…</think>`` block, opened before it is closed, then a non-empty answer."""
    if completion.count(THINK_OPEN) != 1 or completion.count(THINK_CLOSE) != 1:
        return False
    head, _, answer = completion.partition(THINK_CLOSE)
    return THINK_OPEN in head and bool(answer.strip())


def not_truncated(finish_reasons: list[str]) -> np.ndarray:
    """False for completions that did not end on their own: stopped on the token limit
    (``finish_reason == "length"``) or cut before an unknown id (:data:`~llmdistill.formats.UNFINISHED`)."""
    return np.asarray([r not in UNFINISHED for r in finish_reasons], dtype=bool)


def well_formed_mask(completions: list[str]) -> np.ndarray:
    """:func:`well_formed` of every completion."""
    return np.fromiter((well_formed(c) for c in completions), dtype=bool, count=len(completions))


def length_mask(n_tokens: np.ndarray, min_tokens: int, max_tokens: int | None) -> np.ndarray:
    """True for completions with ``min_tokens <= n <= max_tokens`` tokens."""
    n = np.asarray(n_tokens)
    keep = n >= min_tokens
    return keep & (n <= max_tokens) if max_tokens is not None else keep


def cap_per_prompt(prompt_ids: list[str] | np.ndarray, sample_index: list[int] | np.ndarray, m: int | None,
                   alive: np.ndarray | None = None) -> np.ndarray:
    """Keep at most ``m`` samples per prompt: the ones with the lowest ``sample_index``.

    Args:
        prompt_ids: prompt of each sample (ids or integer codes).
        sample_index: sample index of each sample.
        m: the cap (None: no cap).
        alive: optional bool mask: only these samples take part (and count); the others are not kept.
    """
    n = len(sample_index)
    alive = np.ones(n, dtype=bool) if alive is None else np.asarray(alive, dtype=bool)
    if m is None:
        return alive.copy()
    codes = np.unique(np.asarray(prompt_ids), return_inverse=True)[1].reshape(-1)
    idx = np.flatnonzero(alive)
    order = idx[np.lexsort((np.asarray(sample_index)[idx], codes[idx]))]
    group = codes[order]
    start = np.r_[True, group[1:] != group[:-1]]
    rank = np.arange(len(order)) - np.maximum.accumulate(np.where(start, np.arange(len(order)), 0))
    keep = np.zeros(n, dtype=bool)
    keep[order[rank < m]] = True
    return keep
