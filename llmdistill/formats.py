"""The data contracts: one versioned schema per artifact, each with its writer and reader.

Generation shards (``llmdistill generate`` / ``llmdistill score``)
    One Parquet row per completion. Columns:

    ====================  ===============  ==================================================
    prompt_id             string           id column of the input, or a stable hash of it
    sample_index          int32            0 .. num_samples-1 (0 for ``score``)
    prompt                string           the prompt as given (text, or messages as JSON)
    prompt_text           string           what the engine saw, after the chat template
    prompt_token_ids      list<int32>      teacher token ids of ``prompt_text``
    completion            string           the generated (or scored) completion text
    completion_token_ids  list<int32>      teacher token ids of the completion (EOS included
                                           when generation stopped on it)
    finish_reason         string           ``stop`` | ``length`` | ``scored`` |
                                           ``unknown_token`` (cut before an id the
                                           tokenizer lacks: an LM-head padding row)
    topk_ids              list<int32>      flat [n_tokens, k]: the teacher's k most likely
                                           ids at each completion position, by log-prob desc
    topk_logprobs         list<float32>    flat [n_tokens, k]: their log-probs (raw, T = 1)
    token_logprobs        list<float32>    [n_tokens]: log-prob of the completion token itself
    teacher               string           model id/path of the teacher
    <passthrough>         any              columns copied from the input (e.g. ``answer``)
    ====================  ===============  ==================================================

    The log-probs are the teacher's raw distribution (temperature 1, before top-p), whatever
    the sampling temperature was. ``k`` is in the Parquet metadata and in ``manifest.json``.

Built shards (``llmdistill build``)
    One Parquet row per packed sequence of at most ``max_length`` tokens. Columns:

    ====================  ===============  ==================================================
    input_ids             list<int32>      concatenated documents (no padding)
    position_ids          list<int32>      restart at 0 at the start of each document
    loss_mask             list<int8>       1 where the token is an assistant target, i.e. is
                                           predicted from the position before it
    seq_lengths           list<int32>      lengths of the packed documents, in order
    doc_ids               list<string>     ``prompt_id/sample_index`` of each document
    topk                  binary | null    the teacher top-k of every target token, in order
                                           (``sum(loss_mask)`` rows), encoded by
                                           :mod:`llmdistill.codec`; null when built with
                                           ``kd: false``
    ====================  ===============  ==================================================

    The target token at position ``t`` (``loss_mask[t] == 1``) has the teacher row that
    predicts it; the student's logits at ``t - 1`` are compared with it. Metadata holds ``kd``,
    ``k``, ``vocab_size``, the codec parameters and the student tokenizer's fingerprint.
    Training never loads them: :func:`convert_built_to_arrow` copies them once per machine into
    uncompressed Arrow files that :func:`open_built` memory-maps.

Eval details (``llmdistill eval``: ``details.parquet``)
    One row per sample. Columns:

    ====================  ===========  ======================================================
    model                 string       model id/path as given in ``models``
    benchmark             string       registry name
    problem_id            string       the item's id
    sample_index          int32        0 .. n-1
    gold                  string       the gold answer (empty for code)
    response              string       the full generated text
    extracted             string|null  the extracted answer (``null``: none found)
    correct               bool
    finish_reason         string       ``stop`` | ``length``
    n_tokens              int32        response length in tokens
    ====================  ===========  ======================================================

Every shard is named ``part-NNNNNN.parquet`` (:func:`shard_name`), whatever the stage. What a
downstream stage needs from a generation directory's ``manifest.json`` (the teacher, its
tokenizer, ``k`` and the prompt format the teacher saw) is read through
:func:`read_generation_info`, never by a config field's name.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from llmdistill.config.base import UserError
from llmdistill.outputs import pid_alive
from llmdistill.prompts import PromptFormat

SHARD_GLOB = "part-*.parquet"
#: generation columns whose values the footer's statistics bound (:func:`check_value_ranges`)
RANGED_COLUMNS = ("completion_token_ids", "topk_ids", "topk_logprobs")
GENERATION_SCHEMA = "llmdistill.generation"
GENERATION_SCHEMA_VERSION = 1
#: a generated completion cut before an id its tokenizer lacks (:func:`llmdistill.generate.engines.known_ids_only`)
UNKNOWN_TOKEN = "unknown_token"
#: finish reasons of a completion that did not end on its own: the build adds no EOS, and ``drop_truncated`` drops it
UNFINISHED = ("length", UNKNOWN_TOKEN)
BUILT_SCHEMA = "llmdistill.built"
BUILT_SCHEMA_VERSION = 1
DETAILS_SCHEMA = "llmdistill.eval_details"
DETAILS_SCHEMA_VERSION = 1

GENERATION_COLUMNS: dict[str, pa.DataType] = {
    "prompt_id": pa.string(),
    "sample_index": pa.int32(),
    "prompt": pa.string(),
    "prompt_text": pa.string(),
    "prompt_token_ids": pa.list_(pa.int32()),
    "completion": pa.string(),
    "completion_token_ids": pa.list_(pa.int32()),
    "finish_reason": pa.string(),
    "topk_ids": pa.list_(pa.int32()),
    "topk_logprobs": pa.list_(pa.float32()),
    "token_logprobs": pa.list_(pa.float32()),
    "teacher": pa.string(),
}

BUILT_COLUMNS: dict[str, pa.DataType] = {
    "input_ids": pa.list_(pa.int32()),
    "position_ids": pa.list_(pa.int32()),
    "loss_mask": pa.list_(pa.int8()),
    "seq_lengths": pa.list_(pa.int32()),
    "doc_ids": pa.list_(pa.string()),
    "topk": pa.binary(),
}


DETAILS_COLUMNS: dict[str, pa.DataType] = {
    "model": pa.string(),
    "benchmark": pa.string(),
    "problem_id": pa.string(),
    "sample_index": pa.int32(),
    "gold": pa.string(),
    "response": pa.string(),
    "extracted": pa.string(),
    "correct": pa.bool_(),
    "finish_reason": pa.string(),
    "n_tokens": pa.int32(),
}


class SchemaError(UserError):
    """An artifact that does not match the schema (or version) this code reads."""


# ---------------------------------------------------------------------------------------
# Shared Parquet plumbing


def _metadata(schema: str, version: int, extra: dict[str, Any]) -> dict[bytes, bytes]:
    meta = {"schema": schema, "schema_version": version, **extra}
    return {b"llmdistill": json.dumps(meta).encode()}


def shard_metadata(path: str | Path) -> dict[str, Any]:
    """The llmdistill metadata stored in a Parquet shard's footer."""
    try:
        raw = pq.read_schema(path).metadata or {}
    except (pa.ArrowInvalid, OSError) as err:
        raise SchemaError(f"{path} is not a readable Parquet file ({' '.join(str(err).split())[:200]}): it is "
                          "truncated or corrupt; delete it and re-run the stage that wrote it") from None
    if b"llmdistill" not in raw:
        raise SchemaError(f"{path} has no llmdistill metadata: it was not written by llmdistill")
    return json.loads(raw[b"llmdistill"])


def write_parquet_atomic(table: pa.Table, path: str | Path) -> None:
    """Write to ``.name.tmp`` then rename: a SIGKILL leaves no partial shard under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp, compression="zstd")
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def shard_name(index: int) -> str:
    """The file name of shard ``index`` of any stage: ``part-000042.parquet``."""
    return f"part-{index:06d}.parquet"


def list_shards(directory: str | Path) -> list[Path]:
    """Finished shards below ``directory`` (temporary files start with '.' and are ignored), sorted."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory of llmdistill shards")
    return sorted(p for p in directory.rglob(SHARD_GLOB) if not p.name.startswith("."))


def _check(path: Path, meta: dict[str, Any], schema: str, version: int) -> None:
    if meta.get("schema") != schema:
        raise SchemaError(f"{path} holds '{meta.get('schema')}' data, expected '{schema}'")
    if meta.get("schema_version") != version:
        raise SchemaError(
            f"{path} has {schema} schema version {meta.get('schema_version')}, this llmdistill reads "
            f"version {version}: regenerate it with this version of llmdistill"
        )


# ---------------------------------------------------------------------------------------
# Generation shards


def generation_table(rows: list[dict[str, Any]], passthrough: dict[str, pa.DataType] | None = None) -> pa.Table:
    """Arrow table of generation rows (dicts with the :data:`GENERATION_COLUMNS` keys)."""
    fields = list(GENERATION_COLUMNS.items()) + list((passthrough or {}).items())
    arrays = {name: pa.array([r.get(name) for r in rows], type=typ) for name, typ in fields}
    return pa.table(arrays)


def write_generation_shard(
    rows: list[dict[str, Any]],
    path: str | Path,
    k: int,
    teacher: str,
    passthrough: dict[str, pa.DataType] | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write one generation shard atomically.

    Args:
        rows: one dict per completion; ``topk_ids``/``topk_logprobs`` may be 2-D arrays [n, k].
        path: destination ``.parquet`` file.
        k: number of top-k entries per position.
        teacher: teacher model id/path (also stored per row).
        passthrough: arrow types of the passthrough columns.
        extra: additional metadata (e.g. ``{"stage": "score"}``).
    """
    fixed = []
    for r in rows:
        r = dict(r)
        for name in ("topk_ids", "topk_logprobs"):
            r[name] = np.asarray(r[name]).reshape(-1)
        n = len(r["completion_token_ids"])
        if len(r["topk_ids"]) != n * k or len(r["topk_logprobs"]) != n * k:
            raise SchemaError(
                f"row {r['prompt_id']}/{r['sample_index']}: {n} completion tokens need {n * k} top-k "
                f"entries, got {len(r['topk_ids'])} ids and {len(r['topk_logprobs'])} log-probs"
            )
        r.setdefault("teacher", teacher)
        fixed.append(r)
    table = generation_table(fixed, passthrough)
    meta = _metadata(GENERATION_SCHEMA, GENERATION_SCHEMA_VERSION, {"k": k, "teacher": teacher, **(extra or {})})
    write_parquet_atomic(table.replace_schema_metadata(meta), path)


def _first(mask: np.ndarray) -> int | None:
    hits = np.flatnonzero(mask)
    return int(hits[0]) if len(hits) else None


def check_generation_rows(path: Path, table: pa.Table | pa.RecordBatch, k: int, vocab_size: int | None = None,
                          first_row: int = 0) -> None:
    """Check a generation shard's rows: types, a completion per row, top-k shape, log-probs and ids.

    Log-probs must not be NaN or positive (``-inf``, zero probability, is allowed); completion and
    top-k ids must lie in ``[0, vocab_size)`` when ``vocab_size`` is given. Only the columns present are checked.

    Args:
        path: the shard (for messages).
        table: some of its rows (a table or one batch of :func:`iter_generation_batches`).
        k: top-k entries per position.
        vocab_size: the student's vocabulary size, or None to skip the id range check.
        first_row: the row number of ``table``'s first row in the shard (for messages).

    Raises:
        SchemaError: naming the shard, the row, the column and what to do.
    """
    import pyarrow.compute as pc

    if isinstance(table, pa.RecordBatch):
        table = pa.Table.from_batches([table])

    names = table.column_names
    for name in names:
        want = GENERATION_COLUMNS.get(name)
        if want is not None and table.schema.field(name).type != want:
            raise SchemaError(f"{path}: column '{name}' is {table.schema.field(name).type}, expected {want}: "
                              "the shard was not written by llmdistill generate/score; regenerate it")
    for name in ("completion", "completion_token_ids", "prompt_id"):
        if name in names and (row := _first(table.column(name).is_null().to_numpy(zero_copy_only=False))) is not None:
            raise SchemaError(f"{path} row {first_row + row}: '{name}' is null; regenerate the shard or remove the row")
    if "completion_token_ids" not in names:
        return
    n_tokens = pc.list_value_length(table.column("completion_token_ids")).to_numpy(zero_copy_only=False)
    for name in ("topk_ids", "topk_logprobs"):
        if name not in names:
            continue
        lengths = pc.list_value_length(table.column(name)).fill_null(-1).to_numpy(zero_copy_only=False)
        row = _first(lengths != n_tokens * k)
        if row is not None:
            raise SchemaError(f"{path} row {first_row + row}: '{name}' has {lengths[row]} entries for {n_tokens[row]} completion "
                              f"tokens at k = {k} (expected {n_tokens[row] * k}); the shard is damaged: regenerate it")
    offsets = np.concatenate([[0], np.cumsum(n_tokens * k)])

    def row_of(flat: int, starts: np.ndarray = offsets) -> int:
        return first_row + int(np.searchsorted(starts, flat, side="right") - 1)

    if "topk_logprobs" in names:
        values = pc.list_flatten(table.column("topk_logprobs")).to_numpy(zero_copy_only=False)
        bad = _first(np.isnan(values) | (values > 1e-3))
        if bad is not None:
            raise SchemaError(f"{path} row {row_of(bad)}: 'topk_logprobs' holds {values[bad]}, not a log-probability; "
                              "the shard is damaged: regenerate it")
    if vocab_size is None:
        return
    token_offsets = np.concatenate([[0], np.cumsum(n_tokens)])
    for name, starts in (("completion_token_ids", token_offsets), ("topk_ids", offsets)):
        if name not in names:
            continue
        ids = pc.list_flatten(table.column(name)).to_numpy(zero_copy_only=False)
        bad = _first((ids < 0) | (ids >= vocab_size))
        if bad is not None:
            raise SchemaError(f"{path} row {row_of(bad, starts)}: '{name}' holds id {ids[bad]}, outside the student's "
                              f"vocabulary of {vocab_size}: the traces come from another tokenizer (see `llmdistill "
                              "score`) or the shard is damaged")


@dataclass(frozen=True)
class RowGroup:
    """One Parquet row group of a generation shard, as its footer describes it.

    Attributes:
        index: its position in the file.
        first_row: the file row number of its first row.
        num_rows: rows.
        bytes: uncompressed size of all its columns.
        compressed_bytes: size on disk.
        completion_tokens: values of ``completion_token_ids`` (0 when the column is absent).
        value_ranges: ``(column, min, max)`` of the ids and log-probs columns whose footer
            statistics have them (:data:`RANGED_COLUMNS`; NaN is never in a Parquet statistic).
    """

    index: int
    first_row: int
    num_rows: int
    bytes: int
    compressed_bytes: int
    completion_tokens: int
    value_ranges: tuple[tuple[str, float, float], ...] = ()


@dataclass(frozen=True)
class GenerationShard:
    """A generation shard as its footer describes it: read without reading any row.

    Attributes:
        path: the file.
        k: top-k entries per completion position.
        teacher: the teacher named in the metadata (None when absent).
        columns: column name -> Arrow type.
        row_groups: its row groups, in file order.
    """

    path: Path
    k: int
    teacher: str | None
    columns: dict[str, pa.DataType]
    row_groups: tuple[RowGroup, ...]

    @property
    def num_rows(self) -> int:
        return sum(g.num_rows for g in self.row_groups)


def read_generation_footer(path: str | Path, columns: list[str] | None = None) -> GenerationShard:
    """The footer of one generation shard: schema, ``k`` and row groups, checked; no row is read.

    Args:
        path: the shard.
        columns: columns that must be present (default: all of :data:`GENERATION_COLUMNS`).

    Raises:
        SchemaError: an unreadable file, another schema or version, a missing column or a column
            of the wrong type; each names the shard.
    """
    path = Path(path)
    meta = shard_metadata(path)
    _check(path, meta, GENERATION_SCHEMA, GENERATION_SCHEMA_VERSION)
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise SchemaError(f"{path} cannot be read ({' '.join(str(err).split())[:200]}): the file is truncated or "
                          "corrupt; delete it and re-run generate/score, which write only what is missing") from None
    schema = parquet.schema_arrow
    types = {name: schema.field(name).type for name in schema.names}
    missing = [c for c in (columns if columns is not None else GENERATION_COLUMNS) if c not in types]
    if missing:
        raise SchemaError(f"{path} lacks column(s) {missing}: it was not written by llmdistill generate/score")
    for name, typ in types.items():
        want = GENERATION_COLUMNS.get(name)
        if want is not None and typ != want:
            raise SchemaError(f"{path}: column '{name}' is {typ}, expected {want}: the shard was not written by "
                              "llmdistill generate/score; regenerate it")
    footer = parquet.metadata
    leaf = {footer.schema.column(i).path.split(".")[0]: i for i in range(footer.num_columns)}
    groups, first = [], 0
    for i in range(footer.num_row_groups):
        group = footer.row_group(i)
        tokens = group.column(leaf["completion_token_ids"]).num_values if "completion_token_ids" in leaf else 0
        ranges = tuple((name, float(stats.min), float(stats.max)) for name in RANGED_COLUMNS if name in leaf
                       and (stats := group.column(leaf[name]).statistics) is not None and stats.has_min_max)
        groups.append(RowGroup(i, first, group.num_rows, group.total_byte_size,
                               sum(group.column(c).total_compressed_size for c in range(group.num_columns)), tokens,
                               ranges))
        first += group.num_rows
    return GenerationShard(path, int(meta["k"]), meta.get("teacher"), types, tuple(groups))


def check_value_ranges(shard: GenerationShard, vocab_size: int, columns: tuple[str, ...]) -> None:
    """What :func:`check_generation_rows` checks of ids and log-probs, from the footer's statistics
    alone: a damaged shard, or one of another tokenizer, is named before any row is read. (NaN is
    not in the statistics; the rows' check finds it.)

    Args:
        shard: a shard's footer (:func:`read_generation_footer`).
        vocab_size: the student's vocabulary size.
        columns: the columns of :data:`RANGED_COLUMNS` the reader uses (others are never read, so
            never checked).

    Raises:
        SchemaError: as :func:`check_generation_rows` does (naming the row: only a row group whose
            statistics are out of range is read).
    """
    for group in shard.row_groups:
        bad = [name for name, low, high in group.value_ranges if name in columns
               and (high > 1e-3 if name == "topk_logprobs" else low < 0 or high >= vocab_size)]
        if not bad:
            continue
        for first, batch in iter_generation_batches(shard.path, ["completion_token_ids", *bad], [group.index],
                                                    max(1, group.num_rows)):
            check_generation_rows(shard.path, batch, shard.k, vocab_size, first_row=first)  # names the row
        raise SchemaError(f"{shard.path} row group {group.index}: the footer's statistics of {bad} lie outside "
                          f"log-probabilities or the student's vocabulary of {vocab_size}, though no row does: the "
                          "shard is damaged: regenerate it")


def iter_generation_batches(path: str | Path, columns: list[str], row_groups: list[int] | None = None,
                            batch_rows: int = 256) -> Iterator[tuple[int, pa.RecordBatch]]:
    """Rows of a generation shard, a bounded batch at a time: ``(first row number, batch)``.

    Only ``columns`` of ``row_groups`` (default: all) are read, page by page, and no two batches
    are ever joined: a list column may hold any number of values in all (more than the 2**31 an
    Arrow list array can address), as long as one batch holds fewer. A batch may span consecutive
    row groups.

    Raises:
        SchemaError: the file cannot be read (truncated, corrupt), naming it.
    """
    path = Path(path)
    try:
        parquet = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 22)
        groups = list(range(parquet.metadata.num_row_groups)) if row_groups is None else list(row_groups)
        starts = np.concatenate([[0], np.cumsum([parquet.metadata.row_group(i).num_rows
                                                 for i in range(parquet.metadata.num_row_groups)])])
        runs = np.split(groups, np.flatnonzero(np.diff(groups) != 1) + 1) if groups else []
        for run in runs:  # consecutive row groups are read together, so a batch is batch_rows rows
            first = int(starts[run[0]])
            for batch in parquet.iter_batches(batch_size=batch_rows, row_groups=[int(g) for g in run],
                                              columns=columns, use_threads=False):
                yield first, batch
                first += batch.num_rows
    except (pa.ArrowInvalid, OSError) as err:
        raise SchemaError(f"{path} cannot be read ({' '.join(str(err).split())[:200]}): the file is truncated or "
                          "corrupt; delete it and re-run generate/score, which write only what is missing") from None


def read_generation_table(directory: str | Path, columns: list[str] | None = None,
                          vocab_size: int | None = None) -> tuple[pa.Table, int]:
    """All generation shards of a directory as one Arrow table (one chunk per batch, never joined),
    and ``k``; every shard is checked (:func:`check_generation_rows`) as it is read.

    For small outputs (tests, the demo's statistics): the table is in memory. ``build`` reads
    shard by shard and batch by batch (:func:`read_generation_footer`, :func:`iter_generation_batches`).

    Raises:
        SchemaError: an unreadable shard, a shard of another schema/version or with bad rows, or
            shards with different ``k``; each names the shard (and the row).
        FileNotFoundError: no shard in the directory.
    """
    shards = list_shards(directory)
    if not shards:
        raise FileNotFoundError(f"no generation shards ({SHARD_GLOB}) in {directory}")
    batches, ks = [], set()
    for path in shards:
        shard = read_generation_footer(path, columns)
        ks.add(shard.k)
        for first, batch in iter_generation_batches(path, columns or list(shard.columns)):
            check_generation_rows(path, batch, shard.k, vocab_size, first_row=first)
            batches.append(pa.Table.from_batches([batch]))
    if len(ks) > 1:
        raise SchemaError(f"shards in {directory} mix top-k sizes {sorted(ks)}: generate them with one logprobs_top_k")
    return pa.concat_tables(batches, promote_options="default"), ks.pop()


def is_generation_dir(path: str | Path) -> bool:
    """True for a directory holding llmdistill generation shards."""
    path = Path(path)
    if not path.is_dir():
        return False
    shards = list_shards(path)
    return bool(shards) and shard_metadata(shards[0]).get("schema") == GENERATION_SCHEMA


def read_generation_keys(directory: str | Path) -> set[tuple[str, int]]:
    """The (prompt id, sample index) pairs in the finished shards directly in ``directory``."""
    directory = Path(directory)
    keys: set[tuple[str, int]] = set()
    for path in sorted(directory.glob(SHARD_GLOB)) if directory.is_dir() else []:
        table = pq.read_table(path, columns=["prompt_id", "sample_index"])
        keys.update(zip(table["prompt_id"].to_pylist(), table["sample_index"].to_pylist(), strict=True))
    return keys


def generation_counts(directory: str | Path) -> dict[str, Any]:
    """Rows, distinct prompts, completion tokens and finish reasons of the shards directly in ``directory``."""
    import pyarrow.compute as pc

    rows, tokens, prompts, finish = 0, 0, set(), {}
    for path in sorted(Path(directory).glob(SHARD_GLOB)):
        table = pq.read_table(path, columns=["prompt_id", "completion_token_ids", "finish_reason"])
        rows += table.num_rows
        tokens += int(np.sum(pc.list_value_length(table["completion_token_ids"]).to_numpy()))
        prompts.update(table["prompt_id"].to_pylist())
        for reason in table["finish_reason"].to_pylist():
            finish[reason] = finish.get(reason, 0) + 1
    return {"rows": rows, "prompts_written": len(prompts), "completion_tokens": tokens, "finish_reasons": finish}


@dataclass(frozen=True)
class GenerationInfo:
    """What downstream stages need from a generation (or score) directory's manifest.

    Attributes:
        stage: ``generate`` or ``score``.
        teacher: the teacher model (path resolved when it is local).
        tokenizer: the teacher's tokenizer (path resolved when it is local).
        k: top-k entries stored per completion token.
        vocab_size: the teacher tokenizer's vocabulary size (``len(tokenizer)``).
        prompt_format: the prompt format the teacher saw, as resolved text.
        rewrite_template: SDFT: the template that showed each prompt with its reference answer, else None.
    """

    stage: str
    teacher: str
    tokenizer: str
    k: int
    vocab_size: int
    prompt_format: PromptFormat
    rewrite_template: str | None = None

    def to_manifest(self) -> dict[str, Any]:
        """The manifest entry (``"generation"``) that :func:`read_generation_info` reads back."""
        return {"stage": self.stage, "teacher": self.teacher, "tokenizer": self.tokenizer, "k": self.k,
                "vocab_size": self.vocab_size, "prompt_format": self.prompt_format.to_dict(),
                "rewrite_template": self.rewrite_template}


GENERATION_INFO_KEY = "generation"


def read_generation_info(directory: str | Path) -> GenerationInfo | None:
    """The :class:`GenerationInfo` of a generation directory; None when it has no manifest.

    Raises:
        SchemaError: the manifest predates this entry (re-run generate/score with this version).
    """
    from llmdistill.manifest import MANIFEST, read_manifest

    if not (Path(directory) / MANIFEST).is_file():
        return None
    entry = read_manifest(directory).get(GENERATION_INFO_KEY)
    if not isinstance(entry, dict):
        raise SchemaError(f"{Path(directory) / MANIFEST} has no '{GENERATION_INFO_KEY}' entry: it was written by an "
                          "older llmdistill. Re-run `llmdistill generate`/`score` (it resumes) to rewrite it")
    return GenerationInfo(stage=entry["stage"], teacher=entry["teacher"], tokenizer=entry["tokenizer"],
                          k=int(entry["k"]), vocab_size=int(entry["vocab_size"]),
                          prompt_format=PromptFormat.from_dict(entry["prompt_format"]),
                          rewrite_template=entry.get("rewrite_template"))


@dataclass
class GenerationRow:
    """One decoded generation row: top-k as arrays of shape [n_tokens, k]."""

    prompt_id: str
    sample_index: int
    prompt: str
    prompt_text: str
    prompt_token_ids: np.ndarray
    completion: str
    completion_token_ids: np.ndarray
    finish_reason: str
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    token_logprobs: np.ndarray
    teacher: str
    extra: dict[str, Any]


def iter_generations(directory: str | Path) -> Iterator[GenerationRow]:
    """Generation output as decoded rows (top-k as [n_tokens, k] arrays), shard by shard and
    batch by batch.

    For users who want the teacher signal as arrays; the stages read columns instead
    (:func:`iter_generation_batches`).
    """
    for path in list_shards(directory):
        shard = read_generation_footer(path, columns=[])
        k = shard.k
        for _, batch in iter_generation_batches(path, list(shard.columns)):
            for rec in batch.to_pylist():
                n = len(rec["completion_token_ids"])
                extra = {c: rec[c] for c in rec if c not in GENERATION_COLUMNS}
                yield GenerationRow(
                    prompt_id=rec["prompt_id"],
                    sample_index=rec["sample_index"],
                    prompt=rec["prompt"],
                    prompt_text=rec["prompt_text"],
                    prompt_token_ids=np.asarray(rec["prompt_token_ids"], dtype=np.int32),
                    completion=rec["completion"],
                    completion_token_ids=np.asarray(rec["completion_token_ids"], dtype=np.int32),
                    finish_reason=rec["finish_reason"],
                    topk_ids=np.asarray(rec["topk_ids"], dtype=np.int32).reshape(n, k),
                    topk_logprobs=np.asarray(rec["topk_logprobs"], dtype=np.float32).reshape(n, k),
                    token_logprobs=np.asarray(rec["token_logprobs"], dtype=np.float32),
                    teacher=rec["teacher"],
                    extra=extra,
                )


# ---------------------------------------------------------------------------------------
# Built shards


def write_built_shard(rows: list[dict[str, Any]], path: str | Path, meta: dict[str, Any]) -> None:
    """Write one built shard atomically. ``meta`` must hold ``kd``, ``k``, ``vocab_size``,
    ``tokenizer_fingerprint`` and, when ``kd``, the codec parameters."""
    for key in ("kd", "k", "vocab_size", "tokenizer_fingerprint"):
        if key not in meta:
            raise SchemaError(f"built shard metadata needs '{key}'")
    arrays = {name: pa.array([r.get(name) for r in rows], type=typ) for name, typ in BUILT_COLUMNS.items()}
    table = pa.table(arrays).replace_schema_metadata(_metadata(BUILT_SCHEMA, BUILT_SCHEMA_VERSION, meta))
    write_parquet_atomic(table, path)


def read_built_metadata(directory: str | Path) -> tuple[list[Path], dict[str, Any]]:
    """The built shards of a directory and their shared metadata, checked from the Parquet footers alone.

    Raises:
        FileNotFoundError: no shard in the directory.
        SchemaError: another schema/version, or shards built with different settings.
    """
    shards = list_shards(directory)
    if not shards:
        raise FileNotFoundError(f"no built shards (*.parquet) in {directory}: run `llmdistill build` first")
    first: dict[str, Any] | None = None
    for path in shards:
        meta = shard_metadata(path)
        _check(path, meta, BUILT_SCHEMA, BUILT_SCHEMA_VERSION)
        if first is None:
            first = meta
        elif meta != first:
            raise SchemaError(f"{path} was built with other settings than {shards[0]}: rebuild the directory")
    assert first is not None
    return shards, first


def read_built(directory: str | Path) -> tuple[pa.Table, dict[str, Any]]:
    """All built shards of a directory as one in-memory table, and their (shared) metadata.

    For small data (tests, inspection): training memory-maps the shards instead (:func:`open_built`).

    Raises:
        SchemaError: another schema/version, or shards built with different settings.
    """
    shards, meta = read_built_metadata(directory)
    return pa.concat_tables([pq.read_table(path).replace_schema_metadata(None) for path in shards]), meta


#: Where the Arrow copy of a built directory goes by default: inside it, so a rebuild (which replaces
#: the directory whole) takes the stale copy away with it.
BUILT_ARROW_CACHE = ".arrow_cache"
#: Target size of one Arrow record batch while converting: the converter's memory, whatever the shards' row groups.
_ARROW_BATCH_BYTES = 64 << 20


def built_cache_dir(directory: str | Path, root: str | Path | None = None) -> Path:
    """The directory that holds the Arrow copy of the built shards in ``directory``.

    Args:
        directory: a built directory.
        root: where to put the copy; None: ``<directory>/.arrow_cache``, or, when ``directory`` is
            not writable, under the datasets cache (``$HF_DATASETS_CACHE/llmdistill-built``).

    Returns:
        ``<directory>/.arrow_cache``, or ``<root>/<directory name>-<hash of its absolute path>``.
    """
    directory = Path(directory).resolve()
    if root is None:
        if os.access(directory, os.W_OK):
            return directory / BUILT_ARROW_CACHE
        import datasets.config

        root = Path(datasets.config.HF_DATASETS_CACHE) / "llmdistill-built"
    return Path(root) / f"{directory.name}-{hashlib.sha256(str(directory).encode()).hexdigest()[:12]}"


def _arrow_name(directory: Path, shard: Path) -> str:
    """The Arrow file name of a shard: its path, and a key that changes when the shard does."""
    rel = shard.relative_to(directory)
    stat = shard.stat()
    key = hashlib.sha256(f"{BUILT_SCHEMA_VERSION}\n{rel}\n{stat.st_size}\n{stat.st_mtime_ns}".encode()).hexdigest()
    return f"{'.'.join(rel.with_suffix('').parts)}-{key[:12]}.arrow"


def convert_built_to_arrow(directory: str | Path, cache_dir: str | Path) -> list[Path]:
    """Write the Arrow copy of every built shard that ``cache_dir`` lacks; return the Arrow files in shard order.

    Each file is written under a temporary name, fsync'd, then linked into place only if absent: a
    file that exists is whole and is never replaced, so running this on several machines at once
    over a shared filesystem is safe (a reader elsewhere keeps its mapping). Memory: record batches
    of about 64 MiB, plus pyarrow's copy of a shard's whole ``topk`` column chunk (about twice its
    bytes: pyarrow reads a binary column chunk whole), so it is bounded by the row-group size the
    shards were written with, not by the data size. Arrow files of shards that are gone or changed,
    and temporary files of dead converters on this machine, are deleted.

    Raises:
        SchemaError: a shard of another schema/version or settings, or an unreadable shard.
        UserError: the disk of ``cache_dir`` is full (naming it, the bytes needed and the fix).
    """
    directory, cache_dir = Path(directory).resolve(), Path(cache_dir)
    shards, _ = read_built_metadata(directory)
    cache_dir.mkdir(parents=True, exist_ok=True)
    files = [cache_dir / _arrow_name(directory, shard) for shard in shards]
    _remove_stale_arrow(cache_dir, {f.name for f in files})
    for shard, target in zip(shards, files, strict=True):
        if not target.exists():
            _shard_to_arrow(shard, target)
            pa.default_memory_pool().release_unused()  # give the read buffers back to the OS
    return files


def _shard_to_arrow(shard: Path, target: Path) -> None:
    import errno
    import shutil
    import socket

    tmp = target.with_name(f".{target.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    try:
        # buffer_size: read column chunks page by page (not the binary top-k column: see the docstring)
        parquet = pq.ParquetFile(shard, buffer_size=8 << 20)
        info = parquet.metadata
        row_bytes = sum(info.row_group(i).total_byte_size for i in range(info.num_row_groups)) / max(info.num_rows, 1)
        schema = pa.schema([parquet.schema_arrow.field(name) for name in BUILT_COLUMNS])
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            for batch in parquet.iter_batches(batch_size=max(1, int(_ARROW_BATCH_BYTES // max(row_bytes, 1.0))),
                                              columns=list(BUILT_COLUMNS), use_threads=False):
                writer.write_batch(batch)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        try:
            os.link(tmp, target)  # never replaces a file that another process may have mapped
        except FileExistsError:
            pass  # another machine converted it first: its file is whole and the same
        except OSError:  # a filesystem without hard links
            if not target.exists():
                os.replace(tmp, target)
    except (pa.ArrowInvalid, KeyError) as err:
        raise SchemaError(f"{shard} cannot be read as a built shard ({' '.join(str(err).split())[:200]}): it is "
                          "truncated or corrupt; rebuild the directory") from None
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        raise UserError(f"converting {shard} to Arrow in {target.parent}: no space left on the disk "
                        f"({shutil.disk_usage(target.parent).free} bytes free; the copy takes about "
                        f"{int(row_bytes * info.num_rows)} bytes). Free some space, or set data_cache_dir to a "
                        "larger disk (node-local when the nodes share no filesystem)") from err
    finally:
        tmp.unlink(missing_ok=True)


def _remove_stale_arrow(cache_dir: Path, keep: set[str]) -> None:
    """Delete Arrow files not in ``keep`` and temporary files of converters on this machine that died."""
    import socket

    host = socket.gethostname()
    for path in cache_dir.iterdir():
        if path.name.endswith(".arrow") and not path.name.startswith(".") and path.name not in keep:
            path.unlink(missing_ok=True)
        elif ".arrow.tmp-" in path.name:
            owner, _, pid = path.name.rpartition(".arrow.tmp-")[2].rpartition("-")
            if owner == host and pid.isdigit() and not pid_alive(int(pid)):
                path.unlink(missing_ok=True)


def built_footprint(directory: str | Path) -> dict[str, int]:
    """Rows, tokens and bytes of a built directory, from its shard footers alone (nothing is decoded).

    Returns:
        ``rows``, ``tokens``, ``parquet_bytes`` (on disk) and ``arrow_bytes`` (about what
        :func:`convert_built_to_arrow` writes: 4 + 4 + 1 bytes per token for the ids, positions
        and loss mask, the top-k blobs, and offsets).
    """
    shards, _ = read_built_metadata(directory)
    rows = tokens = parquet_bytes = topk_bytes = 0
    for path in shards:
        info = pq.ParquetFile(path).metadata
        parquet_bytes += path.stat().st_size
        rows += info.num_rows
        for g in range(info.num_row_groups):
            group = info.row_group(g)
            for c in range(group.num_columns):
                column = group.column(c)
                name = column.path_in_schema.split(".")[0]
                if name == "input_ids":
                    tokens += column.num_values
                elif name == "topk":
                    topk_bytes += column.total_uncompressed_size
    return {"rows": rows, "tokens": tokens, "parquet_bytes": parquet_bytes,
            "arrow_bytes": 9 * tokens + topk_bytes + 64 * rows}


def open_built(directory: str | Path, cache_dir: str | Path) -> tuple[Any, dict[str, Any]]:
    """The built shards as one memory-mapped :class:`datasets.Dataset`, and their metadata.

    The dataset reads its Arrow copy in ``cache_dir`` (:func:`convert_built_to_arrow`) through the
    page cache: a process holds no table in memory, the processes of a machine share one copy of
    the pages, and the dataset pickles as file paths (DataLoader workers map the files again).
    Columns: :data:`BUILT_COLUMNS`; rows in shard order, as Python values.

    Raises:
        FileNotFoundError: the Arrow copy of a shard is missing (convert first).
        SchemaError: another schema/version, or shards built with different settings.
    """
    from datasets import Dataset, concatenate_datasets

    directory = Path(directory).resolve()
    shards, meta = read_built_metadata(directory)
    files = [Path(cache_dir) / _arrow_name(directory, shard) for shard in shards]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"the Arrow copy of {len(missing)} built shard(s) of {directory} is missing "
                                f"(first: {missing[0]}): convert them with convert_built_to_arrow first")
    parts = [Dataset.from_file(str(f)) for f in files]
    return (parts[0] if len(parts) == 1 else concatenate_datasets(parts)), meta


# ---------------------------------------------------------------------------------------
# Eval details


def write_details(rows: list[dict[str, Any]], path: str | Path) -> None:
    """Write the per-sample eval details table atomically (columns: :data:`DETAILS_COLUMNS`)."""
    table = pa.table({name: pa.array([r[name] for r in rows], type=typ) for name, typ in DETAILS_COLUMNS.items()})
    write_parquet_atomic(table.replace_schema_metadata(_metadata(DETAILS_SCHEMA, DETAILS_SCHEMA_VERSION, {})), path)


def read_details(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """Read an eval details table written by :func:`write_details`.

    Raises:
        SchemaError: another schema or version (re-run ``llmdistill eval``).
    """
    path = Path(path)
    _check(path, shard_metadata(path), DETAILS_SCHEMA, DETAILS_SCHEMA_VERSION)
    return pq.read_table(path, columns=columns)


# ---------------------------------------------------------------------------------------
# Tokenizers


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Identity of a tokenizer by its vocabulary and merges (not its name).

    Two tokenizers with equal fingerprints map every string to the same ids, which is what
    token-level KD needs: a top-k row of the teacher indexes the student's vocabulary.
    """
    h = hashlib.sha256()
    vocab = tokenizer.get_vocab()
    for token, idx in sorted(vocab.items(), key=lambda kv: kv[1]):
        h.update(f"{idx}\t{token}\n".encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        model = json.loads(backend.to_str()).get("model", {})
        h.update(json.dumps(model.get("merges", []), ensure_ascii=False).encode())
    return h.hexdigest()[:16]


def check_built_fits(directory: str | Path, meta: dict[str, Any], tokenizer: Any = None, student: str = "",
                     topk_needed_by: str | None = None) -> None:
    """Refuse built shards a student cannot train on.

    Args:
        directory: the built shards (named in the errors).
        meta: their metadata (:func:`read_built_metadata`).
        tokenizer: the student's tokenizer; None skips the vocabulary check (before it is loaded).
        student: the student's name or path, for the error.
        topk_needed_by: what needs the teacher's top-k (e.g. ``"alpha=0.7 needs it"``); None: SFT only.

    Raises:
        SchemaError: shards without top-k where it is needed, or built with another tokenizer
            (token ids and top-k rows would index another vocabulary), naming the fix.
    """
    if topk_needed_by and not meta.get("kd"):
        raise SchemaError(f"{directory} was built without teacher top-k (kd: false), but {topk_needed_by}: "
                          "rebuild it with kd: true")
    if tokenizer is not None and (fp := tokenizer_fingerprint(tokenizer)) != meta.get("tokenizer_fingerprint"):
        raise SchemaError(f"the tokenizer of student {student} (fingerprint {fp}) is not the one {directory} was built "
                          f"with (fingerprint {meta.get('tokenizer_fingerprint')}): token ids and top-k rows would "
                          "index another vocabulary. Rebuild the data with this student's tokenizer.")
