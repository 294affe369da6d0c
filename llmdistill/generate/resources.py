"""Per-node memory and disk of a ``generate`` / ``score`` job, before it runs (for ``--dry_run``).

Upper bounds: every completion at ``max_tokens`` (score: at the context length), every slot of
the in-flight window full. A completion token costs ``8k + 8`` bytes as arrays (top-k ids and
log-probs as int32/float32, plus its own id and log-prob) in memory and, before zstd, on disk.
"""

from __future__ import annotations

from typing import Any

from llmdistill.config.generate import GenerateConfig, ScoreConfig

GIB = 1024**3
STREAM_TEXT_BYTES = 1 << 20  # raw reply text a stream keeps before parsing (responses.PARSE_EVERY_BYTES)
# the half of flush_every being written (arrays, rows, Arrow table) and the half filling: ~2 x flush_every
FLUSH_COPIES = 2
VLLM_DEFAULT_MAX_NUM_SEQS = 256  # vLLM's offline default on most GPUs (1024 on H100/H200-class ones)


def bytes_per_token(k: int) -> int:
    """Bytes of one completion token's teacher signal as arrays: top-k ids + log-probs, its id and log-prob."""
    return 8 * k + 8


def in_flight(cfg: GenerateConfig | ScoreConfig) -> tuple[int, str]:
    """Sequences a job holds at once, and how that number is made."""
    if cfg.backend == "server":
        per_server = cfg.concurrency_per_server or 64
        return per_server * len(cfg.server_urls), f"{per_server} per server x {len(cfg.server_urls)} servers"
    if cfg.max_in_flight:
        return cfg.max_in_flight, "max_in_flight"
    seqs = cfg.engine_kwargs_dict.get("max_num_seqs", VLLM_DEFAULT_MAX_NUM_SEQS)
    return 2 * seqs, f"2 x max_num_seqs ({seqs})"


def job_resources(cfg: GenerateConfig | ScoreConfig, completions: int | None) -> dict[str, Any]:
    """Host memory of one job (one node) and the disk its shards take.

    Args:
        cfg: the stage's config.
        completions: completions this job writes (None: unknown, e.g. a hub dataset).
    """
    tokens = getattr(cfg, "max_tokens", None) or cfg.max_model_len or 32768
    per_token = bytes_per_token(cfg.logprobs_top_k)
    seqs, how = in_flight(cfg)
    window = seqs * tokens * per_token
    text = seqs * STREAM_TEXT_BYTES if cfg.backend == "server" else 0
    flush = FLUSH_COPIES * cfg.flush_every * tokens * per_token
    plan: dict[str, Any] = {
        "sequences in flight": f"{seqs} ({how})",
        "host RAM per job (upper bound)": f"{(window + text + flush) / GIB:.1f} GiB: in flight {window / GIB:.1f} + "
                                          f"reply text {text / GIB:.1f} + flush buffers {flush / GIB:.1f}, "
                                          f"every sequence at {tokens} tokens",
    }
    per_completion = tokens * per_token
    if completions is not None:
        plan["shard disk of this job (upper bound, before zstd)"] = f"{completions * per_completion / GIB:,.0f} GiB"
    plan["shard disk per 1k completions (upper bound, before zstd)"] = f"{1000 * per_completion / GIB:.1f} GiB"
    return plan
