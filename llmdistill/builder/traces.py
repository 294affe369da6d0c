"""Loading the build's input: generation output or a plain dataset of text traces.

Both inputs become one :class:`Traces`: a light Arrow table that the filtering steps shrink
(``row`` points back into the source), plus the heavy columns (token ids, teacher top-k)
as flat numpy arrays with offsets, read only for the rows that survive.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from llmdistill.config.base import ConfigError, looks_like_local_path
from llmdistill.config.build import BuildConfig
from llmdistill.formats import SHARD_GLOB, is_generation_dir, read_generation_table
from llmdistill.log import get_logger
from llmdistill.prompts import prompt_hash

logger = get_logger(__name__)


@dataclass
class Ragged:
    """A list column as one flat array and offsets: ``values[offsets[i]:offsets[i+1]]`` is row ``i``."""

    values: np.ndarray
    offsets: np.ndarray

    @classmethod
    def from_arrow(cls, column: pa.ChunkedArray) -> Ragged:
        arr = column.combine_chunks()
        offsets = arr.offsets.to_numpy().astype(np.int64)
        return cls(values=arr.values.to_numpy(zero_copy_only=False), offsets=offsets)

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


@dataclass
class Traces:
    """The build's working set.

    Attributes:
        table: light columns, one row per trace: ``row`` (index into the heavy arrays),
            ``prompt_id``, ``sample_index``, ``prompt``, ``completion``, ``finish_reason``,
            ``n_tokens``, and ``reference``/``tests`` when the input has them.
        completion_ids: completion token ids per source row (teacher ids for generation input).
        prompt_ids: the teacher's prompt token ids per source row (generation input only).
        topk_ids, topk_logprobs: flat teacher top-k per source row, ``n_tokens * k`` entries.
        k: top-k size (0 without teacher signal).
        teacher: teacher model path recorded in the generation shards (None for a dataset).
        kind: ``generation`` or ``dataset``.
    """

    table: pa.Table
    completion_ids: Ragged
    prompt_ids: Ragged | None
    topk_ids: Ragged | None
    topk_logprobs: Ragged | None
    k: int
    teacher: str | None
    kind: str

    def filter(self, keep: np.ndarray) -> Traces:
        """The same traces with only the rows where ``keep`` is true."""
        out = Traces(**self.__dict__)
        out.table = self.table.filter(pa.array(np.asarray(keep, dtype=bool)))
        return out

    def column(self, name: str) -> list[Any]:
        return self.table.column(name).to_pylist()


def load_traces(cfg: BuildConfig, tokenizer: Any) -> Traces:
    """Read the configured input (see :class:`~llmdistill.config.build.BuildInputConfig`).

    Args:
        cfg: the build config.
        tokenizer: the student tokenizer, used to count the tokens of a plain dataset's completions.

    Raises:
        SchemaError: a generation directory of another schema version (regenerate it).
        ConfigError: ``kd: true`` with a plain dataset (no teacher log-probs to distil).
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
    if kind == "generation":
        return _load_generation(cfg, len(tokenizer) if cfg.kd else None)
    if cfg.kd:
        raise ConfigError(
            f"{cfg.input_path} is a plain dataset of text traces: it has no teacher log-probs for token-level KD. "
            "Build it SFT-only with `kd: false`, or score it first with `llmdistill score` and build from that output."
        )
    return _load_dataset(cfg, tokenizer)


def _passthrough(table: pa.Table, cfg: BuildConfig) -> dict[str, pa.Array]:
    out = {}
    for ours, col in (("reference", cfg.answer_column), ("tests", cfg.tests_column)):
        if col in table.column_names:
            out[ours] = table.column(col).cast(pa.string())
    return out


def _dataset_passthrough(records: list[dict[str, Any]], cfg: BuildConfig) -> dict[str, pa.Array]:
    out = {}
    for ours, col in (("reference", cfg.answer_column), ("tests", cfg.tests_column)):
        if records and col in records[0]:
            out[ours] = pa.array([None if r.get(col) is None else str(r[col]) for r in records], pa.string())
    return out


def _load_generation(cfg: BuildConfig, vocab_size: int | None) -> Traces:
    table, k = read_generation_table(cfg.input_path, vocab_size=vocab_size)
    completion_ids = Ragged.from_arrow(table.column("completion_token_ids"))
    light = {
        "row": pa.array(np.arange(table.num_rows, dtype=np.int64)),
        **{c: table.column(c) for c in ("prompt_id", "sample_index", "prompt", "completion", "finish_reason")},
        "n_tokens": pa.array(completion_ids.lengths()),
        **_passthrough(table, cfg),
    }
    teachers = table.column("teacher").unique().to_pylist()
    logger.info("read %d traces (top-%d) from %s", table.num_rows, k, cfg.input_path)
    return Traces(
        table=pa.table(light),
        completion_ids=completion_ids,
        prompt_ids=Ragged.from_arrow(table.column("prompt_token_ids")),
        topk_ids=Ragged.from_arrow(table.column("topk_ids")),
        topk_logprobs=Ragged.from_arrow(table.column("topk_logprobs")),
        k=k,
        teacher=teachers[0] if teachers else None,
        kind="generation",
    )


def _read_dataset(cfg: BuildConfig) -> list[dict[str, Any]]:
    import datasets

    path = Path(cfg.input_path)
    if path.is_file():
        builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(path.suffix)
        if builder is None:
            raise ConfigError(f"input_path {path}: use a .jsonl, .json or .parquet file, or a generation directory")
        return datasets.load_dataset(builder, data_files=str(path), split="train").to_list()
    if path.is_dir():
        raise ConfigError(f"input_path {path} holds shards of another kind than generation output: point it at the "
                          "output_dir of `llmdistill generate` or `score`")
    return datasets.load_dataset(cfg.input_path, split=cfg.dataset_split).to_list()


def _split_record(rec: dict[str, Any], cfg: BuildConfig, index: int) -> tuple[str, str]:
    """(prompt, completion) of one dataset record; the prompt as JSON messages or plain text."""
    messages = rec.get(cfg.messages_column)
    if messages:
        last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
        if last is None:
            raise ConfigError(f"{cfg.input_path}, row {index}: '{cfg.messages_column}' has no assistant message")
        prompt = [{"role": m["role"], "content": m["content"]} for m in messages[:last]]
        return json.dumps(prompt), messages[last]["content"]
    if cfg.prompt_column not in rec or cfg.completion_column not in rec:
        raise ConfigError(
            f"{cfg.input_path}, row {index}: needs a '{cfg.messages_column}' column or both '{cfg.prompt_column}' "
            f"and '{cfg.completion_column}'; it has {sorted(rec)}. Set messages_column or prompt_column/completion_column."
        )
    return str(rec[cfg.prompt_column]), str(rec[cfg.completion_column])


def _load_dataset(cfg: BuildConfig, tokenizer: Any) -> Traces:
    records = _read_dataset(cfg)
    prompts, completions, ids, samples = [], [], [], []
    seen: dict[str, int] = {}
    for i, rec in enumerate(records):
        prompt, completion = _split_record(rec, cfg, i)
        pid = str(rec[cfg.id_column]) if rec.get(cfg.id_column) is not None else prompt_hash(prompt)
        samples.append(seen.get(pid, 0))
        seen[pid] = samples[-1] + 1
        prompts.append(prompt)
        completions.append(completion)
        ids.append(pid)
    # a plain dataset's completions end where the assistant turn ends: EOS is the last target
    encoded = tokenizer(completions, add_special_tokens=False)["input_ids"]
    completion_ids = Ragged.from_lists([e + [tokenizer.eos_token_id] for e in encoded])
    table = pa.table({
        "row": pa.array(np.arange(len(records), dtype=np.int64)),
        "prompt_id": pa.array(ids, pa.string()),
        "sample_index": pa.array(samples, pa.int32()),
        "prompt": pa.array(prompts, pa.string()),
        "completion": pa.array(completions, pa.string()),
        "finish_reason": pa.array(["stop"] * len(records), pa.string()),
        "n_tokens": pa.array(completion_ids.lengths()),
        **_dataset_passthrough(records, cfg),
    })
    logger.info("read %d text traces from %s (SFT only)", len(records), cfg.input_path)
    return Traces(table=table, completion_ids=completion_ids, prompt_ids=None, topk_ids=None,
                  topk_logprobs=None, k=0, teacher=None, kind="dataset")
