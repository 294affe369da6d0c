"""Input side of ``generate`` and ``score``: load rows, check them, format and tokenize prompts.

Everything here runs before the engine starts, so a bad input fails in seconds with the file,
the line or row and the column named, instead of after a model load.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from llmdistill.config.base import UserError, looks_like_local_path
from llmdistill.config.generate import GenerateConfig, ScoreConfig
from llmdistill.log import get_logger
from llmdistill.prompts import PromptError, PromptFormat, prompt_hash, stored_prompt

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
    """One unit of teacher work: a prompt to sample from, or a (prompt, completion) pair to score."""

    prompt_id: str
    prompt: str
    prompt_text: str
    prompt_token_ids: list[int]
    passthrough: dict[str, Any] = field(default_factory=dict)
    sample_index: int = 0
    completion: str | None = None
    completion_token_ids: list[int] | None = None


# ---------------------------------------------------------------------------------------
# Paths and rows


def _read_jsonl(path: Path) -> list[tuple[str, dict]]:
    rows = []
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{path} line {number} is not valid JSON ({err.msg}): fix or remove that line") from None
            if not isinstance(record, dict):
                raise InputError(f"{path} line {number} is a JSON {type(record).__name__}, expected an object")
            rows.append((f"{path} line {number}", record))
    return rows


def _read_local(path: Path) -> list[tuple[str, dict]]:
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        records = pq.read_table(path).to_pylist()
    else:
        records = json.loads(path.read_text())
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise InputError(f"{path} must hold a JSON list of objects (one per row)")
    return [(f"{path} row {i}", r) for i, r in enumerate(records)]


def load_rows(cfg: GenerateConfig | ScoreConfig, columns: list[str]) -> list[tuple[str, dict]]:
    """The input rows as ``(location, record)``, where location names the file and line/row.

    Raises:
        InputError: missing file, malformed JSONL line, or a missing column.
    """
    source = os.path.expanduser(cfg.dataset)
    if os.path.exists(source):
        path = Path(source)
        if path.suffix not in LOCAL_SUFFIXES:
            raise InputError(f"{path}: unsupported input file type; use one of {', '.join(LOCAL_SUFFIXES)}")
        rows = _read_local(path)
    elif looks_like_local_path(cfg.dataset):
        raise InputError(f"dataset '{cfg.dataset}' does not exist (and is not a hub dataset id): fix the path")
    else:
        rows = _load_hub(cfg, columns)
    if cfg.max_prompts is not None:
        rows = rows[: cfg.max_prompts]
    settings = {getattr(cfg, name, None): name for name in ("prompt_column", "id_column", "completion_column",
                                                             "sample_index_column")}
    for location, record in rows:
        for column in columns:
            if column not in record:
                setting = settings.get(column, "passthrough_columns")
                raise InputError(f"{location}: column '{column}' is missing (it has {sorted(record)}); "
                                 f"fix the data or the {setting} setting")
    return rows


def _load_hub(cfg: GenerateConfig | ScoreConfig, columns: list[str]) -> list[tuple[str, dict]]:
    import datasets

    ds = datasets.load_dataset(cfg.dataset, name=cfg.dataset_config, split=cfg.dataset_split)
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise InputError(f"dataset {cfg.dataset} ({cfg.dataset_split}) has no column(s) {missing}; "
                         f"its columns are {ds.column_names}")
    if cfg.max_prompts is not None:
        ds = ds.select(range(min(cfg.max_prompts, len(ds))))
    name = f"{cfg.dataset}[{cfg.dataset_split}]"
    return [(f"{name} row {i}", r) for i, r in enumerate(ds.select_columns(columns).to_list())]


def passthrough_types(rows: list[tuple[str, dict]], columns: list[str]) -> dict[str, pa.DataType]:
    """Arrow type of each passthrough column, inferred from its values (all-null: string)."""
    types = {}
    for column in columns:
        typ = pa.array([r[column] for _, r in rows]).type if rows else pa.string()
        types[column] = pa.string() if pa.types.is_null(typ) else typ
    return types


# ---------------------------------------------------------------------------------------
# Prompt ids and requests


def shard_of(prompt_id: str, count: int) -> int:
    """Which of ``count`` shards a prompt id belongs to (deterministic across machines)."""
    return int(hashlib.sha256(prompt_id.encode()).hexdigest()[:12], 16) % count


def check_unique(requests: list[Request], locations: list[str]) -> None:
    """Fail on two rows with the same (prompt id, sample index): resume could not tell them apart."""
    seen: dict[tuple[str, int], str] = {}
    for req, location in zip(requests, locations, strict=True):
        key = (req.prompt_id, req.sample_index)
        if key in seen:
            raise InputError(f"{location} repeats prompt id {req.prompt_id!r} (sample {req.sample_index}) of "
                             f"{seen[key]}: deduplicate the input or set id_column to a unique column")
        seen[key] = location


def _prompt_id(cfg: GenerateConfig | ScoreConfig, record: dict, prompt: Any, location: str) -> str:
    if cfg.id_column is None:
        return prompt_hash(prompt)
    value = record[cfg.id_column]
    if value is None or str(value) == "":
        raise InputError(f"{location}: the id column '{cfg.id_column}' is empty")
    return str(value)


def input_columns(cfg: GenerateConfig | ScoreConfig) -> list[str]:
    """The input columns a stage reads (all must exist in every row)."""
    columns = [cfg.prompt_column, cfg.id_column, *cfg.passthrough_columns]
    if isinstance(cfg, ScoreConfig):
        columns += [cfg.completion_column, cfg.sample_index_column]
    return list(dict.fromkeys(c for c in columns if c))


def prompt_requests(cfg: GenerateConfig, formatter: Formatter, rows: list[tuple[str, dict]]) -> list[Request]:
    """One request per input row (not yet tokenized: see :func:`tokenize_requests`)."""
    requests, locations = [], []
    for location, record in rows:
        prompt = record[cfg.prompt_column]
        requests.append(Request(
            prompt_id=_prompt_id(cfg, record, prompt, location),
            prompt=stored_prompt(prompt),
            prompt_text=formatter.text(prompt, location),
            prompt_token_ids=[],
            passthrough={c: record[c] for c in cfg.passthrough_columns},
        ))
        locations.append(location)
    check_unique(requests, locations)
    return requests


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


def score_requests(cfg: ScoreConfig, formatter: Formatter, rows: list[tuple[str, dict]]) -> list[Request]:
    """One request per (prompt, completion) row (not yet tokenized)."""
    requests, locations, seen = [], [], {}
    for location, record in rows:
        prompt, completion = _split_pair(cfg, record, location)
        if not isinstance(completion, str) or not completion:
            raise InputError(f"{location}: the completion is empty or not text; remove the row or fill it in")
        prompt_id = _prompt_id(cfg, record, prompt, location)
        if cfg.sample_index_column:
            sample_index = int(record[cfg.sample_index_column])
        else:
            sample_index = seen.get(prompt_id, 0)
            seen[prompt_id] = sample_index + 1
        requests.append(Request(
            prompt_id=prompt_id,
            prompt=stored_prompt(prompt),
            prompt_text=formatter.text(prompt, location),
            prompt_token_ids=[],
            passthrough={c: record[c] for c in cfg.passthrough_columns},
            sample_index=sample_index,
            completion=completion,
        ))
        locations.append(location)
    check_unique(requests, locations)
    return requests


def tokenize_requests(requests: list[Request], formatter: Formatter, append_eos: bool = False) -> None:
    """Fill in prompt token ids, and completion token ids of score requests.

    Prompt and completion are tokenized separately and concatenated, so the completion's ids
    (and so the positions that get scored) are known exactly.
    """
    encoded = formatter.format.encode(formatter.tokenizer, [r.prompt_text for r in requests])
    for req, ids in zip(requests, encoded, strict=True):
        req.prompt_token_ids = list(ids)
    pairs = [r for r in requests if r.completion is not None]
    if not pairs:
        return
    tokenizer = formatter.tokenizer
    if append_eos and tokenizer.eos_token_id is None:
        raise InputError(f"append_eos is set but the tokenizer of {tokenizer.name_or_path} has no eos_token")
    encoded = tokenizer([r.completion for r in pairs], add_special_tokens=False)["input_ids"]
    for req, ids in zip(pairs, encoded, strict=True):
        req.completion_token_ids = list(ids) + ([tokenizer.eos_token_id] if append_eos else [])


def drop_too_long(requests: list[Request], max_model_len: int | None, room: int) -> tuple[list[Request], int]:
    """Requests that fit in the context (prompt + completion + ``room`` tokens), and how many did not."""
    if max_model_len is None:
        return requests, 0
    kept = [r for r in requests
            if len(r.prompt_token_ids) + len(r.completion_token_ids or ()) + room <= max_model_len]
    return kept, len(requests) - len(kept)
