"""Metrics over n samples per problem: pass@1 ± s.e., unbiased pass@k, maj@k, lengths.

``correct`` arguments are per-problem lists of per-sample booleans, in sample order.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem (Chen et al. 2021): ``1 - C(n-c, k) / C(n, k)``.

    Computed as ``1 - prod_{i=n-c+1}^{n} (1 - k/i)``, which never forms the huge binomials.

    Args:
        n: samples drawn for the problem.
        c: how many of them are correct.
        k: the k of pass@k, ``1 <= k <= n``.

    Returns:
        The probability that at least one of k samples drawn without replacement is correct.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_pass_at_k(correct: Sequence[Sequence[bool]], k: int) -> float:
    """pass@k averaged over problems."""
    return float(np.mean([pass_at_k(len(c), int(sum(c)), k) for c in correct]))


def pass_at_1(correct: Sequence[Sequence[bool]]) -> tuple[float, float]:
    """pass@1 as the mean accuracy over the n samples of each problem, averaged over problems.

    Returns:
        ``(mean, standard error)``; the standard error is across problems (the per-problem mean
        accuracies' sample standard deviation over sqrt(#problems)), 0 for a single problem.
    """
    per_problem = np.array([np.mean(c) for c in correct], dtype=np.float64)
    if len(per_problem) == 0:
        raise ValueError("pass@1 of zero problems is undefined")
    se = per_problem.std(ddof=1) / math.sqrt(len(per_problem)) if len(per_problem) > 1 else 0.0
    return float(per_problem.mean()), float(se)


def paired_difference(
    correct_a: dict[str, Sequence[bool]], correct_b: dict[str, Sequence[bool]]
) -> tuple[float, float]:
    """pass@1 of model b minus model a on the same problems, with the paired standard error.

    Pairing by problem removes the spread of problem difficulty that both models share, so the
    standard error is that of the difference itself: smaller than the two models' own errors
    combined, the more so the more the two succeed and fail on the same problems.

    Args:
        correct_a: problem id → per-sample correctness of model a.
        correct_b: the same for model b; it must cover exactly the same problems.

    Returns:
        ``(mean difference, standard error)``: the mean over problems of ``acc_b - acc_a`` (each a
        per-problem mean over samples) and its sample standard deviation over sqrt(#problems).
    """
    if set(correct_a) != set(correct_b):
        only = sorted(set(correct_a) ^ set(correct_b))
        raise ValueError(f"a paired difference needs the same problems for both models; {len(only)} differ, "
                         f"e.g. {only[:3]}")
    ids = sorted(correct_a)
    d = np.array([np.mean(correct_b[i]) - np.mean(correct_a[i]) for i in ids], dtype=np.float64)
    if len(d) == 0:
        raise ValueError("a paired difference of zero problems is undefined")
    se = d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else 0.0
    return float(d.mean()), float(se)


def majority_correct(answers: Sequence[str | None], correct: Sequence[bool]) -> bool:
    """Whether the most frequent extracted answer is a correct one.

    ``answers`` are the checker's normalised answers (:attr:`~llmdistill.checking.checkers.Verdict.extracted`:
    ``60``, ``60.0`` and ``120/2`` all arrive as ``"60"``), so the vote counts answers, not spellings.
    Samples without an answer (``None``) do not vote; ties go to the answer seen first.
    """
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return False
    top = max(votes.values())
    winner = next(a for a in answers if a is not None and votes[a] == top)
    return any(ok for a, ok in zip(answers, correct, strict=True) if a == winner)


def maj_at_k(answers: Sequence[Sequence[str | None]], correct: Sequence[Sequence[bool]], k: int) -> float:
    """maj@k: majority vote over the first k samples of each problem, averaged over problems."""
    return float(np.mean([majority_correct(a[:k], c[:k]) for a, c in zip(answers, correct, strict=True)]))


def default_ks(n: int) -> list[int]:
    """The k reported for n samples: powers of two below n, and n itself (1 excluded)."""
    ks = [2**i for i in range(1, n.bit_length()) if 2**i < n]
    return ks + [n] if n > 1 else []


def summarize(
    correct: Sequence[Sequence[bool]],
    answers: Sequence[Sequence[str | None]] | None,
    finish_reasons: Sequence[str],
    n_tokens: Sequence[int],
    ks: Sequence[int] | None = None,
) -> dict[str, float | int | dict[str, float]]:
    """All metrics of one (model, benchmark) pair.

    Args:
        correct: per problem, the correctness of each of its n samples.
        answers: per problem, the normalised extracted answer of each sample (``None`` skips maj@k, e.g. code).
        finish_reasons: every sample's finish reason (``"length"`` counts as truncated).
        n_tokens: every sample's response length in tokens.
        ks: the k for pass@k / maj@k (default :func:`default_ks`); k above n is skipped.

    Returns:
        ``pass@1``, ``pass@1_se``, ``pass@k`` and ``maj@k`` (dicts keyed by k as text),
        ``truncation_rate``, ``mean_tokens``, ``num_problems``, ``num_samples``.
    """
    n = min(len(c) for c in correct)
    ks = [k for k in (ks or default_ks(n)) if 1 <= k <= n]
    mean, se = pass_at_1(correct)
    out: dict[str, float | int | dict[str, float]] = {
        "num_problems": len(correct),
        "num_samples": n,
        "pass@1": mean,
        "pass@1_se": se,
        "pass@k": {str(k): mean_pass_at_k(correct, k) for k in ks},
        "maj@k": {str(k): maj_at_k(answers, correct, k) for k in ks} if answers is not None else {},
        "truncation_rate": float(np.mean([r == "length" for r in finish_reasons])),
        "mean_tokens": float(np.mean(n_tokens)),
    }
    return out
