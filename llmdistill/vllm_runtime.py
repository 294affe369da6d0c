"""Process layout of the vLLM engines that ``generate``, ``score`` and ``eval`` start, and local
``vllm serve`` processes for tests and benchmarks.

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
import signal
import socket
import subprocess
import sys
import time

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


def set_cpu_kv_cache(gib: int | None) -> None:
    """The KV cache size of the next vLLM engine on a CPU host (``VLLM_CPU_KVCACHE_SPACE``, GiB), unless
    the user exported one; None leaves vLLM's default."""
    if gib is not None:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(gib))


def start_local_server(model: str, *flags: str, dev: bool = False, env: dict[str, str] | None = None,
                       port: int | None = None) -> tuple[str, subprocess.Popen]:
    """Start ``vllm serve`` of ``model`` on 127.0.0.1 (a free port unless given), in its own process group:
    fp32, eager, one process, 256-token context, 1 GiB of KV cache on a CPU, then ``flags``. Tests and
    benchmarks use it; a cluster starts its servers from the recipe's SLURM scripts.

    Args:
        dev: ``VLLM_SERVER_DEV_MODE=1``: the server also answers ``/server_info`` and ``/collective_rpc``
            (what a rollout server's weight sync calls).
        env: more environment variables (e.g. ``VLLM_CPU_OMP_THREADS_BIND`` to pin it to cores).

    Returns:
        (base URL, the server process); stop it with :func:`stop_local_servers`.
    """
    if port is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
            "--port", str(port), "--enforce-eager", "--dtype", "float32", "--max-model-len", "256",
            "--distributed-executor-backend", "uni", *flags]
    environ = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_SERVER_DEV_MODE": "1" if dev else "0", **(env or {})}
    proc = subprocess.Popen(argv, env=environ, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    return f"http://127.0.0.1:{port}", proc


# The max_lora_rank values vLLM 0.32 accepts (vllm.config.lora.MaxLoRARanks; a test checks they still match).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_lora_rank(rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds a rank-``rank`` adapter (the largest for
    ranks above it, which callers refuse first)."""
    return next((size for size in VLLM_LORA_RANKS if size >= rank), VLLM_LORA_RANKS[-1])


def healthy(url: str, timeout: float = 2.0) -> bool:
    """Whether the server at ``url`` answers ``GET /health`` with 200 within ``timeout`` seconds."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url + "/health", timeout=timeout) as reply:
            return reply.status == 200
    except (urllib.error.URLError, OSError):
        return False


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 300.0) -> None:
    """Return once ``url/health`` answers 200; raise if the server exits or ``timeout`` seconds pass."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the vLLM server for {url} exited at start (code {proc.returncode})")
        if healthy(url):
            return
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not become healthy within {timeout:.0f}s")


def stop_local_servers(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each server's process group; SIGKILL what is left of it, at the latest 30 s later."""
    def kill(proc: subprocess.Popen, sig: int) -> None:
        try:  # the group, even when its leader is gone: vLLM's engine-core child may still run
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass

    for proc in procs:
        kill(proc, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        kill(proc, signal.SIGKILL)  # whatever of the group is still there
