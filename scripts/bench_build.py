"""Benchmark of ``llmdistill build``: packing efficiency, throughput of the steps, and the top-k codec.

(a) packing efficiency (real tokens / total tokens) of tiny-world traces at the demo's
    max_length, on the demo's data size (600 prompts x 4 samples) and on 100k traces; with
    ``LLMDISTILL_BENCH_GENERATION_DIR`` set, a real build of that generation directory is measured too;
(b) 100,000 synthetic tiny-world traces verified + filtered + deduped + decontaminated +
    tokenised + packed, wall time and records/s (target: <= 90 s on 2 cores);
(c) the teacher's top-20 signal at a 151,936-token vocabulary: bytes per token and mean
    absolute log-prob error of the codec (targets: <= 80 B, <= 0.01 nats), and decode speed.

Run ``python scripts/bench_build.py``; ``run()`` returns the numbers for ``scripts/bench.py``.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from llmdistill.builder import filters
from llmdistill.builder.pack import best_fit_decreasing, packing_efficiency, split_overlong
from llmdistill.builder.pipeline import Ledger, decontaminate, dedup_traces, filter_traces
from llmdistill.builder.tokenize import PromptFormat, make_documents, student_prompt_ids
from llmdistill.builder.traces import Ragged, Traces
from llmdistill.builder.verify import verify_all
from llmdistill.codec import decode_topk, encode_topk
from llmdistill.config.build import BuildConfig
from llmdistill.tinyworld.task import generate_problems, reference_completion
from llmdistill.tinyworld.tokenizer import build_tokenizer

N_TRACES = 100_000
SAMPLES = 4
MAX_LENGTH = 512  # configs/build_tiny.yaml
VOCAB = 151_936
TOP_K = 20


def synthetic_traces(n_prompts: int, tokenizer, teacher_dir: str, seed: int = 0) -> Traces:
    """Tiny-world teacher traces with the mix a sampled teacher gives: mostly correct, some wrong
    answers, truncations, malformed think blocks and repeated samples; a few held-out leaks."""
    rng = np.random.default_rng(seed)
    problems = generate_problems(n_prompts, seed=seed, split="train")
    heldout = generate_problems(50, seed=0, split="heldout")
    rows = []
    for i, p in enumerate(problems):
        question = heldout[i % 50].question if i % 997 == 0 else p.question
        for s in range(SAMPLES):
            text, finish, u = reference_completion(p), "stop", rng.random()
            if u < 0.10:
                text = text.replace(f"\\boxed{{{p.answer}}}", f"\\boxed{{{int(p.answer) + 1}}}")
            elif u < 0.12:
                text, finish = text[: len(text) // 2], "length"
            elif u < 0.14:
                text = text.replace("</think>", "")
            elif u < 0.60:  # resampled traces differ in their scratch work
                text = text.replace("<think>", f"<think>step {s}: ")
            rows.append((p.id, s, question, text, finish, p.answer))
    pid, sample, prompt, completion, finish, answer = map(list, zip(*rows, strict=True))
    eos = tokenizer.eos_token_id
    ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    completion_ids = Ragged.from_lists([x + [eos] if f == "stop" else x for x, f in zip(ids, finish, strict=True)])
    unique = list(dict.fromkeys(prompt))
    encoded = dict(zip(unique, student_prompt_ids(unique, tokenizer, PromptFormat()), strict=True))
    prompt_ids = Ragged.from_lists([encoded[q] for q in prompt])
    table = pa.table({"row": np.arange(len(rows)), "prompt_id": pid, "sample_index": pa.array(sample, pa.int32()),
                      "prompt": prompt, "completion": completion, "finish_reason": finish,
                      "n_tokens": completion_ids.lengths(), "reference": answer})
    return Traces(table=table, completion_ids=completion_ids, prompt_ids=prompt_ids, topk_ids=None, topk_logprobs=None,
                  k=0, teacher=teacher_dir, kind="generation")


def build_steps(traces: Traces, tokenizer, teacher_dir: str) -> tuple[dict[str, float], list[int], int]:
    """Run verify -> filter -> dedup -> decontaminate -> cap -> tokenise -> pack; time each step."""
    cfg = BuildConfig(input_path="synthetic", student_tokenizer=teacher_dir, verifier="numeric", kd=False,
                      max_samples_per_prompt=4, decontam_benchmarks=["tiny"], decontam_ngram=32,
                      max_length=MAX_LENGTH)
    times, t = {}, time.perf_counter()
    ledger = Ledger(traces)
    correct = verify_all(traces.column("completion"), traces.column("reference"), cfg)
    traces.table = traces.table.append_column("correct", pa.array(correct))
    times["verify"], t = time.perf_counter() - t, time.perf_counter()
    traces = filter_traces(traces, cfg, ledger)
    times["filter"], t = time.perf_counter() - t, time.perf_counter()
    traces = dedup_traces(traces, cfg, ledger)
    times["dedup"], t = time.perf_counter() - t, time.perf_counter()
    traces, _ = decontaminate(traces, cfg, ledger)
    traces = ledger.apply("samples_per_prompt", traces, filters.cap_per_prompt(
        traces.column("prompt_id"), traces.column("sample_index"), cfg.max_samples_per_prompt))
    times["decontaminate"], t = time.perf_counter() - t, time.perf_counter()
    docs, _ = make_documents(traces, tokenizer, cfg, PromptFormat(), teacher_dir)
    times["tokenize"], t = time.perf_counter() - t, time.perf_counter()
    docs, _, _ = split_overlong(docs, MAX_LENGTH, "drop")
    lengths = [len(d) for d in docs]
    bins = best_fit_decreasing(lengths, MAX_LENGTH)
    times["pack"] = time.perf_counter() - t
    return times, lengths, len(bins)


def realistic_topk(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Top-20 of softmaxes over the full vocabulary: random logits at several temperatures, with a
    few boosted tokens (peaked and flat distributions; log-probs down to about -30)."""
    ids_all, lp_all = [], []
    for sigma in (0.5, 1.0, 2.0, 4.0):
        logits = rng.normal(0.0, sigma, size=(n // 4, VOCAB)).astype(np.float32)
        logits[:, :64] += rng.uniform(0, 30, size=(n // 4, 64)).astype(np.float32)
        top = logits.max(axis=1, keepdims=True)
        lp = logits - top - np.log(np.exp(logits - top).sum(axis=1, keepdims=True))
        idx = np.argpartition(-lp, TOP_K, axis=1)[:, :TOP_K]
        vals = np.take_along_axis(lp, idx, axis=1)
        order = np.argsort(-vals, axis=1)
        ids_all.append(np.take_along_axis(idx, order, axis=1))
        lp_all.append(np.take_along_axis(vals, order, axis=1))
    return np.concatenate(ids_all), np.concatenate(lp_all)


def codec_numbers(bits: int = 12) -> dict[str, float]:
    rng = np.random.default_rng(0)
    ids, lp = realistic_topk(2000, rng)
    blob = encode_topk(ids, lp, VOCAB, bits)
    got_ids, got_lp = decode_topk(blob, len(ids), TOP_K, VOCAB, bits)
    assert np.array_equal(got_ids, ids)
    big_ids, big_lp = np.tile(ids, (50, 1)), np.tile(lp, (50, 1))  # 100k tokens
    t = time.perf_counter()
    big = encode_topk(big_ids, big_lp, VOCAB, bits)
    encode_s = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(3):
        decode_topk(big, len(big_ids), TOP_K, VOCAB, bits)
    decode_s = (time.perf_counter() - t) / 3
    return {
        "topk_bytes_per_token": len(blob) / len(ids),
        "topk_raw_bytes_per_token": TOP_K * 8.0,
        "topk_logprob_mae": float(np.abs(got_lp - lp).mean()),
        "topk_logprob_max_err": float(np.abs(got_lp - lp).max()),
        "topk_min_logprob": float(lp.min()),
        "codec_encode_tokens_per_s": len(big_ids) / encode_s,
        "codec_decode_tokens_per_s": len(big_ids) / decode_s,
        "codec_decode_mb_per_s": len(big) / decode_s / 1e6,
    }


def real_generation_efficiency(directory: str, tokenizer_dir: str) -> float:
    """Packing efficiency of a real build of a generation directory (SFT shards, into a temp dir)."""
    from llmdistill.builder import run_build

    with tempfile.TemporaryDirectory() as tmp:
        cfg = BuildConfig(input_path=directory, output_dir=str(Path(tmp) / "built"), student_tokenizer=tokenizer_dir,
                          verifier="numeric", kd=False, decontam_benchmarks=["tiny"], decontam_ngram=32,
                          max_length=MAX_LENGTH)
        return float(run_build(cfg)["packing"]["efficiency"])


def run() -> dict[str, float | str]:
    tokenizer = build_tokenizer()
    with tempfile.TemporaryDirectory() as tok_dir:
        tokenizer.save_pretrained(tok_dir)
        small = synthetic_traces(600, tokenizer, tok_dir, seed=1)
        _, small_lengths, small_rows = build_steps(small, tokenizer, tok_dir)
        traces = synthetic_traces(N_TRACES // SAMPLES, tokenizer, tok_dir)
        times, lengths, rows = build_steps(traces, tokenizer, tok_dir)
        real = os.environ.get("LLMDISTILL_BENCH_GENERATION_DIR")
        real_eff = real_generation_efficiency(real, tok_dir) if real else None
    total = sum(times.values())
    out: dict[str, float | str] = {
        "packing_efficiency_demo_size": packing_efficiency(sum(small_lengths), small_rows, MAX_LENGTH),
        "packing_efficiency_100k": packing_efficiency(sum(lengths), rows, MAX_LENGTH),
        "target_packing_efficiency": 0.98,
        "traces": float(N_TRACES),
        "traces_kept": float(len(lengths)),
        "build_steps_s": total,
        "build_records_per_s": N_TRACES / total,
        "target_build_steps_s": 90.0,
        **{f"step_{name}_s": value for name, value in times.items()},
        **codec_numbers(),
        "target_topk_bytes_per_token": 80.0,
        "target_topk_logprob_mae": 0.01,
    }
    if real_eff is not None:
        out["packing_efficiency_real_generation"] = real_eff
    return out


if __name__ == "__main__":
    results = run()
    width = max(map(len, results))
    for key, value in results.items():
        shown = f"{value:,.4f}" if isinstance(value, float) and abs(value) < 100 else (
            f"{value:,.0f}" if isinstance(value, float) else value)
        print(f"{key:<{width}}  {shown}")
