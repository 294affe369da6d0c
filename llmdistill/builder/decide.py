"""Phase C (driver, light data): which traces are kept, step by step.

Reads the verdicts of phase B (8 bytes per trace) and applies the steps in order: prompt-level
drops of phase A, the teacher's pass-rate window per prompt, the row-level filters, completion
dedup, and the cap of samples per prompt. The :class:`Ledger` counts what every step removed
and remembers which step dropped each trace.

Completion duplicates that can lie in two parts (a prompt whose samples are split across parts,
or ``dedup_completion_scope: global``) are found by a Ray Data hash shuffle of the traces'
exact-text hashes, then of their MinHash LSH band keys (:func:`cross_part_duplicates`): each
block holds whole buckets, and only the pairs that share one come back to the driver, which
confirms the near ones on their signatures a few thousand at a time. No process ever holds an
index of the whole corpus.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from llmdistill.builder import dedup, filters
from llmdistill.builder.cluster import Runtime
from llmdistill.builder.prompt_level import CONTAMINATED, DUPLICATE, Prompts
from llmdistill.builder.rows import row_steps, rows_path
from llmdistill.builder.traces import Part
from llmdistill.builder.workfiles import read_arrow
from llmdistill.config.base import UserError
from llmdistill.config.build import BuildConfig


class EmptyBuildError(UserError):
    """Every trace was removed: nothing to write."""


class Ledger:
    """Counts after every step, and the step that dropped each input trace."""

    def __init__(self, n: int) -> None:
        self.steps: list[dict[str, Any]] = [{"step": "input", "dropped": 0, "remaining": n}]
        self.keep = np.ones(n, dtype=bool)
        self.dropped_by = np.zeros(n, dtype=np.uint8)  # 0: kept, else 1 + index into self.names
        self.names: list[str] = []

    def apply(self, step: str, drop: np.ndarray) -> None:
        """Drop the kept traces where ``drop`` is true, recording ``step``; error when none is left."""
        newly = self.keep & np.asarray(drop, dtype=bool)
        self.names.append(step)
        self.dropped_by[newly] = len(self.names)
        self.keep &= ~newly
        self.steps.append({"step": step, "dropped": int(newly.sum()), "remaining": int(self.keep.sum())})
        if not self.keep.any():
            raise EmptyBuildError(f"no trace is left after step '{step}'. Counts per step: {self.summary()}. "
                                  "Check the verifier, answer_column and the filter settings.")

    def count(self, step: str, dropped: int) -> None:
        """A step counted elsewhere (``overlong``, in the packing phase)."""
        remaining = self.steps[-1]["remaining"] - dropped
        self.steps.append({"step": step, "dropped": dropped, "remaining": remaining})

    def fates(self, rows: slice) -> list[str]:
        """The step that dropped each trace of ``rows`` ("" for kept ones)."""
        names = np.asarray(["", *self.names], dtype=object)
        return names[self.dropped_by[rows]].tolist()

    def summary(self) -> str:
        return ", ".join(f"{s['step']} {s['remaining']}" for s in self.steps)


@dataclass
class Verdicts:
    """Phase B's results for every trace, in input order."""

    correct: np.ndarray  # bool
    verified: np.ndarray  # bool: phase B judged it (its prompt survived phase A)
    flag: np.ndarray  # uint8: first failed row-level step (1-based in row_steps), 0 if none
    dup: np.ndarray  # bool: duplicate of an earlier sample of its prompt in the same part
    n_tokens: np.ndarray  # int32


def read_verdicts(work: str, parts: list[Part]) -> Verdicts:
    """Phase B's files of every part, joined (light: 8 bytes per trace)."""
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("correct", "verified", "flag", "dup", "n_tokens")}
    for part in parts:
        table = read_arrow(rows_path(work, part.index))
        correct = table.column("correct")
        cols["verified"].append(correct.is_valid().to_numpy(zero_copy_only=False))
        cols["correct"].append(correct.fill_null(False).to_numpy(zero_copy_only=False))
        for name in ("flag", "dup", "n_tokens"):
            cols[name].append(table.column(name).to_numpy(zero_copy_only=False))
    return Verdicts(**{k: np.concatenate(v) for k, v in cols.items()})


def decide(cfg: BuildConfig, parts: list[Part], prompts: Prompts, verdicts: Verdicts, runtime: Runtime,
           work: str) -> Ledger:
    """Phase C: apply every step in order; the ledger holds which traces are kept.

    Raises:
        EmptyBuildError: a step leaves no trace.
    """
    ledger = Ledger(len(prompts.codes))
    fate = prompts.fate[prompts.codes]
    if cfg.dedup_prompts:
        ledger.apply("duplicate_prompt", fate == DUPLICATE)
    if cfg.decontam_benchmarks or cfg.decontam_extra_file:
        ledger.apply("contaminated", fate == CONTAMINATED)
    if cfg.min_pass_rate > 0 or cfg.max_pass_rate < 1:
        ledger.apply("pass_rate", ~_pass_rate_mask(prompts.codes, verdicts.correct, ledger.keep,
                                                    cfg.min_pass_rate, cfg.max_pass_rate))
    for code, step in enumerate(row_steps(cfg), 1):
        ledger.apply(step, verdicts.flag == code)
    if cfg.dedup_completions:
        cross = prompts.split[prompts.codes] if cfg.dedup_completion_scope == "prompt" else np.ones_like(ledger.keep)
        candidates = ledger.keep & cross
        dup = verdicts.dup.copy()
        if candidates.any():
            groups = prompts.codes if cfg.dedup_completion_scope == "prompt" else np.zeros_like(prompts.codes)
            dup |= cross_part_duplicates(cfg, parts, candidates, groups, runtime, work)
        ledger.apply("duplicate_completion", dup)
    ledger.apply("samples_per_prompt", ~filters.cap_per_prompt(prompts.codes, prompts.sample_index,
                                                               cfg.max_samples_per_prompt, ledger.keep))
    return ledger


def _pass_rate_mask(codes: np.ndarray, correct: np.ndarray, alive: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """True for traces of prompts whose samples (all of them: truncated and malformed count as
    failures) the teacher solves at a rate in ``[lo, hi]``."""
    n = int(codes.max()) + 1
    solved = np.bincount(codes[alive], weights=correct[alive].astype(np.float64), minlength=n)
    total = np.bincount(codes[alive], minlength=n)
    rate = np.divide(solved, total, out=np.zeros(n), where=total > 0)
    return (rate[codes] >= lo) & (rate[codes] <= hi)


# ---------------------------------------------------------------------------------------
# Duplicates across parts


def cross_part_duplicates(cfg: BuildConfig, parts: list[Part], candidates: np.ndarray, groups: np.ndarray,
                          runtime: Runtime, work: str) -> np.ndarray:
    """Completion duplicates among ``candidates`` that may lie in different parts.

    Exact duplicates first (a shuffle by exact-text hash), then near-duplicates among the rest (a
    shuffle by LSH band key, its candidates confirmed on their MinHash signatures); texts of different ``groups``
    (prompts, or one group for the global scope) are never duplicates. The earliest trace of
    each connected group of duplicates is kept.

    Returns:
        bool per trace: a duplicate of an earlier one.
    """
    dup = np.zeros(len(candidates), dtype=bool)
    rounds = (False, True) if cfg.near_dedup else (False,)
    for near in rounds:
        tasks = []
        for part in parts:
            local = np.flatnonzero(candidates[part.offset:part.offset + part.num_rows] & ~dup[part.offset:part.offset
                                                                                            + part.num_rows])
            if len(local):
                tasks.append({"path": str(rows_path(work, part.index, "keys")), "rows": local,
                              "index": part.offset + local, "groups": groups[part.offset + local]})
        pairs = (dedup.near_duplicate_pairs(tasks, cfg, runtime, exact=False) if near
                 else dedup.duplicate_pairs(tasks, cfg, runtime))
        dup[dedup.later_members(pairs)] = True
    return dup
