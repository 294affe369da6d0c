"""End to end at scale: at least 150M tokens of built shards -> ``llmdistill train`` for N steps.

Target: the trainer's peak RSS <= 6 GB, whatever the data size (the old in-memory table alone
would have taken about the size of the Arrow copy reported here, in every rank).

The data is the build issue's scale-run output when ``LLMDISTILL_BENCH_BUILT_DIR`` names it (with
``LLMDISTILL_BENCH_STUDENT``, a student of the tokenizer it was built with; kept afterwards).
Otherwise synthetic built shards of ``LLMDISTILL_BENCH_SCALE_TOKENS`` tokens (default 150M) are
written to a temporary directory and deleted at the end: the 32,768-token rows of
``scripts/bench_train.py`` (top-20 encoded for 151,936 ids, 77.5 B per target token), 500 rows
(one 1.3 GiB row group) per shard. A fresh process converts them to Arrow (timed), trains N steps
of the tiny student with one DataLoader worker, and reports its peak RSS (``VmHWM``), also right
after the conversion (pyarrow reads a shard's top-k column chunk whole: about twice its bytes).

    python scripts/bench_train_scale.py   # 150M tokens: ~16 GiB of temporary disk (4.4 Parquet + 11.4 Arrow), ~6 min
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train  # noqa: E402

TOKENS = int(float(os.environ.get("LLMDISTILL_BENCH_SCALE_TOKENS", "150e6")))
STEPS = 12
ROWS_PER_SHARD = 500
BYTES_PER_TOKEN = 86  # Arrow (Parquet is at most that): 9 B of ids, positions and mask + 77.5 B of top-k per target


def _data(root: Path) -> tuple[Path, Path, dict[str, Any]]:
    """(built directory, student, what was made); synthetic unless LLMDISTILL_BENCH_BUILT_DIR is set."""
    given = os.environ.get("LLMDISTILL_BENCH_BUILT_DIR")
    if given:
        student = os.environ.get("LLMDISTILL_BENCH_STUDENT") or bench_train.make_student(root)
        return Path(given), Path(student), {"data": given}
    rows = math.ceil(TOKENS / bench_train.ROW_TOKENS)
    need, free = 2.2 * rows * bench_train.ROW_TOKENS * BYTES_PER_TOKEN, shutil.disk_usage(root).free
    if free < need:
        raise RuntimeError(f"bench_train_scale needs about {need / 2**30:.0f} GiB free in {root} (Parquet + its Arrow "
                           f"copy) and {free / 2**30:.0f} GiB are: free some, set TMPDIR to a larger disk, or lower "
                           "LLMDISTILL_BENCH_SCALE_TOKENS")
    student = bench_train.make_student(root)
    start = time.perf_counter()
    built = bench_train.write_synthetic_built(root / "built", student, rows, ROWS_PER_SHARD, distinct_rows=16)
    return built, student, {"data": "synthetic", "write_s": round(time.perf_counter() - start, 1)}


def run() -> dict[str, Any]:
    """Make (or take) the data, train STEPS steps in a fresh process, report memory and speed."""
    from llmdistill.formats import built_footprint

    before = bench_train.load_average()
    with tempfile.TemporaryDirectory(prefix="llmdistill-bench-scale-") as tmp:
        built, student, made = _data(Path(tmp))
        size = built_footprint(built)
        config = bench_train.train_config(student, built, Path(tmp) / "out", STEPS, workers=1)
        config["data_cache_dir"] = str(Path(tmp) / "arrow")  # a given data dir may be read-only
        trained = bench_train.in_subprocess(config)
        arrow = sum(f.stat().st_size for f in Path(tmp).joinpath("arrow").rglob("*.arrow"))
    steps = trained["log"][1:]  # the first step includes starting the worker
    wall = sum(h["data_wait_s"] / max(h["data_wait_fraction"], 1e-12) for h in steps)
    return made | {
        "tokens": size["tokens"],
        "rows": size["rows"],
        "parquet_gib": round(size["parquet_bytes"] / 2**30, 2),
        "arrow_gib": round(arrow / 2**30, 2),
        "convert_s": round(trained["convert_s"], 1),
        "steps": STEPS,
        "step_s": round(wall / len(steps), 2),
        "data_wait_fraction": round(sum(h["data_wait_s"] for h in steps) / wall, 4),
        "peak_rss_gib": round(trained["peak_rss_gib"], 3),
        "peak_rss_after_convert_gib": round(trained["peak_rss_after_convert_gib"], 3),
        "target_peak_rss_gib": 6.0,
        "load_average_before": before,
        "load_average_after": bench_train.load_average(),
    }


if __name__ == "__main__":
    results = run()
    width = max(len(k) for k in results)
    for key, value in results.items():
        print(f"{key:<{width}}  {value}")
