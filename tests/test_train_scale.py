"""``llmdistill train`` at scale: memory-mapped built data, DataLoader workers, exact resume over processes.

The built shards are converted once into Arrow files that every process memory-maps
(:func:`llmdistill.formats.convert_built_to_arrow`, :func:`~llmdistill.formats.open_built`); the
benchmarks of memory against data size are in ``scripts/bench_train.py`` and
``scripts/bench_train_scale.py``.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from conftest import accelerate_launch  # tests/ is on sys.path (pytest's rootdir conftest)
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from llmdistill import formats
from llmdistill.collate import DistillCollator
from llmdistill.config.base import UserError
from llmdistill.config.train import TrainConfig
from llmdistill.formats import (
    built_cache_dir,
    convert_built_to_arrow,
    open_built,
    read_built,
    write_built_shard,
)
from llmdistill.plan import make_plan
from llmdistill.tinyworld.kd_data import write_tiny_built
from llmdistill.tinyworld.task import generate_problems
from llmdistill.train import load_built

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_tokenizer, tiny_random_teacher_dir) -> Path:
    """33 packed rows of 64 problems with the random teacher's top-8."""
    return write_tiny_built(tmp_path_factory.mktemp("built"), tiny_tokenizer, generate_problems(64, seed=0),
                            tiny_random_teacher_dir, k=8, max_length=128)


def copy_of(built: Path, dst: Path) -> Path:
    """The built shards (without any Arrow copy) in a directory of the test's own."""
    shutil.copytree(built, dst, ignore=shutil.ignore_patterns(formats.BUILT_ARROW_CACHE))
    return dst


def config(out: Path, data: Path, **overrides) -> TrainConfig:
    return TrainConfig(output_dir=str(out), data_dir=str(data), report_to="none", **overrides)


# ---- the data, memory-mapped ----------------------------------------------------------------


@pytest.mark.unit
def test_training_reads_the_built_rows_memory_mapped_from_one_arrow_copy(tmp_path, built):
    data = copy_of(built, tmp_path / "built")
    dataset, meta = load_built(config(tmp_path / "out", data))
    table, expected_meta = read_built(data)
    assert meta == expected_meta and len(dataset) == table.num_rows
    assert [dataset[i] for i in range(len(dataset))] == table.to_pylist()  # every row, in shard order

    # the rows stay on disk: the dataset maps files in <data_dir>/.arrow_cache and pickles as their paths
    files = [Path(f["filename"]) for f in dataset.cache_files]
    assert files and all(f.parent == data / ".arrow_cache" for f in files)
    assert len(pickle.dumps(dataset)) < 0.1 * sum(f.stat().st_size for f in files)
    # a second run (another process of the machine, or a rerun) maps the same files without converting
    stamps = [(f.stat().st_ino, f.stat().st_mtime_ns) for f in files]
    again, _ = load_built(config(tmp_path / "out", data))
    assert [Path(f["filename"]) for f in again.cache_files] == files
    assert [(f.stat().st_ino, f.stat().st_mtime_ns) for f in files] == stamps


@pytest.mark.unit
def test_a_changed_shard_is_converted_again_and_stale_files_are_removed(tmp_path, built):
    data = copy_of(built, tmp_path / "built")
    cache = built_cache_dir(data)
    (old,) = convert_built_to_arrow(data, cache)
    # a converter on this machine that died, and one that is still running (this process)
    dead = cache / f".{old.name}.tmp-{os.uname().nodename}-999999999"
    running = cache / f".{old.name}.tmp-{os.uname().nodename}-{os.getpid()}"
    dead.write_bytes(b"partial")
    running.write_bytes(b"partial")

    shard = next(data.glob("part-*.parquet"))
    table, meta = read_built(data)
    write_built_shard(table.slice(0, 5).to_pylist(), shard, meta)  # the directory was rebuilt with 5 rows
    (new,) = convert_built_to_arrow(data, cache)
    dataset, _ = open_built(data, cache)
    assert new != old and not old.exists() and len(dataset) == 5
    assert not dead.exists() and running.exists()


@pytest.mark.unit
def test_the_cache_goes_beside_a_read_only_data_dir_or_where_configured(tmp_path, built, monkeypatch):
    import datasets.config

    data = copy_of(built, tmp_path / "built")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as for a read-only data_dir
    fallback = built_cache_dir(data)
    assert fallback.parent == tmp_path / "hf" / "llmdistill-built" and fallback.name.startswith("built-")
    dataset, _ = load_built(config(tmp_path / "out", data))
    assert Path(dataset.cache_files[0]["filename"]).parent == fallback
    assert not (data / ".arrow_cache").exists()

    dataset, _ = load_built(config(tmp_path / "out", data, data_cache_dir=str(tmp_path / "scratch")))
    assert Path(dataset.cache_files[0]["filename"]).parent.parent == tmp_path / "scratch"


@pytest.mark.unit
def test_a_full_disk_while_converting_names_the_directory_and_the_fix(tmp_path, built, monkeypatch):
    data = copy_of(built, tmp_path / "built")

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(UserError, match=r"converting .*part-000000.parquet to Arrow in .*\.arrow_cache: no space "
                                        r"left.*bytes free.*data_cache_dir"):
        convert_built_to_arrow(data, built_cache_dir(data))
    assert not [p for p in (data / ".arrow_cache").iterdir()]  # nothing half written is left


@pytest.mark.unit
def test_dataloader_workers_collate_the_same_batches(tmp_path, built):
    dataset, meta = load_built(config(tmp_path / "out", copy_of(built, tmp_path / "built")))
    collator = DistillCollator(meta["k"], meta["vocab_size"], meta["codec_bits"], with_topk=True)

    def batches(workers: int) -> list[dict[str, torch.Tensor]]:
        return list(DataLoader(dataset, batch_size=4, collate_fn=collator, num_workers=workers))

    inline, in_workers = batches(0), batches(2)
    assert len(inline) == len(in_workers) == 9
    for a, b in zip(inline, in_workers, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.unit
def test_the_dry_run_estimates_the_disk_and_memory_of_the_data(tmp_path, built):
    plan = make_plan("train", config(tmp_path / "out", built, student_model="none"))
    arrow = plan["Arrow cache per machine (disk)"]
    assert "GiB" in arrow and ".arrow_cache" in arrow
    assert "independent of the data size" in plan["host RAM per process for data"]


# ---- two processes: disjoint rows, exact resume ---------------------------------------------

# Runs `llmdistill <argv[2:]...>` and writes the doc ids of every collated batch to <argv[1]>-<rank>.jsonl
# (from the DataLoader worker that collates it).
RECORDING_WRAPPER = '''
import json, os, sys

from llmdistill.cli import main
from llmdistill.collate import DistillCollator

record, collate = sys.argv[1], DistillCollator.__call__


def recording(self, rows):
    with open(f"{record}-{os.environ['RANK']}.jsonl", "a") as fh:
        fh.write(json.dumps([r["doc_ids"] for r in rows]) + "\\n")
    return collate(self, rows)


DistillCollator.__call__ = recording
main(sys.argv[2:])
'''


def launch_two(tmp_path: Path, launcher: str, run: dict, record: Path) -> None:
    """`accelerate launch` of the real CLI with 2 CPU processes, recording the rows each rank collates."""
    run_yaml, wrapper = tmp_path / f"{record.name}.yaml", tmp_path / "wrapper.py"
    run_yaml.write_text(yaml.safe_dump(run))
    wrapper.write_text(RECORDING_WRAPPER)
    cmd = accelerate_launch(str(wrapper), str(record), "train", "--config", str(run_yaml), launcher=launcher)
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def batches_of(record: Path, rank: int) -> list[list[str]]:
    """The rows (as their documents) of each batch a rank collated, in order."""
    lines = Path(f"{record}-{rank}.jsonl").read_text().splitlines()
    return [[" ".join(docs) for docs in json.loads(line)] for line in lines]


@pytest.mark.integration
@pytest.mark.parametrize("launcher", ["ddp_cpu", "deepspeed_zero3"])
def test_two_processes_read_disjoint_rows_and_resume_at_the_exact_data_position(tmp_path, tiny_student_dir,
                                                                               built, launcher):
    """2 processes x 4 rows a step over 33 rows: an epoch is 5 steps; resuming from the checkpoint at
    step 6 (one step into the second epoch) gives the 3 next losses of the uninterrupted run, bit for
    bit, with the top-k decoded in one DataLoader worker per process. Alpha follows the running loss
    (loss_adaptive), which the checkpoint must carry under DeepSpeed too, where transformers skips
    ``_load_from_checkpoint``."""
    data = copy_of(built, tmp_path / "built")
    run = dict(student_model=str(tiny_student_dir), data_dir=str(data), alpha=0.5, max_steps=9,
               alpha_start=0.1, alpha_schedule="loss_adaptive", adaptive_ema_decay=0.5,
               per_device_train_batch_size=4, learning_rate=3e-3, logging_steps=1, save_strategy="steps",
               save_steps=6, gradient_checkpointing=False, report_to="none", seed=0, disable_tqdm=True,
               dataloader_num_workers=1)
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    launch_two(tmp_path, launcher, {**run, "output_dir": str(whole)}, tmp_path / "whole")
    launch_two(tmp_path, launcher, {**run, "output_dir": str(resumed),
                                    "resume_from_checkpoint": str(whole / "checkpoint-6")}, tmp_path / "resumed")

    # ranks read disjoint rows: the 4 full steps of the first epoch cover 32 of the 33 rows once
    first_epoch = [sum(batches_of(tmp_path / "whole", rank)[:4], []) for rank in (0, 1)]
    assert len(set(first_epoch[0])) == len(set(first_epoch[1])) == 16
    assert not set(first_epoch[0]) & set(first_epoch[1])
    # the resumed run collated no batch it skipped: its first batches are those of steps 7, 8, 9
    for rank in (0, 1):
        assert batches_of(tmp_path / "resumed", rank)[:3] == batches_of(tmp_path / "whole", rank)[6:9]

    logs = [{h["step"]: h for h in json.loads((out / "log_history.json").read_text()) if "ce_loss" in h}
            for out in (whole, resumed)]
    assert logs[0][6]["epoch"] > 1.0
    for step in (7, 8, 9):
        for key in ("loss", "grad_norm", "ce_loss", "kd_loss", "learning_rate"):
            assert logs[1][step][key] == logs[0][step][key], (step, key)
        assert logs[0][step]["peak_rss_gib"] > 0.1 and logs[0][step]["data_wait_s"] >= 0
    weights = [load_file(out / "model.safetensors") for out in (whole, resumed)]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
