"""Phase A (driver, light columns only): which prompts are dropped before any trace is read.

Reads ``prompt_id``, ``prompt`` and ``sample_index`` of every part, batch by batch, and gives
every distinct prompt id a code in order of first appearance. Duplicate prompts (exact and near,
:mod:`~llmdistill.builder.dedup`) and prompts that overlap a benchmark
(:mod:`~llmdistill.builder.decontam`) are decided on the distinct prompts; the result, one step
per prompt, is what the per-part phases receive. Memory: the distinct prompts' text, and 8 bytes
per trace.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llmdistill.builder import dedup
from llmdistill.builder.decontam import build_index, contaminated
from llmdistill.builder.traces import Part, read_part
from llmdistill.config.build import BuildConfig
from llmdistill.formats import check_generation_rows
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
        ids: prompt id of each code, in order of first appearance.
        fate: uint8 per code: :data:`KEPT`, :data:`DUPLICATE` or :data:`CONTAMINATED`.
        split: bool per code: its traces lie in more than one part.
        codes: int32 per trace (input order): its prompt's code.
        sample_index: int32 per trace.
        hits: contaminated prompts per benchmark.
    """

    ids: list[str]
    fate: np.ndarray
    split: np.ndarray
    codes: np.ndarray
    sample_index: np.ndarray
    hits: dict[str, int]

    def rows(self, part: Part) -> slice:
        return slice(part.offset, part.offset + part.num_rows)


def read_prompts(parts: list[Part]) -> tuple[list[str], list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Distinct prompt ids and their first text, and per trace its code and sample index, plus
    per code the number of parts it appears in."""
    code_of: dict[str, int] = {}
    texts: list[str] = []
    codes = np.empty(sum(p.num_rows for p in parts), dtype=np.int32)
    samples = np.empty_like(codes)
    n_parts = np.zeros(0, dtype=np.int32)
    for part in parts:
        seen = set()
        for first, batch in read_part(part, ["prompt_id", "prompt", "sample_index"], batch_rows=LIGHT_BATCH_ROWS):
            check_generation_rows(part.path, batch, 0, first_row=part.first_row + first)
            encoded = batch.column("prompt_id").dictionary_encode()
            distinct = encoded.dictionary.to_pylist()
            index = encoded.indices.to_numpy(zero_copy_only=False)
            _, first_row = np.unique(index, return_index=True)
            prompt_texts = batch.column("prompt").to_pylist()
            local = np.empty(len(distinct), dtype=np.int32)
            for j, pid in enumerate(distinct):
                if pid not in code_of:
                    code_of[pid] = len(code_of)
                    texts.append(prompt_texts[first_row[j]] or "")
                local[j] = code_of[pid]
            rows = slice(part.offset + first, part.offset + first + batch.num_rows)
            codes[rows] = local[index]
            samples[rows] = batch.column("sample_index").to_numpy(zero_copy_only=False)
            seen.update(local.tolist())
        n_parts = np.concatenate([n_parts, np.zeros(len(code_of) - len(n_parts), dtype=np.int32)])
        n_parts[np.fromiter(seen, dtype=np.int64, count=len(seen))] += 1
    return list(code_of), texts, codes, samples, n_parts


def prompt_fates(cfg: BuildConfig, parts: list[Part]) -> Prompts:
    """Phase A: read the light columns, then drop duplicate and contaminated prompts.

    Contamination is checked on the prompts that are not duplicates, and counted per benchmark.
    """
    ids, texts, codes, samples, n_parts = read_prompts(parts)
    fate = np.zeros(len(ids), dtype=np.uint8)
    problems = [prompt_problem(t) for t in texts]
    del texts
    if cfg.dedup_prompts:
        dup = dedup.duplicates(problems, near=cfg.near_dedup, threshold=cfg.dedup_threshold, ngram=cfg.dedup_ngram,
                               num_perm=cfg.minhash_num_perm, seed=cfg.seed)
        fate[dup] = DUPLICATE
    hits: dict[str, int] = {}
    if cfg.decontam_benchmarks or cfg.decontam_extra_file:
        index = build_index(cfg, cfg.data_paths)
        alive = np.flatnonzero(fate == KEPT)
        found, counter = contaminated([problems[i] for i in alive], index)
        fate[alive[[bool(names) for names in found]]] = CONTAMINATED
        hits = dict(sorted(counter.items()))
        for name, count in hits.items():
            logger.warning("decontamination: %d prompt(s) overlap %s", count, name)
    logger.info("%d traces of %d prompts: %d duplicate, %d contaminated", len(codes), len(ids),
                int((fate == DUPLICATE).sum()), int((fate == CONTAMINATED).sum()))
    return Prompts(ids=ids, fate=fate, split=n_parts > 1, codes=codes, sample_index=samples, hits=hits)
