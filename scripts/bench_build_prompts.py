"""Benchmark of the build's phase A (prompt dedup and decontamination) on Ray workers.

Synthetic prompts of 80 words (a 5,000-word vocabulary), 4 samples each, over 8 generation
shards that hold only the light columns phase A reads; 5% exact and 5% near duplicates, 1%
contaminated by a 500-problem extra file. Each run is a fresh process whose peak RSS above its
baseline (after imports and Ray start) is sampled; Ray's own processes are not counted.

- speed-up of 2 workers over 1 at the larger size (target >= 1.6x on an idle 2-core machine), of phase A
  on workers that have run a first (empty) Ray Data map: the first map of a process pays ~2.5 s here
  to start Ray Data's executor and the workers' imports, once per build, not per phase
  (``ray_data_start_s``); the speed-up with that cost counted in is printed beside it
  (``speedup_2_workers_cold``);
- the driver's memory per prompt, at 1x and 4x the prompts: with the texts on the workers it
  holds ids, hashes and 8 bytes per trace (RSS, and its anonymous part: RSS also counts the pages of
  the memory-mapped part files the confirmation reads, which the kernel can drop);
- against the old phase A, which ran on the driver and held every distinct prompt's text
  (:func:`old_phase_a`, the same steps: exact and MinHash near dedup, n-gram decontamination),
  at the larger size: its wall time and the driver's memory.

Run ``python scripts/bench_build_prompts.py`` (about 6 min here); ``run()`` returns the numbers
for ``scripts/bench.py``. The data (about 0.2 GB) is deleted at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from llmdistill.formats import GENERATION_COLUMNS, shard_name

SIZES = (50_000, 200_000)  # prompts: 1x and 4x
SAMPLES = 4
WORDS = 80
FILES = 8


def write_prompts(directory: Path, extra: Path, n: int, seed: int = 0) -> None:
    """``n`` prompts x :data:`SAMPLES` samples, light columns only, with planted duplicates."""
    rng = np.random.default_rng(seed)
    vocab = np.asarray([f"w{i}" for i in range(5000)], dtype=object)
    words = rng.integers(0, len(vocab), size=(n, WORDS))
    exact = rng.choice(n, size=n // 20, replace=False)
    words[exact] = words[rng.integers(0, n, size=len(exact))]
    near = rng.choice(n, size=n // 20, replace=False)
    words[near] = words[rng.integers(0, n, size=len(near))]
    words[near, WORDS // 2] = rng.integers(0, len(vocab), size=len(near))
    texts = [" ".join(vocab[row]) for row in words]
    leaked = rng.choice(n, size=n // 100, replace=False)
    extra.write_text("\n".join(" ".join(texts[i].split()[20:60]) for i in leaked[:500]) + "\n")
    meta = {b"llmdistill": json.dumps({"schema": "llmdistill.generation", "schema_version": 1, "k": 20,
                                       "teacher": "bench"}).encode()}
    schema = pa.schema([(c, GENERATION_COLUMNS[c]) for c in ("prompt_id", "sample_index", "prompt")], metadata=meta)
    order = np.repeat(np.arange(n), SAMPLES)
    bounds = np.linspace(0, len(order), FILES + 1).astype(int)
    directory.mkdir(parents=True)
    for f in range(FILES):
        rows = order[bounds[f]:bounds[f + 1]]
        table = pa.table({"prompt_id": pa.array([f"p{i}" for i in rows]),
                          "sample_index": pa.array(np.arange(bounds[f], bounds[f + 1]) % SAMPLES, pa.int32()),
                          "prompt": pa.array([texts[i] for i in rows])}, schema=schema)
        pq.write_table(table, directory / shard_name(f), row_group_size=20_000)


def old_phase_a(cfg: Any, parts: list[Any]) -> np.ndarray:
    """The phase A of before: every distinct prompt's text read into the driver, then deduplicated
    and decontaminated there in one process. Returns the fate per prompt."""
    from llmdistill.builder import dedup
    from llmdistill.builder.decontam import build_index, contaminated
    from llmdistill.builder.traces import read_part
    from llmdistill.prompts import prompt_problem

    first: dict[str, str] = {}
    for part in parts:
        for _, batch in read_part(part, ["prompt_id", "prompt"], batch_rows=65_536):
            for pid, text in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist(), strict=True):
                first.setdefault(pid, text)
    problems = [prompt_problem(t) for t in first.values()]
    fate = dedup.duplicates(problems, near=True, threshold=cfg.dedup_threshold, ngram=cfg.dedup_ngram,
                            num_perm=cfg.minhash_num_perm, seed=cfg.seed).astype(np.uint8)
    alive = np.flatnonzero(fate == 0)
    found, _ = contaminated([problems[i] for i in alive], build_index(cfg, cfg.data_paths))
    fate[alive[[bool(f) for f in found]]] = 2
    return fate


def _nothing(task: dict[str, Any], context: Any) -> dict[str, Any]:
    return {"part": task["part"]}


def one(mode: str, data: Path, workers: int) -> dict[str, Any]:
    """One measured phase A in this process: ``mode`` ``new`` (Ray workers) or ``old`` (driver)."""
    import psutil

    from llmdistill.builder.cluster import start_ray
    from llmdistill.builder.prompt_level import prompt_fates
    from llmdistill.builder.traces import open_generation, plan_parts
    from llmdistill.config.build import BuildConfig

    cfg = BuildConfig(input_path=str(data / "gen"), output_dir=str(data / "out"), student_tokenizer="unused",
                      decontam_benchmarks=[], decontam_extra_file=str(data / "extra.txt"), workers=workers)
    parts = plan_parts(open_generation(cfg, ["prompt_id", "prompt", "sample_index"]), cfg.part_mb)
    runtime = start_ray(workers, None) if mode == "new" else None
    started = time.perf_counter()
    if runtime is not None:  # Ray Data's executor and the workers' first task, as a build's earlier map would
        from llmdistill.builder.cluster import map_parts

        for _ in map_parts(_nothing, [{"part": i} for i in range(workers)], None, runtime):
            pass
    ray_start = time.perf_counter() - started
    me = psutil.Process()

    def anonymous() -> int:  # RssAnon: what the process allocated, not pages of files it maps
        with open(f"/proc/{me.pid}/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("RssAnon:"))

    base, base_anon = me.memory_info().rss, anonymous()
    peak = [base, base_anon]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0], peak[1] = max(peak[0], me.memory_info().rss), max(peak[1], anonymous())
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=data) as work:
        if mode == "new":
            fate = prompt_fates(cfg, parts, runtime, work).fate
        else:
            fate = old_phase_a(cfg, parts)
    wall = time.perf_counter() - started
    done.set()
    sampler.join()
    return {"wall_s": wall, "ray_data_start_s": ray_start, "driver_peak_above_base_bytes": peak[0] - base,
            "driver_anonymous_peak_above_base_bytes": peak[1] - base_anon, "prompts": len(fate),
            "duplicate": int((fate == 1).sum()), "contaminated": int((fate == 2).sum()), "parts": len(parts)}


def measured(mode: str, data: Path, workers: int) -> dict[str, Any]:
    """:func:`one` in a fresh process."""
    out = subprocess.run([sys.executable, __file__, "--one", mode, str(data), str(workers)], capture_output=True,
                         text=True, env=os.environ | {"RAY_DEDUP_LOGS": "0"})
    if out.returncode:
        raise RuntimeError(f"phase A ({mode}, {workers} workers) failed: {out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"phase A {mode}, {workers} worker(s), {result['prompts']:,} prompts: {result['wall_s']:.1f} s "
          f"(+{result['ray_data_start_s']:.1f} s first map), "
          f"driver +{result['driver_peak_above_base_bytes'] / 1e6:.0f} MB "
          f"(+{result['driver_anonymous_peak_above_base_bytes'] / 1e6:.0f} MB not file-backed)", flush=True)
    return result


def run() -> dict[str, float | str]:
    with tempfile.TemporaryDirectory(prefix="llmdistill-bench-prompts-") as tmp:
        root = Path(tmp)
        sizes = {}
        for n in SIZES:
            (root / str(n)).mkdir()
            write_prompts(root / str(n) / "gen", root / str(n) / "extra.txt", n)
            sizes[n] = root / str(n)
        small, big = SIZES
        new_small = measured("new", sizes[small], 2)
        new_two = measured("new", sizes[big], 2)
        new_one = measured("new", sizes[big], 1)
        old = measured("old", sizes[big], 1)
    assert (new_two["duplicate"], new_two["contaminated"]) == (new_one["duplicate"], new_one["contaminated"])
    traces = big * SAMPLES
    return {
        "prompts": float(big), "traces": float(traces), "duplicate_prompts": float(new_two["duplicate"]),
        "contaminated_prompts": float(new_two["contaminated"]),
        "old_duplicate_prompts": float(old["duplicate"]), "old_contaminated_prompts": float(old["contaminated"]),
        "wall_1_worker_s": new_one["wall_s"], "wall_2_workers_s": new_two["wall_s"],
        "speedup_2_workers": new_one["wall_s"] / new_two["wall_s"], "target_speedup_2_workers": 1.6,
        "ray_data_start_s": new_two["ray_data_start_s"],
        "speedup_2_workers_cold": ((new_one["wall_s"] + new_one["ray_data_start_s"])
                                   / (new_two["wall_s"] + new_two["ray_data_start_s"])),
        "old_driver_only_s": old["wall_s"], "speedup_2_workers_vs_old": old["wall_s"] / new_two["wall_s"],
        "driver_bytes_per_prompt_1x": new_small["driver_peak_above_base_bytes"] / small,
        "driver_bytes_per_prompt_4x": new_two["driver_peak_above_base_bytes"] / big,
        "old_driver_bytes_per_prompt_4x": old["driver_peak_above_base_bytes"] / big,
        "driver_anonymous_bytes_per_prompt_1x": new_small["driver_anonymous_peak_above_base_bytes"] / small,
        "driver_anonymous_bytes_per_prompt_4x": new_two["driver_anonymous_peak_above_base_bytes"] / big,
        "old_driver_anonymous_bytes_per_prompt_4x": old["driver_anonymous_peak_above_base_bytes"] / big,
    }


if __name__ == "__main__":
    if sys.argv[1:2] == ["--one"]:
        print(json.dumps(one(sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]))))
        sys.exit(0)
    results = run()
    width = max(map(len, results))
    for key, value in results.items():
        print(f"{key:<{width}}  {value:,.3f}" if abs(value) < 100 else f"{key:<{width}}  {value:,.0f}")
