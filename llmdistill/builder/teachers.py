"""Multi-teacher build: several teachers' top-k on the same traces, joined by trace and merged per part.

Each teacher is a ``score`` (or ``generate``) output of the same traces; rows are joined on
``(prompt_id, sample_index)``, which ``score`` keeps from its input (``id_column``,
``sample_index_column``), never on row order: each output is written in the order its traces
finished. The driver reads only the key columns (:func:`open_teachers`): it checks that every
teacher holds exactly the input's traces and finds, for every input trace, the shard and row of
each teacher's copy (12 bytes per trace and teacher). A phase-D task gets its part's slice of
that map (:func:`part_sources`) and, batch by batch, reads the teachers' rows it needs a row group
at a time (:class:`TeacherRows`), checks that they hold the same completion tokens and merges
their top-k with :func:`llmdistill.builder.merge.mix_topk` (:func:`merge_batch`). No teacher's
output is ever read whole. Teachers whose rows are in the input's order (the usual case: the
same traces scored by the same pipeline) read each of their row groups once per part; any order
works, at the price of re-reading row groups.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from llmdistill.builder.merge import UnknownTeacher, mix_topk, route_weights
from llmdistill.builder.tokenize import teacher_ids_usable
from llmdistill.builder.traces import BuildInput, Part, Ragged
from llmdistill.config.base import ConfigError
from llmdistill.config.build import BuildConfig
from llmdistill.formats import (
    SchemaError,
    check_generation_rows,
    is_generation_dir,
    iter_generation_batches,
    list_shards,
    read_generation_footer,
    read_generation_info,
)

KEYS = ["prompt_id", "sample_index"]
SIGNAL = ["prompt_id", "sample_index", "completion_token_ids", "topk_ids", "topk_logprobs"]


@dataclass(frozen=True)
class TeacherMix:
    """The teachers of a build, as every phase-D task needs them (small: no per-trace data).

    Attributes:
        names: teacher names, in config order.
        paths: their output directories (absolute).
        weights: the mixture's weights (sum 1).
        ks: each teacher's top-k size.
        shards: per teacher, its shard paths; per shard, the first row of each row group (and the total).
        own: the teacher whose top-k is the input's own (its path is ``input_path``), or None.
        route_column: the input column that routes a trace to one teacher, or None.
        vocab_size: the student's vocabulary (ids are checked against it).
    """

    names: tuple[str, ...]
    paths: tuple[str, ...]
    weights: tuple[float, ...]
    ks: tuple[int, ...]
    shards: tuple[tuple[tuple[str, tuple[int, ...]], ...], ...]
    own: str | None
    route_column: str | None
    vocab_size: int

    @property
    def k(self) -> int:
        """Entries kept per position: the largest teacher k."""
        return max(self.ks)

    def to_manifest(self) -> dict[str, Any]:
        """What the built artifact records about its teachers."""
        return {"teachers": [{"name": n, "path": p, "weight": w, "k": k}
                             for n, p, w, k in zip(self.names, self.paths, self.weights, self.ks, strict=True)],
                "teacher_route_column": self.route_column}


def _key_hash(prompt_ids: list[str], samples: np.ndarray) -> np.ndarray:
    """64-bit hash of each (prompt id, sample index): the join key (equality is checked on the rows)."""
    return np.fromiter((int.from_bytes(hashlib.blake2b(f"{p}\0{s}".encode(), digest_size=8).digest(), "little")
                        for p, s in zip(prompt_ids, samples.tolist(), strict=True)), dtype=np.uint64,
                       count=len(prompt_ids))


def _read_keys(paths: list[Path]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hash, shard index and row of every trace of some shards, in file order (key columns only)."""
    hashes, shard_of, row_of = [np.zeros(0, np.uint64)], [np.zeros(0, np.int32)], [np.zeros(0, np.int64)]
    for index, path in enumerate(paths):
        for first, batch in iter_generation_batches(path, KEYS, batch_rows=65536):
            hashes.append(_key_hash(batch.column(0).to_pylist(), batch.column(1).to_numpy(zero_copy_only=False)))
            shard_of.append(np.full(batch.num_rows, index, dtype=np.int32))
            row_of.append(first + np.arange(batch.num_rows, dtype=np.int64))
    return np.concatenate(hashes), np.concatenate(shard_of), np.concatenate(row_of)


def _input_keys(inp: BuildInput) -> np.ndarray:
    """The join key of every input trace, in the build's global row order."""
    return _read_keys([shard.path for shard in inp.shards])[0]


def _key_text(inp: BuildInput, index: int) -> str:
    """``prompt_id/sample_index`` of input trace ``index`` (global order), for a message."""
    for shard in inp.shards:
        if index < shard.num_rows:
            row = pq.read_table(shard.path, columns=KEYS).slice(index, 1).to_pylist()[0]
            return f"{row['prompt_id']}/{row['sample_index']}"
        index -= shard.num_rows
    raise IndexError(index)


def _locate(name: str, path: str, wanted: np.ndarray, inp: BuildInput,
            shards: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Shard and row, in teacher ``name``'s output, of every input trace (by key).

    Raises:
        ConfigError: the teacher lacks an input trace, holds one twice, or holds others.
    """
    hashes, shard_of, row_of = _read_keys(shards)
    order = np.argsort(hashes, kind="stable")
    hashes = hashes[order]
    if len(hashes) > 1 and (dup := np.flatnonzero(hashes[1:] == hashes[:-1])).size:
        raise ConfigError(f"teacher {name} ({path}) holds a trace twice (shard {shards[shard_of[order[dup[0]]]]}, "
                          f"row {row_of[order[dup[0]]]}): score each trace once")
    at = np.minimum(np.searchsorted(hashes, wanted), max(len(hashes) - 1, 0))
    found = hashes[at] == wanted if len(hashes) else np.zeros(len(wanted), bool)
    if not found.all():
        missing = _key_text(inp, int(np.flatnonzero(~found)[0]))
        raise ConfigError(f"teacher {name} ({path}) has no row for trace {missing} (prompt_id/sample_index) of the "
                          f"input, and {int((~found).sum())} trace(s) in all: score every teacher on the same traces "
                          "with the same id_column (and sample_index_column)")
    if len(hashes) != len(wanted):
        raise ConfigError(f"teacher {name} ({path}) holds {len(hashes)} traces, the input {len(wanted)}: score every "
                          "teacher on the same traces")
    return shard_of[order[at]], row_of[order[at]]


def open_teachers(cfg: BuildConfig, inp: BuildInput, student: Any) -> tuple[TeacherMix, dict[str, Any]] | None:
    """Check the teachers against the input and the student; locate every input trace in each.

    Returns:
        The :class:`TeacherMix` and, per looked-up teacher, ``(shard, row)`` arrays in the input's
        global row order (the driver keeps them and gives each part its slice); None without teachers.

    Raises:
        ConfigError, TokenizerMismatchError, SchemaError: naming the teacher and the fix.
    """
    if not cfg.teachers:
        return None
    if inp.kind != "generation":
        raise ConfigError(f"teachers need input_path to be a generate/score output, not the dataset {cfg.input_path}")
    if cfg.teacher_route_column and cfg.teacher_route_column not in inp.columns:
        raise ConfigError(f"teacher_route_column '{cfg.teacher_route_column}' is not a column of {cfg.input_path} "
                          f"(it has {sorted(inp.columns)}): pass it through at score time (passthrough_columns)")
    wanted = _input_keys(inp)
    here = os.path.realpath(cfg.input_path)
    names, paths, ks, shard_lists, locations, own = [], [], [], [], {}, None
    for name, path in cfg.teacher_paths.items():
        if not is_generation_dir(path):
            raise ConfigError(f"teacher {name}: {path} is not a generate/score output directory: run `llmdistill "
                              "score` with that teacher on the traces first")
        shards = list_shards(path)
        footers = [read_generation_footer(p, SIGNAL) for p in shards]
        info = read_generation_info(path)
        teacher_ids_usable(student, info.tokenizer if info else footers[0].teacher, True)
        if len({f.k for f in footers}) > 1:
            raise SchemaError(f"teacher {name}: shards in {path} mix top-k sizes: score them with one logprobs_top_k")
        if os.path.realpath(path) == here:
            own = name
        else:
            locations[name] = _locate(name, path, wanted, inp, shards)
        names.append(name)
        paths.append(os.path.abspath(path))
        ks.append(footers[0].k)
        shard_lists.append(tuple((str(Path(f.path).resolve()), tuple(g.first_row for g in f.row_groups) + (f.num_rows,))
                                 for f in footers))
    mix = TeacherMix(tuple(names), tuple(paths), tuple(cfg.weights), tuple(ks), tuple(shard_lists), own,
                     cfg.teacher_route_column, len(student))
    return mix, locations


def part_sources(locations: dict[str, Any], part: Part) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The slice of each looked-up teacher's (shard, row) map that covers ``part``'s rows."""
    span = slice(part.offset, part.offset + part.num_rows)
    return {name: (shard[span], row[span]) for name, (shard, row) in locations.items()}


class TeacherRows:
    """One teacher's rows, read a row group at a time (the groups of the last batch stay cached)."""

    def __init__(self, mix: TeacherMix, index: int) -> None:
        self.name, self.k, self.shards = mix.names[index], mix.ks[index], mix.shards[index]
        self.vocab_size = mix.vocab_size
        self.cache: dict[tuple[int, int], dict[str, Any]] = {}

    def _group(self, shard: int, group: int) -> dict[str, Any]:
        path, starts = self.shards[shard]
        table = pq.ParquetFile(path).read_row_group(group, columns=SIGNAL).combine_chunks()
        check_generation_rows(Path(path), table, self.k, self.vocab_size, first_row=starts[group])
        return {"pid": table.column("prompt_id").to_pylist(),
                "sample": table.column("sample_index").to_numpy(zero_copy_only=False),
                **{c: Ragged.from_arrow(table.column(c)) for c in SIGNAL[2:]}}

    def rows(self, shard: np.ndarray, row: np.ndarray) -> list[tuple[str, int, np.ndarray, np.ndarray, np.ndarray]]:
        """``(prompt_id, sample_index, completion ids, top-k ids (n, k), log-probs (n, k))`` of each row."""
        groups = [int(np.searchsorted(self.shards[s][1], r, side="right") - 1) for s, r in zip(shard, row, strict=True)]
        wanted = set(zip(shard.tolist(), groups, strict=True))
        self.cache = {key: self.cache[key] for key in wanted if key in self.cache}
        out = []
        for s, r, g in zip(shard.tolist(), row.tolist(), groups, strict=True):
            if (s, g) not in self.cache:
                self.cache[(s, g)] = self._group(s, g)
            data, i = self.cache[(s, g)], r - self.shards[s][1][g]
            out.append((data["pid"][i], int(data["sample"][i]), data["completion_token_ids"][i],
                        data["topk_ids"][i].reshape(-1, self.k), data["topk_logprobs"][i].reshape(-1, self.k)))
        return out


def _list_column(blocks: list[np.ndarray], dtype: pa.DataType) -> pa.Array:
    lengths = np.fromiter((b.size for b in blocks), dtype=np.int64, count=len(blocks))
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    values = np.concatenate([b.reshape(-1) for b in blocks]) if blocks else np.zeros(0)
    return pa.ListArray.from_arrays(offsets, pa.array(values, type=dtype.value_type))


def merge_batch(mix: TeacherMix, readers: dict[str, TeacherRows], batch: pa.RecordBatch, rows: np.ndarray,
                sources: dict[str, tuple[np.ndarray, np.ndarray]], where: str, input_k: int) -> pa.RecordBatch:
    """``batch`` (kept input traces) with its top-k columns replaced by the teachers' merged top-k.

    Args:
        mix: the teachers.
        readers: one :class:`TeacherRows` per looked-up teacher (kept across the part's batches).
        batch: input traces with ``prompt_id``, ``sample_index``, ``completion_token_ids``, top-k
            columns and the routing column.
        rows: int (batch rows,): each trace's row in its part.
        sources: :func:`part_sources` of the part.
        where: the input shard and the part's first row, for messages.
        input_k: top-k size of the input's own columns.

    Raises:
        ConfigError: a teacher scored other completion tokens for a trace, or a route names no teacher.
    """
    pids, samples = batch.column("prompt_id").to_pylist(), batch.column("sample_index").to_pylist()
    completions = Ragged.from_arrow(batch.column("completion_token_ids"))
    per_teacher = []
    for name in mix.names:
        if name == mix.own:
            ids, lps = Ragged.from_arrow(batch.column("topk_ids")), Ragged.from_arrow(batch.column("topk_logprobs"))
            per_teacher.append([(ids[i].reshape(-1, input_k), lps[i].reshape(-1, input_k)) for i in range(len(ids))])
            continue
        shard, row = sources[name]
        got = readers[name].rows(shard[rows], row[rows])
        for i, (pid, sample, comp, _, _) in enumerate(got):
            if (pid, sample) != (pids[i], samples[i]) or not np.array_equal(comp, completions[i]):
                raise ConfigError(f"teacher {name} scored other completion tokens than the input for trace "
                                  f"{pids[i]}/{samples[i]}: score every teacher on the same traces with the same "
                                  "tokenizer and append_eos")
        per_teacher.append([(ids, lps) for *_, ids, lps in got])
    routes = (batch.column(mix.route_column).to_pylist() if mix.route_column
              else [None] * batch.num_rows)
    try:
        weights = route_weights(routes, list(mix.names), list(mix.weights))
    except UnknownTeacher as err:
        raise ConfigError(f"{where}: trace {pids[err.row]}/{samples[err.row]}: {mix.route_column} = {err.value!r} "
                          f"names no teacher of {list(mix.names)}: fix the column or the teachers' names") from None
    lengths = completions.lengths()
    merged_ids, merged_lps = mix_topk([np.concatenate([b[0] for b in blocks]) for blocks in per_teacher],
                                      [np.concatenate([b[1] for b in blocks]) for blocks in per_teacher],
                                      np.repeat(weights, lengths, axis=0), mix.k)
    bounds = np.cumsum(lengths)[:-1]
    arrays = {"topk_ids": _list_column(np.split(merged_ids.astype(np.int32), bounds), pa.list_(pa.int32())),
              "topk_logprobs": _list_column(np.split(merged_lps, bounds), pa.list_(pa.float32()))}
    return pa.RecordBatch.from_arrays([arrays.get(n, batch.column(n)) for n in batch.schema.names],
                                      names=batch.schema.names)
