"""Process layout of the vLLM engines that ``generate``, ``score`` and ``eval`` start.

vLLM v1 runs its engine core (scheduler, model runner, sampler) in a separate process by
default and ships every step's outputs to the front-end over ZMQ. On a GPU that overlap pays;
on a CPU-only host the core, its worker and the front-end compete for the same few cores, and
per-step serialization of top-k log-prob blocks is pure overhead. Measured on a 2-core box
(``scripts/bench_generate.py``, tiny teacher, 384 prompts x 2 samples x 64 tokens): plain sampling
~15k tok/s with the separate process vs ~19k in-process; top-20 capture + shard writing ~11k vs
~15.5k tok/s.
"""

from __future__ import annotations

import os

from llmdistill.log import get_logger

logger = get_logger(__name__)
ENV_VAR = "VLLM_ENABLE_V1_MULTIPROCESSING"
MODES = ("auto", "on", "off")
# The model dtypes every stage that starts a vLLM engine accepts (vLLM's own names, aliases excluded).
DTYPES = ("auto", "bfloat16", "float16", "float32")


def _vllm_on_cpu() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def set_engine_process(mode: str) -> str | None:
    """Choose whether the next ``vllm.LLM`` runs its engine core in a separate process.

    Args:
        mode: ``on`` (separate process, vLLM's default), ``off`` (in this process) or ``auto``:
            ``off`` when vLLM runs on CPU, otherwise vLLM's default. Under ``auto`` a value the
            user already exported in ``VLLM_ENABLE_V1_MULTIPROCESSING`` is left alone.

    Returns:
        The value now in ``VLLM_ENABLE_V1_MULTIPROCESSING`` (None: unset, vLLM's default).
    """
    if mode not in MODES:
        raise ValueError(f"vllm_multiprocessing must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "auto":
        if ENV_VAR in os.environ or not _vllm_on_cpu():
            return os.environ.get(ENV_VAR)
        mode = "off"
    os.environ[ENV_VAR] = "1" if mode == "on" else "0"
    logger.debug("vLLM engine core %s", "in its own process" if mode == "on" else "in this process")
    return os.environ[ENV_VAR]
