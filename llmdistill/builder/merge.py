"""Several teachers' top-k at one position merged into one top-k plus the tail bucket (pure numpy).

Each teacher ``t`` gives, per position, its top-``k_t`` ids and log-probs; the mass it did not
list (``1 - sum(p_t)``) is unknown, spread over the rest of the vocabulary. The merged target is
the weighted mixture in probability space, ``q(v) = sum_t w_t p_t(v)``, over the union of the
listed ids, where a teacher that did not list ``v`` contributes nothing to ``q(v)``: its mass
for ``v`` is part of its unknown mass, which stays in the tail. The ``k`` largest entries of the
union are kept and the rest joins the tail, so

    sum(kept q) + tail = 1,   tail = sum_t w_t (1 - sum(p_t)) + (mass of the union entries dropped).

When every teacher lists every id with non-zero probability (its ``k`` covers the union), this
is the exact mixture. The tail is never stored: the built shards' contract is that it is
``1 - sum(exp(top-k log-probs))``, which the KD loss reads as its tail bucket.
"""

from __future__ import annotations

import numpy as np

from llmdistill.codec import LOGPROB_FLOOR


def mix_topk(ids: list[np.ndarray], logprobs: list[np.ndarray], weights: np.ndarray,
             k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge the top-k of several teachers at the same positions.

    Args:
        ids: per teacher, int (n, k_t) top-k token ids (distinct within a row).
        logprobs: per teacher, float (n, k_t) their log-probs.
        weights: float (n, T) or (T,): each teacher's weight per position (rows sum to 1; a
            one-hot row routes a position to one teacher).
        k: entries to keep per position (at most the union's size: the rest are padded with
            probability 0, i.e. log-prob :data:`~llmdistill.codec.LOGPROB_FLOOR`).

    Returns:
        ``ids`` int64 (n, k) and ``logprobs`` float32 (n, k) of the merged top-k, sorted by
        probability descending (ties: smaller id first).
    """
    n = ids[0].shape[0]
    w = np.broadcast_to(np.asarray(weights, dtype=np.float64), (n, len(ids)))
    all_ids = np.concatenate([np.asarray(i, dtype=np.int64) for i in ids], axis=1)
    probs = np.concatenate([w[:, t:t + 1] * np.exp(np.asarray(lp, dtype=np.float64))
                            for t, lp in enumerate(logprobs)], axis=1)
    width = all_ids.shape[1]
    # sum the entries of one id within a row: sort each row by id, number the runs of equal ids
    order = np.argsort(all_ids, axis=1, kind="stable")
    sorted_ids = np.take_along_axis(all_ids, order, axis=1)
    sorted_p = np.take_along_axis(probs, order, axis=1)
    starts = np.ones((n, width), dtype=bool)
    starts[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    run = np.cumsum(starts, axis=1) - 1
    flat = (np.arange(n)[:, None] * width + run).ravel()
    union_p = np.bincount(flat, weights=sorted_p.ravel(), minlength=n * width).reshape(n, width)
    union_ids = np.zeros((n, width), dtype=np.int64)
    union_ids.ravel()[flat] = sorted_ids.ravel()
    # the k largest (a run index past a row's union has probability 0 and sorts last)
    pick = np.argsort(-union_p, axis=1, kind="stable")[:, :k]
    out_p = np.take_along_axis(union_p, pick, axis=1)
    out_ids = np.take_along_axis(union_ids, pick, axis=1)
    if out_p.shape[1] < k:  # fewer listed entries in all than k
        out_p = np.pad(out_p, ((0, 0), (0, k - out_p.shape[1])))
        out_ids = np.pad(out_ids, ((0, 0), (0, k - out_ids.shape[1])))
    with np.errstate(divide="ignore"):
        out_lp = np.maximum(np.log(out_p), LOGPROB_FLOOR).astype(np.float32)
    return out_ids, out_lp


class UnknownTeacher(ValueError):
    """A routing value that names no teacher: ``row`` (index in the routes given) and ``value``."""

    def __init__(self, row: int, value: object) -> None:
        super().__init__(f"row {row}: no teacher named {value!r}")
        self.row, self.value = row, value


def route_weights(routes: list[str | None], names: list[str], weights: list[float]) -> np.ndarray:
    """Per-trace teacher weights: one-hot on the named teacher, the mixture's ``weights`` when null.

    Args:
        routes: per trace, the value of the routing column (None: mix).
        names: the teachers, in the order of ``weights``.
        weights: the mixture's weights.

    Returns:
        float64 (len(routes), len(names)).

    Raises:
        UnknownTeacher: a value that names no teacher.
    """
    out = np.tile(np.asarray(weights, dtype=np.float64), (len(routes), 1))
    index = {name: i for i, name in enumerate(names)}
    for row, value in enumerate(routes):
        if value is None:
            continue
        if str(value) not in index:
            raise UnknownTeacher(row, value)
        out[row] = 0.0
        out[row, index[str(value)]] = 1.0
    return out
