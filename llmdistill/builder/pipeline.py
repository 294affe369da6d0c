"""``llmdistill build``: teacher traces in, train-ready packed shards out, at any scale.

Read top to bottom, five phases:

A. prompts (a Ray Data map over parts, light columns; then the driver, 8 bytes per trace): duplicate
   and contaminated prompts (:mod:`.prompt_level`);
B. verdicts (a Ray Data map over parts, medium columns): verify, filter, per-prompt dedup (:mod:`.rows`);
C. decisions (driver, 8 bytes per trace): pass rate, dedup across parts, cap per prompt (:mod:`.decide`);
D. shards (a Ray Data map over parts, heavy columns of kept rows): tokenise, align, pack, encode,
   write bounded shards (:mod:`.shards`);
E. finish (driver): number the shards in part order, merge the statistics, write the report,
   ``traces.arrow`` and the manifest, and swap the output in.

A part is whole row groups of one generation shard (:mod:`.traces`): the output depends on the
input and the config, never on the number of workers. Everything is written into a staging
directory named after the config and the input (:func:`llmdistill.outputs.resumable_output`),
so a killed build, run again, reuses every part that finished and redoes the others.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

import llmdistill
from llmdistill.builder.cluster import Runtime, map_parts, start_ray, uses_actors, warm_up
from llmdistill.builder.decide import EmptyBuildError, Ledger, decide, read_verdicts
from llmdistill.builder.pack import packing_efficiency
from llmdistill.builder.prompt_level import KEPT, Prompts, prompt_fates
from llmdistill.builder.report import coverage_summary, length_histogram, write_report
from llmdistill.builder.rows import RowsContext, check_reference_column, part_rows, read_rows_result
from llmdistill.builder.shards import ShardsContext, part_dir, part_shards, read_done
from llmdistill.builder.teachers import TeacherMix, open_teachers, part_sources
from llmdistill.builder.tokenize import (
    DocumentSpec,
    ShippedTokenizer,
    load_tokenizer,
    resolve_prompt_format,
    teacher_ids_usable,
)
from llmdistill.builder.traces import BuildInput, Part, find_input, open_dataset, open_generation, plan_parts
from llmdistill.builder.workfiles import arrow_writer
from llmdistill.config.base import ConfigError, config_to_dict
from llmdistill.config.build import OPERATIONAL_FIELDS, BuildConfig
from llmdistill.formats import (
    RANGED_COLUMNS,
    check_value_ranges,
    read_generation_info,
    shard_name,
    tokenizer_fingerprint,
)
from llmdistill.log import get_logger
from llmdistill.manifest import MANIFEST, fingerprint, read_manifest, write_manifest
from llmdistill.outputs import resumable_output

logger = get_logger(__name__)

__all__ = ["EmptyBuildError", "Ledger", "run_build"]
WORK = "_work"


class Laps(dict):
    """Wall seconds of each phase: ``laps("name")`` closes the phase that ran since the last call."""

    def __init__(self) -> None:
        super().__init__()
        self._last = time.time()

    def __call__(self, name: str) -> None:
        now = time.time()
        self[name] = round(now - self._last, 3)
        self._last = now


def run_build(cfg: BuildConfig) -> dict[str, Any]:
    """Run the build and return its stats (also written to ``output_dir/stats.json``)."""
    laps = Laps()
    output = Path(cfg.output_dir)
    if output.exists() and any(output.iterdir()) and not cfg.overwrite:
        raise ConfigError(f"output_dir {output} exists: choose another one or set overwrite: true")
    tokenizer = load_tokenizer(cfg.student_tokenizer, "student")
    shipped = ShippedTokenizer(tokenizer)  # the workers' copy
    kind = find_input(cfg)
    key = resume_key(cfg, kind)
    with resumable_output(output, key, cfg.overwrite) as staging:
        if _finished(staging, key):  # killed after the last write, before the swap
            return json.loads((staging / "stats.json").read_text())
        work = staging / WORK
        inp = (open_generation(cfg, _needed_columns(cfg)) if kind == "generation"
               else open_dataset(cfg, work / "input"))
        parts = plan_parts(inp, cfg.part_mb)
        reference = check_reference_column(cfg, inp.columns, kind)
        mix, locations = open_teachers(cfg, inp, tokenizer) or (None, {})
        spec, meta = _document_spec(cfg, inp, tokenizer, mix), _shard_meta(cfg, tokenizer, inp, mix)
        read = RANGED_COLUMNS if cfg.kd else ("completion_token_ids",) if spec.same_tokenizer else ()
        for shard in inp.shards if kind == "generation" else ():  # what phase D will read, from the footers
            check_value_ranges(shard, len(tokenizer), read)
        laps("setup")
        runtime = start_ray(cfg.workers, cfg.ray_address)
        if not uses_actors(len(parts), runtime):  # task workers: their start-up overlaps with phase A
            warm_up(runtime, shipped)
        laps("ray_start")

        # A. prompts (Ray Data, per part; then the driver)
        prompts = prompt_fates(cfg, parts, runtime, str(work))
        laps("prompts")

        # B. verdicts (Ray Data, per part)
        rows_ctx = RowsContext(cfg, kind, reference, str(work), shipped)
        verdict_runs = _run_verdicts(parts, prompts, cfg, rows_ctx, runtime)
        laps("verdicts")

        # C. decisions (driver)
        ledger = decide(cfg, parts, prompts, read_verdicts(str(work), parts), runtime, str(work))
        logger.info("kept %d of %d traces: %s", int(ledger.keep.sum()), len(ledger.keep), ledger.summary())
        laps("decide")

        # D. shards (Ray Data, per part)
        shards_ctx = ShardsContext(cfg, spec, meta, str(work), shipped, mix, inp.k)
        shard_runs = _run_shards(parts, ledger, shards_ctx, runtime, locations)
        laps("shards")

        # E. finish (driver)
        stats = _finish(staging, cfg, inp, parts, prompts, ledger, meta, runtime,
                        {"verdicts": verdict_runs, "shards": shard_runs}, laps, key)
    logger.info("wrote %s: %s", output, ledger.summary())
    return stats


def resume_key(cfg: BuildConfig, kind: str) -> str:
    """``build`` + 12 hex digits naming the output-affecting config, the input and the code."""
    h = hashlib.sha256()
    settings = {k: v for k, v in config_to_dict(cfg).items() if k not in OPERATIONAL_FIELDS}
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    h.update(llmdistill.__version__.encode())
    for source in sorted(Path(__file__).parent.glob("*.py")):
        h.update(source.read_bytes())
    path = Path(cfg.input_path)
    if kind != "generation":
        h.update(fingerprint(path).encode() if path.exists() else cfg.input_path.encode())
    for data in (cfg.decontam_extra_file, *cfg.data_paths.values()):  # what phase A's parts were checked against
        if data and Path(data).exists():
            h.update(fingerprint(Path(data)).encode())
    for source in ([path] if kind == "generation" else []) + [Path(p) for p in cfg.teacher_paths.values()]:
        for shard in sorted(source.rglob("part-*.parquet")):
            size = shard.stat().st_size
            with open(shard, "rb") as fh:  # the footer: schema, row groups and column statistics
                fh.seek(max(0, size - (1 << 16)))
                h.update(f"{shard.relative_to(source)}:{size}".encode() + fh.read())
    return "build" + h.hexdigest()[:12]


def _finished(staging: Path, key: str) -> bool:
    """Whether ``staging`` holds a complete build of ``key``; clears it when it holds anything else."""
    if not (staging / MANIFEST).is_file():
        return False
    if read_manifest(staging).get("resume_key") == key:
        return not (staging / WORK).exists()
    for path in staging.iterdir():  # an old output that a kill during the swap left here
        if path.is_dir():
            shutil.rmtree(path)
        elif path.name != ".lock":
            path.unlink()
    return False


def _needed_columns(cfg: BuildConfig) -> list[str]:
    cols = ["prompt_id", "sample_index", "prompt", "completion", "completion_token_ids", "finish_reason"]
    return cols + (["prompt_token_ids", "topk_ids", "topk_logprobs"] if cfg.kd else [])


def _document_spec(cfg: BuildConfig, inp: BuildInput, tokenizer: Any, mix: TeacherMix | None) -> DocumentSpec:
    info = read_generation_info(cfg.input_path) if inp.kind == "generation" else None
    teacher = cfg.teacher_tokenizer or (info.tokenizer if info else inp.teacher)
    same = inp.kind == "generation" and teacher_ids_usable(tokenizer, teacher, cfg.kd)
    fmt = resolve_prompt_format(cfg, info.prompt_format if info else None)
    rewrites = bool(info and info.rewrite_template)
    if rewrites:
        logger.info("SDFT rewrites: the student reads each stored prompt without the reference the model saw%s",
                    " (kd: the targets are the model's distribution with the reference in view)" if cfg.kd else "")
    return DocumentSpec(kind=inp.kind, same_tokenizer=same, fmt=fmt, k=mix.k if mix else inp.k,
                        compare_prompts=not rewrites)


def _shard_meta(cfg: BuildConfig, tokenizer: Any, inp: BuildInput, mix: TeacherMix | None) -> dict[str, Any]:
    """The built shards' metadata (and the manifest's ``built``): with teachers, which were merged and how."""
    k = (mix.k if mix else inp.k) if cfg.kd else 0
    return {"kd": cfg.kd, "k": k, **(mix.to_manifest() if mix else {}), "vocab_size": len(tokenizer),
            "codec": "llmdistill.codec/v1" if cfg.kd else None, "codec_bits": cfg.codec_bits if cfg.kd else None,
            "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "max_length": cfg.max_length,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}


def _run_verdicts(parts: list[Part], prompts: Prompts, cfg: BuildConfig, ctx: RowsContext,
                  runtime: Runtime) -> dict[int, dict[str, Any]]:
    """Phase B on every part not finished yet; returns every part's result (finished ones from disk)."""
    results = {p.index: r for p in parts if (r := read_rows_result(ctx.work, p.index)) is not None}
    for r in results.values():
        r["resumed"] = True
    cross_scope = cfg.dedup_completion_scope == "global"
    tasks = []
    for part in parts:
        if part.index in results:
            continue
        codes = prompts.codes[prompts.rows(part)]
        tasks.append({"part": part, "alive": prompts.fate[codes] == KEPT,
                      "cross": np.ones(len(codes), bool) if cross_scope else prompts.split[codes]})
    logger.info("phase B (verdicts): %d part(s) to run, %d finished before", len(tasks), len(results))
    for result in map_parts(part_rows, tasks, ctx, runtime):
        results[result["part"]] = result
    return results


def _run_shards(parts: list[Part], ledger: Ledger, ctx: ShardsContext, runtime: Runtime,
                locations: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Phase D on every part with kept traces and no ``done.json``; returns every part's result
    (``locations``: where each looked-up teacher holds every input trace, see :func:`open_teachers`)."""
    results = {}
    tasks = []
    for part in parts:
        keep = ledger.keep[part.offset:part.offset + part.num_rows]
        if not keep.any():
            continue
        done = read_done(ctx.work, part.index)
        if done is not None:
            results[part.index] = done | {"resumed": True}
        else:
            tasks.append({"part": part, "keep": keep} | ({"sources": part_sources(locations, part)} if ctx.mix else {}))
    logger.info("phase D (shards): %d part(s) to run, %d finished before", len(tasks), len(results))
    for result in map_parts(part_shards, tasks, ctx, runtime):
        results[result["part"]] = result
        logger.info("part %d: %d rows in %d shard(s), %.1f s", result["part"], result["rows"], len(result["shards"]),
                    result["wall_s"])
    return results


def _link_shards(staging: Path, work: Path, parts: list[Part], results: dict[int, dict[str, Any]]) -> list[int]:
    """Hard-link every part's shards into ``staging`` as ``part-NNNNNN.parquet``, in part order."""
    sizes = []
    for part in parts:
        for shard in results.get(part.index, {}).get("shards", []):
            final = staging / shard_name(len(sizes))
            tmp = final.with_name(f".{final.name}.link")
            tmp.unlink(missing_ok=True)
            os.link(part_dir(work, part.index) / shard["name"], tmp)
            os.replace(tmp, final)
            sizes.append(shard["bytes"])
    return sizes


def _write_fates(staging: Path, parts: list[Part], prompts: Prompts, ledger: Ledger, correct: np.ndarray,
                 verified: np.ndarray) -> None:
    """``traces.arrow``: per input trace, its verdict (null when its prompt was dropped before
    verification) and the step that dropped it (empty: kept); written part by part."""
    schema = pa.schema([("prompt_id", pa.string()), ("sample_index", pa.int32()), ("correct", pa.bool_()),
                        ("dropped_by", pa.string())])
    for stale in staging.glob(".traces.arrow.tmp-*"):  # a killed run's (staging is locked: one writer)
        stale.unlink()
    with arrow_writer(staging / "traces.arrow", schema) as writer:
        for part in parts:
            rows = prompts.rows(part)
            writer.write_table(pa.table({
                "prompt_id": prompts.ids.take(pa.array(prompts.codes[rows])).cast(pa.string()),
                "sample_index": pa.array(prompts.sample_index[rows]),
                "correct": pa.array(correct[rows], mask=~verified[rows]),
                "dropped_by": pa.array(ledger.fates(rows), pa.string()),
            }, schema=schema))


def _sum(results: list[dict[str, Any]], key: str) -> int:
    return int(sum(r[key] for r in results))


def _finish(staging: Path, cfg: BuildConfig, inp: BuildInput, parts: list[Part], prompts: Prompts, ledger: Ledger,
            meta: dict[str, Any], runtime: Runtime, runs: dict[str, dict[int, dict[str, Any]]], laps: Laps,
            key: str) -> dict[str, Any]:
    """Phase E: overlong fates, shard numbering, merged statistics, report, traces.arrow, manifest."""
    work = staging / WORK
    shard_runs = [runs["shards"][i] for i in sorted(runs["shards"])]
    ledger.names.append("overlong")
    for part in parts:
        done = runs["shards"].get(part.index)
        if done and done["overlong_rows"]:
            ledger.dropped_by[part.offset + np.asarray(done["overlong_rows"])] = len(ledger.names)
    ledger.count("overlong", _sum(shard_runs, "overlong_dropped"))
    documents, rows = _sum(shard_runs, "documents"), _sum(shard_runs, "rows")
    if not documents:
        raise EmptyBuildError(f"every trace is longer than max_length={cfg.max_length}. Counts per step: "
                              f"{ledger.summary()}. Raise max_length or set overlong: split.")
    sizes = _link_shards(staging, work, parts, runs["shards"])
    tokens, targets = _sum(shard_runs, "tokens"), _sum(shard_runs, "target_tokens")
    lengths = length_histogram(np.zeros(0), cfg.max_length)
    lengths["counts"] = np.sum([r["length_counts"] for r in shard_runs], axis=0).tolist()
    stats: dict[str, Any] = {
        "output_dir": cfg.output_dir, "input": cfg.input_path, "input_kind": inp.kind, "verifier": cfg.verifier,
        "kd": cfg.kd, "steps": ledger.steps, "contamination_hits": prompts.hits,
        "prompt_template_mismatches": _sum(shard_runs, "prompt_template_mismatches"),
        "packing": {"documents": documents, "rows": rows, "tokens": tokens, "target_tokens": targets,
                    "max_length": cfg.max_length, "efficiency": packing_efficiency(tokens, rows, cfg.max_length),
                    "overlong_dropped": _sum(shard_runs, "overlong_dropped"),
                    "overlong_split": _sum(shard_runs, "overlong_split")},
        "length_histogram": lengths,
        "shards": {"count": len(sizes), "bytes": int(sum(sizes)), "largest_bytes": int(max(sizes))},
        "run": _run_stats(parts, runs, runtime),
    }
    if cfg.kd:
        signal = _sum(shard_runs, "signal_bytes")
        stats["teacher_signal"] = {"k": meta["k"], "bytes": signal, "bytes_per_token": signal / max(targets, 1),
                                   "codec_bits": meta["codec_bits"], "vocab_size": meta["vocab_size"]}
        stats["teacher_topk_coverage"] = coverage_summary(np.sum([r["coverage_counts"] for r in shard_runs], axis=0),
                                                          sum(r["coverage_sum"] for r in shard_runs))
    verdicts = read_verdicts(str(work), parts)
    _write_fates(staging, parts, prompts, ledger, verdicts.correct, verdicts.verified)
    laps("finish")
    stats["run"] |= {"phase_s": dict(laps), "wall_s": round(sum(laps.values()), 3)}
    write_report(staging, stats)
    counts = {s["step"]: s["remaining"] for s in ledger.steps} | {"rows": rows}
    inputs = {"input": cfg.input_path} | {f"teacher:{n}": p for n, p in cfg.teacher_paths.items()}
    write_manifest(staging, "build", cfg, inputs=inputs, counts=counts, built=meta,
                   started=time.time() - stats["run"]["wall_s"], resume_key=key, runtime=runtime.to_dict())
    shutil.rmtree(work)
    return stats


def _run_stats(parts: list[Part], runs: dict[str, dict[int, dict[str, Any]]], runtime: Runtime) -> dict[str, Any]:
    """Per-part timings and the CPU seconds of every step, summed over parts."""
    timings, seconds = [], {"verdicts": {}, "shards": {}}
    for part in parts:
        b, d = runs["verdicts"].get(part.index, {}), runs["shards"].get(part.index, {})
        timings.append({"part": part.index, "rows": part.num_rows, "completion_tokens": part.completion_tokens,
                        "verdicts_s": b.get("wall_s", 0.0), "shards_s": d.get("wall_s", 0.0),
                        "worker": d.get("worker") or b.get("worker") or "", "resumed": bool(d.get("resumed"))})
        for phase, result in (("verdicts", b), ("shards", d)):
            for step, value in result.get("seconds", {}).items():
                seconds[phase][step] = round(seconds[phase].get(step, 0.0) + value, 4)
    resumed = sum(1 for r in runs["shards"].values() if r.get("resumed"))
    return {"parts": len(parts), "resumed": resumed,
            "resumed_verdicts": sum(1 for r in runs["verdicts"].values() if r.get("resumed")),
            "runtime": runtime.to_dict(), "cpu_s": seconds, "timings": timings}
