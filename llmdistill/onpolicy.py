"""``llmdistill onpolicy``: the student samples, the teacher grades every token, the student learns.

Offline KD (``generate`` → ``build`` → ``train``) shows the student the teacher's own traces.
On-policy distillation (GKD, Agarwal et al. 2024; Qwen3's strong-to-weak stage; Thinking
Machines' on-policy distillation) shows it its own attempts instead, mistakes included, with
the teacher's judgement of every token. Each optimizer step reads like a training loop:

1. :func:`rollout` — the current student samples completions for a batch of prompts (an
   in-process vLLM engine holding a copy of the student, the student's own vLLM servers, or
   ``model.generate``); with ``steps_per_rollout`` k the prompts of k steps are sampled in one
   batch and trained a step at a time, and with ``async_rollouts`` the servers sample the next
   batch while this one is scored and trained (:class:`RolloutSource`);
2. :func:`score` — the teacher reads prompt + the student's completion in one prefill and
   returns its top-k log-probs (and the log-prob of the sampled token) at every completion
   position, never a full ``[tokens × vocab]`` tensor;
3. :func:`onpolicy_loss` — per-token reverse KL (or generalized JSD) on the teacher's top-k plus
   the tail bucket through :func:`llmdistill.losses.chunked_distill_loss`, or the sampled-token
   reverse-KL advantage as a policy gradient; optionally an answer-checker reward term;
4. the AdamW step;
5. :meth:`VllmRollout.sync` / :meth:`ServerRollout.sync` — every ``sync_every`` steps (before a
   rollout) the rollout engine reloads the student's weights in place (vLLM's ``reload_weights``:
   handed the tensors in process, or read by the servers from ``rollout_sync_dir``), so the next
   rollouts come from the new policy.

With ``on_policy_fraction`` (GKD's lambda) below 1, a seeded choice per step index sends some
steps to :class:`OfflineBatches` instead: a batch of built shards (the teacher's own traces with
its top-k, read as ``train`` reads them) and the same divergence, with no rollout and no scoring.
The teacher runs in this process (:class:`TransformersTeacher`, or a vLLM engine: :class:`VllmTeacher`, the
``score`` stage's offline engine) or on a pool of ``vllm serve`` servers (:class:`ServerTeacher`, the
``score`` stage's client).

Under ``accelerate launch`` with several processes (:class:`Ranks`) they train one student
data-parallel: each samples, scores and back-propagates its share of every step's prompts, and the
gradients are summed over all of them before the one optimizer step every process takes.

Checkpoints hold the student, the optimizer, the scheduler, the RNG states and the position in
the prompt stream, so a resumed run continues with the prompts it would have seen. SIGTERM (sent
ahead of a scheduler's time limit) stops the run at the end of its step with a checkpoint
(:class:`~llmdistill.checkpoints.StopRequest`), the engines closed and the sync files removed.
The manifest records the compute: optimizer steps, trained tokens, rollout tokens, teacher tokens scored and
wall seconds per phase.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import random
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from llmdistill.checking.checkers import Reference, check_many
from llmdistill.checkpoints import ADAPTER_DIR, ONPOLICY_STATE
from llmdistill.collate import DistillCollator
from llmdistill.compute import run_record
from llmdistill.config.base import (
    RESUME_LATEST,
    ConfigError,
    check_model_path,
    first_mixed_value,
    json_array_objects,
    jsonl_objects,
    looks_like_local_path,
)
from llmdistill.config.onpolicy import OnPolicyConfig
from llmdistill.distributed import Ranks, sum_gradients
from llmdistill.formats import (
    SchemaError,
    built_cache_dir,
    check_built_fits,
    convert_built_to_arrow,
    open_built,
    read_built_metadata,
)
from llmdistill.log import get_logger
from llmdistill.losses import NO_TRANSFORM, LogitTransform, chunked_distill_loss
from llmdistill.manifest import MANIFEST, write_json_atomic, write_manifest
from llmdistill.prompts import PromptFormat
from llmdistill.teacher import (
    TransformersTeacher,
    check_logit_transform,
    check_same_vocabulary,
    logit_transform,
    on_device,
    predicting_hidden,
)
from llmdistill.vllm_runtime import set_cpu_kv_cache, vllm_lora_rank

logger = get_logger(__name__)

PHASES = ("rollout", "scoring", "training", "sync")  # sync: the weights, and the engine's wake-up (sleep_mode)
GRADES = ("teacher_ids", "teacher_logprobs", "teacher_token_logprobs")  # what scoring adds per completion token
# Generator keys of the offline steps' choice and row order. NumPy's SeedSequence reads a key as one
# integer, word by word, so trailing zeros drop out ([s, 1, 0] is [s, 1]): the prompt order's keys
# are [seed, epoch] (at most two words), these are three words or more, ending in a non-zero word
# before the epoch, and no two of the streams can share a key.
OFFLINE_CHOICE_KEY = (1, 1)
OFFLINE_ROWS_KEY = (1, 2)


# ---------------------------------------------------------------------------------------
# Prompts


def seeded_slice(n: int, key: list[int], start: int, size: int) -> list[int]:
    """Positions ``start ... start + size - 1`` of a seeded order of ``range(n)``, reshuffled every epoch
    (each item once per epoch).

    Position ``p`` is always the same item for the same ``key``: a resumed run finds its batch again.
    """
    out = []
    for position in range(start, start + size):
        epoch, offset = divmod(position, n)
        out.append(int(epoch_order(n, tuple(key), epoch)[offset]))
    return out


@functools.lru_cache(maxsize=4)  # the current epoch (and the next, at its end) of the prompts and the offline rows
def epoch_order(n: int, key: tuple[int, ...], epoch: int) -> np.ndarray:
    """The seeded permutation of ``range(n)`` for ``epoch``: drawn once per epoch and kept, not once per
    step (a permutation of millions of rows takes a tenth of a second and 8 bytes a row)."""
    order = np.random.default_rng([*key, epoch]).permutation(n)
    order.flags.writeable = False
    return order


@dataclass(frozen=True)
class Cursor:
    """Where each optimizer step reads one of the run's seeded streams (the prompts, or the offline rows).

    The steps that read the stream (``reads``; ``None``: every step) take ``size`` items each, one
    after another: step ``s`` starts at ``start`` plus ``size`` for every reading step from ``first``
    to ``s``. ``first`` and ``start`` are the step the run began at and its position (0 and 0, or
    a checkpoint's step and the position it had reached), so a run resumed with another ``size``
    goes on where the checkpoint stopped: no item of the epoch is repeated or skipped.
    """

    size: int
    reads: np.ndarray | None = None  # (max_steps,) bool
    first: int = 0
    start: int = 0
    # before[s]: the reading steps before step s (a prefix sum, so position() costs O(1), not O(max_steps))
    before: np.ndarray | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        before = None if self.reads is None else np.concatenate([[0], np.cumsum(self.reads, dtype=np.int64)])
        object.__setattr__(self, "before", before)

    def position(self, step: int) -> int:
        """The stream position of step ``step``'s first item (for ``step`` = a checkpoint's step: where it stopped)."""
        reading = step - self.first if self.before is None else int(self.before[step] - self.before[self.first])
        return self.start + self.size * reading

    def resumed(self, step: int, position: int) -> Cursor:
        """This cursor for a run that resumes at ``step`` from stream position ``position``."""
        return Cursor(self.size, self.reads, step, position)


class PromptTable:
    """The prompt rows, as one Arrow table of only the columns the run reads.

    A hub dataset stays memory-mapped (HF datasets' Arrow cache); of a local Parquet file only those
    columns are read; a JSONL file is parsed once, 64k lines at a time, into Arrow columns. A row
    becomes a Python dict only when its step draws it, so a prompt set of millions of rows costs
    its Arrow bytes (of the columns read), not millions of dicts.
    """

    def __init__(self, table: pa.Table, name: str = "prompts") -> None:
        self.table = table
        self.name = name  # the file or hub dataset, for messages
        # the table's record batches (zero-copy) and the first row of each: a step's rows are taken
        # from the batches that hold them, never from the whole column joined into one array (that
        # join would cost the whole column's bytes every step, and overflow 32-bit string offsets
        # past 2 GiB of text)
        self._batches = table.to_batches()
        self._starts = np.cumsum([0] + [b.num_rows for b in self._batches])

    @classmethod
    def from_rows(cls, rows: list[dict[str, Any]]) -> PromptTable:
        return cls(pa.Table.from_pylist(rows))

    def __len__(self) -> int:
        return self.table.num_rows

    def rows(self, indices: list[int]) -> list[dict[str, Any]]:
        """The rows at ``indices``, in that order, as dicts. Chat messages come back with only the keys
        they were given: Arrow holds all messages as one struct type, which fills a key another
        message has with None (a chat template may test ``'tool_calls' in message``)."""
        where = np.asarray(indices, dtype=np.int64)
        if where.size and (where.min() < 0 or where.max() >= len(self)):
            raise IndexError(f"{self.name}: row indices out of range 0..{len(self) - 1}")
        batch_of = np.searchsorted(self._starts, where, side="right") - 1
        rows: list[Any] = [None] * where.size
        for b in np.unique(batch_of):
            places = np.flatnonzero(batch_of == b)
            taken = self._batches[b].take(pa.array(where[places] - self._starts[b])).to_pylist()
            for place, row in zip(places, taken, strict=True):
                rows[place] = row
        for row in rows:
            for key, value in row.items():
                if isinstance(value, list) and value and isinstance(value[0], dict):
                    row[key] = [{k: v for k, v in m.items() if v is not None} for m in value]
        return rows


@dataclass
class PromptStream:
    """The prompts in a seeded order, epoch after epoch: position ``p`` is always the same prompt, and
    ``cursor`` says where each step reads (``prompts_per_step`` prompts an on-policy step).

    A resumed run asks for the batch of its step and gets exactly the prompts the interrupted
    run would have seen.
    """

    prompts: PromptTable
    seed: int
    cursor: Cursor

    def batch(self, step: int) -> list[int]:
        """Indices into :attr:`prompts` of the prompts of optimizer step ``step``."""
        return seeded_slice(len(self.prompts), [self.seed], self.cursor.position(step), self.cursor.size)


_CHUNK_ROWS = 65_536  # JSONL/JSON rows turned into one Arrow chunk


def _check_row(row: dict[str, Any], needed: list[str], cfg: OnPolicyConfig, location: str) -> None:
    if missing := [c for c in needed if c not in row]:
        raise ConfigError(f"{location}: column(s) {missing} missing (it has {sorted(row)})")
    if empty := [c for c in needed if row[c] is None]:
        raise ConfigError(f"{location}: column(s) {empty} empty: fill them or remove the row")
    if cfg.teacher_column and str(row[cfg.teacher_column]) not in cfg.teachers:
        raise ConfigError(f"{location}: teacher '{row[cfg.teacher_column]}' is not one of {sorted(cfg.teachers)} "
                          "(teacher_model)")


def _records_table(path: Path, records: Iterable[tuple[str, dict[str, Any]]], needed: list[str],
                   optional: list[str], cfg: OnPolicyConfig) -> pa.Table:
    """Rows of a JSONL or JSON file, each with its location (file and line or row), checked
    (:func:`_check_row`) and turned into Arrow columns 64k rows at a time."""
    chunks, columns, locations, starts = [], {c: [] for c in needed + optional}, [], []
    text = {c for c in (cfg.answer_column, cfg.teacher_column) if c}  # only ever read as text (str())

    def flush() -> None:
        if not locations:
            return
        try:
            chunks.append(pa.table({c: pa.array(v) for c, v in columns.items()}))
        except (pa.ArrowException, OverflowError):
            for c, values in columns.items():  # the column, and the row where it stops being one type
                if (bad := first_mixed_value(values)) is not None:
                    kind = pa.array(values[:bad]).type if bad else None
                    raise ConfigError(f"{locations[bad]}: column '{c}' holds {values[bad]!r:.60}, which "
                                      + (f"does not fit the {kind} values of the rows before it" if bad else
                                         "Arrow cannot store") + ": give the column one type in every row") from None
            raise
        starts.append(locations[0])
        for values in columns.values():
            values.clear()
        locations.clear()

    for location, row in records:
        _check_row(row, needed, cfg, location)
        for c in columns:
            value = row.get(c)
            columns[c].append(str(value) if c in text and value is not None else value)
        locations.append(location)
        if len(locations) >= _CHUNK_ROWS:
            flush()
    flush()
    if not chunks:
        return pa.table({c: [] for c in columns})
    try:
        return pa.concat_tables(chunks, promote_options="permissive")  # nulls, then ints to floats, are promoted
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        for c in columns:  # the column whose type changes, and the first chunk that does not fit the ones before
            merged = chunks[0].schema.field(c).type
            for start, chunk in zip(starts[1:], chunks[1:], strict=True):
                kind = chunk.schema.field(c).type
                try:
                    merged = pa.unify_schemas([pa.schema([(c, merged)]), pa.schema([(c, kind)])],
                                              promote_options="permissive").field(c).type
                except (pa.ArrowInvalid, pa.ArrowTypeError):
                    raise ConfigError(f"{path}: column '{c}' is {merged} in the rows from {starts[0]} on and {kind} "
                                      f"in those from {start} on: give the column one type in every row") from None
        raise ConfigError(f"{path}: a column changes type between rows ({err}): give each column one type") from None


def load_prompts(cfg: OnPolicyConfig) -> PromptTable:
    """The prompt rows (the columns the run reads), checked before any model loads: the file and
    line or row, and the column, of the first problem named.

    ``dataset`` is a local .jsonl/.json/.parquet file or a hub dataset id (``dataset_config``,
    ``dataset_split``), as ``generate`` reads it.
    """
    needed = [c for c in (cfg.prompt_column, cfg.teacher_column) if c]
    if cfg.reward_weight > 0 and cfg.answer_column:
        needed.append(cfg.answer_column)
    optional = [c for c in [cfg.answer_column] if c and c not in needed]  # the reference answer: the reward log
    source = os.path.expanduser(cfg.dataset)
    if os.path.isfile(source):
        path = Path(source)
        if path.suffix == ".jsonl":
            records = ((f"{path} line {number}", row) for number, row in jsonl_objects(path, ConfigError))
            table = _records_table(path, records, needed, optional, cfg)
        elif path.suffix == ".parquet":
            import pyarrow.parquet as pq

            present = set(pq.read_schema(path).names)
            table = pq.read_table(path, columns=[c for c in needed + optional if c in present] or None,
                                  memory_map=True)
        elif path.suffix == ".json":  # streamed: one row at a time into the Arrow table
            records = ((f"{path} row {i}", row) for i, row in json_array_objects(path))
            table = _records_table(path, records, needed, optional, cfg)
        else:
            raise ConfigError(f"dataset {path}: unsupported file type; use a .jsonl, .json or .parquet file")
        name = str(path)
    elif looks_like_local_path(cfg.dataset):
        raise ConfigError(f"dataset {cfg.dataset} does not exist (and is not a hub dataset id): point it at a "
                          "local .jsonl/.json/.parquet prompt file")
    else:
        from llmdistill.generate.inputs import hub_table

        name = f"dataset {cfg.dataset} ({cfg.dataset_split})"
        table = hub_table(cfg.dataset, cfg.dataset_config, cfg.dataset_split, ConfigError)
    if missing := [c for c in needed if c not in table.column_names]:
        raise ConfigError(f"{name}: column(s) {missing} missing (it has {table.column_names})")
    table = table.select(needed + [c for c in optional  # an optional column no row fills is absent
                                   if c in table.column_names and table.column(c).null_count < table.num_rows])
    if cfg.teacher_column:  # teacher names are text, as teacher_model names them (a column of 0/1 is '0'/'1')
        column = table.column_names.index(cfg.teacher_column)
        table = table.set_column(column, cfg.teacher_column, table.column(column).cast(pa.string()))
    if table.num_rows == 0:
        raise ConfigError(f"{name} holds no prompts")
    _check_columns(table, needed, cfg, name)
    return PromptTable(table, name)


CHECK_ROWS = 4096  # prompts rendered and tokenized at once by check_prompts


def check_prompts(prompts: PromptTable, fmt: PromptFormat, tokenizer: Any, cfg: OnPolicyConfig,
                  context: int | None) -> None:
    """Render and tokenize every prompt as the rollouts will, before any model loads, so that a prompt
    the run cannot use fails now, in one line naming its row, not at the step that draws it: a chat
    template the student's tokenizer lacks, a prompt that is empty or not text or messages, and a
    prompt too long for ``context`` (prompt + ``max_new_tokens`` + the teacher's one scoring position:
    a rollout cut by the context, then scored by a vLLM teacher of that context, would not fit).
    ``CHECK_ROWS`` rows at a time, keeping only counts."""
    fmt.check_tokenizer(tokenizer)
    started, longest, too_long, first = time.perf_counter(), 0, 0, None
    room = cfg.max_new_tokens + 1
    for start in range(0, len(prompts), CHECK_ROWS):
        rows = prompts.rows(list(range(start, min(start + CHECK_ROWS, len(prompts)))))
        texts = [fmt.render(tokenizer, row[cfg.prompt_column], f"{prompts.name} row {start + i}")
                 for i, row in enumerate(rows)]
        lengths = np.array([len(ids) for ids in fmt.encode(tokenizer, texts)])
        longest = max(longest, int(lengths.max()))
        if context is not None and (over := np.flatnonzero(lengths + room > context)).size:
            too_long += over.size
            first = first or (start + int(over[0]), int(lengths[over[0]]))
    if first is not None:
        limit = (f"max_model_len {context}" if cfg.max_model_len
                 else f"the student's context {context} (max_position_embeddings; max_model_len unset)")
        raise ConfigError(f"{prompts.name} row {first[0]}: the prompt is {first[1]} tokens, and with max_new_tokens "
                          f"{cfg.max_new_tokens} and the teacher's scoring position it needs {first[1] + room}, more "
                          f"than {limit} ({too_long} of {len(prompts)} prompts are this long): raise max_model_len, "
                          "lower max_new_tokens, or drop those rows")
    logger.info("%d prompts checked in %.1f s: the longest is %d tokens", len(prompts), time.perf_counter() - started,
                longest)


def _check_columns(table: pa.Table, needed: list[str], cfg: OnPolicyConfig, name: str) -> None:
    """:func:`_check_row`'s value checks on a whole table (Parquet or hub rows), the first bad row named."""
    import pyarrow.compute as pc

    for column in needed:
        if table.column(column).null_count:
            row = pc.index(pc.is_null(table.column(column)), True).as_py()
            raise ConfigError(f"{name} row {row}: column(s) {[column]} empty: fill them or remove the row")
    if cfg.teacher_column:
        names = table.column(cfg.teacher_column)
        known = pc.fill_null(pc.is_in(names, value_set=pa.array(sorted(cfg.teachers))), False)
        if not pc.all(known).as_py():
            row = pc.index(known, False).as_py()
            raise ConfigError(f"{name} row {row}: teacher '{names[row].as_py()}' is not one of {sorted(cfg.teachers)} "
                              "(teacher_model)")


# ---------------------------------------------------------------------------------------
# Rollouts


@dataclass
class Rollouts:
    """The student's samples of one step: token ids, and which prompt and teacher each answers."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    records: list[dict[str, Any]]
    teachers: list[str]
    texts: list[str] = field(default_factory=list)
    policy_step: int = 0  # the optimizer steps behind the weights that sampled them

    @property
    def num_tokens(self) -> int:
        return sum(len(c) for c in self.completion_ids)


class VllmRollout:
    """An in-process vLLM engine holding a copy of the student.

    On a CPU host the engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``),
    which is also what lets :meth:`sync` hand it tensors without a copy through a socket.

    A LoRA student (``adapter``, with ``lora_rollouts: adapter``) is served as vLLM serves LoRAs:
    the engine holds the base weights, and each sync saves the adapter (:class:`WeightDrops`) and
    samples with it as a new ``LoRARequest``. The base never changes, so ``sleep_mode`` keeps it in
    CPU RAM (level 1) instead of dropping it.

    With several training processes each holds its own engine (seeded ``seed + rank``), which samples
    that process's share; on GPUs it joins the launcher's process group as vLLM's
    ``external_launcher``, as TRL's colocate mode does.
    """

    def __init__(self, model_dir: str, cfg: OnPolicyConfig, adapter: Any = None, ranks: Ranks | None = None):
        from vllm import LLM

        ranks = ranks or Ranks()
        set_cpu_kv_cache(cfg.kv_cache_space_gb)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        kwargs: dict[str, Any] = {"dtype": cfg.dtype, "enforce_eager": cfg.enforce_eager, "seed": cfg.seed + ranks.rank,
                                  "gpu_memory_utilization": cfg.gpu_memory_utilization}
        if ranks.world > 1 and torch.cuda.is_available():
            # one engine per training process on that process's GPU, in the launcher's process group (as TRL's colocate mode)
            kwargs["distributed_executor_backend"] = "external_launcher"
        if cfg.max_model_len:
            kwargs["max_model_len"] = cfg.max_model_len
        self.adapter = adapter if cfg.lora_rollouts == "adapter" else None
        self.lora_request: Any = None
        if self.adapter is not None:
            kwargs.update(enable_lora=True, max_lora_rank=vllm_lora_rank(cfg.lora_r), max_loras=1)
            self.drops = WeightDrops(Path(cfg.rollout_weights_dir) / (f"rank-{ranks.rank}" if ranks.world > 1 else ""))
        self.sleep_level = 0  # 0: always awake
        if cfg.sleep_mode and torch.cuda.is_available():
            kwargs["enable_sleep_mode"] = True
            self.sleep_level = cfg.sleep_level  # 1 with a LoRA adapter: the base weights stay in CPU RAM
        elif cfg.sleep_mode:
            logger.warning("sleep_mode is vLLM's CUDA feature: on this machine the rollout engine stays awake")
        self.asleep = False
        self.synced_step = 0
        self.llm = LLM(model=model_dir, tokenizer=model_dir, **kwargs)

    def sample(self, prompt_ids: list[list[int]], cfg: OnPolicyConfig) -> list[list[int]]:
        """``samples_per_prompt`` completions per prompt (token ids, the final EOS included)."""
        from vllm import SamplingParams

        params = SamplingParams(n=cfg.samples_per_prompt, temperature=cfg.rollout_temperature, top_p=cfg.rollout_top_p,
                                max_tokens=cfg.max_new_tokens, detokenize=False)
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False,
                                    lora_request=self.lora_request)
        return [list(o.token_ids) for res in outputs for o in res.outputs]

    def sync(self, model: torch.nn.Module) -> None:
        """Give the engine the trainer's current weights: the LoRA adapter, saved and loaded as a new
        LoRA request; or all the weights, loaded in place (a LoRA student's base weights merged with
        its adapter: :func:`merged_weights`), and the cached prefixes dropped."""
        if self.adapter is not None:
            from vllm.lora.request import LoRARequest

            path = self.drops.write(model, self.adapter)
            self.lora_request = LoRARequest(path.name, self.drops.count, str(path))
            self.drops.keep_only(path)  # the engine loaded the previous adapter already, the next loads this one
            return
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": merged_weights(model)})
        self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        """After the step's rollouts (``sleep_mode``): free the engine's GPU memory for the student's update."""
        if self.sleep_level:
            self.llm.sleep(level=self.sleep_level)
            self.asleep = True

    def wake(self, model: torch.nn.Module, sync: bool) -> None:
        """Before the next rollouts: the engine awake, with the student's weights when ``sync`` (always
        after a level-2 sleep, which dropped them). The weights come back first and the KV cache
        after the new weights are in, so the two never take GPU memory at once with the old weights."""
        if self.asleep and self.sleep_level == 2:
            self.llm.wake_up(tags=["weights"])
            self.sync(model)
            self.llm.wake_up(tags=["kv_cache"])
        else:
            if self.asleep:
                self.llm.wake_up()
            if sync:
                self.sync(model)
        self.asleep = False

    def close(self) -> None:
        from llmdistill.eval.engine import shutdown

        shutdown(self.llm)
        if self.adapter is not None:
            shutil.rmtree(self.drops.directory, ignore_errors=True)


class TransformersRollout:
    """Sampling with ``model.generate`` on the training weights themselves: nothing to sync."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any):
        self.model, self.tokenizer = model, tokenizer
        self.synced_step = 0  # unused: it samples from the training weights themselves

    @torch.no_grad()
    def sample(self, prompt_ids: list[list[int]], cfg: OnPolicyConfig) -> list[list[int]]:
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        width = max(len(p) for p in prompt_ids)
        ids = torch.full((len(prompt_ids), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(prompt_ids):  # left padding: every prompt ends at the same column
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        self.model.eval()
        ids, mask = ids.to(self.model.device), mask.to(self.model.device)
        out = self.model.generate(input_ids=ids, attention_mask=mask, do_sample=cfg.rollout_temperature > 0,
                                  temperature=cfg.rollout_temperature or None, top_p=cfg.rollout_top_p,
                                  max_new_tokens=cfg.max_new_tokens, num_return_sequences=cfg.samples_per_prompt,
                                  eos_token_id=self.tokenizer.eos_token_id, pad_token_id=pad)
        self.model.train()
        completions = []
        for row in out[:, width:].tolist():
            if self.tokenizer.eos_token_id in row:
                row = row[: row.index(self.tokenizer.eos_token_id) + 1]
            completions.append(row)
        return completions

    def sync(self, model: torch.nn.Module) -> None:
        pass

    def sleep(self) -> None:
        pass

    def wake(self, model: torch.nn.Module, sync: bool) -> None:
        pass

    def close(self) -> None:
        pass


class ServerRollout:
    """The student's own vLLM servers (``rollout_urls``): a separate process, or other GPUs and nodes.

    A step's prompts go out in pieces of at most :attr:`PIECE_PROMPTS`, round-robin over the
    servers, all at once: each piece is one non-streaming ``/v1/completions`` request over token ids
    (``n`` samples per prompt, ``return_token_ids``), which the server batches as the in-process
    engine would. Every sampling setting is sent (``generate.pool.PLAIN_SAMPLING``), so the server's
    ``generation_config.json`` defaults (a ``top_k``, a repetition penalty) never change the
    student's distribution. A piece that fails for a server-side reason goes to the next server.

    A sync writes the trainer's weights as safetensors shards in the engine's dtype into a new
    directory (:class:`WeightDrops`, under ``rollout_sync_dir``), then every server reloads them in
    place with vLLM's own ``reload_weights(weights_path=...)`` through its ``/collective_rpc``
    (served with ``VLLM_SERVER_DEV_MODE=1``) and drops its cached prefixes. A LoRA student
    (``lora_rollouts: adapter``) sends its base weights at the first sync (a server may hold
    another run's weights) and to a server that comes back, and otherwise only its adapter, which
    every server loads as a new LoRA (``/v1/load_lora_adapter``; servers started with
    ``--enable-lora`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``) and samples with; the previous
    one is unloaded. The servers read the files themselves, so the directory must be on a
    filesystem they see.

    Only the servers that took the latest sync sample (:attr:`active`): one that fails a sync (down,
    restarting, out of memory) is left out with a warning until it takes a later sync, tried with a
    growing gap once its ``/health`` answers (a LoRA student's server that comes back reloads the
    frozen base first, written again for it, then loads the adapter). A sync that no server takes
    stops the run.

    With several training processes (:class:`Ranks`) each samples its own share from the servers, and
    the main one alone writes and sends the weights, once every process's rollouts are back, so no
    request is in flight while the servers' weights change.

    Args:
        cfg: the run's settings (student name the servers serve, sampling, URLs, sync directory).
        ranks: the training processes.
    """

    PIECE_PROMPTS = 64  # prompts per request: replies of bounded size, spread over the servers

    def __init__(self, cfg: OnPolicyConfig, ranks: Ranks | None = None):
        from llmdistill.config.generate import GenerateConfig
        from llmdistill.generate.pool import ServerPool

        self.urls = [u.rstrip("/") for u in dict.fromkeys(cfg.rollout_urls)]
        self.active = list(self.urls)  # the servers holding the latest weights: the ones that sample
        self.syncs, self.out = 0, {}  # syncs so far; a server out: (syncs it missed, the sync to try it at)
        self.model, self.timeout = cfg.student_model, cfg.rollout_timeout
        self.lora_adapters, self.lora_r = cfg.use_peft and cfg.lora_rollouts == "adapter", cfg.lora_r
        self.adapter: Any = None  # the PeftModel, once the student is loaded (:meth:`use_adapter`)
        self.adapters: dict[str, str] = {}  # each server's loaded adapter of this run, unloaded at the next
        self.ranks = ranks or Ranks()
        self.run_tag = uuid.uuid4().hex[:8]  # a server or sync directory may serve several runs
        root = Path(cfg.rollout_weights_dir).resolve()
        if not cfg.rollout_sync_dir and self.ranks.main:  # the output_dir's own: an earlier, killed run's
            for stale in root.glob("run-*"):
                shutil.rmtree(stale, ignore_errors=True)
        self.drops = WeightDrops(root / f"run-{self.run_tag}", cfg.dtype)
        # the generate stage's pool, for its start-up check: health, the model served, capacity
        self.pool = ServerPool(GenerateConfig(model=cfg.student_model, dataset=cfg.dataset or "prompts",
                                              backend="server", server_urls=self.urls,
                                              progress_timeout=cfg.rollout_timeout))
        self.synced_step = 0

    def probe(self) -> None:
        """Every server answers, serves the student and can take weights (and adapters); else one line
        naming the server and the fix."""
        from llmdistill.generate.pool import ServerError

        try:
            self.pool.probe()
        except ServerError as err:
            raise ServerError(f"student rollout servers: {str(err).replace('progress_timeout', 'rollout_timeout')}; "
                              "start them or fix rollout_urls") from None
        checks = [("/collective_rpc", "cannot reload weights: start it with VLLM_SERVER_DEV_MODE=1 (that serves "
                                      "the /collective_rpc a sync calls)")]
        if self.lora_adapters:
            checks.insert(0, ("/v1/load_lora_adapter", f"cannot load LoRA adapters: start it with --enable-lora "
                                                        f"--max-lora-rank {vllm_lora_rank(self.lora_r)} and "
                                                        "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True (or set "
                                                        "lora_rollouts: merged)"))
        deadline = time.monotonic() + self.timeout
        for url in self.urls:
            for route, fix in checks:  # an empty request: refused as invalid (400/422) where the route is served
                status, text = _post_json(url + route, {}, self.timeout)
                while status == 0 and time.monotonic() < deadline:  # still loading (the pool needed only one)
                    time.sleep(1.0)
                    status, text = _post_json(url + route, {}, self.timeout)
                if status == 404:
                    raise ServerError(f"rollout server {url} {fix}")
                if status not in (400, 422):
                    raise ServerError(f"rollout server {url} does not answer {route} as vLLM does "
                                      f"({'HTTP ' + str(status) if status else text[:200]}); check rollout_urls")

    def use_adapter(self, adapter: Any) -> None:
        """A LoRA student's ``PeftModel``: with ``lora_rollouts: adapter`` its syncs send the adapter only."""
        self.adapter = adapter if self.lora_adapters else None

    def sample(self, prompt_ids: list[list[int]], cfg: OnPolicyConfig) -> list[list[int]]:
        """``samples_per_prompt`` completions per prompt (token ids, the final EOS included), prompt by prompt."""
        from llmdistill.generate.pool import PLAIN_SAMPLING

        pieces = [prompt_ids[i:i + self.PIECE_PROMPTS] for i in range(0, len(prompt_ids), self.PIECE_PROMPTS)]
        body = {"model": self.model, "n": cfg.samples_per_prompt, "max_tokens": cfg.max_new_tokens,
                "temperature": cfg.rollout_temperature, "top_p": cfg.rollout_top_p, **PLAIN_SAMPLING,
                "return_token_ids": True}
        if len(pieces) == 1:
            return self._complete(0, {**body, "prompt": pieces[0]})
        running = [in_background(self._complete, i, {**body, "prompt": piece}) for i, piece in enumerate(pieces)]
        return [c for piece in running for c in piece.result()]

    def _complete(self, piece: int, body: dict[str, Any]) -> list[list[int]]:
        """One piece's completions, from its server or, after a server-side failure, the next ones."""
        from llmdistill.generate.pool import ServerError

        failures = []
        servers = list(self.active)
        for turn in range(len(servers)):
            url = servers[(piece + turn) % len(servers)]
            status, text = _post_json(url + "/v1/completions", body, self.timeout)
            if status == 200:
                choices = sorted(json.loads(text)["choices"], key=lambda c: c["index"])  # prompt-major, then sample
                return [c["token_ids"] for c in choices]
            if 400 <= status < 500 and status != 429:  # the request itself is wrong: no server will take it
                raise ServerError(f"rollout server {url} refused a request (HTTP {status}): {text[:300]}")
            failures.append(f"{url}: {'HTTP ' + str(status) if status else ''} {text[:200]}".strip())
        raise ServerError(f"no rollout server could sample (a request waits up to rollout_timeout "
                          f"{self.timeout:g}s for its whole piece): {'; '.join(failures)}")

    def sync(self, model: torch.nn.Module) -> None:
        """Write the trainer's weights (or adapter); the servers reload them (or load the adapter), and
        those that did are the ones that sample next (:attr:`active`), for every training process."""
        self.ranks.barrier()  # every process's rollouts are back
        if self.ranks.main:
            self._sync_weights(model)
        self.active, self.model = self.ranks.broadcast((self.active, self.model))

    def _sync_weights(self, model: torch.nn.Module) -> None:
        from llmdistill.generate.pool import ServerError

        if self.adapter is not None and self.drops.count:
            path = self.drops.write(model, self.adapter)
            self.model = f"{path.name}-{self.run_tag}"
            base: list[Path] = []  # the frozen base, written only when a server comes back at this sync

            def load(url: str) -> None:
                if url not in self.active:  # back after missing syncs, maybe restarted on other weights
                    if not base:
                        base.append(self.drops.write(model, with_adapter=False))
                    self._reload(url, base[0])
                self._call(url, "/v1/load_lora_adapter", {"lora_name": self.model, "lora_path": str(path)}, path)
                old, self.adapters[url] = self.adapters.get(url), self.model
                if old is not None and old != self.model:
                    try:  # the new one is in: a server that keeps an old adapter still samples right
                        self._call(url, "/v1/unload_lora_adapter", {"lora_name": old}, path, missing_ok=True)
                    except ServerError as err:
                        logger.warning("%s (the adapter %s stays loaded there)", err, old)

            self._sync_servers(self.urls, load)
        else:  # all the weights; a LoRA student's first sync: its base, then its adapter
            path = self.drops.write(model, with_adapter=self.adapter is None)
            self._sync_servers(self.urls, lambda url: self._reload(url, path))
            if self.adapter is not None:
                self._sync_weights(model)
                return
        self.drops.keep_only(path)

    def _reload(self, url: str, path: Path) -> None:
        """A server reloads all its weights from ``path`` and drops the prefix cache of the old ones."""
        self._call(url, "/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": str(path)}}, path)
        self._call(url, "/reset_prefix_cache", None, path)

    def _sync_servers(self, urls: list[str], take: Callable[[str], None]) -> None:
        """``take(url)`` on each server; the ones that took it become :attr:`active`. A server out since an
        earlier sync is tried again after 1, 2, 4, ... more syncs, and only when its ``/health`` answers
        within 2 s, so a hung one does not hold up every step; each failure is logged. None took it:
        ServerError."""
        from llmdistill.generate.pool import ServerError
        from llmdistill.vllm_runtime import healthy

        self.syncs += 1
        active, failures = [], {}
        for url in urls:
            misses, retry_at = self.out.get(url, (0, 0))
            if url not in self.active and self.syncs < retry_at:
                failures[url] = f"rollout server {url} is out (tried again at sync {retry_at})"
                continue
            if url not in self.active and not healthy(url):
                failures[url] = f"rollout server {url} is still out: its /health does not answer"
                self.out[url] = (misses + 1, self.syncs + 2 ** misses)
                logger.info("%s", failures[url])
                continue
            try:
                take(url)
                active.append(url)
                if self.out.pop(url, None):
                    logger.info("rollout server %s took the weights again: it samples again", url)
            except ServerError as err:
                failures[url] = str(err)
                self.out[url] = (misses + 1, self.syncs + 2 ** misses)
                logger.warning("%s; it samples nothing until it takes a later sync", err)
        if not active:
            raise ServerError(f"no rollout server took the weights: {'; '.join(failures.values())}")
        self.active = active

    def _call(self, url: str, route: str, body: dict | None, path: Path, missing_ok: bool = False) -> None:
        from llmdistill.generate.pool import ServerError

        status, text = _post_json(url + route, body, self.timeout)
        if status != 200 and not (missing_ok and status == 404):
            hint = (f"servers need --enable-lora --max-lora-rank {vllm_lora_rank(self.lora_r)}"
                    if "lora" in route else "servers need VLLM_SERVER_DEV_MODE=1")
            raise ServerError(f"rollout server {url} could not take the weights in {path} ({route}: "
                              f"{'HTTP ' + str(status) if status else 'no answer'}: {text[:300]}); {hint}, and "
                              "rollout_sync_dir must be a path they can read")

    def sleep(self) -> None:
        pass

    def wake(self, model: torch.nn.Module, sync: bool) -> None:
        if sync:
            self.sync(model)

    def close(self) -> None:
        """Remove this run's weight files (the servers hold the weights and adapter in memory)."""
        if self.ranks.main:
            shutil.rmtree(self.drops.directory, ignore_errors=True)


class WeightDrops:
    """Numbered directories of the student's weights, or of its LoRA adapter, that a rollout engine
    loads from (``weights-000001``, ...): each appears whole, and only the newest is kept.

    Args:
        directory: where they go (one run's own directory: :meth:`keep_only` removes the others in it).
        dtype: the engine's weight dtype (``auto``: the trainer's, fp32); weights are written in it.
    """

    PREFIX = "weights-"
    SHARD_BYTES = 2 << 30  # a sync holds at most one shard of weights in memory

    def __init__(self, directory: Path, dtype: str = "auto"):
        self.directory, self.count = directory, 0
        self.dtype = None if dtype == "auto" else getattr(torch, dtype)

    def write(self, model: torch.nn.Module, adapter: Any = None, with_adapter: bool = True) -> Path:
        """Save ``adapter`` (a ``PeftModel``: its adapter only), else every weight of ``model`` (a LoRA
        student's merged with its adapter, or with ``with_adapter=False`` its base alone:
        :func:`merged_weights`), into the next directory; return it."""
        self.count += 1
        target = self.directory / f"{self.PREFIX}{self.count:06d}"
        if adapter is None:
            write_weights(merged_weights(model, with_adapter), target, self.SHARD_BYTES, self.dtype)
        else:
            _write_whole(target, lambda tmp: adapter.save_pretrained(str(tmp)))
        return target

    def keep_only(self, path: Path) -> None:
        for old in self.directory.glob(f"{self.PREFIX}*"):
            if old != path:
                shutil.rmtree(old, ignore_errors=True)


def _write_whole(directory: Path, fill: Callable[[Path], None]) -> None:
    """``fill`` a directory written beside ``directory`` and renamed onto it: it appears whole or not at all."""
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    fill(tmp)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)


def write_weights(weights: Iterable[tuple[str, torch.Tensor]], directory: Path, shard_bytes: int,
                  dtype: torch.dtype | None = None) -> None:
    """Save ``(name, tensor)`` pairs (cast to ``dtype`` when given) as safetensors shards of about
    ``shard_bytes`` into ``directory``, which appears whole."""
    from safetensors.torch import save_file

    def fill(tmp: Path) -> None:
        shard: dict[str, torch.Tensor] = {}
        size = files = 0
        for name, tensor in weights:  # copies: tied weights share no memory, the trainer's are untouched
            shard[name] = tensor.detach().to("cpu", dtype=dtype or tensor.dtype, copy=True).contiguous()
            size += shard[name].numel() * shard[name].element_size()
            if size >= shard_bytes:
                save_file(shard, str(tmp / f"model-{files:05d}.safetensors"))
                shard, size, files = {}, 0, files + 1
        if shard or not files:
            save_file(shard, str(tmp / f"model-{files:05d}.safetensors"))

    _write_whole(directory, fill)


def _post_json(url: str, body: dict | None, timeout: float) -> tuple[int, str]:
    """POST ``body`` as JSON (an empty body for None); return the status and the reply's text."""
    import urllib.error
    import urllib.request

    data = json.dumps(body).encode() if body is not None else b""
    request = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, reply.read().decode(errors="replace")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as err:  # refused, unreachable, timed out
        return 0, f"{type(err).__name__}: {getattr(err, 'reason', err)}"


RolloutEngine = VllmRollout | ServerRollout | TransformersRollout


def rollout(engine: RolloutEngine, stream: PromptStream, steps: list[int], fmt: PromptFormat,
            tokenizer: Any, cfg: OnPolicyConfig, ranks: Ranks | None = None) -> list[Rollouts]:
    """Step 1: the current student's completions for the prompts of ``steps`` (this process's share of
    each step's prompts), sampled in one batch; one :class:`Rollouts` per step, in order."""
    ranks = ranks or Ranks()
    shares = [ranks.share(stream.batch(step)) for step in steps]
    records = stream.prompts.rows([i for share in shares for i in share])
    prompt_ids = fmt.token_ids(tokenizer, [r[cfg.prompt_column] for r in records])
    # model.generate samples from the training weights as they are when the first step of the batch starts
    policy_step = steps[0] if isinstance(engine, TransformersRollout) else engine.synced_step
    completions = engine.sample(prompt_ids, cfg)
    n = cfg.samples_per_prompt
    only = next(iter(cfg.teachers))  # without teacher_column there is one teacher (the config checks it)
    teachers = [str(r[cfg.teacher_column]) if cfg.teacher_column else only for r in records]
    prompt_ids, records, teachers = ([x for x in xs for _ in range(n)] for xs in (prompt_ids, records, teachers))
    out, first = [], 0  # every list is now one entry per sample, in the order of the completions
    for share in shares:
        last = first + len(share) * n
        out.append(Rollouts(prompt_ids=prompt_ids[first:last], completion_ids=completions[first:last],
                            records=records[first:last], teachers=teachers[first:last], policy_step=policy_step))
        first = last
    return out


class RolloutSource:
    """Where each on-policy step's rollouts come from, and when the engine gets the new weights.

    The steps run in groups of ``steps_per_rollout`` (steps 0 to k - 1, k to 2k - 1, ...). The
    first on-policy step of a group samples the prompts of all the group's on-policy steps in one
    batch, the teachers grade all those samples at once (:func:`score_group`), and each step then
    trains on its own prompts' samples and grades (with k = 1, every step samples its own). A run
    resumed inside a group samples the rest of the group, from the checkpoint's weights.

    Synchronous: after the last update of a group the engine syncs when ``sync_every`` divides the
    step count (and wakes, with ``sleep_mode``), so step i of a group trains on samples of weights
    i updates old, or older by whole groups with ``sync_every`` > k.

    ``async_rollouts`` (a rollout server): the servers sample the next group's prompts in the
    background while this group is scored and trained. When a group's first step starts it takes
    the finished batch, syncs the weights if they are ``sync_every`` updates behind, and submits
    the next group's batch. Weights change only between two batches, so with ``sync_every: 1`` and
    k = 1 each batch comes from weights one update older than those it trains (``policy_lag`` 1 in
    the log, 0 when synchronous; with ``sync_every: s`` up to s, against s - 1 when synchronous). A
    batch is submitted only when the next group starts with an on-policy step: after offline steps
    (GKD's lambda) the next batch is sampled when its first on-policy step starts, from freshly
    synced weights.
    """

    def __init__(self, engine: RolloutEngine, teachers: dict[str, Teacher], stream: PromptStream, fmt: PromptFormat,
                 tokenizer: Any, cfg: OnPolicyConfig, counters: Counters, offline: OfflineBatches | None,
                 ranks: Ranks | None = None):
        self.engine, self.teachers, self.stream, self.fmt, self.tokenizer = engine, teachers, stream, fmt, tokenizer
        self.cfg, self.counters, self.offline, self.ranks = cfg, counters, offline, ranks or Ranks()
        self.pending: tuple[int, Future] | None = None
        self.ready: dict[int, tuple[Rollouts, dict[str, torch.Tensor]]] = {}  # this group's later steps, graded
        self.background = cfg.async_rollouts

    def group_end(self, step: int) -> int:
        """The first step after ``step``'s group."""
        return min((step // self.cfg.steps_per_rollout + 1) * self.cfg.steps_per_rollout, self.cfg.max_steps)

    def sampled_with(self, step: int) -> list[int]:
        """The on-policy steps whose prompts are sampled with ``step``'s: the rest of its group, offline
        steps left out."""
        return [s for s in range(step, self.group_end(step)) if self.offline is None or not self.offline.takes(s)]

    def take(self, step: int, model: torch.nn.Module) -> tuple[Rollouts, dict[str, torch.Tensor]]:
        """The rollouts of on-policy step ``step`` and their packed batch with the teachers' grades
        (:func:`score`); at a group's first step, async, the next group's batch is submitted before
        this group is graded."""
        if step in self.ready:
            return self.ready.pop(step)
        steps = self.sampled_with(step)
        if self.pending is not None and self.pending[0] == step:
            t = time.perf_counter()
            batches = self.pending[1].result()
            self.counters.timed("rollout", t)  # only the wait: the sampling not hidden behind the last group
        else:  # synchronous; or async, at a run's first step or after offline steps
            self._sync_if_behind(step, model)
            t = time.perf_counter()
            batches = rollout(self.engine, self.stream, steps, self.fmt, self.tokenizer, self.cfg, self.ranks)
            self.counters.timed("rollout", t)
        self.pending = None
        self.engine.sleep()
        following = self.group_end(step)
        upcoming = self.sampled_with(following)  # empty after the last group
        if self.background and upcoming[:1] == [following]:  # the next group starts with an on-policy step
            self._sync_if_behind(step, model)
            self.pending = (following, in_background(self._sample, upcoming))
        t = time.perf_counter()
        graded = score_group(self.teachers, batches, self.cfg)
        self.counters.timed("scoring", t)
        self.ready = dict(zip(steps, zip(batches, graded, strict=True), strict=True))
        return self.ready.pop(step)

    def _sync_if_behind(self, step: int, model: torch.nn.Module) -> None:
        """Async: give the engine the weights if they are ``sync_every`` updates old (the engine is idle here)."""
        if self.background and step - self.engine.synced_step >= self.cfg.sync_every:
            t = time.perf_counter()
            self.engine.sync(model)
            self.engine.synced_step = step
            self.counters.timed("sync", t)

    def updated(self, step: int, model: torch.nn.Module) -> None:
        """After step ``step``'s update: at the end of a group, synchronous engines wake and sync when due
        (async ones sync in :meth:`take`)."""
        if not self.background and (step + 1) % self.cfg.steps_per_rollout == 0:
            t = time.perf_counter()
            sync = (step + 1) % self.cfg.sync_every == 0
            self.engine.wake(model, sync=sync)
            if sync:
                self.engine.synced_step = step + 1
            self.counters.timed("sync", t)

    def _sample(self, steps: list[int]) -> list[Rollouts]:
        t = time.perf_counter()
        try:
            return rollout(self.engine, self.stream, steps, self.fmt, self.tokenizer, self.cfg, self.ranks)
        finally:
            self.counters.background_s += time.perf_counter() - t  # only this thread writes it


def in_background(fn: Callable[..., Any], *args: Any) -> Future:
    """``fn(*args)`` on a daemon thread, its result (or exception) in the returned future. A daemon: a run
    that fails or is interrupted exits without waiting for work still in flight (a server's reply)."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(fn(*args))
        except BaseException as err:  # noqa: BLE001 - raised where the result is read
            future.set_exception(err)

    threading.Thread(target=run, name="rollouts", daemon=True).start()
    return future


# ---------------------------------------------------------------------------------------
# Teacher scoring


def pack(prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> dict[str, torch.Tensor]:
    """Prompt + completion of every sample in one padding-free sequence (as the trainer's collator does).

    Returns:
        input_ids and position_ids (1, L) int64; target_index (N,) int64: the flat positions of the
        completion tokens (each predicted from the position before it); target_ids (N,) int64;
        seq_of_target (N,) int64: which sample each target belongs to.
    """
    prompt_len = np.fromiter(map(len, prompt_ids), np.int64, len(prompt_ids))
    completion_len = np.fromiter(map(len, completion_ids), np.int64, len(completion_ids))
    if len(prompt_len) != len(completion_len):
        raise ValueError(f"{len(prompt_len)} prompts for {len(completion_len)} completions")
    lengths = prompt_len + completion_len
    starts = np.cumsum(lengths) - lengths  # each sample's first position
    pairs = zip(prompt_ids, completion_ids, strict=True)
    ids = np.fromiter(itertools.chain.from_iterable(x for pair in pairs for x in pair),
                      np.int64, int(lengths.sum()))
    positions = np.arange(len(ids)) - np.repeat(starts, lengths)
    owners = np.repeat(np.arange(len(lengths)), completion_len)
    # a completion token's position: its sample's start + prompt length + its place in the completion
    first_target = np.cumsum(completion_len) - completion_len
    targets = np.arange(len(owners)) - first_target[owners] + (starts + prompt_len)[owners]
    input_ids = torch.from_numpy(ids)
    target_index = torch.from_numpy(targets)
    return {"input_ids": input_ids[None], "position_ids": torch.from_numpy(positions)[None],
            "target_index": target_index, "target_ids": input_ids[target_index],
            "seq_of_target": torch.from_numpy(owners)}


def unpack(batch: dict[str, torch.Tensor]) -> list[tuple[np.ndarray, np.ndarray]]:
    """:func:`pack`'s samples again, as int32 (prompt ids, completion ids), for each sample with a completion token."""
    ids = batch["input_ids"][0].numpy().astype(np.int32)
    starts = np.flatnonzero(batch["position_ids"][0].numpy() == 0)
    ends = np.append(starts[1:], len(ids))
    owners, targets = batch["seq_of_target"].numpy(), batch["target_index"].numpy()
    samples = np.unique(owners)
    firsts = targets[np.searchsorted(owners, samples)]  # each sample's first completion position
    return [(ids[starts[i]:first], ids[first:ends[i]]) for i, first in zip(samples, firsts, strict=True)]


class StreamedTeacher:
    """A teacher behind one of the ``score`` stage's engines, which take (prompt, completion) pairs and
    stream back the top-k and the sampled token's log-prob at every completion position: each sample is
    one ``prompt_logprobs`` prefill over its prompt + completion token ids."""

    engine: Any  # ServerPool or OfflineEngine: ``k`` and ``stream(work)``
    vocab: int | None = None  # the student's LM-head rows (:meth:`grade_for`)

    def grade_for(self, student: torch.nn.Module) -> None:
        """Keep only ids below ``student``'s LM-head rows in the grades: vLLM ranks every row of the
        teacher's head, and a larger teacher's padding rows index nothing in the student
        (:func:`~llmdistill.generate.engines.known_ids_only`)."""
        self.vocab = student.get_output_embeddings().weight.shape[0]

    def score(self, batch: dict[str, torch.Tensor], k: int, chunk_size: int) -> dict[str, torch.Tensor]:
        """The same grades as :meth:`TransformersTeacher.score` (``chunk_size`` is unused)."""
        from llmdistill.generate.engines import Work, known_ids_only
        from llmdistill.generate.inputs import Request

        if k != self.engine.k:
            raise ValueError(f"the teacher's engine was asked for top-{self.engine.k}, not top-{k}")
        samples = unpack(batch)
        work = [Work(Request(str(i), "", "", prompt, completion_token_ids=completion), 0)
                for i, (prompt, completion) in enumerate(samples)]
        graded: dict[int, Any] = {}
        for finished in self.engine.stream(work):
            if finished is not None:
                graded[int(finished[0].request.prompt_id)] = finished[1]
        limit = self.vocab if self.vocab is not None else np.iinfo(np.int64).max
        parts = [known_ids_only(graded[i], limit, k) for i in range(len(samples))]
        return {"teacher_ids": torch.from_numpy(np.concatenate([c.topk_ids for c in parts]).astype(np.int64)),
                "teacher_logprobs": torch.from_numpy(np.concatenate([c.topk_logprobs for c in parts])),
                "teacher_token_logprobs": torch.from_numpy(np.concatenate([c.token_logprobs for c in parts]))}


class ServerTeacher(StreamedTeacher):
    """A teacher on a pool of ``vllm serve`` servers: the ``score`` stage's client
    (:class:`~llmdistill.generate.pool.ServerPool`: least-loaded routing, retries, health checks), each
    reply parsed straight to arrays (:func:`~llmdistill.generate.responses.parse_scored`).

    Args:
        model: the model name the servers serve.
        urls: the servers' base URLs.
        cfg: top-k, the servers' max_logprobs, timeout.
    """

    def __init__(self, model: str, urls: list[str], cfg: OnPolicyConfig):
        from llmdistill.config.generate import ScoreConfig
        from llmdistill.generate.pool import ServerPool

        self.config = ScoreConfig(model=model, dataset=cfg.dataset or "prompts", backend="server", server_urls=urls,
                                  logprobs_top_k=cfg.logprobs_top_k, max_logprobs=cfg.teacher_max_logprobs,
                                  progress_timeout=cfg.teacher_timeout,
                                  health_interval=max(0.1, min(10.0, cfg.teacher_timeout / 4)))
        self.engine = ServerPool(self.config, scoring=True)

    def probe(self) -> None:
        """Wait up to ``teacher_timeout`` for a server to answer; fail in one line naming the URLs otherwise."""
        from llmdistill.generate.pool import ServerError

        try:
            self.engine.probe()
        except ServerError as err:
            raise ServerError(f"teacher '{self.config.model}': {str(err).replace('progress_timeout', 'teacher_timeout')}"
                              "; start the teacher servers or fix teacher_urls") from None


class VllmTeacher(StreamedTeacher):
    """A teacher in an in-process vLLM engine: the ``score`` stage's offline engine
    (:class:`~llmdistill.generate.engines.OfflineEngine`, prefix caching off, so every position is
    computed), beside the student and its rollout engine; the teacher must fit the device with the
    student. It reads samples of any length without padding them to a batch (paged attention); on a
    CPU, for the tiny world's short samples, it is slower than :class:`TransformersTeacher`.

    Args:
        path: the teacher's checkpoint.
        cfg: top-k, context length, dtype, memory fraction, seed.
        ranks: the training processes (each holds its own engine; on GPUs in the launcher's process group).
    """

    def __init__(self, path: str, cfg: OnPolicyConfig, ranks: Ranks | None = None):
        from llmdistill.config.generate import ScoreConfig
        from llmdistill.generate.engines import OfflineEngine

        ranks = ranks or Ranks()
        set_cpu_kv_cache(cfg.kv_cache_space_gb)
        launcher = "external_launcher" if ranks.world > 1 and torch.cuda.is_available() else None
        self.config = ScoreConfig(model=path, dataset=cfg.dataset or "prompts", backend="offline",
                                  dtype=cfg.teacher_dtype, max_model_len=cfg.max_model_len,
                                  gpu_memory_utilization=cfg.teacher_gpu_memory_utilization,
                                  enforce_eager=cfg.enforce_eager, logprobs_top_k=cfg.logprobs_top_k,
                                  seed=cfg.seed + ranks.rank, vllm_multiprocessing="off",
                                  distributed_executor_backend=launcher)
        self.engine = OfflineEngine(self.config, scoring=True)

    def close(self) -> None:
        from llmdistill.eval.engine import shutdown

        shutdown(self.engine.llm)


Teacher = TransformersTeacher | ServerTeacher | VllmTeacher


def load_teachers(cfg: OnPolicyConfig, device: torch.device | str = "cpu", ranks: Ranks | None = None) -> dict[str, Teacher]:
    """Every teacher by name: loaded in this process (on ``device``, or in a vLLM engine), or a client of its servers."""
    if cfg.teacher_backend == "server":
        pools = cfg.teacher_url_pools
        return {name: ServerTeacher(model, pools[name], cfg) for name, model in cfg.teachers.items()}
    if cfg.teacher_backend == "vllm":
        return {name: VllmTeacher(path, cfg, ranks) for name, path in cfg.teachers.items()}
    return {name: TransformersTeacher(path, cfg.teacher_dtype, device, cfg.pack_tokens)
            for name, path in cfg.teachers.items()}


def score(teachers: dict[str, Teacher], rollouts: Rollouts, cfg: OnPolicyConfig) -> dict[str, torch.Tensor]:
    """Step 2: each sample's teacher grades every one of its tokens; returns the packed batch with the grades."""
    batch = pack(rollouts.prompt_ids, rollouts.completion_ids)
    n = len(batch["target_ids"])
    out = {"teacher_ids": torch.zeros(n, cfg.logprobs_top_k, dtype=torch.long),
           "teacher_logprobs": torch.zeros(n, cfg.logprobs_top_k), "teacher_token_logprobs": torch.zeros(n)}
    if unknown := set(rollouts.teachers) - set(teachers):
        raise RuntimeError(f"samples routed to teacher(s) {sorted(unknown)}, not one of {sorted(teachers)}: they "
                           "would train on empty grades")
    for name, teacher in teachers.items():
        mine = [i for i, t in enumerate(rollouts.teachers) if t == name]
        if not mine:
            continue
        sub = pack([rollouts.prompt_ids[i] for i in mine], [rollouts.completion_ids[i] for i in mine])
        graded = teacher.score(sub, cfg.logprobs_top_k, cfg.loss_chunk_size)
        rows = torch.isin(batch["seq_of_target"], torch.tensor(mine))  # targets of these samples, in order
        for key, value in graded.items():
            out[key][rows] = value.to("cpu", out[key].dtype)
    return {**batch, **out}


def score_group(teachers: dict[str, Teacher], group: list[Rollouts], cfg: OnPolicyConfig) -> list[dict[str, torch.Tensor]]:
    """:func:`score` of each of ``group``'s rollouts (the steps sampled together), with one call per teacher
    for all of them: the teachers are frozen, so the grades are the same, and a few larger batches
    are read faster than many small ones. The group's grades are held until its last step trains:
    ``steps_per_rollout`` steps of top-k ids and log-probs (12 bytes x top-k per completion token)."""
    if len(group) == 1:
        return [score(teachers, group[0], cfg)]
    whole = score(teachers, Rollouts(prompt_ids=[p for r in group for p in r.prompt_ids],
                                     completion_ids=[c for r in group for c in r.completion_ids],
                                     records=[x for r in group for x in r.records],
                                     teachers=[t for r in group for t in r.teachers]), cfg)
    out, first = [], 0  # pack puts the targets in sample order, so each step's are one slice of the group's
    for rollouts in group:
        batch = pack(rollouts.prompt_ids, rollouts.completion_ids)
        last = first + len(batch["target_ids"])
        out.append({**batch, **{key: whole[key][first:last] for key in GRADES}})
        first = last
    return out


# ---------------------------------------------------------------------------------------
# Offline batches (GKD's lambda < 1)


def offline_steps(seed: int, on_policy_fraction: float, num_steps: int) -> np.ndarray:
    """(num_steps,) bool: which optimizer steps train on offline built data instead of the student's samples.

    Step ``s`` is offline when the ``s``-th draw of a generator seeded by ``seed`` is at least
    ``on_policy_fraction``: about a (1 - lambda) fraction of the steps, each decided by its index alone
    (the draws are a prefix of one stream whatever ``num_steps``), so a resumed run makes the same choices.
    """
    return np.random.default_rng([seed, *OFFLINE_CHOICE_KEY]).random(num_steps) >= on_policy_fraction


def check_offline_data(directory: str, meta: dict[str, Any], tokenizer: Any = None, student: str = "") -> None:
    """Refuse built shards an offline step cannot use: no teacher top-k, or another tokenizer than the student's."""
    try:
        check_built_fits(directory, meta, tokenizer, student, "offline steps distil the top-k")
    except SchemaError as err:
        raise ConfigError(f"offline_data_dir: {err}") from None


class OfflineBatches:
    """The batches of the offline steps: built shards read as ``train`` reads them.

    The shards are memory-mapped through their Arrow copy (:func:`~llmdistill.formats.open_built`,
    converted once) and collated by :class:`~llmdistill.collate.DistillCollator` (padding-free, the
    teacher's top-k decoded). The offline steps read a seeded row order one batch after another
    (:class:`Cursor`), so a resumed run continues with the rows it would have seen. That they fit
    the student (top-k present, its tokenizer) is checked before, by :func:`check_inputs`.
    """

    def __init__(self, cfg: OnPolicyConfig, ranks: Ranks | None = None):
        directory = cfg.offline_data_dir
        self.ranks = ranks or Ranks()
        cache = built_cache_dir(directory)
        for first in (self.ranks.main, self.ranks.local_rank == 0):  # the main process, then each node's first
            if first:  # converted once (a cache another node sees already is kept)
                convert_built_to_arrow(directory, cache)
            self.ranks.barrier()
        self.rows, meta = open_built(directory, cache)
        self.collator = DistillCollator(k=int(meta["k"]), vocab_size=int(meta["vocab_size"]),
                                        codec_bits=int(meta.get("codec_bits") or 0), with_topk=True)
        self.offline = offline_steps(cfg.seed, cfg.on_policy_fraction, cfg.max_steps)
        self.cursor = Cursor(cfg.offline_rows_per_step, self.offline)  # only the offline steps read rows
        self.seed = cfg.seed

    def takes(self, step: int) -> bool:
        """Whether optimizer step ``step`` is an offline one."""
        return bool(self.offline[step])

    def row_indices(self, step: int) -> list[int]:
        """Rows of the built data in the batch of offline step ``step``."""
        return seeded_slice(len(self.rows), [self.seed, *OFFLINE_ROWS_KEY], self.cursor.position(step), self.cursor.size)

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        """The collated rows of step ``step`` (this process's share), with ``target_ids`` (N,): what
        :func:`onpolicy_loss` reads."""
        batch = self.collator([self.rows[i] for i in self.ranks.share(self.row_indices(step))])
        batch["target_ids"] = batch["input_ids"][0, batch["target_index"]]
        return batch


# ---------------------------------------------------------------------------------------
# Loss


def token_logprobs(hidden: torch.Tensor, head: torch.nn.Module, target_ids: torch.Tensor, chunk_size: int,
                   transform: LogitTransform = NO_TRANSFORM) -> torch.Tensor:
    """The student's log-prob of each target (N,) under the logits ``transform(head(hidden))``, with
    gradient; each chunk's logits are recomputed in the backward pass (activation checkpointing), so at
    most one (chunk, V) block is alive."""
    from torch.utils.checkpoint import checkpoint

    def chunk_logprobs(h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        z = head(h)
        logits = transform(z if z.dtype == torch.float64 else z.float())
        return torch.log_softmax(logits, dim=-1).gather(-1, ids[:, None])[:, 0]

    parts = [checkpoint(chunk_logprobs, hidden[s:s + chunk_size], target_ids[s:s + chunk_size], use_reentrant=False)
             for s in range(0, len(hidden), chunk_size)]
    return torch.cat(parts)


PER_TARGET = ("target_index", "target_ids", "seq_of_target", *GRADES)  # a step's tensors with one row per target token


def micro_batches(batch: dict[str, torch.Tensor], max_tokens: int) -> list[dict[str, torch.Tensor]]:
    """A packed step (:func:`pack`, or an offline batch) as consecutive groups of whole samples of at most
    ``max_tokens`` positions each (a longer sample alone); ``max_tokens`` 0: the step as it is.

    A group's ``target_index`` counts from its own first position; ``seq_of_target`` keeps the step's
    sample numbers (the reward term centres on the whole step).
    """
    length = batch["input_ids"].shape[1]
    if max_tokens <= 0 or length <= max_tokens:
        return [batch]
    ends = torch.nonzero(batch["position_ids"][0] == 0).flatten().tolist()[1:] + [length]  # each sample's end
    bounds, first, last = [], 0, 0
    for end in ends:
        if end - first > max_tokens and last > first:  # this sample would overflow a non-empty group
            bounds.append((first, last))
            first = last
        last = end
    bounds.append((first, length))
    groups = []
    for a, b in bounds:
        rows = (batch["target_index"] >= a) & (batch["target_index"] < b)
        group = {k: v[rows] if k in PER_TARGET else v for k, v in batch.items()}
        group.update(input_ids=batch["input_ids"][:, a:b], position_ids=batch["position_ids"][:, a:b],
                     target_index=batch["target_index"][rows] - a)
        groups.append(group)
    return groups


def step_gradients(model: torch.nn.Module, batch: dict[str, torch.Tensor], cfg: OnPolicyConfig,
                   rewards: torch.Tensor | None = None, normalizer: int | None = None,
                   baseline: float | None = None) -> dict[str, float]:
    """Backward of the step's loss (:func:`onpolicy_loss`), a micro-batch at a time
    (``micro_batch_tokens``): the gradients add up to one backward of the whole step's mean loss.

    ``normalizer`` and ``baseline``: the step's target tokens and mean reward over all processes (None:
    this batch's); the logged values are then this process's shares, which add up over the processes.
    """
    n = normalizer or len(batch["target_ids"])
    total: dict[str, float] = {}
    for group in micro_batches(batch, cfg.micro_batch_tokens):
        if not len(group["target_ids"]):
            continue
        with torch.autocast(device_type=next(model.parameters()).device.type, dtype=torch.bfloat16,
                            enabled=cfg.bf16):
            loss, stats = onpolicy_loss(model, group, cfg, rewards, normalizer=n, baseline=baseline)
        loss.backward()
        share = len(group["target_ids"]) / n
        for key, value in stats.items():  # the loss adds up (each is a share of the mean); means are weighted
            total[key] = total.get(key, 0.0) + (value if key == "loss" else value * share)
    return total


def onpolicy_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], cfg: OnPolicyConfig,
                  rewards: torch.Tensor | None = None, normalizer: int | None = None,
                  baseline: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Step 3: the mean per-token loss on the student's own tokens, and what to log.

    Args:
        model: the student (training mode).
        batch: :func:`score`'s output: packed samples with the teacher's top-k per target; or an
            offline batch (:meth:`OfflineBatches.batch`: no ``teacher_token_logprobs``, a top-k objective).
        cfg: objective, JSD beta, reward weight, chunk size.
        rewards: (num_samples,) answer-checker verdicts (1 correct, 0 not) for the reward term.
        normalizer: the target tokens the mean is over (a micro-batch of a step: the step's); None: the batch's.
        baseline: the reward the term centres on (the step's mean over all processes); None: ``rewards``' mean.

    Returns:
        The loss (mean over target tokens) and ``loss``, ``reverse_kl`` (the sampled-token estimate
        ``log p_student(x) - log p_teacher(x)`` averaged over tokens; not for an offline batch).
    """
    batch = on_device(batch, model)
    rewards = rewards.to(batch["target_ids"].device) if rewards is not None else None
    hidden, head = predicting_hidden(model, batch, cfg.pack_tokens)
    n = normalizer or len(batch["target_ids"])
    transform = logit_transform(model.config)
    needs_token_lp = cfg.objective == "sampled_reverse_kl" or cfg.reward_weight > 0
    student_lp = (token_logprobs(hidden, head, batch["target_ids"], cfg.loss_chunk_size, transform)
                  if needs_token_lp else None)
    if cfg.objective == "sampled_reverse_kl":
        assert student_lp is not None
        advantage = (batch["teacher_token_logprobs"] - student_lp).detach()  # -(log p_S - log p_T), per token
        loss = -(advantage * student_lp).sum() / n
    else:
        out = chunked_distill_loss(hidden, head.weight, batch["target_ids"], batch["teacher_ids"],
                                   batch["teacher_logprobs"], alpha=1.0, divergence=cfg.objective, beta=cfg.jsd_beta,
                                   temperature=cfg.temperature, chunk_size=cfg.loss_chunk_size, lm_head_bias=head.bias,
                                   logit_transform=transform)
        loss = out.loss / n
    if rewards is not None and cfg.reward_weight > 0:
        assert student_lp is not None
        centred = (rewards - (rewards.mean() if baseline is None else baseline))[batch["seq_of_target"]]
        loss = loss - cfg.reward_weight * (centred * student_lp).sum() / n
    stats = {"loss": float(loss.detach())}
    if "teacher_token_logprobs" in batch:
        with torch.no_grad():
            lp = student_lp if student_lp is not None else token_logprobs(hidden.detach(), head, batch["target_ids"],
                                                                          cfg.loss_chunk_size, transform)
            stats["reverse_kl"] = float((lp - batch["teacher_token_logprobs"]).mean())
    return loss, stats


# ---------------------------------------------------------------------------------------
# Checkpoints


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoints whose state file was written (it is written last), oldest first."""
    found = [p for p in output_dir.glob("checkpoint-*") if (p / ONPOLICY_STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def rng_states() -> dict[str, Any]:
    """This process's random generators (a checkpoint keeps every process's: each samples its own)."""
    return {"torch_rng": torch.get_rng_state(), "numpy_rng": np.random.get_state(), "python_rng": random.getstate(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_states(saved: dict[str, Any]) -> None:
    torch.set_rng_state(saved["torch_rng"])
    if saved.get("cuda_rng") is not None:
        torch.cuda.set_rng_state_all(saved["cuda_rng"])
    np.random.set_state(saved["numpy_rng"])
    random.setstate(saved["python_rng"])


def save_checkpoint(output_dir: Path, step: int, model: torch.nn.Module, tokenizer: Any,
                    optimizer: torch.optim.Optimizer, scheduler: Any, state: dict[str, Any],
                    ranks: Ranks | None = None) -> Path:
    """Write ``checkpoint-<step>`` under a temporary name, then rename it: never half a checkpoint.

    The main process writes the student, optimizer and scheduler (equal on every process); each other
    process adds its random generators (``rng-<rank>.pt``) before the rename, and none returns before
    the checkpoint is complete (a process that exits early, as after a SIGTERM, would have the
    launcher stop the main one mid-save)."""
    ranks = ranks or Ranks()
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp"
    if ranks.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    ranks.barrier()
    if not ranks.main:
        torch.save(rng_states(), tmp / f"rng-{ranks.rank}.pt")
    ranks.barrier()
    if ranks.main:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), **rng_states()},
                   tmp / "training_state.pt")
        write_json_atomic(tmp / ONPOLICY_STATE, {**state, "step": step, "processes": ranks.world})
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    ranks.barrier()
    return final


def resuming(cfg: OnPolicyConfig) -> bool:
    """Whether ``resume_from_checkpoint`` asks for a resume (``latest`` may still find nothing)."""
    return cfg.resume_from_checkpoint is not None  # normalized by the config: None, ``latest`` or a path


def clear_earlier_run(output_dir: Path, checkpoints: bool) -> None:
    """What an earlier run left in ``output_dir`` that this one (``overwrite: true``) replaces: its
    manifest first (the directory no longer holds a finished run), then, unless this run resumes from
    one of them, its checkpoints."""
    (output_dir / MANIFEST).unlink(missing_ok=True)
    if not checkpoints:
        return
    for path in [*output_dir.glob("checkpoint-*"), *output_dir.glob(".checkpoint-*.tmp")]:
        if path.is_dir():
            shutil.rmtree(path)


def resume_point(cfg: OnPolicyConfig) -> Path | None:
    """The checkpoint to resume from: an explicit path, or the newest complete one for ``latest``."""
    value = cfg.resume_from_checkpoint
    if not resuming(cfg):
        return None
    if value == RESUME_LATEST:
        found = complete_checkpoints(Path(cfg.output_dir))
        if not found:
            logger.info("resume_from_checkpoint=%s: no complete checkpoint in %s, starting fresh", value, cfg.output_dir)
        path = found[-1] if found else None
    else:
        path = Path(value)
        if not (path / ONPOLICY_STATE).is_file():
            raise ConfigError(f"resume_from_checkpoint={value} is not a complete checkpoint (no {ONPOLICY_STATE}); "
                              f"use 'latest' for the newest complete one in {cfg.output_dir}")
    if path is not None and (path / "adapter_config.json").is_file() != cfg.use_peft:
        held = "a full model" if cfg.use_peft else "a LoRA adapter"
        raise ConfigError(f"{path} holds {held}: resume with the run's own setting, use_peft: {not cfg.use_peft}")
    return path


def restore(path: Path, optimizer: torch.optim.Optimizer, scheduler: Any,
            ranks: Ranks | None = None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Optimizer and scheduler states of a checkpoint; returns its run state (step, counters) and this
    process's RNG states, for :func:`set_rng_states` once every engine is built (an in-process vLLM
    engine seeds the global generators when it starts, and its sampler draws from torch's: set
    before, they would replay the run's first samples instead of continuing). A checkpoint of a run
    with another number of processes resumes with the weights, optimizer and prompt stream; the
    processes it did not have keep their fresh ``seed + rank`` generators (RNG states ``None``)."""
    ranks = ranks or Ranks()
    saved = torch.load(path / "training_state.pt", weights_only=False)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    own = path / f"rng-{ranks.rank}.pt"
    own_rng = {k: v for k, v in saved.items() if k.endswith("_rng")}  # not the (large) optimizer state
    rng = own_rng if ranks.main else torch.load(own, weights_only=False) if own.is_file() else None
    state = json.loads((path / ONPOLICY_STATE).read_text())
    if state.get("processes", 1) != ranks.world:
        logger.warning("%s was saved by %d process(es), resumed by %d: the samples differ from an uninterrupted run's",
                       path, state.get("processes", 1), ranks.world)
    return state, rng


def stream_places(step: int, stream: PromptStream, offline: OfflineBatches | None) -> dict[str, int]:
    """Where the run's streams stand after ``step`` steps, kept in each checkpoint: the prompt stream's
    batch size and position, and the offline rows' when some steps are offline (GKD's lambda < 1)."""
    places = {"prompts_per_step": stream.cursor.size, "prompt_position": stream.cursor.position(step)}
    if offline is not None:
        places |= {"offline_rows_per_step": offline.cursor.size, "offline_position": offline.cursor.position(step)}
    return places


def resume_streams(path: Path, state: dict[str, Any], stream: PromptStream, offline: OfflineBatches | None) -> None:
    """Continue the prompt stream (and the offline rows) where checkpoint ``path`` stopped.

    A resume may change ``prompts_per_step`` or ``offline_rows_per_step`` (a deliberate choice: on-policy
    samples are fresh whichever prompts they answer): the next batches start at the checkpoint's
    positions, so no prompt of the epoch comes twice or not at all. A checkpoint from before the
    positions were kept stopped at its step x its ``prompts_per_step`` (every step then counted).
    """
    step = state["step"]
    saved = state.get("streams") or state.get("prompt_layout") or {}
    position = saved.get("prompt_position", step * saved.get("prompts_per_step", stream.cursor.size))
    stream.cursor = stream.cursor.resumed(step, position)
    if offline is not None:
        offline.cursor = offline.cursor.resumed(step, saved.get("offline_position", offline.cursor.position(step)))
    now = stream_places(step, stream, offline)
    changed = [f"{k} {saved[k]} -> {now[k]}" for k in ("prompts_per_step", "offline_rows_per_step")
               if k in saved and k in now and saved[k] != now[k]]
    if changed:
        logger.info("%s: %s changed on resume; the streams go on from where it stopped (%s)", path,
                    ", ".join(changed), ", ".join(f"{k} {now[k]}" for k in now if k.endswith("position")))


# ---------------------------------------------------------------------------------------
# The stage


@dataclass
class Counters:
    """The compute a run spent (recorded in the manifest, and read by the demo's report)."""

    optimizer_steps: int = 0
    offline_steps: int = 0  # of the optimizer steps, those on an offline batch (GKD's lambda < 1)
    trained_tokens: int = 0
    rollout_tokens: int = 0
    teacher_tokens_scored: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    # async_rollouts: seconds the background thread sampled, hidden behind training (not wall time)
    background_s: float = 0.0

    def timed(self, phase: str, started: float) -> None:
        self.seconds[phase] += time.perf_counter() - started


@functools.lru_cache(maxsize=4)
def student_tokenizer(path: str) -> Any:
    """The tokenizer at ``path``, loaded once in a run (:func:`run_onpolicy` clears the cache): the input
    checks, the prompt checks and the student's loading all read it (a second or two each for a large one)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def load_student(path: str, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, Any]:
    """The student (float32 by default: the optimizer's master weights) and its tokenizer."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model, student_tokenizer(path)


def with_lora(model: torch.nn.Module, cfg: OnPolicyConfig, checkpoint: Path | None) -> tuple[torch.nn.Module, Any]:
    """A LoRA adapter on the frozen student (``use_peft``): a new one, or a checkpoint's to resume.

    Returns:
        The HF model with the adapter's layers in it (what the loop forwards and the optimizer
        trains: the adapter's parameters are its only trainable ones) and the ``PeftModel``
        that saves the adapter.
    """
    from peft import PeftModel, get_peft_model

    if checkpoint is not None:
        peft_model = PeftModel.from_pretrained(model, str(checkpoint), is_trainable=True)
    else:
        peft_model = get_peft_model(model, cfg.peft_config())
    return peft_model.get_base_model(), peft_model


def merged_weights(model: torch.nn.Module, with_adapter: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's weights under the plain model's names, each LoRA layer's base weight plus its
    adapters' delta (``scale * B @ A``; the base weight alone without ``with_adapter``): what the
    rollout engine, which holds the plain model, loads.

    One tensor at a time: a merged weight exists only while the engine copies it in (a list of
    them would be a second copy of the model). The trainer's weights are not touched (no merge and
    unmerge, which would round them).
    """
    state = model.state_dict()
    if not any(".lora_" in key for key in state):  # a plain student
        yield from ((key, tensor.detach()) for key, tensor in state.items())
        return
    from peft.tuners.lora import LoraLayer

    layers = {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}
    for key, tensor in state.items():
        if ".lora_" in key:
            continue
        owner, sep, rest = key.partition(".base_layer.")
        if sep and rest == "weight" and with_adapter:
            layer = layers[owner]
            with torch.no_grad():
                tensor = tensor + sum(layer.get_delta_weight(a) for a in layer.active_adapters if a in layer.lora_A)
        yield (f"{owner}.{rest}" if sep else key), tensor.detach()


def check_shares(cfg: OnPolicyConfig, processes: int) -> None:
    """Every step's prompts (and offline rows) divide among the training processes; else one line."""
    sizes = [("prompts_per_step", cfg.prompts_per_step)] if cfg.on_policy_fraction > 0 else []
    sizes += [("offline_rows_per_step", cfg.offline_rows_per_step)] if cfg.on_policy_fraction < 1 else []
    for name, size in sizes:
        if size % processes:
            raise ConfigError(f"{name}={size} does not divide among the {processes} processes: each takes an "
                              f"equal share of every step; set a multiple of {processes}")


def check_inputs(cfg: OnPolicyConfig, ranks: Ranks | None = None) -> None:
    """Everything that can fail before a model loads: the launch, paths, the offline data, the output directory."""
    ranks = ranks or Ranks()
    sharded = [name for name, var in (("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"), ("FSDP", "ACCELERATE_USE_FSDP"))
               if os.environ.get(var, "").lower() in ("1", "true")]
    if sharded:
        raise ConfigError(f"onpolicy trains a replicated student, data-parallel as DDP does, not with {sharded[0]}: launch "
                          "it with a config without DeepSpeed or FSDP (configs/accelerate/ddp_cpu.yaml: one process "
                          "per GPU on a GPU host), and train a student too big for one device as a LoRA (use_peft: true)")
    check_shares(cfg, ranks.world)
    check_model_path("student_model", cfg.student_model)
    if cfg.on_policy_fraction > 0 and cfg.teacher_backend != "server":
        for name, path in cfg.teachers.items():
            check_model_path(f"teacher '{name}'", path)
    if cfg.on_policy_fraction < 1:
        try:
            _, meta = read_built_metadata(cfg.offline_data_dir)
        except (FileNotFoundError, SchemaError) as err:
            raise ConfigError(f"offline_data_dir: {err}") from None

        # the tokenizer only (small): the built rows must index its vocabulary
        check_offline_data(cfg.offline_data_dir, meta, student_tokenizer(cfg.student_model), cfg.student_model)
    out = Path(cfg.output_dir)
    if (out / MANIFEST).is_file() and not cfg.overwrite and not resuming(cfg):
        raise ConfigError(f"output_dir {out} holds a finished run: set overwrite: true or another output_dir")
    if not resuming(cfg) and (found := complete_checkpoints(out)) and not cfg.overwrite:
        # `latest` would later resume from the newest of them, another run's weights and prompt position
        raise ConfigError(f"output_dir {out} holds checkpoints of an earlier run (the newest {found[-1].name}): resume "
                          "it with resume_from_checkpoint: latest, or set overwrite: true to start afresh (they are "
                          "removed), or use another output_dir")


def run_onpolicy(cfg: OnPolicyConfig) -> dict[str, Any]:
    """Run on-policy distillation (see the module docstring); returns the manifest.

    Under ``accelerate launch`` (or ``torchrun``) with several processes they train one student
    data-parallel (:class:`Ranks`)."""
    started = time.time()
    ranks = Ranks.start()
    student_tokenizer.cache_clear()  # one load per run: a path may hold another tokenizer by the next run
    check_inputs(cfg, ranks)
    finished = Path(cfg.output_dir) / MANIFEST
    if finished.is_file() and resuming(cfg) and not cfg.overwrite:  # a requeued job of a run that ended
        logger.warning("output_dir %s holds a finished run: nothing to resume (set overwrite: true to train it again, "
                       "from resume_from_checkpoint)", cfg.output_dir)
        return json.loads(finished.read_text())
    on_policy = cfg.on_policy_fraction > 0  # else pure offline KD: no prompt, no rollout, no teacher
    prompts = load_prompts(cfg) if on_policy else PromptTable(pa.table({}))
    # teacher servers answer before any model loads: an unreachable one fails here, in one line
    teachers = load_teachers(cfg) if on_policy and cfg.teacher_backend == "server" else {}
    for teacher in teachers.values():
        teacher.probe()
    server = ServerRollout(cfg, ranks) if on_policy and cfg.rollout_backend == "server" else None
    if server is not None:
        server.probe()
    check_logit_transform(cfg.student_model, "student_model")
    if on_policy and cfg.teacher_backend == "transformers":  # vLLM applies a model's logit transform itself
        for name, path in cfg.teachers.items():
            check_logit_transform(path, f"teacher '{name}'")
    fmt = PromptFormat.from_settings(cfg.system_prompt, cfg.instruction_template, cfg.use_chat_template)
    if on_policy:  # every prompt renders, and fits the context, before any model loads
        tokenizer, context = student_tokenizer_and_context(cfg)
        for name, path in cfg.teachers.items():  # a served teacher's name is checked where it is a local path
            if cfg.teacher_backend != "server" or os.path.isdir(os.path.expanduser(path)):
                check_same_vocabulary(path, tokenizer, f"teacher '{name}'", cfg.student_model)
        check_prompts(prompts, fmt, tokenizer, cfg, context)
    with contextlib.ExitStack() as cleanup:  # every engine is closed however the run ends
        if server is not None:
            cleanup.callback(server.close)
        return _distill(cfg, prompts, fmt, teachers, server, cleanup, started, ranks)


def student_tokenizer_and_context(cfg: OnPolicyConfig) -> tuple[Any, int | None]:
    """The student's tokenizer, and the context a rollout and its scoring must fit: ``max_model_len``,
    else the student's ``max_position_embeddings`` (what vLLM takes then)."""
    from transformers import AutoConfig

    tokenizer = student_tokenizer(cfg.student_model)
    if cfg.max_model_len:
        return tokenizer, cfg.max_model_len
    return tokenizer, getattr(AutoConfig.from_pretrained(cfg.student_model), "max_position_embeddings", None)


def _distill(cfg: OnPolicyConfig, prompts: PromptTable, fmt: PromptFormat, teachers: dict[str, Teacher],
             engine: RolloutEngine | None, cleanup: contextlib.ExitStack, started: float, ranks: Ranks) -> dict[str, Any]:
    """:func:`run_onpolicy` once its inputs and servers are checked: load, train, save."""
    from llmdistill.checkpoints import RunClock, StopRequest, stop_message

    on_policy = cfg.on_policy_fraction > 0
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if ranks.main and cfg.overwrite:
        clear_earlier_run(out, checkpoints=not resuming(cfg))
    ranks.barrier()
    # from here a SIGTERM ends the run after a step, cleaned up; under a launcher a process may get it twice
    # (from Slurm and from torchrun passing it on), and the second must not cut the checkpoint short
    stop = cleanup.enter_context(StopRequest(repeat_exits=ranks.world == 1))
    torch.manual_seed(cfg.seed)  # the same on every process: a new LoRA adapter starts equal everywhere
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)

    # Student, optimizer, schedule; resume
    resume = resume_point(cfg)
    # a LoRA checkpoint holds the adapter only: the base is student_model
    # a LoRA student's frozen base in bf16 with cfg.bf16 (peft keeps the adapter it adds in fp32)
    model, tokenizer = load_student(str(resume) if resume and not cfg.use_peft else cfg.student_model,
                                    torch.bfloat16 if cfg.bf16 and cfg.use_peft else torch.float32)
    adapter = None
    if cfg.use_peft:
        model, adapter = with_lora(model, cfg, resume)
    device = ranks.device
    model.to(device).train()
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate,
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps))
                                                  * max(0.0, 1 - s / cfg.max_steps))
    counters, history, first, clock = Counters(), [], 0, RunClock(0.0, started)
    record = run_record(cfg.student_model) if ranks.main else None  # what each checkpoint keeps of the run
    if ranks.world > 1:  # each process samples its own rollouts
        torch.manual_seed(cfg.seed + ranks.rank)
        random.seed(cfg.seed + ranks.rank)
        np.random.seed(cfg.seed + ranks.rank)
    if resume is not None:
        state, rng = restore(resume, optimizer, scheduler, ranks)
        first, history = state["step"], state["history"]
        counters = Counters(**{k: v for k, v in state["counters"].items()})
        clock.before = state.get("wall_time_total_s", 0.0)  # the seconds of the processes before this one
        logger.info("resuming from %s at step %d", resume, first)

    # Teachers, rollout engine, prompts, offline batches
    if on_policy and cfg.teacher_backend != "server":
        teachers = load_teachers(cfg, device, ranks)
        for teacher in teachers.values():
            if isinstance(teacher, VllmTeacher):
                cleanup.callback(teacher.close)
    for teacher in teachers.values():
        teacher.grade_for(model)
    offline = OfflineBatches(cfg, ranks) if cfg.on_policy_fraction < 1 else None
    # only the on-policy steps read prompts: every step, or those OfflineBatches does not take
    stream = PromptStream(prompts, cfg.seed, Cursor(cfg.prompts_per_step, None if offline is None else ~offline.offline))
    if resume is not None:
        resume_streams(resume, state, stream, offline)
    if on_policy and cfg.rollout_backend == "vllm":
        engine = VllmRollout(str(resume) if resume and adapter is None else cfg.student_model, cfg, adapter, ranks)
        cleanup.callback(engine.close)
        if adapter is not None and (resume is not None or engine.adapter is not None):
            engine.sync(model)  # the checkpoint's adapter (merged into the base, or as a LoRA)
    elif isinstance(engine, ServerRollout):
        engine.use_adapter(adapter)
        engine.sync(model)  # the servers sample from this run's weights, whatever they were started with
    elif on_policy:
        engine = TransformersRollout(model, tokenizer)
    if engine is not None:
        engine.synced_step = first
    source = (RolloutSource(engine, teachers, stream, fmt, tokenizer, cfg, counters, offline, ranks)
              if engine is not None else None)
    if resume is not None and rng is not None:  # after the engines: starting one reseeds the global generators
        set_rng_states(rng)

    # Train: sample -> score -> loss -> step -> sync (or, on an offline step: built batch -> loss -> step)
    window = []
    for step in range(first, cfg.max_steps):
        stats = train_step(step, model, optimizer, scheduler, source, tokenizer, cfg, counters, offline, ranks)
        window.append(stats)
        asked = stop.signum is not None
        if ranks.world > 1:  # any process signalled: all save the same step and stop
            asked = ranks.sum([float(asked)])[0] > 0
        stopping = asked and step + 1 < cfg.max_steps
        if (step + 1) % cfg.logging_steps == 0 or step + 1 == cfg.max_steps or stopping:
            history.append(log_window(step + 1, window, counters, clock))
            window = []
        if stopping or cfg.save_steps and (step + 1) % cfg.save_steps == 0:
            path = save_checkpoint(out, step + 1, model if adapter is None else adapter, tokenizer, optimizer,
                                   scheduler, {"history": history, "counters": counters.__dict__,
                                               "wall_time_total_s": round(clock.elapsed, 3), "run_record": record,
                                               "streams": stream_places(step + 1, stream, offline)}, ranks)
            if ranks.main and cfg.save_total_limit:
                for old in complete_checkpoints(out)[:-cfg.save_total_limit]:
                    (old / ONPOLICY_STATE).unlink()  # no longer complete, however far the removal gets
                    shutil.rmtree(old)
        if stopping:
            signum = stop.signum or signal.SIGTERM  # the processes Slurm or the launcher signalled got SIGTERM
            logger.warning("%s", stop_message(signum, step + 1, cfg.max_steps, path))
            raise SystemExit(128 + signum)

    # Save the student and the run's record
    if ranks.main:
        manifest = save_final(out, model, tokenizer, cfg, counters, history, started, clock, adapter)
    ranks.barrier()
    return manifest if ranks.main else json.loads((out / MANIFEST).read_text())


def train_step(step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
               source: RolloutSource | None, tokenizer: Any, cfg: OnPolicyConfig,
               counters: Counters, offline: OfflineBatches | None = None, ranks: Ranks | None = None) -> dict[str, float]:
    """One optimizer step on the student's own samples, or on an offline batch when ``offline`` takes the
    step. With several processes each computes the gradients of its share; the sums over all of them
    (:func:`~llmdistill.distributed.sum_gradients`) are the whole step's, and every process takes the same step."""
    ranks = ranks or Ranks()
    rollouts, rewards, rewarded = None, None, 0
    if offline is not None and offline.takes(step):
        t = time.perf_counter()
        batch = offline.batch(step)
        total = int(ranks.sum([len(batch["target_ids"])])[0])
        optimizer.zero_grad(set_to_none=True)
        stats = step_gradients(model, batch, cfg, normalizer=total)
        counters.offline_steps += 1
    else:
        rollouts, batch = source.take(step, model)  # graded: counted as scoring

        t = time.perf_counter()
        rewards = answer_rewards(rollouts, tokenizer, cfg)  # the same length of `counts` on every process
        checked = ~torch.isnan(rewards) if rewards is not None else None
        counts = [len(batch["target_ids"])] + ([float(rewards[checked].sum()), int(checked.sum())]
                                               if rewards is not None else [])
        total, *reward_counts = ranks.sum(counts)
        reward_sum, rewarded = reward_counts if rewards is not None else (0.0, 0)
        baseline = reward_sum / rewarded if rewarded else None
        optimizer.zero_grad(set_to_none=True)
        stats = step_gradients(model, batch, cfg, rewards if cfg.reward_weight > 0 else None, normalizer=int(total),
                               baseline=baseline)
    if ranks.world > 1:
        sum_gradients(model.parameters())
    if cfg.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
    optimizer.step()
    scheduler.step()
    counters.timed("training", t)

    # what the step logs and counts, over all processes (the loss terms are shares that add up); the same
    # keys on every process, whatever its share held (a process without targets adds 0)
    keys = ["loss"] + (["reverse_kl"] if rollouts is not None else [])
    local = [stats.get(k, 0.0) for k in keys] + [len(batch["target_ids"])]
    if rollouts is not None:
        local += [rollouts.num_tokens, len(rollouts.completion_ids), int(batch["input_ids"].shape[1])]
    summed = ranks.sum(local)
    stats = dict(zip(keys, summed, strict=False))
    counters.optimizer_steps += 1
    counters.trained_tokens += int(summed[len(keys)])
    if rollouts is not None:
        rollout_tokens, samples, scored = (int(v) for v in summed[len(keys) + 1:])
        counters.rollout_tokens += rollout_tokens
        counters.teacher_tokens_scored += scored
        stats["completion_tokens"] = rollout_tokens / samples
        stats["policy_lag"] = float(step - rollouts.policy_step)
        if rewarded:
            stats["reward"] = reward_sum / rewarded  # of the samples whose prompt has a reference answer

    if source is not None:
        source.updated(step, model)
    if offline is not None:
        stats["offline"] = float(rollouts is None)
    return stats


def answer_rewards(rollouts: Rollouts, tokenizer: Any, cfg: OnPolicyConfig) -> torch.Tensor | None:
    """Per sample: 1 where the answer checker accepts its answer, 0 where not, NaN where its prompt has
    no reference answer (a column filled on some rows only: the reward is then only logged, since
    ``reward_weight > 0`` needs every row's). None without ``answer_column``, on every process alike."""
    if not cfg.answer_column:
        return None
    rewards = torch.full((len(rollouts.records),), float("nan"))
    known = [i for i, r in enumerate(rollouts.records) if r.get(cfg.answer_column) is not None]
    if known:
        texts = tokenizer.batch_decode([rollouts.completion_ids[i] for i in known], skip_special_tokens=True)
        verdicts = check_many(cfg.checker, texts,
                              [Reference(answer=str(rollouts.records[i][cfg.answer_column])) for i in known])
        rewards[known] = torch.tensor([float(v.correct) for v in verdicts])
    return rewards


def log_window(step: int, window: list[dict[str, float]], counters: Counters, clock: Any = None) -> dict[str, Any]:
    """The mean of each statistic over the window's steps that have it (offline steps have no rollout stats),
    the seconds of each phase so far (carried over a resume), ``logged_at`` (Unix seconds: when the run
    reached the step) and ``elapsed_s`` (the run's wall seconds then, resumes included: ``clock``)."""
    keys = dict.fromkeys(k for w in window for k in w)
    entry = {"step": step, **{k: float(np.mean([w[k] for w in window if k in w])) for k in keys},
             "seconds": {k: round(v, 3) for k, v in counters.seconds.items()},
             "logged_at": round(time.time(), 3), **({"elapsed_s": round(clock.elapsed, 3)} if clock else {})}
    logger.info("step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in entry.items()
                                                     if isinstance(v, float) and k != "logged_at"))
    return entry


def save_final(out: Path, model: torch.nn.Module, tokenizer: Any, cfg: OnPolicyConfig, counters: Counters,
               history: list[dict[str, Any]], started: float, clock: Any, adapter: Any = None) -> dict[str, Any]:
    """The final student (a plain HF checkpoint in ``output_dir``; a LoRA student merged into its base
    weights, its adapter alone in ``output_dir/adapter``), its log and the manifest, written last."""
    (out / MANIFEST).unlink(missing_ok=True)
    tmp = out / f".model.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    if adapter is not None:
        adapter.save_pretrained(str(tmp / ADAPTER_DIR))
        model = adapter.merge_and_unload()
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(out / ADAPTER_DIR, ignore_errors=True)  # an earlier run's; this run's is in tmp if it has one
    for path in tmp.iterdir():
        os.replace(path, out / path.name)
    tmp.rmdir()
    write_json_atomic(out / "log_history.json", history)
    inputs = {"student": cfg.student_model}
    if cfg.on_policy_fraction > 0:
        inputs.update({"dataset": cfg.dataset, **{f"teacher_{k}": v for k, v in cfg.teachers.items()}})
    if cfg.on_policy_fraction < 1:
        inputs["offline_data"] = cfg.offline_data_dir
    return write_manifest(out, "onpolicy", cfg, inputs=inputs, started=started,
                          counts={"optimizer_steps": counters.optimizer_steps, "offline_steps": counters.offline_steps,
                                  "trained_tokens": counters.trained_tokens,
                                  "rollout_tokens": counters.rollout_tokens,
                                  "teacher_tokens_scored": counters.teacher_tokens_scored},
                          wall_time_total_s=round(clock.elapsed, 3),
                          compute={"seconds": {k: round(v, 3) for k, v in counters.seconds.items()},
                                   **({"rollout_in_background_s": round(counters.background_s, 3)}
                                      if cfg.async_rollouts else {})})
