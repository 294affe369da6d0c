"""Phase A: which prompts are dropped before any trace is read.

A Ray map over parts (:func:`part_prompts`) reads ``prompt_id``, ``prompt`` and ``sample_index``
batch by batch and writes, per distinct prompt of the part, its id, the hash of its normalised
problem, its MinHash signature (near dedup) and the benchmarks it overlaps (decontamination,
:mod:`~llmdistill.builder.decontam`); per trace, which of those prompts it has. The driver
(:func:`prompt_fates`) then numbers every distinct prompt id in order of first appearance, keeps
the first of each exact-text hash, finds near-duplicate candidates with the Ray hash shuffle of
LSH band keys that completions across parts use (:func:`~llmdistill.builder.dedup.duplicate_pairs`),
confirms them on their exact shingle sets as :func:`~llmdistill.builder.dedup.near_duplicates` does
within one process (:func:`~llmdistill.builder.dedup.near_duplicate_pairs`), and marks the remaining
prompts that overlap a benchmark.

No process holds the prompts' text: a worker holds one part's; the driver holds 8 bytes per trace,
the ids and hashes of the distinct prompts, and the shingles of a few thousand candidate pairs at a
time. A part's files are written atomically, so a re-run of a killed build reuses them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from llmdistill.builder import dedup
from llmdistill.builder.cluster import Runtime, map_parts
from llmdistill.builder.decontam import NgramIndex, build_index
from llmdistill.builder.traces import Part, read_part
from llmdistill.builder.workfiles import read_arrow, write_arrow_atomic
from llmdistill.config.build import BuildConfig
from llmdistill.formats import check_generation_rows, shard_name
from llmdistill.log import get_logger
from llmdistill.prompts import prompt_problem

logger = get_logger(__name__)

KEPT, DUPLICATE, CONTAMINATED = 0, 1, 2
LIGHT_BATCH_ROWS = 65_536
PROMPT_STEPS = {DUPLICATE: "duplicate_prompt", CONTAMINATED: "contaminated"}


@dataclass
class Prompts:
    """The distinct prompts of the input and, per trace, its prompt.

    Attributes:
        ids: prompt id of each code, in order of first appearance (a large_string array).
        fate: uint8 per code: :data:`KEPT`, :data:`DUPLICATE` or :data:`CONTAMINATED`.
        split: bool per code: its traces lie in more than one part.
        codes: int32 per trace (input order): its prompt's code.
        sample_index: int32 per trace.
        hits: contaminated prompts per benchmark.
    """

    ids: pa.Array
    fate: np.ndarray
    split: np.ndarray
    codes: np.ndarray
    sample_index: np.ndarray
    hits: dict[str, int]

    def rows(self, part: Part) -> slice:
        return slice(part.offset, part.offset + part.num_rows)


@dataclass
class PromptsContext:
    """What every phase-A task shares: the settings, and the benchmark index when decontaminating."""

    work: str
    exact: bool  # hash the normalised problems
    near: bool  # and sign them
    ngram: int
    num_perm: int
    seed: int
    index: NgramIndex | None


def prompts_path(work: str | Path, part: int, what: str = "") -> Path:
    """``prompts/part-N.arrow`` (one row per distinct prompt of the part) or, with ``what="traces"``,
    ``part-N.traces.arrow`` (one row per trace)."""
    return Path(work) / "prompts" / shard_name(part).replace(".parquet", f"{'.' + what if what else ''}.arrow")


def part_prompts(task: dict[str, Any], ctx: PromptsContext) -> dict[str, Any]:
    """Phase A of one part (a Ray task): its distinct prompts and what each trace refers to.

    Writes ``prompts/part-N.traces.arrow`` (per trace: ``prompt``, the index of its prompt among
    the part's distinct prompts, and ``sample_index``), then ``prompts/part-N.arrow``: per distinct prompt in
    order of first appearance, ``row`` (that index), ``prompt_id``, ``hash`` (of the normalised
    problem of its first trace), ``sig`` (MinHash) and ``shingles`` (their hashes; both empty
    unless ``near``), and ``hits`` (the collections it overlaps).
    """
    part: Part = task["part"]
    local_of: dict[str, int] = {}
    texts: list[str] = []
    per_trace = np.empty((part.num_rows, 2), dtype=np.int32)
    for first, batch in read_part(part, ["prompt_id", "prompt", "sample_index"], batch_rows=LIGHT_BATCH_ROWS):
        check_generation_rows(Path(part.path), batch, 0, first_row=part.first_row + first)
        encoded = batch.column("prompt_id").dictionary_encode()
        index = encoded.indices.to_numpy(zero_copy_only=False)
        _, first_row = np.unique(index, return_index=True)
        prompt_texts = batch.column("prompt")
        local = np.empty(len(encoded.dictionary), dtype=np.int32)
        for j, pid in enumerate(encoded.dictionary.to_pylist()):
            if pid not in local_of:
                local_of[pid] = len(local_of)
                texts.append(prompt_texts[int(first_row[j])].as_py() or "")
            local[j] = local_of[pid]
        per_trace[first:first + batch.num_rows, 0] = local[index]
        per_trace[first:first + batch.num_rows, 1] = batch.column("sample_index").to_numpy(zero_copy_only=False)
    problems = [dedup.normalize(prompt_problem(t)) for t in texts] if ctx.exact or ctx.index else []
    del texts
    n = len(local_of)
    sig = np.zeros((n, ctx.num_perm if ctx.near else 1), dtype=np.uint32)
    shingles, starts = np.zeros(0, dtype=np.uint64), np.zeros(n, dtype=np.int64)
    if ctx.near and n:
        shingles, starts = dedup.shingle_hashes(*dedup.word_ids(problems, normalized=True), ctx.ngram)
        sig = dedup.minhash_signatures(shingles, starts, ctx.num_perm, ctx.seed)
    hits = [sorted(ctx.index.hits(p)) for p in problems] if ctx.index else [[] for _ in range(n)]
    table = pa.table({
        "row": pa.array(np.arange(n), pa.int64()),
        "prompt_id": pa.array(list(local_of), pa.large_string()),
        "hash": pa.array(dedup.text_hashes(problems, normalized=True) if ctx.exact else np.zeros(n, np.uint64),
                         pa.uint64()),
        "sig": pa.FixedSizeListArray.from_arrays(pa.array(sig.reshape(-1), pa.uint32()), sig.shape[1]),
        "hits": pa.array(hits, pa.list_(pa.string())),
        "shingles": pa.LargeListArray.from_arrays(pa.array(np.append(starts, len(shingles)), pa.int64()),
                                                  pa.array(shingles, pa.uint64())),
    })
    write_arrow_atomic(pa.table({"prompt": per_trace[:, 0], "sample_index": per_trace[:, 1]}),
                       prompts_path(ctx.work, part.index, "traces"))
    write_arrow_atomic(table, prompts_path(ctx.work, part.index))  # last: its presence means the part is done
    return {"part": part.index, "prompts": n}


def _read(work: str, part: int, what: str = "") -> pa.Table:
    return read_arrow(prompts_path(work, part, what))


def prompt_fates(cfg: BuildConfig, parts: list[Part], runtime: Runtime, work: str) -> Prompts:
    """Phase A: every part's prompts (Ray tasks), then drop duplicate and contaminated prompts.

    The first prompt (in input order) of each group of duplicates is kept: exact duplicates share
    the normalised problem; near-duplicates (``near_dedup``) are the LSH candidates of a Ray
    shuffle of band keys whose exact Jaccard similarity of shingles reaches the threshold, as
    within a part (:func:`~llmdistill.builder.dedup.near_duplicates`). Contamination is checked on
    the prompts that are not duplicates, and counted per benchmark.
    """
    decontam = bool(cfg.decontam_benchmarks or cfg.decontam_extra_file)
    todo = [{"part": p} for p in parts if not prompts_path(work, p.index).is_file()]
    logger.info("phase A (prompts): %d part(s) to run, %d finished before", len(todo), len(parts) - len(todo))
    if todo:  # the benchmarks are read only when a part needs them
        ctx = PromptsContext(work=work, exact=cfg.dedup_prompts, near=cfg.dedup_prompts and cfg.near_dedup,
                             ngram=cfg.dedup_ngram, num_perm=cfg.minhash_num_perm, seed=cfg.seed,
                             index=build_index(cfg, cfg.data_paths) if decontam else None)
        for _ in map_parts(part_prompts, todo, ctx, runtime):
            pass
    if not parts:  # no rows at all: the steps of phase C say so
        none = np.zeros(0, dtype=np.int32)
        return Prompts(ids=pa.array([], pa.large_string()), fate=np.zeros(0, dtype=np.uint8),
                       split=np.zeros(0, dtype=bool), codes=none, sample_index=none, hits={})

    # number the distinct ids in order of first appearance: parts in order, each in its own order
    tables = [_read(work, p.index) for p in parts]
    encoded = pc.dictionary_encode(pa.concat_arrays([t.column("prompt_id").combine_chunks() for t in tables]))
    ids = encoded.dictionary
    all_codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int32)
    n = len(ids)
    hashes = np.zeros(n, dtype=np.uint64)
    n_parts = np.bincount(all_codes, minlength=n)
    codes = np.empty(sum(p.num_rows for p in parts), dtype=np.int32)
    samples = np.empty_like(codes)
    firsts: list[tuple[Part, np.ndarray, np.ndarray]] = []  # per part: its rows that are first appearances, their codes
    hit_codes: list[int] = []
    hit_names: list[list[str]] = []
    start = seen = 0
    for part, table in zip(parts, tables, strict=True):
        local_codes = all_codes[start:start + table.num_rows]
        start += table.num_rows
        first = np.flatnonzero(local_codes >= seen)  # codes are given in order, so new ones are the next ones
        seen += len(first)
        hashes[local_codes[first]] = table.column("hash").to_numpy()[first]
        firsts.append((part, first, local_codes[first]))
        if decontam:
            lengths = pc.list_value_length(table.column("hits")).to_numpy(zero_copy_only=False)
            for row in first[lengths[first] > 0]:
                hit_codes.append(int(local_codes[row]))
                hit_names.append(table.column("hits")[int(row)].as_py())
        per_trace = _read(work, part.index, "traces")
        rows = slice(part.offset, part.offset + part.num_rows)
        codes[rows] = local_codes[per_trace.column("prompt").to_numpy()]
        samples[rows] = per_trace.column("sample_index").to_numpy()
    del tables, all_codes

    fate = np.zeros(n, dtype=np.uint8)
    if cfg.dedup_prompts:
        dup = np.ones(n, dtype=bool)
        dup[np.unique(hashes, return_index=True)[1]] = False  # the first code of every hash
        if cfg.near_dedup:
            tasks = []
            for part, first, first_codes in firsts:
                take = ~dup[first_codes]
                if take.any():
                    tasks.append({"path": str(prompts_path(work, part.index)), "rows": first[take],
                                  "index": first_codes[take].astype(np.int64),
                                  "groups": np.zeros(int(take.sum()), dtype=np.int64)})
            dup[dedup.later_members(dedup.near_duplicate_pairs(tasks, cfg, runtime, exact=True))] = True
        fate[dup] = DUPLICATE
    hits: Counter = Counter()
    for code, names in zip(hit_codes, hit_names, strict=True):
        if fate[code] == KEPT:
            fate[code] = CONTAMINATED
            hits.update(names)
    for name, count in sorted(hits.items()):
        logger.warning("decontamination: %d prompt(s) overlap %s", count, name)
    logger.info("%d traces of %d prompts: %d duplicate, %d contaminated", len(codes), n,
                int((fate == DUPLICATE).sum()), int((fate == CONTAMINATED).sum()))
    return Prompts(ids=ids, fate=fate, split=n_parts > 1, codes=codes, sample_index=samples, hits=dict(sorted(hits.items())))
