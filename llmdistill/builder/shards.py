"""Phase D (a Ray Data task or actor per part): the part's kept traces become built shards of bounded size.

A part reads its heavy columns (token ids, teacher top-k) a batch at a time and only keeps the
rows phase C kept. Each trace is tokenised and aligned for the student
(:func:`~llmdistill.builder.tokenize.batch_documents`); documents are packed best-fit in windows
of about ``pack_window_tokens`` tokens (the worst-filled sequences of a window wait for the next
one), their teacher top-k is encoded (:mod:`llmdistill.codec`), and rows are written as they are
made: a Parquet row group every ``max_row_group_mb``, a new shard every ``max_shard_mb``. Memory
is one window, whatever the size of the part or of the input.

Everything goes to ``shards/part-NNNNNN/`` in the build's work directory; ``done.json`` is
written last, so a killed part is redone whole and a finished one is never redone.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from llmdistill.builder.pack import best_fit_decreasing, pack_row, split_overlong
from llmdistill.builder.report import length_histogram
from llmdistill.builder.teachers import TeacherMix, TeacherRows, merge_batch
from llmdistill.builder.tokenize import Document, DocumentSpec, ShippedTokenizer, batch_documents
from llmdistill.builder.traces import Part, read_part, select_rows
from llmdistill.codec import encode_topk
from llmdistill.config.build import BuildConfig
from llmdistill.formats import (
    BUILT_COLUMNS,
    BUILT_SCHEMA,
    BUILT_SCHEMA_VERSION,
    SchemaError,
    _metadata,
    check_generation_rows,
)

DONE = "done.json"
CARRY_FILL = 0.98  # sequences filled less than this wait for the next window (unless it is the last)
COVERAGE_BINS = 1000


@dataclass(frozen=True)
class ShardsContext:
    """What every phase-D task shares (``mix``: the teachers to merge, whose top-k replaces the
    input's, of ``input_k`` entries, before tokenising)."""

    cfg: BuildConfig
    spec: DocumentSpec
    meta: dict[str, Any]
    work: str
    tokenizer: ShippedTokenizer
    mix: TeacherMix | None = None
    input_k: int = 0


def part_dir(work: str | Path, part: int) -> Path:
    return Path(work) / "shards" / f"part-{part:06d}"


class BuiltShardWriter:
    """Built shards written a row group at a time, each shard under a temporary name until closed.

    Row groups hold at most ``max_group_bytes`` and shards at most ``max_shard_bytes`` (Arrow
    bytes, before compression: the files are smaller) and ``max_rows`` rows.
    """

    def __init__(self, directory: Path, meta: dict[str, Any], max_shard_bytes: int, max_group_bytes: int,
                 max_rows: int) -> None:
        for key in ("kd", "k", "vocab_size", "tokenizer_fingerprint"):
            if key not in meta:
                raise SchemaError(f"built shard metadata needs '{key}'")
        self.directory, self.limits = directory, (max_shard_bytes, max_group_bytes, max_rows)
        self.schema = pa.schema(list(BUILT_COLUMNS.items())).with_metadata(
            _metadata(BUILT_SCHEMA, BUILT_SCHEMA_VERSION, meta))
        self.shards: list[dict[str, Any]] = []
        self.pending: list[dict[str, Any]] = []
        self.pending_bytes = 0
        self.writer: pq.ParquetWriter | None = None
        self.shard_bytes = self.shard_rows = 0

    def add(self, row: dict[str, Any]) -> None:
        size = 9 * len(row["input_ids"]) + len(row.get("topk") or b"") + 16 * len(row["doc_ids"]) + 64
        max_shard, max_group, max_rows = self.limits
        if self.writer is not None and (self.shard_bytes + self.pending_bytes + size > max_shard
                                        or self.shard_rows + len(self.pending) >= max_rows):
            self._close_shard()
        self.pending.append(row)
        self.pending_bytes += size
        if self.pending_bytes >= max_group or self.shard_rows + len(self.pending) >= max_rows:
            self._write_group()

    def _path(self, temporary: bool) -> Path:
        name = f"shard-{len(self.shards):05d}.parquet"
        return self.directory / (f".{name}.tmp-{os.getpid()}" if temporary else name)

    def _write_group(self) -> None:
        if not self.pending:
            return
        if self.writer is None:
            self.writer = pq.ParquetWriter(self._path(True), self.schema, compression="zstd")
        table = pa.table({name: pa.array([r.get(name) for r in self.pending], type=typ)
                          for name, typ in BUILT_COLUMNS.items()}, schema=self.schema)
        self.writer.write_table(table, row_group_size=len(self.pending))
        self.shard_bytes += self.pending_bytes
        self.shard_rows += len(self.pending)
        self.pending, self.pending_bytes = [], 0

    def _close_shard(self) -> None:
        self._write_group()
        if self.writer is None:
            return
        self.writer.close()
        tmp, final = self._path(True), self._path(False)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        self.shards.append({"name": final.name, "rows": self.shard_rows, "bytes": final.stat().st_size})
        self.writer, self.shard_bytes, self.shard_rows = None, 0, 0

    def close(self) -> list[dict[str, Any]]:
        """Finish the last shard; returns every shard's name, rows and bytes."""
        self._close_shard()
        return self.shards


class PartStats:
    """What a part reports: counts, the length histogram, the teacher's top-k coverage, seconds per step."""

    def __init__(self, max_length: int) -> None:
        self.max_length = max_length
        self.counts = dict.fromkeys(("documents", "tokens", "target_tokens", "rows", "signal_bytes",
                                     "overlong_dropped", "overlong_split", "prompt_template_mismatches"), 0)
        self.lengths = np.zeros(32, dtype=np.int64)
        self.coverage = np.zeros(COVERAGE_BINS, dtype=np.int64)
        self.coverage_sum = 0.0
        self.overlong_rows: list[int] = []
        self.seconds = dict.fromkeys(("read", "merge", "tokenize", "pack", "encode", "write"), 0.0)

    def add_documents(self, docs: list[Document], kd: bool) -> None:
        lengths = np.asarray([len(d) for d in docs])
        self.counts["documents"] += len(docs)
        self.counts["tokens"] += int(lengths.sum())
        self.counts["target_tokens"] += int(sum(int(d.loss_mask.sum()) for d in docs))
        self.lengths += np.asarray(length_histogram(lengths, self.max_length)["counts"])
        if kd and docs:
            mass = np.concatenate([np.exp(d.topk()[1]).sum(axis=1, dtype=np.float64) for d in docs])
            self.coverage += np.bincount(np.minimum((mass * COVERAGE_BINS).astype(np.int64), COVERAGE_BINS - 1),
                                         minlength=COVERAGE_BINS)
            self.coverage_sum += float(mass.sum())

    def to_dict(self) -> dict[str, Any]:
        return {**self.counts, "length_counts": self.lengths.tolist(), "coverage_counts": self.coverage.tolist(),
                "coverage_sum": self.coverage_sum, "overlong_rows": self.overlong_rows,
                "seconds": {k: round(v, 4) for k, v in self.seconds.items()}}


def _emit(docs: list[Document], bins: list[list[int]], writer: BuiltShardWriter, ctx: ShardsContext,
          stats: PartStats) -> None:
    """Write one packed row per bin, with its encoded teacher top-k."""
    meta = ctx.meta
    for members in bins:
        packed = [docs[i] for i in members]
        t = time.process_time()
        row = pack_row(packed)
        stats.seconds["pack"] += time.process_time() - t
        if meta["kd"]:
            t = time.process_time()
            blocks = [d.topk() for d in packed]
            row["topk"] = encode_topk(np.concatenate([b[0] for b in blocks]), np.concatenate([b[1] for b in blocks]),
                                      meta["vocab_size"], meta["codec_bits"])
            stats.counts["signal_bytes"] += len(row["topk"])
            stats.seconds["encode"] += time.process_time() - t
        t = time.process_time()
        writer.add(row)
        stats.counts["rows"] += 1
        stats.seconds["write"] += time.process_time() - t


def _flush(window: list[Document], writer: BuiltShardWriter, ctx: ShardsContext, stats: PartStats,
           final: bool) -> list[Document]:
    """Pack a window and write its rows; returns the documents that wait for the next window."""
    if not window:
        return []
    t = time.process_time()
    bins = best_fit_decreasing([len(d) for d in window], ctx.cfg.max_length)
    fill = [sum(len(window[i]) for i in b) for b in bins]
    low = [b for b, f in zip(bins, fill, strict=True) if f < CARRY_FILL * ctx.cfg.max_length]
    carry: list[int] = []
    if not final and sum(len(window[i]) for b in low for i in b) <= ctx.cfg.pack_window_tokens // 2:
        carry = sorted(i for b in low for i in b)
        bins = [b for b, f in zip(bins, fill, strict=True) if f >= CARRY_FILL * ctx.cfg.max_length]
    stats.seconds["pack"] += time.process_time() - t
    _emit(window, bins, writer, ctx, stats)
    return [window[i] for i in carry]


def _checked(batches: Iterator[tuple[int, pa.RecordBatch]], part: Part,
             ctx: ShardsContext) -> Iterator[tuple[int, pa.RecordBatch]]:
    """Every batch read is checked whole (top-k shape, log-probs, and ids in the vocabulary wherever
    the student reads the teacher's ids: its top-k, or its completion tokens with one tokenizer)."""
    vocab = ctx.meta["vocab_size"] if ctx.cfg.kd or ctx.spec.same_tokenizer else None
    for first, batch in batches:
        k = ctx.input_k if ctx.mix else ctx.spec.k  # with teachers, the input's own k (before the merge)
        check_generation_rows(part.path, batch, k, vocab, first_row=part.first_row + first)
        yield first, batch


def part_shards(task: dict[str, Any], ctx: ShardsContext) -> dict[str, Any]:
    """Phase D of one part (a Ray task): tokenise, align, pack, encode and write its kept traces.

    Args:
        task: ``part`` (:class:`Part`), ``keep`` (bool per row of the part) and, with teachers to
            merge, ``sources`` (:func:`~llmdistill.builder.teachers.part_sources`).
        ctx: the shared :class:`ShardsContext`.

    Returns:
        The part's counts, histograms, shards and seconds per step (also in its ``done.json``).
    """
    part: Part = task["part"]
    keep: np.ndarray = task["keep"]
    cfg, spec = ctx.cfg, ctx.spec
    started, cpu = time.time(), time.process_time()
    out = part_dir(ctx.work, part.index)
    shutil.rmtree(out, ignore_errors=True)  # what a killed attempt left
    out.mkdir(parents=True)
    tokenizer = ctx.tokenizer.get()
    writer = BuiltShardWriter(out, ctx.meta, cfg.max_shard_mb << 20, cfg.max_row_group_mb << 20, cfg.rows_per_shard)
    stats, window, window_tokens, cache = PartStats(cfg.max_length), [], 0, {}
    t = time.process_time()
    route = [cfg.teacher_route_column] if ctx.mix and cfg.teacher_route_column else []
    batches = read_part(part, spec.columns(cfg.kd) + route)
    readers = {n: TeacherRows(ctx.mix, i) for i, n in enumerate(ctx.mix.names) if n != ctx.mix.own} if ctx.mix else {}
    for _, rows, batch in select_rows(_checked(batches, part, ctx), keep):
        stats.seconds["read"] += time.process_time() - t
        if len(rows):
            if ctx.mix:
                t = time.process_time()
                batch = merge_batch(ctx.mix, readers, batch, rows, task["sources"],
                                    f"{part.path} (part from row {part.first_row})", ctx.input_k)
                stats.seconds["merge"] += time.process_time() - t
            t = time.process_time()
            docs, mismatches = batch_documents(batch, rows, tokenizer, cfg, spec, cache)
            fitting, dropped, split = split_overlong(docs, cfg.max_length, cfg.overlong)
            stats.seconds["tokenize"] += time.process_time() - t
            stats.counts["prompt_template_mismatches"] += mismatches
            stats.counts["overlong_dropped"] += dropped
            stats.counts["overlong_split"] += split
            if dropped:
                stats.overlong_rows += sorted({d.row for d in docs} - {d.row for d in fitting})
            stats.add_documents(fitting, cfg.kd)
            window += fitting
            window_tokens += sum(len(d) for d in fitting)
            if window_tokens >= cfg.pack_window_tokens:
                window = _flush(window, writer, ctx, stats, final=False)
                window_tokens = sum(len(d) for d in window)
        t = time.process_time()
    _flush(window, writer, ctx, stats, final=True)
    result = {"part": part.index, "shards": writer.close(), **stats.to_dict(),
              "wall_s": round(time.time() - started, 4), "cpu_s": round(time.process_time() - cpu, 4)}
    tmp = out / f".{DONE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(result))
    os.replace(tmp, out / DONE)
    return result


def read_done(work: str | Path, part: int) -> dict[str, Any] | None:
    """The ``done.json`` of a finished part, or None."""
    path = part_dir(work, part) / DONE
    return json.loads(path.read_text()) if path.is_file() else None
