"""Phase B (a Ray Data task or actor per part): the verdict on every trace, from the medium columns.

A part reads the completion text, finish reason, token count and reference of its rows, batch
by batch (never the top-k). For the traces of prompts phase A kept it runs the verifier
(:func:`~llmdistill.builder.verify.verify_all`, the checker registry eval uses), the
well-formedness and length filters, and completion dedup among the samples of each prompt that
lies wholly in this part. For traces whose duplicates may lie in another part (a prompt split
across parts, or ``dedup_completion_scope: global``) it stores an exact-text hash and a MinHash
signature instead, for the groupby of phase C.

The result is a small Arrow file per part (``rows/part-NNNNNN.arrow``, about 8 bytes per trace,
written atomically and last: its presence means the part is done), and beside it the hashes and
signatures of the traces that need them (``rows/part-NNNNNN.keys.arrow``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from llmdistill.builder import dedup, filters
from llmdistill.builder.tokenize import ShippedTokenizer
from llmdistill.builder.traces import Part, read_part
from llmdistill.builder.verify import check_references, verify_all
from llmdistill.builder.workfiles import arrow_metadata, write_arrow_atomic
from llmdistill.checking.checkers import CHECKERS
from llmdistill.config.base import ConfigError
from llmdistill.config.build import BuildConfig
from llmdistill.formats import check_generation_rows, shard_name

ROW_STEPS = ("truncated", "malformed", "length", "incorrect")


def row_steps(cfg: BuildConfig) -> list[str]:
    """The row-level filters this config runs, in order."""
    on = {"truncated": cfg.drop_truncated, "malformed": cfg.require_think, "length": True,
          "incorrect": not cfg.keep_incorrect}
    return [s for s in ROW_STEPS if on[s]]


@dataclass(frozen=True)
class RowsContext:
    """What every phase-B task shares."""

    cfg: BuildConfig
    kind: str
    reference_column: str | None
    work: str
    tokenizer: ShippedTokenizer


def rows_path(work: str | Path, part: int, what: str = "") -> Path:
    """``rows/part-N.arrow`` (verdicts) or, with ``what="keys"``, ``rows/part-N.keys.arrow``."""
    return Path(work) / "rows" / shard_name(part).replace(".parquet", f"{'.' + what if what else ''}.arrow")


def _token_counts(batch: pa.RecordBatch, ctx: RowsContext) -> np.ndarray:
    if ctx.kind == "generation":
        return pc.list_value_length(batch.column("completion_token_ids")).to_numpy(zero_copy_only=False)
    ids = ctx.tokenizer.get()(batch.column("completion").to_pylist(), add_special_tokens=False)["input_ids"]
    return np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))  # + EOS


def _references(batch: pa.RecordBatch, ctx: RowsContext, alive: np.ndarray, part: Part, first: int) -> list[Any]:
    if ctx.reference_column is None:
        return [None] * batch.num_rows
    refs = batch.column(ctx.reference_column).cast(pa.string()).to_pylist()
    gaps = [r for r in np.flatnonzero(alive) if refs[r] is None or refs[r] == ""]
    if gaps:
        row = gaps[0]
        ids = batch.column("prompt_id").to_pylist()
        raise ConfigError(
            f"verifier '{ctx.cfg.verifier}' needs a reference in column '{ctx.reference_column}', but {len(gaps)} row(s) "
            f"of {part.path} have none (first: row {part.first_row + first + row}, prompt_id {ids[row]}). Fill them, "
            "or use verifier: none.")
    return refs


def _columns(ctx: RowsContext) -> list[str]:
    cols = ["prompt_id", "completion", "finish_reason"]
    if ctx.kind == "generation":
        cols.append("completion_token_ids")
    return cols + ([ctx.reference_column] if ctx.reference_column else [])


def _flags(completions: list[str], finish: list[str], n_tokens: np.ndarray, correct: np.ndarray,
           cfg: BuildConfig) -> np.ndarray:
    """The first row-level filter each trace fails (1-based index into :func:`row_steps`), 0 if none."""
    fails = {"truncated": lambda: ~filters.not_truncated(finish),
             "malformed": lambda: ~filters.well_formed_mask(completions),
             "length": lambda: ~filters.length_mask(n_tokens, cfg.min_completion_tokens, cfg.max_completion_tokens),
             "incorrect": lambda: ~correct}
    flag = np.zeros(len(completions), dtype=np.uint8)
    for code, step in enumerate(row_steps(cfg), 1):
        flag[(flag == 0) & fails[step]()] = code
    return flag


def part_rows(task: dict[str, Any], ctx: RowsContext) -> dict[str, Any]:
    """Phase B of one part (a Ray task): verdicts, filters and dedup keys; writes ``rows/part-N.arrow``.

    Args:
        task: ``part`` (:class:`Part`), ``alive`` (bool per row: its prompt survived phase A) and
            ``cross`` (bool per row: its duplicates may lie in another part).
        ctx: the shared :class:`RowsContext`.

    Returns:
        Counts and seconds per step.
    """
    part: Part = task["part"]
    cfg = ctx.cfg
    started, cpu = time.time(), time.process_time()
    alive_all, cross_all = task["alive"], task["cross"]
    seconds = dict.fromkeys(("read", "verify", "filter", "dedup"), 0.0)
    out: dict[str, list[Any]] = {k: [] for k in ("correct", "flag", "n_tokens", "prompt", "completion", "cross")}
    t = time.process_time()
    for first, batch in read_part(part, _columns(ctx)):
        check_generation_rows(part.path, batch, 0, first_row=part.first_row + first)
        alive = alive_all[first:first + batch.num_rows]
        n_tokens = _token_counts(batch, ctx)
        refs = _references(batch, ctx, alive, part, first)
        live = np.flatnonzero(alive)
        completions = batch.column("completion").to_pylist()
        finish = batch.column("finish_reason").to_pylist()
        seconds["read"] += time.process_time() - t
        t = time.process_time()
        correct = np.zeros(batch.num_rows, dtype=bool)
        correct[live] = verify_all([completions[i] for i in live], [refs[i] for i in live], cfg)
        seconds["verify"] += time.process_time() - t
        t = time.process_time()
        flag = np.zeros(batch.num_rows, dtype=np.uint8)
        flag[live] = _flags([completions[i] for i in live], [finish[i] for i in live], n_tokens[live], correct[live], cfg)
        seconds["filter"] += time.process_time() - t
        t = time.process_time()
        keep = alive & (flag == 0)
        out["correct"].append(np.where(alive, correct, False))
        out["flag"].append(flag)
        out["n_tokens"].append(n_tokens)
        out["prompt"].extend(batch.column("prompt_id").to_pylist())
        out["completion"].extend(c if k else None for c, k in zip(completions, keep, strict=True))
        out["cross"].append(cross_all[first:first + batch.num_rows])
    verdicts, keys = _dedup_tables(out, alive_all, cfg, seconds)
    result = {"part": part.index, "rows": part.num_rows, "alive": int(alive_all.sum()), "keys": keys.num_rows,
              "seconds": {k: round(v, 4) for k, v in seconds.items()}, "wall_s": round(time.time() - started, 4),
              "cpu_s": round(time.process_time() - cpu, 4)}
    write_arrow_atomic(keys, rows_path(ctx.work, part.index, "keys"))
    write_arrow_atomic(verdicts.replace_schema_metadata({"result": json.dumps(result)}), rows_path(ctx.work, part.index))
    return result


def read_rows_result(work: str | Path, part: int) -> dict[str, Any] | None:
    """What a finished phase-B part reported (kept in its file), or None when it is not finished."""
    path = rows_path(work, part)
    if not path.is_file():
        return None
    return json.loads(arrow_metadata(path)[b"result"])


def _dedup_tables(out: dict[str, list[Any]], alive: np.ndarray, cfg: BuildConfig,
                  seconds: dict[str, float]) -> tuple[pa.Table, pa.Table]:
    """The part's verdicts (with local per-prompt duplicates), and the hashes + signatures of the
    traces whose duplicates phase C looks for across parts."""
    t = time.process_time()
    completions, prompts = out["completion"], out["prompt"]
    cross = np.concatenate(out["cross"]) if out["cross"] else np.zeros(0, dtype=bool)
    candidate = np.fromiter((c is not None for c in completions), dtype=bool, count=len(completions))
    dup = np.zeros(len(completions), dtype=bool)
    if cfg.dedup_completions:
        local = np.flatnonzero(candidate & ~cross)
        _, group, count = np.unique(np.asarray([prompts[i] for i in local], dtype=object), return_inverse=True,
                                    return_counts=True)
        shared = local[count[group] > 1]  # a prompt with one candidate has no duplicate
        if len(shared):
            near = dict(near=cfg.near_dedup, threshold=cfg.dedup_threshold, ngram=cfg.dedup_ngram,
                        num_perm=cfg.minhash_num_perm, seed=cfg.seed)
            dup[shared] = dedup.duplicates([completions[i] for i in shared], **near, groups=group[count[group] > 1])
    remote = np.flatnonzero(candidate & cross) if cfg.dedup_completions else np.zeros(0, dtype=np.int64)
    texts = [dedup.normalize(completions[i]) for i in remote]
    sigs = np.zeros((len(remote), cfg.minhash_num_perm), dtype=np.uint32)
    if len(remote) and cfg.near_dedup:
        sigs = dedup.signatures(texts, cfg.dedup_ngram, cfg.minhash_num_perm, cfg.seed, normalized=True)
    seconds["dedup"] += time.process_time() - t
    keys = pa.table({
        "row": pa.array(remote, pa.int64()),
        "hash": pa.array(dedup.text_hashes(texts, normalized=True), pa.uint64()),
        "sig": pa.FixedSizeListArray.from_arrays(pa.array(sigs.reshape(-1), pa.uint32()), cfg.minhash_num_perm),
    })
    verdicts = pa.table({
        "correct": pa.array(np.concatenate(out["correct"]), mask=~alive),
        "flag": np.concatenate(out["flag"]),
        "dup": dup,
        "n_tokens": np.concatenate(out["n_tokens"]).astype(np.int32),
    })
    return verdicts, keys


def check_reference_column(cfg: BuildConfig, columns: frozenset[str], kind: str) -> str | None:
    """The column holding the verifier's reference, checked to exist before any work."""
    needs = CHECKERS[cfg.verifier].needs
    if needs is None:
        return None
    column = cfg.answer_column if needs == "answer" else cfg.tests_column
    if column not in columns:
        check_references(sorted(columns), None, cfg, column, [])  # raises, naming the column
    return column
