"""The build at scale, on this machine: at least 150M completion tokens with top-20, built in bounded memory.

Writes ``LLMDISTILL_BENCH_SCALE_TRACES`` (default 64,000) synthetic traces of about 2,400 tokens
with top-20 over 151,936 ids (the long traces of ``scripts/bench_build.py``: about 154M
completion tokens, 20 GB of generation shards) and builds them with ``llmdistill build`` (2
workers, a local Ray) in a fresh process whose processes' peak RSS is sampled. The pre-Ray build
failed beyond 107M tokens (``ArrowInvalid: offset overflow``) and needed about 172 B of RAM per
token before that. Target: peak RSS (all processes) <= 6 GB. Reports wall time, tokens/s, peak RSS,
disk in and out, then deletes the data (about 35 GB at the peak: check ``df`` first).

Run by hand, once, not in CI:

    python scripts/bench_build_scale.py        # ~35 GB of temporary disk, ~20 min here

The numbers are kept in ``runs/bench/build_scale.json``; ``run()`` (``make bench``) reports that
file and only builds again when ``LLMDISTILL_BENCH_SCALE=1``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_build  # noqa: E402

TRACES = int(os.environ.get("LLMDISTILL_BENCH_SCALE_TRACES", "64000"))
MEAN_TOKENS = 2_400
RECORD = Path(__file__).resolve().parents[1] / "runs" / "bench" / "build_scale.json"
TARGET_PEAK_GB = 6.0


def scale_run() -> dict[str, Any]:
    """Write the data, build it in a fresh process, measure, delete everything."""
    free = shutil.disk_usage(tempfile.gettempdir()).free
    with tempfile.TemporaryDirectory(prefix="llmdistill-bench-build-scale-") as tmp:
        root = Path(tmp)
        tokenizer = bench_build.big_vocab_tokenizer(root / "tok")
        made = bench_build.write_long_generation(root / "gen", tokenizer, str(root / "tok"), TRACES, MEAN_TOKENS)
        load = bench_build.load_average()
        build = bench_build.measured_build(bench_build.long_config(root / "gen", root / "out", root / "tok", 2), root)
        out_bytes = sum(p.stat().st_size for p in (root / "out").iterdir() if p.is_file())
        stats, tokens = build["stats"], made["completion_tokens"]
        return {
            "measured": time.strftime("%Y-%m-%d %H:%M"), "machine": bench_build.rates_machine(load),
            "traces": TRACES, "completion_tokens": tokens, "past_the_old_overflow_point": tokens > 107_000_000,
            "generation_write_s": made["write_s"], "disk_in_gb": made["disk_bytes"] / 1e9,
            "disk_out_gb": out_bytes / 1e9, "shards": stats["shards"]["count"],
            "largest_shard_mb": stats["shards"]["largest_bytes"] / 1e6,
            "wall_s": build["wall_s"], "build_s_without_ray_start": build["work_s"],
            "tokens_per_s": tokens / build["work_s"], "peak_rss_gb": build["peak"]["total"] / 1e9,
            "peak_rss_driver_gb": build["peak"]["driver"] / 1e9, "peak_rss_one_worker_gb": build["peak"]["worker"] / 1e9,
            "peak_rss_ray_system_gb": build["peak"]["system"] / 1e9, "target_peak_rss_gb": TARGET_PEAK_GB,
            "packing_efficiency": stats["packing"]["efficiency"],
            "topk_bytes_per_token": stats["teacher_signal"]["bytes_per_token"],
            "teacher_topk_coverage": stats["teacher_topk_coverage"], "kept_traces": stats["steps"][-1]["remaining"],
            "load_average_before": load, "load_average_after": bench_build.load_average(),
            "free_disk_before_gb": free / 1e9,
        }


def run() -> dict[str, Any]:
    """The recorded scale run (``make bench``); a new one with ``LLMDISTILL_BENCH_SCALE=1``."""
    if os.environ.get("LLMDISTILL_BENCH_SCALE") == "1" or not RECORD.is_file():
        if os.environ.get("LLMDISTILL_BENCH_SCALE") != "1":
            return {"skipped": "no recorded scale run: `python scripts/bench_build_scale.py` (35 GB of disk)"}
        RECORD.parent.mkdir(parents=True, exist_ok=True)
        RECORD.write_text(json.dumps(scale_run(), indent=2) + "\n")
    return {"recorded": str(RECORD), **json.loads(RECORD.read_text())}


if __name__ == "__main__":
    os.environ["LLMDISTILL_BENCH_SCALE"] = "1"
    for key, value in run().items():
        print(f"{key:<32} {value}")
