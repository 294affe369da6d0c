"""Phase C (driver, light data): which traces are kept, step by step.

Reads the verdicts of phase B (8 bytes per trace) and applies the steps in order: prompt-level
drops of phase A, the teacher's pass-rate window per prompt, the row-level filters, completion
dedup, and the cap of samples per prompt. The :class:`Ledger` counts what every step removed
and remembers which step dropped each trace.

Completion duplicates that can lie in two parts (a prompt whose samples are split across parts,
or ``dedup_completion_scope: global``) are found by a Ray Data hash shuffle of the traces'
exact-text hashes, then of their MinHash LSH band keys (:func:`cross_part_duplicates`): each
block holds whole buckets, confirms them on the signatures, and only the confirmed pairs come
back to the driver. No process ever holds an index of the whole corpus.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from llmdistill.builder import dedup, filters
from llmdistill.builder.cluster import Runtime
from llmdistill.builder.prompt_level import CONTAMINATED, DUPLICATE, Prompts
from llmdistill.builder.rows import row_steps, rows_path
from llmdistill.builder.traces import Part
from llmdistill.config.base import UserError
from llmdistill.config.build import BuildConfig

# about the most bytes one block of the dedup shuffle holds (the hash shuffle never splits a block)
SHUFFLE_BLOCK_BYTES = 128 << 20


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
        with pa.memory_map(str(rows_path(work, part.index))) as source:
            table = pa.ipc.open_file(source).read_all()
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
# Duplicates across parts: a Ray Data hash shuffle by key


def shuffle_blocks(n: int, bytes_per_trace: int, cpus: int) -> int:
    """Blocks of the shuffle of ``n`` traces' records: one per 50k traces up to two per CPU, and at
    least enough that no block holds more than :data:`SHUFFLE_BLOCK_BYTES` on average, so the memory
    of a task stays bounded however large the input is."""
    by_size = -(-n * bytes_per_trace // SHUFFLE_BLOCK_BYTES)
    return max(1, min(cpus * 2, n // 50_000 + 1), by_size)


def _key_rows(batch: dict[str, np.ndarray], near: bool, bands: int, rows_per_band: int) -> pa.Table:
    """One part's candidate traces as (key, row, sig) records: its exact key, or one per LSH band."""
    task = pickle.loads(batch["task"][0])
    with pa.memory_map(task["path"]) as source:
        keys = pa.ipc.open_file(source).read_all()
    local = keys.column("row").to_numpy()
    pick = np.flatnonzero(np.isin(local, task["rows"]))
    group = task["groups"][np.searchsorted(task["rows"], local[pick])]
    row = task["offset"] + local[pick]
    if not near:
        return pa.table({"key": dedup.mix(group, keys.column("hash").to_numpy()[pick]), "row": row})
    width = keys.schema.field("sig").type.list_size
    sig = keys.column("sig").combine_chunks().flatten().to_numpy().reshape(-1, width)[pick]
    band = dedup.band_keys(sig, bands, rows_per_band)
    key = dedup.mix(group[:, None], band).reshape(-1)
    flat = pa.array(np.repeat(sig, bands, axis=0).reshape(-1), pa.uint32())
    return pa.table({"key": key, "row": np.repeat(row, bands),
                     "sig": pa.FixedSizeListArray.from_arrays(flat, width)})


def _bucket_pairs(block: pa.Table, threshold: float, near: bool) -> pa.Table:
    """Within one block of whole buckets: (first, other) pairs of every bucket with more than one trace."""
    key, row = block.column("key").to_numpy(), block.column("row").to_numpy()
    order = np.lexsort((row, key))
    key, row = key[order], row[order]
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    sizes = np.diff(np.r_[starts, len(key)])
    pairs = [np.zeros((0, 2), dtype=np.int64)]
    if near:
        width = block.schema.field("sig").type.list_size
        sig = block.column("sig").combine_chunks().flatten().to_numpy().reshape(-1, width)[order]
        for s, n in zip(starts[sizes > 1], sizes[sizes > 1], strict=True):
            pairs.append(dedup.confirmed_pairs(row[s:s + n], sig[s:s + n], threshold))
    else:  # exact duplicates: every later trace of a bucket pairs with its first
        member = np.repeat(sizes > 1, sizes) & ~np.isin(np.arange(len(row)), starts)
        head = np.repeat(row[starts], sizes)
        pairs.append(np.stack([head[member], row[member]], axis=1))
    both = np.concatenate(pairs)
    return pa.table({"a": both[:, 0], "b": both[:, 1]})


def _duplicate_pairs(tasks: list[dict[str, Any]], near: bool, cfg: BuildConfig, runtime: Runtime) -> np.ndarray:
    import ray.data

    bands, rows_per_band = dedup.lsh_params(cfg.dedup_threshold, cfg.minhash_num_perm)
    items = [{"task": pickle.dumps(t)} for t in tasks]
    # a record is a key and a row (8 bytes each), plus the signature once per band when near
    per_trace = bands * (16 + 4 * cfg.minhash_num_perm) if near else 16
    blocks = shuffle_blocks(sum(len(t["rows"]) for t in tasks), per_trace, runtime.cpus)
    dataset = (ray.data.from_items(items, override_num_blocks=len(items))
               .map_batches(_key_rows, batch_size=1, batch_format="numpy",
                            fn_kwargs={"near": near, "bands": bands, "rows_per_band": rows_per_band})
               .repartition(blocks, keys=["key"])
               .map_batches(_bucket_pairs, batch_size=None, batch_format="pyarrow",
                            fn_kwargs={"threshold": cfg.dedup_threshold, "near": near}))
    found = [np.stack([b["a"], b["b"]], axis=1) for b in dataset.iter_batches(batch_format="numpy", batch_size=None)]
    return np.concatenate(found) if found else np.zeros((0, 2), dtype=np.int64)


def _later_members(pairs: np.ndarray) -> np.ndarray:
    """Rows that are not the first (smallest index) of their connected component of pairs."""
    if not len(pairs):
        return np.zeros(0, dtype=np.int64)
    nodes, inverse = np.unique(pairs.reshape(-1), return_inverse=True)
    edges = inverse.reshape(-1, 2)
    label = dedup._components(len(nodes), edges[:, 0], edges[:, 1])
    return nodes[label != np.arange(len(nodes))]


def cross_part_duplicates(cfg: BuildConfig, parts: list[Part], candidates: np.ndarray, groups: np.ndarray,
                          runtime: Runtime, work: str) -> np.ndarray:
    """Completion duplicates among ``candidates`` that may lie in different parts.

    Exact duplicates first (a shuffle by exact-text hash), then near-duplicates among the rest (a
    shuffle by LSH band key, confirmed on MinHash signatures); texts of different ``groups``
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
                tasks.append({"path": str(rows_path(work, part.index, "keys")), "offset": part.offset,
                              "rows": local, "groups": groups[part.offset + local]})
        dup[_later_members(_duplicate_pairs(tasks, near, cfg, runtime))] = True
    return dup
