"""What top-k capture costs: generation with top-20 log-probs *and* shard writing vs plain sampling.

One vLLM engine (in a subprocess: vLLM needs a ``__main__`` guard), the tiny-world teacher
(random init: it writes until max_tokens, so every variant produces the same token count), the
same prompts and sampling settings for both variants:

- plain:    ``LLM.generate`` of all prompts with default SamplingParams options (text, no log-probs,
            nothing written)
- llmdistill: ``write_stream`` — the code path of ``llmdistill generate``: vLLM's step loop fed a
            window of single-sample requests, top-20 log-prob blocks kept as numpy, detokenization,
            atomic zstd Parquet shards written in the background every ``flush_every / 2`` completions.

The engine is warmed up, then the variants alternate ``--repeats`` times (5); the fastest run of each counts
(other processes on a shared machine add noise to single runs).

    python scripts/bench_generate.py [--prompts 384] [--samples 2] [--max_tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_RATIO = 1.25


def _setup(workdir: Path, n_prompts: int) -> tuple[Path, Path]:
    """A random-init tiny teacher (with tokenizer) and a prompts file from the tiny world."""
    from llmdistill.tinyworld.models import make_model, save_model
    from llmdistill.tinyworld.task import generate_problems, to_records, write_jsonl
    from llmdistill.tinyworld.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    teacher = save_model(make_model("teacher", tokenizer, seed=0), tokenizer, workdir / "teacher")
    prompts = write_jsonl(workdir / "prompts.jsonl", to_records(generate_problems(n_prompts, seed=0)))
    return teacher, prompts


def worker(args: argparse.Namespace) -> dict[str, float | str]:
    """Runs in the subprocess: one engine, both variants, alternating."""
    from llmdistill.config.generate import GenerateConfig
    from llmdistill.generate.engines import OfflineEngine
    from llmdistill.generate.stage import prepare, write_stream

    workdir = Path(args.workdir)
    teacher, prompts = _setup(workdir, args.prompts)
    cfg = GenerateConfig(model=str(teacher), dataset=str(prompts), id_column="id", passthrough_columns=["answer"],
                         output_dir=str(workdir / "out"), num_samples=args.samples, max_tokens=args.max_tokens,
                         temperature=1.0, top_p=1.0, logprobs_top_k=20, dtype="bfloat16", max_model_len=256,
                         enforce_eager=True, flush_every=1024)  # shards of 512, as batch_size 256 x 2 samples before
    plan = prepare(cfg, "generate")
    engine = OfflineEngine(cfg)

    from vllm.inputs import TokensPrompt

    prompts_in = [TokensPrompt(prompt_token_ids=r.prompt_token_ids.tolist()) for r in plan.pending]
    plain_params = engine.sampling_params(logprobs=False)
    plain_params.n = cfg.num_samples

    def plain() -> int:
        outs = engine.llm.generate(prompts_in, plain_params, use_tqdm=False)
        return sum(len(o.token_ids) for r in outs for o in r.outputs)

    def ours(run: int) -> Path:
        plan.directory = workdir / f"out-{run}"
        write_stream(engine, plan, cfg)
        return plan.directory

    engine.llm.generate(prompts_in[:32], plain_params, use_tqdm=False)  # warm-up
    ours(-1)
    times: dict[str, list[float]] = {"plain": [], "topk": []}
    for run in range(args.repeats):
        t0 = time.perf_counter()
        tokens = plain()
        times["plain"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        out = ours(run)
        times["topk"].append(time.perf_counter() - t0)
    shard_bytes = sum(p.stat().st_size for p in out.glob("part-*.parquet"))
    plain_s, topk_s = min(times["plain"]), min(times["topk"])
    return {
        "prompts": len(prompts_in), "samples_per_prompt": cfg.num_samples, "completion_tokens": tokens,
        "plain_s": round(plain_s, 3), "topk20_and_write_s": round(topk_s, 3),
        "plain_tok_per_s": round(tokens / plain_s), "topk20_and_write_tok_per_s": round(tokens / topk_s),
        "ratio_topk20_write_over_plain": round(topk_s / plain_s, 3), "target_ratio_max": TARGET_RATIO,
        "bytes_per_completion_token": round(shard_bytes / tokens, 1),
    }


def run(prompts: int = 384, samples: int = 2, max_tokens: int = 64, repeats: int = 5) -> dict[str, float | str]:
    """Measure in a fresh subprocess and return the numbers (for ``scripts/bench.py``)."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
               "LLMDISTILL_NO_PROGRESS": "1", "TOKENIZERS_PARALLELISM": "false"}
        argv = [sys.executable, __file__, "--worker", str(result), "--workdir", tmp, "--prompts", str(prompts),
                "--samples", str(samples), "--max_tokens", str(max_tokens), "--repeats", str(repeats)]
        proc = subprocess.run(argv, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"bench_generate worker failed:\n{proc.stderr[-3000:]}")
        return json.loads(result.read_text())


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--prompts", type=int, default=384)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--max_tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.worker:
        Path(args.worker).write_text(json.dumps(worker(args)))
        return
    result = run(args.prompts, args.samples, args.max_tokens, args.repeats)
    width = max(map(len, result))
    sys.stdout.write("\n".join(f"{k:<{width}}  {v}" for k, v in result.items()) + "\n")


if __name__ == "__main__":
    _main()
