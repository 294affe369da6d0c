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
    finish_reason         string           ``stop`` | ``length`` | ``scored``
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
from llmdistill.prompts import PromptFormat

SHARD_GLOB = "part-*.parquet"
GENERATION_SCHEMA = "llmdistill.generation"
GENERATION_SCHEMA_VERSION = 1
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


def next_shard_index(directory: str | Path) -> int:
    """The index after the last finished shard directly in ``directory`` (0 when there is none)."""
    directory = Path(directory)
    numbers = [int(p.stem.split("-")[1]) for p in directory.glob(SHARD_GLOB)] if directory.is_dir() else []
    return max(numbers, default=-1) + 1


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


def check_generation_rows(path: Path, table: pa.Table, k: int, vocab_size: int | None = None) -> None:
    """Check a generation shard's rows: types, a completion per row, top-k shape, log-probs and ids.

    Log-probs must not be NaN or positive (``-inf``, zero probability, is allowed); ids must lie in
    ``[0, vocab_size)`` when ``vocab_size`` is given. Only the columns present are checked.

    Raises:
        SchemaError: naming the shard, the row, the column and what to do.
    """
    import pyarrow.compute as pc

    names = table.column_names
    for name in names:
        want = GENERATION_COLUMNS.get(name)
        if want is not None and table.schema.field(name).type != want:
            raise SchemaError(f"{path}: column '{name}' is {table.schema.field(name).type}, expected {want}: "
                              "the shard was not written by llmdistill generate/score; regenerate it")
    for name in ("completion", "completion_token_ids", "prompt_id"):
        if name in names and (row := _first(table.column(name).is_null().to_numpy(zero_copy_only=False))) is not None:
            raise SchemaError(f"{path} row {row}: '{name}' is null; regenerate the shard or remove the row")
    if "completion_token_ids" not in names:
        return
    n_tokens = pc.list_value_length(table.column("completion_token_ids")).to_numpy(zero_copy_only=False)
    for name in ("topk_ids", "topk_logprobs"):
        if name not in names:
            continue
        lengths = pc.list_value_length(table.column(name)).fill_null(-1).to_numpy(zero_copy_only=False)
        row = _first(lengths != n_tokens * k)
        if row is not None:
            raise SchemaError(f"{path} row {row}: '{name}' has {lengths[row]} entries for {n_tokens[row]} completion "
                              f"tokens at k = {k} (expected {n_tokens[row] * k}); the shard is damaged: regenerate it")
    offsets = np.concatenate([[0], np.cumsum(n_tokens * k)])

    def row_of(flat: int) -> int:
        return int(np.searchsorted(offsets, flat, side="right") - 1)

    if "topk_logprobs" in names:
        values = pc.list_flatten(table.column("topk_logprobs")).to_numpy(zero_copy_only=False)
        bad = _first(np.isnan(values) | (values > 1e-3))
        if bad is not None:
            raise SchemaError(f"{path} row {row_of(bad)}: 'topk_logprobs' holds {values[bad]}, not a log-probability; "
                              "the shard is damaged: regenerate it")
    if "topk_ids" in names and vocab_size is not None:
        ids = pc.list_flatten(table.column("topk_ids")).to_numpy(zero_copy_only=False)
        bad = _first((ids < 0) | (ids >= vocab_size))
        if bad is not None:
            raise SchemaError(f"{path} row {row_of(bad)}: 'topk_ids' holds id {ids[bad]}, outside the student's "
                              f"vocabulary of {vocab_size}: the traces come from another tokenizer (see `llmdistill "
                              "score`) or the shard is damaged")


def read_generation_table(directory: str | Path, columns: list[str] | None = None,
                          vocab_size: int | None = None) -> tuple[pa.Table, int]:
    """All generation shards of a directory as one Arrow table, and ``k``; every shard is checked
    (:func:`check_generation_rows`) as it is read.

    Raises:
        SchemaError: an unreadable shard, a shard of another schema/version or with bad rows, or
            shards with different ``k``; each names the shard (and the row).
        FileNotFoundError: no shard in the directory.
    """
    shards = list_shards(directory)
    if not shards:
        raise FileNotFoundError(f"no generation shards ({SHARD_GLOB}) in {directory}")
    tables, ks = [], set()
    for path in shards:
        meta = shard_metadata(path)
        _check(path, meta, GENERATION_SCHEMA, GENERATION_SCHEMA_VERSION)
        k = int(meta["k"])
        ks.add(k)
        try:
            table = pq.read_table(path, columns=columns).replace_schema_metadata(None)
        except (pa.ArrowInvalid, OSError) as err:
            raise SchemaError(f"{path} cannot be read ({' '.join(str(err).split())[:200]}): the file is truncated or "
                              "corrupt; delete it and re-run generate/score, which write only what is missing") from None
        missing = [c for c in (columns or GENERATION_COLUMNS) if c not in table.column_names]
        if missing:
            raise SchemaError(f"{path} lacks column(s) {missing}: it was not written by llmdistill generate/score")
        check_generation_rows(path, table, k, vocab_size)
        tables.append(table)
    if len(ks) > 1:
        raise SchemaError(f"shards in {directory} mix top-k sizes {sorted(ks)}: generate them with one logprobs_top_k")
    return pa.concat_tables(tables, promote_options="default"), ks.pop()


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
    """

    stage: str
    teacher: str
    tokenizer: str
    k: int
    vocab_size: int
    prompt_format: PromptFormat

    def to_manifest(self) -> dict[str, Any]:
        """The manifest entry (``"generation"``) that :func:`read_generation_info` reads back."""
        return {"stage": self.stage, "teacher": self.teacher, "tokenizer": self.tokenizer, "k": self.k,
                "vocab_size": self.vocab_size, "prompt_format": self.prompt_format.to_dict()}


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
                          prompt_format=PromptFormat.from_dict(entry["prompt_format"]))


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
    """Generation output as decoded rows (top-k as [n_tokens, k] arrays), shard by shard.

    For users who want the teacher signal as arrays; the stages read columns instead
    (:func:`read_generation_table`).
    """
    for path in list_shards(directory):
        meta = shard_metadata(path)
        _check(path, meta, GENERATION_SCHEMA, GENERATION_SCHEMA_VERSION)
        k = int(meta["k"])
        for rec in pq.read_table(path).to_pylist():
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


def read_built(directory: str | Path) -> tuple[pa.Table, dict[str, Any]]:
    """All built shards of a directory as one table, and their (shared) metadata.

    Raises:
        SchemaError: another schema/version, or shards built with different settings.
    """
    shards = list_shards(directory)
    if not shards:
        raise FileNotFoundError(f"no built shards (*.parquet) in {directory}: run `llmdistill build` first")
    tables, first = [], None
    for path in shards:
        meta = shard_metadata(path)
        _check(path, meta, BUILT_SCHEMA, BUILT_SCHEMA_VERSION)
        if first is None:
            first = meta
        elif meta != first:
            raise SchemaError(f"{path} was built with other settings than {shards[0]}: rebuild the directory")
        tables.append(pq.read_table(path).replace_schema_metadata(None))
    assert first is not None
    return pa.concat_tables(tables), first


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
