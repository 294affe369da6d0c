"""``llmdistill build --dry_run``: peak RAM per worker, disk and wall time for the input it sees.

The input is sized from the generation shards' footers (rows, completion tokens; no row is read)
or, without shards, from the counts of its ``manifest.json``. The estimate applies per-token
rates that ``scripts/bench_build.py`` measured and stored in ``rates.json`` beside this module,
so it says where its numbers come from. Upper bounds: every trace is assumed kept.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from llmdistill.config.build import BuildConfig

RATES = Path(__file__).with_name("rates.json")
GB = 1e9
NODE_CPUS = 64  # the recipe's nodes (slurm/build.sbatch): RAM is reported per node of this many workers


def load_rates() -> dict[str, Any] | None:
    """The rates ``scripts/bench_build.py`` measured, or None when it has not run."""
    return json.loads(RATES.read_text()) if RATES.is_file() else None


def input_size(cfg: BuildConfig) -> dict[str, Any] | None:
    """Traces, completion tokens, bytes on disk and ``k`` of the input, without reading a row."""
    from llmdistill.formats import SHARD_GLOB, list_shards, read_generation_footer
    from llmdistill.manifest import MANIFEST, read_manifest

    path = Path(cfg.input_path)
    if path.is_dir() and any(path.rglob(SHARD_GLOB)):
        shards = [read_generation_footer(p, columns=[]) for p in list_shards(path)]
        return {"traces": sum(s.num_rows for s in shards), "source": f"{len(shards)} shard footers",
                "completion_tokens": sum(g.completion_tokens for s in shards for g in s.row_groups),
                "disk_bytes": sum(g.compressed_bytes for s in shards for g in s.row_groups), "k": shards[0].k}
    if (path / MANIFEST).is_file():
        manifest = read_manifest(path)
        counts = manifest.get("counts", {})
        if "rows" in counts and "completion_tokens" in counts:
            return {"traces": counts["rows"], "completion_tokens": counts["completion_tokens"], "disk_bytes": None,
                    "k": manifest.get("generation", {}).get("k"), "source": f"counts of its {MANIFEST}"}
    return None


def build_estimate(cfg: BuildConfig, k: int | None, vocab_size: int | None) -> dict[str, Any]:
    """Plan entries: input size, peak RAM per worker and of the driver, disk, wall time.

    Args:
        cfg: the build config (``workers``, ``pack_window_tokens``, ``part_mb``, ``codec_bits``).
        k: teacher top-k entries per token (None: read from the shards, else 20).
        vocab_size: the vocabulary the top-k ids index (None: Qwen2.5's 151,936).
    """
    from llmdistill.plan import topk_bytes_per_token

    size, rates = input_size(cfg), load_rates()
    if size is None:
        return {"estimate": f"unknown: {cfg.input_path} has neither shards nor manifest counts to size it"}
    if rates is None:
        return {"input": size, "estimate": "no rates measured yet: run `python scripts/bench_build.py`"}
    workers = cfg.workers or os.cpu_count() or 1
    k, vocab_size = k or size.get("k") or 20, vocab_size or 151_936
    tokens, traces = size["completion_tokens"], size["traces"]
    per_part = min(tokens, (cfg.part_mb << 20) / rates["input_disk_bytes_per_token"])
    window = min(cfg.pack_window_tokens, per_part)
    worker_ram = rates["worker_idle_rss_bytes"] + rates["worker_bytes_per_window_token"] * window
    driver_ram = rates["driver_base_rss_bytes"] + rates["driver_bytes_per_trace"] * traces
    topk = topk_bytes_per_token(k, vocab_size, cfg.codec_bits) if cfg.kd else 0.0
    # measured on disk at the benchmark's k and vocabulary; the top-k share rescaled to this build's
    out_bytes = tokens * (rates["built_disk_bytes_per_token"] - rates["built_topk_bytes_per_token"] + topk)
    seconds = tokens / (rates["tokens_per_s_per_core"] * workers) + rates["ray_start_s"]
    if cfg.verifier == "math":
        seconds += traces * rates["math_verify_s_per_trace"] / workers
    local = not cfg.ray_address and workers <= (os.cpu_count() or 1)
    node = workers if local else min(workers, NODE_CPUS)
    in_bytes = size.get("disk_bytes") or tokens * rates["input_disk_bytes_per_token"]
    return {
        "input (upper bound: all kept)": f"{traces:,} traces, {tokens:.3g} completion tokens ({size['source']})",
        "parts": f"about {math.ceil(tokens / per_part):,} of {per_part:.3g} tokens ({cfg.part_mb} MB on disk)",
        "peak RAM per worker": f"{worker_ram / GB:.2f} GB (a pack window of {window:.3g} tokens)",
        "peak RAM of the driver": f"{driver_ram / GB:.2f} GB ({traces:,} traces' light columns)",
        ("peak RAM of this machine (driver + Ray + workers)" if local else
         f"peak RAM of a node of {node} workers (+ the driver on the head node)"):
            f"{((driver_ram if local else 0) + rates['ray_system_rss_bytes'] + node * worker_ram) / GB:.1f} GB",
        "disk: built shards": f"{out_bytes / GB:,.1f} GB ({out_bytes / tokens:.1f} B per token)",
        "disk: input read": f"{in_bytes / GB:,.0f} GB, {in_bytes / seconds / GB:.1f} GB/s at the estimated pace "
                            "(slower storage sets the pace)",
        "wall time": f"{_duration(seconds)} on {workers} CPU(s) ({rates['tokens_per_s_per_core']:,.0f} tokens/s "
                     f"per core{', + math-verify per trace' if cfg.verifier == 'math' else ''})",
        "rates measured": f"{rates['measured']} on {rates['machine']} by scripts/bench_build.py",
    }


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:,.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"
