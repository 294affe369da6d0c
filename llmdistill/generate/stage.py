"""``llmdistill generate`` and ``llmdistill score``, top to bottom.

check inputs -> plan this job's part -> (engine) -> one shard per batch -> manifest.

All checks of :func:`prepare` run before the engine starts: a bad column, an empty prompt, a
malformed JSONL line, a missing model or a changed config fails in seconds, not after a model
load. The engine is only started when something is left to do.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from llmdistill.config.base import check_model_path
from llmdistill.config.generate import GenerateConfig, ScoreConfig
from llmdistill.formats import (
    GenerationInfo,
    next_shard_index,
    read_generation_keys,
    shard_name,
    write_generation_shard,
)
from llmdistill.generate.engines import OfflineEngine, ServerEngine
from llmdistill.generate.inputs import (
    Formatter,
    InputError,
    Request,
    drop_too_long,
    input_columns,
    load_rows,
    passthrough_types,
    prompt_requests,
    score_requests,
    shard_of,
    tokenize_requests,
)
from llmdistill.generate.store import (
    check_resumable,
    decode_completions,
    merge_shards,
    part_dir,
    remove_stale_temp_files,
    shard_rows,
    write_part_manifest,
)
from llmdistill.log import get_logger, progress

logger = get_logger(__name__)


@dataclass
class Plan:
    """What one job will do: its part's directory and the requests not yet written."""

    info: GenerationInfo
    directory: Path
    tokenizer: Any
    pending: list[Request]
    passthrough: dict[str, pa.DataType]
    done: set[tuple[str, int]]
    counts: dict[str, int]


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
        return ServerEngine(cfg).max_model_len()
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

    # Input rows -> requests
    formatter = Formatter.of(cfg, tokenizer)
    rows = load_rows(cfg, input_columns(cfg))
    requests = score_requests(cfg, formatter, rows) if stage == "score" else prompt_requests(cfg, formatter, rows)

    # This job's part, minus what a previous run already wrote
    mine = [r for r in requests if shard_of(r.prompt_id, count) == index]
    tokenize_requests(mine, formatter, append_eos=getattr(cfg, "append_eos", False))
    fitting, too_long = drop_too_long(mine, context_length(cfg), room=1)
    done = read_generation_keys(directory)
    pending = [r for r in fitting if any(key not in done for key in _keys(r, cfg))]
    counts = {"input_rows": len(rows), "part_rows": len(mine), "skipped_too_long": too_long,
              "pending_at_start": len(pending)}
    logger.info("%s: %d input rows, %d in part %s, %d too long for the context, %d left to do",
                stage, len(rows), len(mine), cfg.shard, too_long, len(pending))
    info = GenerationInfo(stage=stage, teacher=resolve_model(cfg.model), tokenizer=resolve_model(cfg.tokenizer or cfg.model),
                          k=cfg.logprobs_top_k, vocab_size=len(tokenizer), prompt_format=formatter.format)
    return Plan(info, directory, tokenizer, pending, passthrough_types(rows, cfg.passthrough_columns), done, counts)


def make_engine(cfg: GenerateConfig | ScoreConfig, scoring: bool) -> OfflineEngine | ServerEngine:
    """The in-process vLLM engine or the server client, per ``cfg.backend``."""
    if cfg.backend == "server":
        return ServerEngine(cfg)
    return OfflineEngine(cfg, scoring=scoring)


def teacher_rows(completions: list, batch: list[Request], plan: Plan) -> list[dict]:
    """The generation rows of one batch's teacher output (sampled: ``[[Completion]]``; scored: ``[Completion]``)."""
    if plan.info.stage == "score":
        return shard_rows(batch, [[c] for c in completions], None, plan.done)
    texts = decode_completions(plan.tokenizer, [c for comps in completions for c in comps])
    return shard_rows(batch, completions, texts, plan.done)


def write_batches(engine: OfflineEngine | ServerEngine, plan: Plan, cfg: GenerateConfig | ScoreConfig) -> None:
    """One engine call and one atomically written shard per ``batch_size`` pending requests.

    A batch's shard (detokenization, Arrow conversion, zstd, fsync) is written by a background
    thread while the engine runs the next batch; at most one shard is in flight, and a failed
    write stops the run at the next batch.
    """
    remove_stale_temp_files(plan.directory)
    index = next_shard_index(plan.directory)

    def write(completions: list, batch: list[Request], path: Path) -> None:
        rows = teacher_rows(completions, batch, plan)
        if rows:
            write_generation_shard(rows, path, cfg.logprobs_top_k, plan.info.teacher, plan.passthrough,
                                   extra={"stage": plan.info.stage})

    with progress() as bar, ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer") as writer:
        task = bar.add_task(plan.info.stage, total=len(plan.pending))
        in_flight: Future | None = None
        for start in range(0, len(plan.pending), cfg.batch_size):
            batch = plan.pending[start:start + cfg.batch_size]
            completions = engine.score(batch) if plan.info.stage == "score" else engine.sample(batch, cfg.num_samples)
            if in_flight is not None:
                in_flight.result()
            in_flight = writer.submit(write, completions, batch, plan.directory / shard_name(index))
            index += 1
            bar.advance(task, len(batch))
        if in_flight is not None:
            in_flight.result()


def _run(cfg: GenerateConfig | ScoreConfig, stage: str) -> dict[str, Any]:
    started = time.time()
    plan = prepare(cfg, stage)
    write_part_manifest(plan.directory, cfg, plan.info, plan.counts, started, complete=False)
    if plan.pending:
        engine = make_engine(cfg, scoring=stage == "score")
        write_batches(engine, plan, cfg)
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
