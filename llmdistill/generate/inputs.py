"""Input side of ``generate`` and ``score``: load rows, check them, format and tokenize prompts.

Everything here runs before the engine starts, so a bad input fails in seconds with the file,
the line or row and the column named, instead of after a model load. A ``--shard i/N`` job
computes each row's prompt id from the raw row first and formats only its own part's rows.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from llmdistill.config.base import (
    UserError,
    first_mixed_value,
    json_array_objects,
    jsonl_objects,
    looks_like_local_path,
)
from llmdistill.config.generate import GenerateConfig, ScoreConfig
from llmdistill.log import get_logger
from llmdistill.prompts import PromptError, PromptFormat, prompt_hash, read_text_or_file, stored_prompt

logger = get_logger(__name__)

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


class InputError(UserError):
    """Input data or paths that cannot be used; raised before the engine starts."""


@dataclass
class Formatter:
    """The stage's prompt format bound to the teacher tokenizer."""

    format: PromptFormat
    tokenizer: Any

    @classmethod
    def of(cls, cfg: GenerateConfig | ScoreConfig, tokenizer: Any) -> Formatter:
        """The configured format (inline text or files); fails on a missing chat template."""
        try:
            fmt = PromptFormat.from_settings(cfg.system_prompt, cfg.instruction_template, cfg.use_chat_template)
            fmt.check_tokenizer(tokenizer)
        except PromptError as err:
            raise InputError(str(err)) from None
        return cls(fmt, tokenizer)

    def text(self, prompt: Any, location: str) -> str:
        try:
            return self.format.render(self.tokenizer, prompt, location)
        except PromptError as err:
            raise InputError(str(err)) from None


@dataclass
class Request:
    """A prompt to sample from, or a (prompt, completion) pair to score.

    Token ids are int32 arrays (4 bytes a token, not a Python int's 36): a part's prompts stay in
    memory for the run. A pair's completion is tokenized only when it is about to be scored
    (:func:`tokenized_pairs`), so ``completion_token_ids`` is None until then.
    """

    prompt_id: str
    prompt: str
    prompt_text: str
    prompt_token_ids: np.ndarray
    passthrough: dict[str, Any] = field(default_factory=dict)
    sample_index: int = 0
    completion: str | None = None
    completion_token_ids: np.ndarray | None = None


@dataclass
class PartRows:
    """The input rows of one part (``--shard i/N``), read before any prompt is formatted.

    Attributes:
        rows: ``(location, record)`` of the part's rows; location names the file and line/row.
        total: input rows read (all parts, after ``max_prompts``).
        types: Arrow types of the passthrough columns from the input's schema (hub, Parquet);
            None for JSON/JSONL, whose types are inferred from the part's values.
    """

    rows: list[tuple[str, dict]]
    total: int
    types: dict[str, pa.DataType] | None = None


# ---------------------------------------------------------------------------------------
# Prompt ids: computed from the raw row, before formatting, so a part formats only its own rows


def shard_of(prompt_id: str, count: int) -> int:
    """Which of ``count`` shards a prompt id belongs to (deterministic across machines).

    Rows with the same id always share a part, so duplicates are found within one part.
    """
    return int(hashlib.sha256(prompt_id.encode()).hexdigest()[:12], 16) % count


def _split_pair(cfg: ScoreConfig, record: dict, location: str) -> tuple[Any, Any]:
    """(prompt, completion) of a score row: two columns, or messages ending with the assistant's turn."""
    if cfg.completion_column:
        return record[cfg.prompt_column], record[cfg.completion_column]
    messages = record[cfg.prompt_column]
    if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict) \
            or messages[-1].get("role") != "assistant":
        raise InputError(f"{location}: without completion_column, '{cfg.prompt_column}' must hold chat messages "
                         f"whose last turn is the assistant's completion")
    return messages[:-1], messages[-1].get("content")


def _prompt_of(cfg: GenerateConfig | ScoreConfig, record: dict, location: str) -> Any:
    if isinstance(cfg, ScoreConfig) and not cfg.completion_column:
        return _split_pair(cfg, record, location)[0]
    return record[cfg.prompt_column]


def _prompt_id(cfg: GenerateConfig | ScoreConfig, record: dict, prompt: Any, location: str) -> str:
    if cfg.id_column is None:
        return prompt_hash(prompt)
    value = record[cfg.id_column]
    if value is None or str(value) == "":
        raise InputError(f"{location}: the id column '{cfg.id_column}' is empty")
    return str(value)


def _id_columns(cfg: GenerateConfig | ScoreConfig) -> list[str]:
    """The columns a row's prompt id is computed from."""
    return [cfg.id_column] if cfg.id_column else [cfg.prompt_column]


def _check_columns(cfg: GenerateConfig | ScoreConfig, record: dict, location: str, columns: list[str]) -> None:
    for column in columns:
        if column not in record:
            settings = {getattr(cfg, name, None): name for name in ("prompt_column", "id_column", "completion_column",
                                                                     "sample_index_column")}
            setting = settings.get(column, "passthrough_columns")
            raise InputError(f"{location}: column '{column}' is missing (it has {sorted(record)}); "
                             f"fix the data or the {setting} setting")


def row_prompt_id(cfg: GenerateConfig | ScoreConfig, record: dict, location: str) -> str:
    """The prompt id of an input row: its id column, or a stable hash of its prompt."""
    _check_columns(cfg, record, location, _id_columns(cfg))
    prompt = None if cfg.id_column else _prompt_of(cfg, record, location)
    return _prompt_id(cfg, record, prompt, location)


# ---------------------------------------------------------------------------------------
# Paths and rows


def _read_jsonl(path: Path, keep: Callable[[str, dict], bool], limit: int | None) -> PartRows:
    rows, total = [], 0
    for number, record in jsonl_objects(path, InputError, limit):
        total += 1
        location = f"{path} line {number}"
        if keep(location, record):
            rows.append((location, record))
    return PartRows(rows, total)


def _read_json(path: Path, keep: Callable[[str, dict], bool], limit: int | None) -> PartRows:
    rows, total = [], 0
    for index, record in json_array_objects(path, InputError, limit):  # streamed: one row at a time
        total += 1
        location = f"{path} row {index}"
        if keep(location, record):
            rows.append((location, record))
    return PartRows(rows, total)


ROW_BATCH = 8192  # input rows per Arrow batch while picking a part's rows: bounds the other parts' rows in memory


def _select_rows(cfg: GenerateConfig | ScoreConfig, schema: pa.Schema,
                 read: Callable[[list[str]], Iterable[pa.RecordBatch]], name: str, columns: list[str],
                 keep: Callable[[str, dict], bool]) -> PartRows:
    """The part's rows of a Parquet file or hub table, one Arrow batch at a time.

    ``read(names)`` yields the table's batches of just those columns. Each batch's prompt ids
    come from its id columns first; only the part's rows of the other columns are turned into
    Python objects, so memory holds the part plus one batch, never the other parts' rows.
    """
    id_cols = _id_columns(cfg)
    needed = list(dict.fromkeys([*columns, *id_cols]))
    missing = [c for c in needed if c not in schema.names]
    if missing:
        raise InputError(f"{name} has no column(s) {missing}; its columns are {schema.names}")
    rest = [c for c in needed if c not in id_cols]
    rows, total = [], 0
    for batch in read(needed):
        keys = batch.select(id_cols).to_pylist()
        kept = [i for i, key in enumerate(keys) if keep(f"{name} row {total + i}", key)]
        others = batch.select(rest).take(pa.array(kept, type=pa.int64())).to_pylist()
        rows += [(f"{name} row {total + i}", keys[i] | other) for i, other in zip(kept, others, strict=True)]
        total += batch.num_rows
    types = {c: schema.field(c).type for c in cfg.passthrough_columns}
    return PartRows(rows, total, types)


def _parquet_batches(parquet: Any, columns: list[str], limit: int | None) -> Iterator[pa.RecordBatch]:
    """The batches of ``columns`` of a ``pyarrow.parquet.ParquetFile``: its other columns are never read,
    nor its rows after the first ``limit``."""
    seen = 0
    for batch in parquet.iter_batches(batch_size=ROW_BATCH, columns=columns):
        if limit is not None and seen + batch.num_rows >= limit:
            yield batch.slice(0, limit - seen)
            return
        seen += batch.num_rows
        yield batch


def load_rows(cfg: GenerateConfig | ScoreConfig, columns: list[str], part: tuple[int, int] = (0, 1)) -> PartRows:
    """The input rows of part ``i`` of ``N`` (by prompt id), each with its location (file and line/row).

    Rows of other parts are read only as far as needed to compute their prompt id, and are
    never formatted or kept.

    Raises:
        InputError: missing file, malformed JSONL line, or a missing column.
    """
    index, count = part

    def keep(location: str, record: dict) -> bool:
        if count == 1:
            return True
        return shard_of(row_prompt_id(cfg, record, location), count) == index

    source = os.path.expanduser(cfg.dataset)
    if os.path.exists(source):
        path = Path(source)
        if path.suffix not in LOCAL_SUFFIXES:
            raise InputError(f"{path}: unsupported input file type; use one of {', '.join(LOCAL_SUFFIXES)}")
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            parquet = pq.ParquetFile(path)
            loaded = _select_rows(cfg, parquet.schema_arrow, lambda names: _parquet_batches(parquet, names, cfg.max_prompts),
                                  str(path), columns, keep)
        else:
            read = _read_jsonl if path.suffix == ".jsonl" else _read_json
            loaded = read(path, keep, cfg.max_prompts)
    elif looks_like_local_path(cfg.dataset):
        raise InputError(f"dataset '{cfg.dataset}' does not exist (and is not a hub dataset id): fix the path")
    else:
        loaded = _load_hub(cfg, columns, keep)
    for location, record in loaded.rows:
        _check_columns(cfg, record, location, columns)
    return loaded


def hub_table(dataset: str, config: str | None, split: str, error: type[UserError] = InputError) -> pa.Table:
    """A hub dataset's split as its memory-mapped Arrow table (HF datasets' cache): only the rows a
    caller takes are decoded. Not found, unreachable, or no such config or split: one line."""
    import datasets

    try:
        return datasets.load_dataset(dataset, name=config, split=split).data.table
    except (OSError, ValueError) as err:
        raise error(f"could not load dataset {dataset} ({split}): {err}. Check the id, dataset_config and "
                    "dataset_split, or point dataset at a local file") from None


def _load_hub(cfg: GenerateConfig | ScoreConfig, columns: list[str], keep: Callable[[str, dict], bool]) -> PartRows:
    table = hub_table(cfg.dataset, cfg.dataset_config, cfg.dataset_split)
    if cfg.max_prompts is not None:
        table = table.slice(0, cfg.max_prompts)
    return _select_rows(cfg, table.schema, lambda names: table.select(names).to_batches(max_chunksize=ROW_BATCH),
                        f"dataset {cfg.dataset} ({cfg.dataset_split})", columns, keep)


def passthrough_types(loaded: PartRows, columns: list[str]) -> dict[str, pa.DataType]:
    """Arrow type of each passthrough column: the input's schema when it has one, else inferred from the
    part's values (all-null: string)."""
    types = {}
    for column in columns:
        if loaded.types is not None:
            typ = loaded.types[column]
        else:
            typ = _inferred_type(loaded.rows, column) if loaded.rows else pa.string()
        types[column] = pa.string() if pa.types.is_null(typ) else typ
    return types


def _inferred_type(rows: list[tuple[str, dict]], column: str) -> pa.DataType:
    """The Arrow type of a JSON/JSONL passthrough column's values.

    Raises:
        InputError: values that are not one type, naming the first row that does not fit the rows before it.
    """
    values = [r[column] for _, r in rows]
    try:
        return pa.array(values).type
    except (pa.ArrowException, OverflowError):
        bad = first_mixed_value(values)
        if bad is None:  # not a question of types
            raise
    location, value = rows[bad][0], values[bad]
    earlier = pa.array(values[:bad]).type
    why = "cannot be stored" if pa.types.is_null(earlier) else f"does not fit the {earlier} values of the rows before it"
    raise InputError(f"{location}: passthrough column '{column}' holds {value!r:.60}, which {why}; make the column one "
                     "type in every row or drop it from passthrough_columns")


# ---------------------------------------------------------------------------------------
# Requests


def check_unique(requests: list[Request], locations: list[str]) -> None:
    """Fail on two rows with the same (prompt id, sample index): resume could not tell them apart."""
    seen: dict[tuple[str, int], str] = {}
    for req, location in zip(requests, locations, strict=True):
        key = (req.prompt_id, req.sample_index)
        if key in seen:
            raise InputError(f"{location} repeats prompt id {req.prompt_id!r} (sample {req.sample_index}) of "
                             f"{seen[key]}: deduplicate the input or set id_column to a unique column")
        seen[key] = location


def input_columns(cfg: GenerateConfig | ScoreConfig) -> list[str]:
    """The input columns a stage reads (all must exist in every row)."""
    columns = [cfg.prompt_column, cfg.id_column, *cfg.passthrough_columns]
    if isinstance(cfg, ScoreConfig):
        columns += [cfg.completion_column, cfg.sample_index_column]
    else:
        columns.append(cfg.rewrite_column)
    return list(dict.fromkeys(c for c in columns if c))


NO_TOKENS = np.zeros(0, dtype=np.int32)


def rewrite_prompt(template: str, prompt: Any, reference: Any, location: str) -> Any:
    """The request that asks the model to rewrite ``reference`` (SDFT): ``template`` with the prompt and
    the reference filled in, as the last user turn (text stays text, messages stay messages)."""
    if not isinstance(reference, str) or not reference.strip():
        raise InputError(f"{location}: the reference answer (rewrite_column) is empty or not text; fill it in or "
                         "remove the row")

    def fill(question: Any) -> str:
        return template.replace("{prompt}", str(question)).replace("{reference}", reference)

    if isinstance(prompt, str):
        return fill(prompt)
    users = [i for i, m in enumerate(prompt) if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise InputError(f"{location}: a rewrite needs a user turn in the prompt to put the reference after")
    return [m | {"content": fill(m["content"])} if i == users[-1] else m for i, m in enumerate(prompt)]


def prompt_requests(cfg: GenerateConfig, formatter: Formatter, rows: list[tuple[str, dict]]) -> list[Request]:
    """One request per input row (not yet tokenized: see :func:`tokenize_prompts`).

    With ``rewrite_column`` (SDFT) the model reads :func:`rewrite_prompt`, while the stored
    ``prompt`` stays the original one: what the student will be trained to answer.
    """
    template = read_text_or_file(cfg.rewrite_template) if cfg.rewrite_column else None
    requests, locations = [], []
    for location, record in rows:
        prompt = record[cfg.prompt_column]
        shown = rewrite_prompt(template, prompt, record[cfg.rewrite_column], location) if template else prompt
        requests.append(Request(
            prompt_id=_prompt_id(cfg, record, prompt, location),
            prompt=stored_prompt(prompt),
            prompt_text=formatter.text(shown, location),
            prompt_token_ids=NO_TOKENS,
            passthrough={c: record[c] for c in cfg.passthrough_columns},
        ))
        locations.append(location)
    check_unique(requests, locations)
    return requests


SAMPLE_INDEX_END = 2**31  # sample indices are stored as int32


def _sample_index(cfg: ScoreConfig, record: dict, location: str) -> int:
    """A row's ``sample_index_column`` value: a whole number in [0, 2**31) (floats and booleans are refused)."""
    value = record[cfg.sample_index_column]
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < SAMPLE_INDEX_END:
        raise InputError(f"{location}: the sample index column '{cfg.sample_index_column}' holds {value!r:.60}, not a "
                         f"whole number from 0 to {SAMPLE_INDEX_END - 1}; fix the data or the sample_index_column setting")
    return value


def score_requests(cfg: ScoreConfig, formatter: Formatter, rows: list[tuple[str, dict]]) -> list[Request]:
    """One request per (prompt, completion) row (not yet tokenized)."""
    requests, locations, seen = [], [], {}
    for location, record in rows:
        prompt, completion = _split_pair(cfg, record, location)
        if not isinstance(completion, str) or not completion:
            raise InputError(f"{location}: the completion is empty or not text; remove the row or fill it in")
        prompt_id = _prompt_id(cfg, record, prompt, location)
        if cfg.sample_index_column:
            sample_index = _sample_index(cfg, record, location)
        else:
            sample_index = seen.get(prompt_id, 0)
            seen[prompt_id] = sample_index + 1
        requests.append(Request(
            prompt_id=prompt_id,
            prompt=stored_prompt(prompt),
            prompt_text=formatter.text(prompt, location),
            prompt_token_ids=NO_TOKENS,
            passthrough={c: record[c] for c in cfg.passthrough_columns},
            sample_index=sample_index,
            completion=completion,
        ))
        locations.append(location)
    check_unique(requests, locations)
    return requests


TOKENIZE_CHUNK = 512  # texts per tokenizer call: bounds the Python lists a call builds


def tokenize_prompts(requests: list[Request], formatter: Formatter) -> None:
    """Fill in the prompt token ids (int32 arrays), ``TOKENIZE_CHUNK`` prompts per tokenizer call."""
    for start in range(0, len(requests), TOKENIZE_CHUNK):
        chunk = requests[start:start + TOKENIZE_CHUNK]
        for req, ids in zip(chunk, formatter.format.encode(formatter.tokenizer, [r.prompt_text for r in chunk]),
                            strict=True):
            req.prompt_token_ids = np.asarray(ids, dtype=np.int32)


def eos_suffix(tokenizer: Any, append_eos: bool) -> list[int]:
    """The token ids scored after each completion: ``[eos]`` with ``append_eos``.

    Raises:
        InputError: ``append_eos`` with a tokenizer that has no EOS token.
    """
    if append_eos and tokenizer.eos_token_id is None:
        raise InputError(f"append_eos is set but the tokenizer of {tokenizer.name_or_path} has no eos_token")
    return [tokenizer.eos_token_id] if append_eos else []


def tokenized_pairs(requests: Iterable[Request], tokenizer: Any, suffix: list[int]) -> Iterator[Request]:
    """Score requests with their completion token ids, tokenized ``TOKENIZE_CHUNK`` at a time as they are needed.

    Prompt and completion are tokenized separately and concatenated, so the completion's ids
    (and so the positions that get scored) are known exactly. The given requests are not
    changed: each is yielded as a copy holding its ids, which are dropped once it is written.
    """
    it = iter(requests)
    while chunk := list(itertools.islice(it, TOKENIZE_CHUNK)):
        encoded = tokenizer([r.completion for r in chunk], add_special_tokens=False)["input_ids"]
        for req, ids in zip(chunk, encoded, strict=True):
            yield replace(req, completion_token_ids=np.asarray(ids + suffix, dtype=np.int32))


def fits(req: Request, max_model_len: int | None, room: int) -> bool:
    """Whether prompt + completion + ``room`` tokens fit in the context."""
    completion = 0 if req.completion_token_ids is None else len(req.completion_token_ids)
    return max_model_len is None or len(req.prompt_token_ids) + completion + room <= max_model_len


def drop_too_long(requests: list[Request], max_model_len: int | None, room: int) -> tuple[list[Request], int]:
    """Requests that fit in the context (prompt + completion + ``room`` tokens), and how many did not."""
    kept = [r for r in requests if fits(r, max_model_len, room)]
    return kept, len(requests) - len(kept)
