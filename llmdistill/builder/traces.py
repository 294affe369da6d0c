"""The build's input: generation shards (or a plain dataset of text traces) cut into parts.

Nothing here holds a whole input. A generation directory is described by its shards' footers
(:func:`llmdistill.formats.read_generation_footer`); the work is cut into :class:`Part` s of
whole Parquet row groups of at most ``part_mb`` on disk, and a part is read a bounded batch at a
time, only the columns a step needs (:func:`read_part`). A plain dataset (the SFT-only path) is
first written as Parquet parts of the same shape into the build's work directory, so both inputs
run through one code path.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from llmdistill.config.base import ConfigError, looks_like_local_path
from llmdistill.config.build import BuildConfig
from llmdistill.formats import (
    SHARD_GLOB,
    GenerationShard,
    RowGroup,
    SchemaError,
    is_generation_dir,
    iter_generation_batches,
    list_shards,
    read_generation_footer,
    shard_name,
)
from llmdistill.log import get_logger
from llmdistill.prompts import prompt_hash

logger = get_logger(__name__)

BATCH_BYTES = 32 << 20  # uncompressed bytes of one batch read from a part
DATASET_ROWS_PER_GROUP = 2048


@dataclass
class Ragged:
    """A list column as one flat array and offsets: ``values[offsets[i]:offsets[i+1]]`` is row ``i``."""

    values: np.ndarray
    offsets: np.ndarray

    @classmethod
    def from_arrow(cls, array: pa.Array | pa.ChunkedArray) -> Ragged:
        """One batch's list column (a chunked column must have one chunk: batches are never joined)."""
        if isinstance(array, pa.ChunkedArray):
            if array.num_chunks != 1:
                raise ValueError(f"expected one chunk, got {array.num_chunks}: read the column batch by batch")
            array = array.chunk(0)
        offsets = array.offsets.to_numpy().astype(np.int64)
        return cls(values=array.flatten().to_numpy(zero_copy_only=False), offsets=offsets - offsets[0])

    @classmethod
    def from_lists(cls, rows: list[list[int]], dtype: Any = np.int32) -> Ragged:
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        values = np.fromiter((x for r in rows for x in r), dtype=dtype, count=int(offsets[-1]))
        return cls(values=values, offsets=offsets)

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i]:self.offsets[i + 1]]

    def __len__(self) -> int:
        return len(self.offsets) - 1


@dataclass(frozen=True)
class Part:
    """A unit of work: consecutive row groups of one shard.

    Attributes:
        index: position in the build (parts are numbered in input order).
        path: the shard.
        row_groups: its row groups (file indices).
        first_row: row number (in the shard) of the part's first row.
        offset: number of input traces before this part (its first row's global index).
        num_rows: traces in the part.
        completion_tokens: completion tokens in the part (0 for a dataset).
        batch_rows: rows per read batch (about :data:`BATCH_BYTES` each).
    """

    index: int
    path: str
    row_groups: tuple[int, ...]
    first_row: int
    offset: int
    num_rows: int
    completion_tokens: int
    batch_rows: int


@dataclass(frozen=True)
class BuildInput:
    """What the build reads.

    Attributes:
        kind: ``generation`` or ``dataset``.
        shards: the shards (a dataset: the Parquet files it was written to).
        k: top-k entries per position (0 for a dataset).
        teacher: the teacher recorded in the shards (None for a dataset).
        columns: columns every shard has.
    """

    kind: str
    shards: tuple[GenerationShard, ...]
    k: int
    teacher: str | None
    columns: frozenset[str]

    @property
    def num_rows(self) -> int:
        return sum(s.num_rows for s in self.shards)


def find_input(cfg: BuildConfig) -> str:
    """``generation`` or ``dataset``: the kind of ``input_path``, checked before any work.

    Raises:
        ConfigError: a path that does not exist, a directory without shards, or ``kd: true`` with a
            plain dataset (no teacher log-probs to distil).
    """
    path = Path(cfg.input_path)
    if path.is_dir() and not any(path.rglob(SHARD_GLOB)):
        raise ConfigError(f"input_path {path} holds no shards ({SHARD_GLOB}): point it at the output_dir of "
                          "`llmdistill generate` or `score`, or at a .jsonl/.parquet dataset file")
    if not path.exists() and looks_like_local_path(cfg.input_path):
        raise ConfigError(f"input_path {path} does not exist (and is not a hub dataset id): fix the path")
    kind = cfg.input_format
    if kind == "auto":
        kind = "generation" if is_generation_dir(cfg.input_path) else "dataset"
    if kind == "dataset" and cfg.kd:
        raise ConfigError(
            f"{cfg.input_path} is a plain dataset of text traces: it has no teacher log-probs for token-level KD. "
            "Build it SFT-only with `kd: false`, or score it first with `llmdistill score` and build from that output."
        )
    return kind


def open_generation(cfg: BuildConfig, needed: list[str]) -> BuildInput:
    """The footers of every generation shard, checked: schema, version, columns, one ``k``.

    Raises:
        SchemaError: naming the shard.
    """
    paths = list_shards(cfg.input_path)
    shards = tuple(read_generation_footer(p, needed) for p in paths)
    ks = sorted({s.k for s in shards})
    if len(ks) > 1:
        raise SchemaError(f"shards in {cfg.input_path} mix top-k sizes {ks}: generate them with one logprobs_top_k")
    columns = frozenset.intersection(*(frozenset(s.columns) for s in shards))
    logger.info("%d generation shard(s), %d traces, %d completion tokens (top-%d) in %s", len(shards),
                sum(s.num_rows for s in shards), sum(g.completion_tokens for s in shards for g in s.row_groups),
                ks[0], cfg.input_path)
    return BuildInput("generation", shards, ks[0], shards[0].teacher, columns)


def plan_parts(inp: BuildInput, part_mb: int) -> list[Part]:
    """Cut the input into parts of consecutive row groups of at most ``part_mb`` MB on disk
    (a larger row group is a part of its own). Depends on the input and ``part_mb`` only."""
    parts: list[Part] = []
    offset = 0
    budget = part_mb << 20
    for shard in inp.shards:
        run: list[RowGroup] = []
        for group in (*shard.row_groups, None):
            if run and (group is None or sum(g.compressed_bytes for g in run) + group.compressed_bytes > budget):
                rows = sum(g.num_rows for g in run)
                per_row = max(1, sum(g.bytes for g in run) // max(rows, 1))
                parts.append(Part(len(parts), str(shard.path), tuple(g.index for g in run), run[0].first_row, offset,
                                  rows, sum(g.completion_tokens for g in run), max(1, min(4096, BATCH_BYTES // per_row))))
                offset += rows
                run = []
            if group is not None and group.num_rows:
                run.append(group)
    return parts


def read_part(part: Part, columns: list[str], batch_rows: int | None = None) -> Iterator[tuple[int, pa.RecordBatch]]:
    """The rows of a part, batch by batch: ``(row index in the part, batch)``; columns as asked.

    ``batch_rows`` (default: the part's, about :data:`BATCH_BYTES` of all columns) can be larger
    when only light columns are read.
    """
    for first, batch in iter_generation_batches(part.path, columns, list(part.row_groups),
                                                batch_rows or part.batch_rows):
        yield first - part.first_row, batch


def select_rows(batches: Iterable[tuple[int, pa.RecordBatch]],
                keep: np.ndarray) -> Iterator[tuple[int, np.ndarray, pa.RecordBatch]]:
    """The kept rows of each batch, batch by batch (batches are never joined, so a list column may
    hold more values in all than one Arrow array can): ``(first row, kept rows, their batch)``.

    Args:
        batches: ``(row index of the first row, batch)`` as :func:`read_part` yields them.
        keep: bool per row of all the batches.
    """
    for first, batch in batches:
        mask = keep[first:first + batch.num_rows]
        yield first, first + np.flatnonzero(mask), batch.filter(pa.array(mask)) if not mask.all() else batch


# ---------------------------------------------------------------------------------------
# A plain dataset of text traces (SFT only)


def _read_dataset(cfg: BuildConfig) -> Any:
    """The dataset as HF ``datasets`` loads it: memory-mapped Arrow in its cache, read batch by batch."""
    import datasets

    path = Path(cfg.input_path)
    if path.is_file():
        builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(path.suffix)
        if builder is None:
            raise ConfigError(f"input_path {path}: use a .jsonl, .json or .parquet file, or a generation directory")
        hf_logger = logging.getLogger("datasets")
        level = hf_logger.level
        hf_logger.setLevel(logging.CRITICAL)  # its loader logs a traceback of a malformed file: one line here
        try:
            return datasets.load_dataset(builder, data_files=str(path), split="train")
        except datasets.exceptions.DatasetGenerationError as err:
            raise ConfigError(f"input_path {path} could not be read as {builder}: {err.__cause__ or err}. Fix the file "
                              "(a .jsonl file holds one JSON object per line)") from None
        finally:
            hf_logger.setLevel(level)
    if path.is_dir():
        raise ConfigError(f"input_path {path} holds shards of another kind than generation output: point it at the "
                          "output_dir of `llmdistill generate` or `score`")
    try:
        return datasets.load_dataset(cfg.input_path, split=cfg.dataset_split)
    except (OSError, ValueError) as err:
        raise ConfigError(f"could not load dataset {cfg.input_path} ({cfg.dataset_split}): {err}. Check the id and "
                          "dataset_split, or point input_path at a local file") from None


def _kind(value: Any, want: str = "text") -> str:
    return "null" if value is None else f"of type {type(value).__name__}, not {want}"


def _split_messages(messages: Any, cfg: BuildConfig, where: str) -> tuple[str, str]:
    """(prompt as JSON messages, completion) of one row's chat messages."""
    col = cfg.messages_column
    if isinstance(messages, str):
        raise ConfigError(f"{where}: '{col}' is a string (JSON?), not a list of messages: store it as a list of "
                          "{\"role\": ..., \"content\": ...} objects (decode the string when writing the file)")
    if not isinstance(messages, list):
        raise ConfigError(f"{where}: '{col}' is {_kind(messages, 'a list')}; it must be a list of "
                          "{\"role\": ..., \"content\": ...} objects: fill it in or remove the row")
    for j, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ConfigError(f"{where}: '{col}' message {j} is {_kind(m, 'an object')}; it must be a "
                              "{\"role\": ..., \"content\": ...} object")
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                got = "missing" if key not in m else _kind(m[key])
                raise ConfigError(f"{where}: '{col}' message {j} has '{key}' {got} (keys {sorted(m)}); give every "
                                  "message a text 'role' and 'content', or remove the row")
    last = max((j for j, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise ConfigError(f"{where}: '{col}' has no assistant message (the last one is the completion): add it or "
                          "remove the row")
    if not any(m["role"] == "user" for m in messages[:last]):
        raise ConfigError(f"{where}: '{col}' has no user message before its last assistant message, so the trace "
                          "has no prompt: add the user turn or remove the row")
    prompt = [{"role": m["role"], "content": m["content"]} for m in messages[:last]]
    return json.dumps(prompt), messages[last]["content"]


def _split_record(rec: dict[str, Any], cfg: BuildConfig, index: int) -> tuple[str, str]:
    """(prompt, completion) of one dataset record; the prompt as JSON messages or plain text.

    Raises:
        ConfigError: naming the input, the row, the column and the fix (a null, non-text or
            malformed value is never made into a trace).
    """
    where = f"{cfg.input_path}, row {index}"
    messages = rec.get(cfg.messages_column)
    if cfg.messages_column in rec and (messages or not {cfg.prompt_column, cfg.completion_column} <= rec.keys()):
        return _split_messages(messages, cfg, where)
    if cfg.prompt_column not in rec or cfg.completion_column not in rec:
        raise ConfigError(
            f"{where}: needs a '{cfg.messages_column}' column or both '{cfg.prompt_column}' "
            f"and '{cfg.completion_column}'; it has {sorted(rec)}. Set messages_column or prompt_column/completion_column."
        )
    pair = rec[cfg.prompt_column], rec[cfg.completion_column]
    for col, value in zip((cfg.prompt_column, cfg.completion_column), pair, strict=True):
        if not isinstance(value, str):
            raise ConfigError(f"{where}: '{col}' is {_kind(value)}; fill in the text or remove the row")
    return pair


def dataset_schema(cfg: BuildConfig, columns: list[str]) -> pa.Schema:
    """The columns a plain dataset with ``columns`` is written with.

    Raises:
        ConfigError: it has neither a messages column nor the prompt and completion columns.
    """
    if cfg.messages_column not in columns and not {cfg.prompt_column, cfg.completion_column} <= set(columns):
        raise ConfigError(
            f"{cfg.input_path}: needs a '{cfg.messages_column}' column or both '{cfg.prompt_column}' and "
            f"'{cfg.completion_column}'; it has {sorted(columns)}. Set messages_column or prompt_column/completion_column."
        )
    extra = [c for c in dict.fromkeys((cfg.answer_column, cfg.tests_column)) if c in columns]
    return pa.schema([("prompt_id", pa.string()), ("sample_index", pa.int32()), ("prompt", pa.string()),
                      ("completion", pa.string()), ("finish_reason", pa.string())] + [(c, pa.string()) for c in extra])


def _trace_columns(batch: dict[str, list[Any]], indices: list[int], cfg: BuildConfig,
                   extra: list[str]) -> dict[str, list[Any]]:
    """One batch of dataset records as text-trace columns (``sample_index`` is numbered afterwards).

    Raises:
        ConfigError: a bad row, named by its index in the dataset (:func:`_split_record`).
    """
    prompts, completions, ids = [], [], []
    for j, index in enumerate(indices):
        rec = {name: values[j] for name, values in batch.items()}
        prompt, completion = _split_record(rec, cfg, index)
        ids.append(str(rec[cfg.id_column]) if rec.get(cfg.id_column) is not None else prompt_hash(prompt))
        prompts.append(prompt)
        completions.append(completion)
    return {"prompt_id": ids, "prompt": prompts, "completion": completions, "finish_reason": ["stop"] * len(ids),
            **{c: [None if v is None else str(v) for v in batch[c]] for c in extra}}


def sample_numbers(prompt_ids: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Per row, how many earlier rows have its prompt id (0, 1, ...): the traces' ``sample_index``.

    Memory: the distinct ids, and 16 bytes per row.
    """
    codes = pc.index_in(prompt_ids, value_set=pc.unique(prompt_ids)).to_numpy(zero_copy_only=False)
    order = np.argsort(codes, kind="stable")  # rows grouped by id, each group in row order
    group = codes[order]
    starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
    first = np.repeat(starts, np.diff(np.r_[starts, len(group)]))
    numbers = np.empty(len(codes), dtype=np.int32)
    numbers[order] = np.arange(len(codes)) - first
    return numbers


def write_dataset(cfg: BuildConfig, path: Path) -> int:
    """Write a plain dataset to ``path`` as text traces, one Parquet row group of
    :data:`DATASET_ROWS_PER_GROUP` rows at a time; the number of traces.

    The records are split into prompt and completion by ``datasets``' own ``map`` over
    ``cfg.workers`` processes (default: the machine's cores), into memory-mapped Arrow files
    beside ``path`` that are deleted at the end; the driver then numbers each prompt's samples
    (:func:`sample_numbers`) and writes the rows batch by batch.

    Raises:
        ConfigError: the dataset cannot be read, or a bad row (named by its index).
    """
    import datasets

    dataset = _read_dataset(cfg)
    schema = dataset_schema(cfg, dataset.column_names)
    extra = schema.names[5:]
    workers = max(1, min(cfg.workers or os.cpu_count() or 1, len(dataset) // DATASET_ROWS_PER_GROUP))
    cache = path.with_name(f"{path.name}.records.arrow")
    features = datasets.Features({name: datasets.Value("string") for name in schema.names if name != "sample_index"})
    progress = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        traces = dataset.map(_trace_columns, batched=True, batch_size=DATASET_ROWS_PER_GROUP, with_indices=True,
                             num_proc=workers if workers > 1 else None, remove_columns=dataset.column_names,
                             fn_kwargs={"cfg": cfg, "extra": extra}, features=features, cache_file_name=str(cache))
        table = traces.data.table
        samples = sample_numbers(table.column("prompt_id"))
        with pq.ParquetWriter(path, schema, compression="zstd") as writer:
            for start in range(0, table.num_rows, DATASET_ROWS_PER_GROUP):
                rows = table.slice(start, DATASET_ROWS_PER_GROUP)
                rows = rows.append_column("sample_index", pa.array(samples[start:start + rows.num_rows]))
                writer.write_table(rows.select(schema.names).cast(schema), row_group_size=DATASET_ROWS_PER_GROUP)
        del traces, table
    finally:
        if progress:
            datasets.enable_progress_bars()
        for file in path.parent.glob(f"{cache.stem}*"):
            file.unlink(missing_ok=True)
    logger.info("read %d text traces from %s (SFT only, %d process(es))", len(samples), cfg.input_path, workers)
    return len(samples)


def open_dataset(cfg: BuildConfig, directory: Path) -> BuildInput:
    """Write a plain dataset as Parquet parts in ``directory`` (once: a resumed build reuses them)."""
    path = directory / shard_name(0)
    if not path.is_file():
        directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            write_dataset(cfg, tmp)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, path)
    footer = pq.ParquetFile(path).metadata
    groups, first = [], 0
    for i in range(footer.num_row_groups):
        g = footer.row_group(i)
        disk = sum(g.column(c).total_compressed_size for c in range(g.num_columns))
        groups.append(RowGroup(i, first, g.num_rows, g.total_byte_size, disk, 0))
        first += g.num_rows
    schema = pq.read_schema(path)
    shard = GenerationShard(path, 0, None, {n: schema.field(n).type for n in schema.names}, tuple(groups))
    return BuildInput("dataset", (shard,), 0, None, frozenset(shard.columns))
