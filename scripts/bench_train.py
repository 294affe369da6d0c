"""Benchmarks of ``llmdistill train``: speed against TRL, memory against data size, data-loading time.

(a) Throughput on the tiny world: the distillation trainer vs plain TRL SFTTrainer, same student,
    packed rows, batch, steps, optimiser and seed. The KD run decodes the teacher top-k in its
    collator and computes the sparse KD + CE loss chunk by chunk; the SFT run is TRL's own
    padding-free SFTTrainer on the same rows with labels = -100 outside the loss mask.
    Target: KD tokens/s >= 0.85 x SFT tokens/s.
(b) Memory against data size: the trainer's peak RSS (a fresh process each, the conversion of
    the shards to Arrow included) on 1x and 10x the built rows of 32,768-token rows with top-20
    over 151,936 ids, for the same steps. Target: at most 1.2x apart.
(c) Data loading for 32,768-token rows with top-20: the trainer's own ``data_wait_fraction``
    (time spent waiting for batches / wall time), with one DataLoader worker decoding ahead.
    Target: <= 5% of the step time. The tiny student needs seconds per 32k-token step on 2 cores,
    which is also the order of a 7B student's step on a GPU.

The synthetic rows are 16 documents of 2,048 tokens (128 of prompt) whose ids and top-k ids lie
in the tiny-world vocabulary, encoded as for a 151,936-id vocabulary (18-bit ids, 77.5 B per
target token: the size and decode cost of the real thing). CPU ``sdpa`` turns packed position
ids into a dense (tokens x tokens) mask (10 GB and ~100 s a step at 32k tokens here), so the
student attends within each document with :func:`per_document_sdpa`, the CPU stand-in for
flash-attention's varlen kernel that the recipe uses on GPUs.

    python scripts/bench_train.py
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("LLMDISTILL_NO_PROGRESS", "1")

STEPS = 60
BATCH_ROWS = 4
REPEATS = 2
ROW_TOKENS = 32_768
DOC_TOKENS = 2_048
PROMPT_TOKENS = 128
TOP_K = 20
CODEC_VOCAB = 151_936
MEMORY_ROWS = 40  # 1x: 40 rows of 32k tokens (1.3M tokens, 0.1 GiB); 10x: 400 rows
MEMORY_STEPS = 4
LOADING_STEPS = 8


# ---- the synthetic 32k-token data and the student that trains on it ---------------------------


def per_document_sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0, position_ids=None,
                      **kwargs):
    """Causal attention within each packed document (position ids restart at 0), one sdpa call each.

    query/key/value: (1, heads, tokens, head_dim). Returns (1, tokens, heads, head_dim) and no weights.
    """
    import torch
    import torch.nn.functional as F

    starts = (position_ids[0] == 0).nonzero().flatten().tolist() + [query.shape[2]]
    parts = [F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], is_causal=True,
                                            scale=scaling, enable_gqa=True) for s, e in itertools.pairwise(starts)]
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


def register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register("per_document_sdpa", per_document_sdpa)


def make_student(root: Path) -> Path:
    """The tiny-world student (Qwen2 64 x 2) and its tokenizer."""
    from llmdistill.tinyworld.models import make_model, save_model
    from llmdistill.tinyworld.tokenizer import build_tokenizer

    tok = build_tokenizer()
    return save_model(make_model("student", tok, seed=0), tok, root / "student")


def synthetic_rows(count: int, seed: int, vocab: int) -> list[dict[str, Any]]:
    """``count`` built rows of :data:`ROW_TOKENS` tokens with encoded top-k (see the module docstring)."""
    import numpy as np

    from llmdistill.codec import encode_topk

    rng = np.random.default_rng(seed)
    docs = ROW_TOKENS // DOC_TOKENS
    positions = np.tile(np.arange(DOC_TOKENS, dtype=np.int32), docs)
    mask = (positions >= PROMPT_TOKENS).astype(np.int8)
    n = int(mask.sum())
    rows = []
    for i in range(count):
        # k distinct ids per target: a random permutation read at k consecutive places
        ids = rng.permutation(vocab)[(rng.integers(0, vocab, size=(n, 1)) + np.arange(TOP_K)) % vocab]
        logprobs = np.sort(rng.normal(-8, 4, size=(n, TOP_K)).clip(max=0), axis=1)[:, ::-1].astype(np.float32)
        rows.append({"input_ids": rng.integers(0, vocab, ROW_TOKENS, dtype=np.int32), "position_ids": positions,
                     "loss_mask": mask, "seq_lengths": np.full(docs, DOC_TOKENS, dtype=np.int32),
                     "doc_ids": [f"synthetic-{seed}-{i}-{d}/0" for d in range(docs)],
                     "topk": encode_topk(ids, logprobs, CODEC_VOCAB, 12)})
    return rows


def write_synthetic_built(directory: Path, student: Path, rows: int, rows_per_shard: int = 40,
                          distinct_rows: int | None = None) -> Path:
    """Built shards of ``rows`` synthetic rows; ``distinct_rows`` cycles that many (quicker to make)."""
    from transformers import AutoTokenizer

    from llmdistill.formats import shard_name, tokenizer_fingerprint, write_built_shard

    tok = AutoTokenizer.from_pretrained(student)
    meta = {"kd": True, "k": TOP_K, "vocab_size": CODEC_VOCAB, "codec": "llmdistill.codec/v1", "codec_bits": 12,
            "tokenizer_fingerprint": tokenizer_fingerprint(tok), "max_length": ROW_TOKENS,
            "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    pool = synthetic_rows(distinct_rows, seed=0, vocab=len(tok)) if distinct_rows else None
    for shard, start in enumerate(range(0, rows, rows_per_shard)):
        count = min(rows_per_shard, rows - start)
        batch = [_unique(pool[(start + i) % len(pool)], start + i) for i in range(count)] if pool else \
            synthetic_rows(count, seed=shard, vocab=len(tok))
        write_built_shard(batch, directory / shard_name(shard), meta)
    return directory


def _unique(row: dict[str, Any], index: int) -> dict[str, Any]:
    """A copy of a pool row that Parquet cannot dictionary-encode away: its own doc ids, and its top-k
    blob ending in its index (the last bytes hold quantised log-prob gaps, where any value is valid)."""
    docs = ROW_TOKENS // DOC_TOKENS
    return dict(row, doc_ids=[f"row{index}-{d}/0" for d in range(docs)],
                topk=row["topk"][:-8] + index.to_bytes(8, "little"))


def train_config(student: Path, data: Path, out: Path, steps: int, workers: int) -> dict[str, Any]:
    """A 32k-token KD run: one packed row per step, the per-document attention (see the docstring)."""
    return dict(output_dir=str(out), student_model=str(student), data_dir=str(data), alpha=0.5, max_steps=steps,
                per_device_train_batch_size=1, learning_rate=1e-3, logging_steps=1, save_strategy="no",
                report_to="none", gradient_checkpointing=False, bf16=False, use_cpu=True, seed=0,
                dataloader_num_workers=workers, disable_tqdm=True, loss_chunk_size=4096,
                model_init_kwargs={"attn_implementation": "per_document_sdpa"})


def train_and_measure(config: dict[str, Any]) -> dict[str, Any]:
    """Run in a fresh process: convert + map the data, train; return the log, times and peak RSS.

    Peak RSS is the trainer process's (``VmHWM``): the DataLoader worker is forked from it and
    shares its pages.
    """
    register_attention()
    from llmdistill.config.train import TrainConfig
    from llmdistill.train import build_trainer, load_built
    from llmdistill.trainer import peak_rss_bytes

    cfg = TrainConfig(**config)
    start = time.perf_counter()
    load_built(cfg)  # converts the shards to Arrow (build_trainer then only maps them)
    convert_s, converted_peak = time.perf_counter() - start, peak_rss_bytes()
    trainer, _ = build_trainer(cfg)
    start = time.perf_counter()
    trainer.train()
    return {"convert_s": convert_s, "train_s": time.perf_counter() - start,
            "log": [h for h in trainer.state.log_history if "ce_loss" in h],
            "peak_rss_after_convert_gib": converted_peak / 2**30, "peak_rss_gib": peak_rss_bytes() / 2**30}


def in_subprocess(config: dict[str, Any]) -> dict[str, Any]:
    """:func:`train_and_measure` in a new Python process (peak RSS is per process)."""
    done = subprocess.run([sys.executable, __file__, "--train", json.dumps(config)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"training subprocess failed: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def arrow_gib(data: Path) -> float:
    return sum(f.stat().st_size for f in (data / ".arrow_cache").glob("*.arrow")) / 2**30


def load_average() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


# ---- (a) KD trainer vs TRL SFTTrainer -------------------------------------------------------


def _make_world(root: Path) -> tuple[Path, Path]:
    from llmdistill.tinyworld.kd_data import write_tiny_built
    from llmdistill.tinyworld.models import make_model, save_model
    from llmdistill.tinyworld.task import generate_problems
    from llmdistill.tinyworld.tokenizer import build_tokenizer

    tok = build_tokenizer()
    student = save_model(make_model("student", tok, seed=0), tok, root / "student")
    teacher = save_model(make_model("teacher", tok, seed=1), tok, root / "teacher")
    built = write_tiny_built(root / "built", tok, generate_problems(600, seed=0), teacher, k=20, max_length=256)
    return student, built


def _common(out: Path) -> dict:
    return dict(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=BATCH_ROWS, learning_rate=1e-3,
                logging_steps=STEPS, save_strategy="no", report_to="none", gradient_checkpointing=False,
                bf16=False, use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True)


def _run_kd(student: Path, built: Path, out: Path) -> tuple[float, int]:
    from llmdistill.config.train import TrainConfig
    from llmdistill.train import build_trainer

    config = TrainConfig(student_model=str(student), data_dir=str(built), alpha=0.5, **_common(out))
    trainer, _ = build_trainer(config)
    return _timed(trainer)


def _run_sft(student: Path, built: Path, out: Path) -> tuple[float, int]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from llmdistill.formats import read_built

    table, _ = read_built(built)
    rows = table.select(["input_ids", "loss_mask", "seq_lengths"]).to_pylist()
    data = Dataset.from_list([{"input_ids": r["input_ids"], "seq_lengths": r["seq_lengths"],
                               "labels": [t if m else -100 for t, m in zip(r["input_ids"], r["loss_mask"], strict=True)]}
                              for r in rows])
    config = SFTConfig(padding_free=True, max_length=None, dataset_kwargs={"skip_prepare_dataset": True},
                       **_common(out))
    model = AutoModelForCausalLM.from_pretrained(student, attn_implementation="sdpa")
    trainer = SFTTrainer(model=model, args=config, train_dataset=data,
                         processing_class=AutoTokenizer.from_pretrained(student))
    return _timed(trainer)


def _timed(trainer) -> tuple[float, int]:
    """(seconds of the training loop, real tokens it consumed)."""
    tokens = 0
    collate = trainer.data_collator

    def counting(rows):
        nonlocal tokens
        batch = collate(rows)
        tokens += int(batch["input_ids"].shape[1])
        return batch

    trainer.data_collator = counting
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start, tokens


def throughput(root: Path) -> dict[str, Any]:
    student, built = _make_world(root)
    kd_rates, sft_rates = [], []
    for i in range(REPEATS):
        secs, tokens = _run_sft(student, built, root / f"sft{i}")
        sft_rates.append(tokens / secs)
        secs, tokens = _run_kd(student, built, root / f"kd{i}")
        kd_rates.append(tokens / secs)
    kd, sft = max(kd_rates), max(sft_rates)
    return {"kd_tokens_per_s": round(kd, 1), "sft_tokens_per_s": round(sft, 1), "kd_over_sft": round(kd / sft, 3),
            "target_kd_over_sft": 0.85, "steps": STEPS, "rows_per_step": BATCH_ROWS,
            "setup": "tiny-world student (Qwen2 64x2), packed rows of 256, k=20, fp32, CPU"}


# ---- (b) memory against data size, (c) data loading at 32k tokens ----------------------------


def memory_and_loading(root: Path) -> dict[str, Any]:
    student = make_student(root)
    small = write_synthetic_built(root / "x1", student, MEMORY_ROWS, distinct_rows=8)
    large = write_synthetic_built(root / "x10", student, 10 * MEMORY_ROWS, distinct_rows=8)
    one = in_subprocess(train_config(student, small, root / "out1", MEMORY_STEPS, workers=1))
    ten = in_subprocess(train_config(student, large, root / "out10", MEMORY_STEPS, workers=1))
    loading = in_subprocess(train_config(student, small, root / "out_loading", LOADING_STEPS, workers=1))
    steps = loading["log"][1:]  # the first step includes starting the worker
    wall = sum(h["data_wait_s"] / max(h["data_wait_fraction"], 1e-12) for h in steps)
    waited = sum(h["data_wait_s"] for h in steps)
    return {
        "peak_rss_1x_gib": round(one["peak_rss_gib"], 3),
        "peak_rss_10x_gib": round(ten["peak_rss_gib"], 3),
        "peak_rss_10x_over_1x": round(ten["peak_rss_gib"] / one["peak_rss_gib"], 3),
        "target_peak_rss_10x_over_1x": 1.2,
        "peak_rss_after_convert_1x_gib": round(one["peak_rss_after_convert_gib"], 3),
        "peak_rss_after_convert_10x_gib": round(ten["peak_rss_after_convert_gib"], 3),
        "data_1x_arrow_gib": round(arrow_gib(small), 3),
        "data_10x_arrow_gib": round(arrow_gib(large), 3),
        "convert_10x_s": round(ten["convert_s"], 1),
        "data_wait_fraction_32k": round(waited / wall, 4),
        "target_data_wait_fraction_32k": 0.05,
        "step_s_32k": round(wall / len(steps), 2),
        "data_wait_s_per_step_32k": round(waited / len(steps), 4),
        "memory_setup": (f"rows of {ROW_TOKENS} tokens ({ROW_TOKENS // DOC_TOKENS} documents), top-{TOP_K} over "
                         f"{CODEC_VOCAB} ids, 1 row a step, {MEMORY_STEPS} steps, 1 DataLoader worker; "
                         f"1x = {MEMORY_ROWS} rows, 10x = {10 * MEMORY_ROWS} rows"),
    }


def run() -> dict[str, Any]:
    """(a), (b) and (c) of the module docstring, with the load average before and after."""
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    before = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        results = throughput(Path(tmp) / "throughput")
        results |= memory_and_loading(Path(tmp) / "memory")
    return results | {"load_average_before": before, "load_average_after": load_average()}


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--train":  # one measured run, from in_subprocess
        print(json.dumps(train_and_measure(json.loads(sys.argv[2]))))
    else:
        results = run()
        width = max(len(k) for k in results)
        for key, value in results.items():
            print(f"{key:<{width}}  {value}")
