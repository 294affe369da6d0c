"""``llmdistill generate`` and ``llmdistill score``, top to bottom.

check inputs -> plan this job's part -> (engine) -> stream: a shard every ``flush_every / 2``
completions or ``flush_seconds / 2`` seconds -> manifest.

All checks of :func:`prepare` run before the engine starts: a bad column, an empty prompt, a
malformed JSONL line, a missing model or a changed config fails in seconds, not after a model
load. The engine is only started when something is left to do. Completions are written as
they finish, so a kill loses only those not yet flushed, and a re-run does only what is missing.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from llmdistill.config.base import check_model_path
from llmdistill.config.generate import GenerateConfig, ScoreConfig
from llmdistill.formats import GenerationInfo, read_generation_keys
from llmdistill.generate.engines import Finished, OfflineEngine, Work, known_ids_only
from llmdistill.generate.inputs import (
    Formatter,
    InputError,
    Request,
    drop_too_long,
    eos_suffix,
    fits,
    input_columns,
    load_rows,
    passthrough_types,
    prompt_requests,
    score_requests,
    tokenize_prompts,
    tokenized_pairs,
)
from llmdistill.generate.pool import ServerPool
from llmdistill.generate.store import (
    ShardWriter,
    check_resumable,
    decode_completions,
    merge_shards,
    part_dir,
    remove_stale_temp_files,
    shard_rows,
    write_part_manifest,
)
from llmdistill.log import get_logger, progress
from llmdistill.prompts import read_text_or_file

logger = get_logger(__name__)


@dataclass
class Plan:
    """What one job will do: its part's directory and the requests with work left."""

    info: GenerationInfo
    directory: Path
    tokenizer: Any
    pending: list[Request]
    passthrough: dict[str, pa.DataType]
    done: set[tuple[str, int]]
    counts: dict[str, Any]
    max_model_len: int | None = None
    num_samples: int = 1
    append_eos: bool = False

    def work(self) -> Iterator[Work]:
        """The units of work left, in input order: each missing (prompt, sample), or each pair to score.

        Score pairs are tokenized here, as they are handed out; a pair longer than the context
        is skipped and counted (``skipped_too_long``).
        """
        if self.info.stage == "generate":
            for req in self.pending:
                yield from (Work(req, s) for s in range(self.num_samples) if (req.prompt_id, s) not in self.done)
            return
        for req in tokenized_pairs(self.pending, self.tokenizer, eos_suffix(self.tokenizer, self.append_eos)):
            if fits(req, self.max_model_len, room=1):
                yield Work(req, req.sample_index)
            else:
                self.counts["skipped_too_long"] += 1

    @property
    def units(self) -> int:
        """Completions left to write (score: before pairs too long for the context are skipped)."""
        if self.info.stage == "score":
            return len(self.pending)
        return sum((r.prompt_id, s) not in self.done for r in self.pending for s in range(self.num_samples))


def resolve_model(name: str) -> str:
    """A local model or tokenizer path made absolute (so later stages run from any directory); a hub id as is."""
    path = os.path.expanduser(name)
    return os.path.abspath(path) if os.path.exists(path) else name


def load_tokenizer(cfg: GenerateConfig | ScoreConfig) -> Any:
    """The teacher tokenizer (chat template, EOS, decoding)."""
    from transformers import AutoTokenizer

    name = cfg.tokenizer or cfg.model
    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as err:
        raise InputError(f"cannot load the teacher tokenizer from '{name}': {err}") from err


def context_length(cfg: GenerateConfig | ScoreConfig) -> int | None:
    """max_model_len if set, else what the servers report, else the model config's position limit."""
    if cfg.max_model_len is not None:
        return cfg.max_model_len
    if cfg.backend == "server":
        pool = ServerPool(cfg)
        pool.probe()
        return pool.max_model_len
    from transformers import AutoConfig

    try:
        model_config = AutoConfig.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read the model config of '{cfg.model}': {err}") from err
    return getattr(model_config, "max_position_embeddings", None)


def _keys(req: Request, cfg: GenerateConfig | ScoreConfig) -> list[tuple[str, int]]:
    if isinstance(cfg, GenerateConfig):
        return [(req.prompt_id, s) for s in range(cfg.num_samples)]
    return [(req.prompt_id, req.sample_index)]


def prepare(cfg: GenerateConfig | ScoreConfig, stage: str) -> Plan:
    """Check everything that can be checked without the engine, and plan this job's work.

    Raises:
        InputError: bad paths or input rows (naming the file, line/row and column).
        ConfigError: the output directory holds a run with other output-affecting settings.
    """
    # Output: a resume must not mix settings
    index, count = cfg.shard_index_count
    directory = part_dir(cfg.output_dir, index, count)
    check_resumable(directory, cfg, stage)

    # Teacher
    check_model_path("model", cfg.model)
    if cfg.tokenizer:
        check_model_path("tokenizer", cfg.tokenizer)
    tokenizer = load_tokenizer(cfg)
    if cfg.logprobs_top_k > len(tokenizer):
        raise InputError(f"logprobs_top_k={cfg.logprobs_top_k} exceeds the teacher's vocabulary ({len(tokenizer)})")

    # This job's rows (shard before formatting) -> requests, minus what a previous run already wrote
    formatter = Formatter.of(cfg, tokenizer)
    loaded = load_rows(cfg, input_columns(cfg), (index, count))
    types = passthrough_types(loaded, cfg.passthrough_columns)  # mixed-type JSON columns fail before formatting
    mine = (score_requests(cfg, formatter, loaded.rows) if stage == "score"
            else prompt_requests(cfg, formatter, loaded.rows))
    eos_suffix(tokenizer, getattr(cfg, "append_eos", False))  # fails now, not when the first pair is scored
    tokenize_prompts(mine, formatter)
    max_model_len = context_length(cfg)
    fitting, too_long = drop_too_long(mine, max_model_len, room=1)
    done = read_generation_keys(directory)
    pending = [r for r in fitting if any(key not in done for key in _keys(r, cfg))]
    counts = {"input_rows": loaded.total, "part_rows": len(mine), "skipped_too_long": too_long,
              "pending_at_start": len(pending)}
    logger.info("%s: %d input rows, %d in part %s, %d too long for the context, %d left to do",
                stage, loaded.total, len(mine), cfg.shard, too_long, len(pending))
    info = GenerationInfo(stage=stage, teacher=resolve_model(cfg.model), tokenizer=resolve_model(cfg.tokenizer or cfg.model),
                          k=cfg.logprobs_top_k, vocab_size=len(tokenizer), prompt_format=formatter.format,
                          rewrite_template=rewrite_template(cfg))
    return Plan(info, directory, tokenizer, pending, types, done, counts,
                max_model_len=max_model_len, num_samples=getattr(cfg, "num_samples", 1),
                append_eos=getattr(cfg, "append_eos", False))


def rewrite_template(cfg: GenerateConfig | ScoreConfig) -> str | None:
    """The resolved rewrite template of an SDFT generation (recorded for build), else None."""
    if isinstance(cfg, ScoreConfig) or not cfg.rewrite_column:
        return None
    return read_text_or_file(cfg.rewrite_template)


def make_engine(cfg: GenerateConfig | ScoreConfig, scoring: bool) -> OfflineEngine | ServerPool:
    """The in-process vLLM engine or the server pool, per ``cfg.backend``."""
    if cfg.backend == "server":
        return ServerPool(cfg, scoring=scoring)
    return OfflineEngine(cfg, scoring=scoring)


def teacher_rows(finished: list[Finished], plan: Plan) -> list[dict]:
    """The generation rows of finished work (sampled completions are detokenized here), holding
    only ids of the teacher's tokenizer (:func:`~llmdistill.generate.engines.known_ids_only`)."""
    finished = [(work, known_ids_only(completion, plan.info.vocab_size, plan.info.k)) for work, completion in finished]
    if plan.info.stage == "score":
        return shard_rows(finished, None)
    return shard_rows(finished, decode_completions(plan.tokenizer, [c for _, c in finished]))


def write_stream(engine: OfflineEngine | ServerPool, plan: Plan, cfg: GenerateConfig | ScoreConfig,
                 work: Iterable[Work] | None = None) -> None:
    """Stream the plan's work through the engine and write what finishes, shard by shard.

    Double-buffered, so that a kill loses at most ``flush_every`` completions and at most
    ``flush_seconds`` of them: a shard is handed to the background writer
    (:class:`~llmdistill.generate.store.ShardWriter`) at half of either, while the other half
    fills. A shard due while the previous one is still being written waits for it, and the
    engine waits with it (the server pool keeps receiving meanwhile). ``work``: the plan's
    (:meth:`Plan.work`) when not given.
    """
    remove_stale_temp_files(plan.directory)
    every, seconds = max(1, cfg.flush_every // 2), cfg.flush_seconds / 2
    with progress() as bar, ShardWriter(plan.directory, lambda done: teacher_rows(done, plan), plan.info,
                                        plan.passthrough) as writer:
        task = bar.add_task(plan.info.stage, total=plan.units)
        buffer: list[Finished] = []
        oldest = 0.0
        try:
            for finished in engine.stream(plan.work() if work is None else work):
                if finished is not None:
                    if not buffer:
                        oldest = time.monotonic()
                    buffer.append(finished)
                    bar.advance(task)
                if buffer and (len(buffer) >= every or time.monotonic() - oldest >= seconds):
                    writer.submit(buffer)
                    buffer = []
        finally:  # the end, or an engine error: what finished is written either way
            if buffer:
                writer.submit(buffer)


def _run(cfg: GenerateConfig | ScoreConfig, stage: str) -> dict[str, Any]:
    started = time.time()
    plan = prepare(cfg, stage)
    write_part_manifest(plan.directory, cfg, plan.info, plan.counts, started, complete=False)
    work = plan.work()
    # the engine starts only for work that is left: score pairs too long for the context, found
    # as they are tokenized, are skipped again by every re-run of a finished part
    first = next(work, None) if plan.pending else None
    if first is not None:
        engine = make_engine(cfg, scoring=stage == "score")
        write_stream(engine, plan, cfg, itertools.chain([first], work))
        if isinstance(engine, ServerPool):
            plan.counts.update(engine.stats())
    manifest = write_part_manifest(plan.directory, cfg, plan.info, plan.counts, started, complete=True)
    logger.info("%s: %d rows, %d completion tokens in %s", stage, manifest["counts"]["rows"],
                manifest["counts"]["completion_tokens"], plan.directory)
    return manifest


def run_generate(cfg: GenerateConfig) -> dict[str, Any]:
    """``llmdistill generate``: sample ``num_samples`` completions per prompt with top-k log-probs.

    Returns:
        The manifest written to the part's directory (or the merged one with ``merge``).
    """
    if cfg.merge:
        return merge_shards(cfg.output_dir)
    return _run(cfg, "generate")


def run_score(cfg: ScoreConfig) -> dict[str, Any]:
    """``llmdistill score``: the teacher's top-k log-probs on existing completions, by one prefill."""
    if cfg.merge:
        return merge_shards(cfg.output_dir)
    return _run(cfg, "score")
