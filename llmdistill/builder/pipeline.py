"""``llmdistill build``: teacher traces in, train-ready packed shards out.

Read top to bottom: load -> verify -> filter -> dedup -> decontaminate -> cap per prompt ->
tokenise -> pack -> write. Every step is a small function returning a keep-mask; the
:class:`Ledger` counts what each step removed and remembers, per input trace, which step
dropped it (``traces.arrow``), so a build can be audited trace by trace.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather

from llmdistill.builder import dedup, filters
from llmdistill.builder.decontam import build_index, contaminated
from llmdistill.builder.pack import best_fit_decreasing, pack_row, packing_efficiency, split_overlong
from llmdistill.builder.report import length_histogram, write_report
from llmdistill.builder.tokenize import Document, load_tokenizer, make_documents, resolve_prompt_format
from llmdistill.builder.traces import Traces, load_traces
from llmdistill.builder.verify import check_references, reference_column, verify_all
from llmdistill.codec import encode_topk
from llmdistill.config.base import ConfigError
from llmdistill.config.build import BuildConfig
from llmdistill.formats import read_generation_info, shard_name, tokenizer_fingerprint, write_built_shard
from llmdistill.log import get_logger
from llmdistill.manifest import write_manifest
from llmdistill.outputs import clean_stale, staged_output
from llmdistill.prompts import prompt_problem

logger = get_logger(__name__)


class EmptyBuildError(ValueError):
    """Every trace was removed: nothing to write."""


class Ledger:
    """Counts after every step, and the step that dropped each input trace."""

    def __init__(self, traces: Traces) -> None:
        n = traces.table.num_rows
        self.steps: list[dict[str, Any]] = [{"step": "input", "dropped": 0, "remaining": n}]
        self.ids = traces.table.select(["prompt_id", "sample_index"])
        self.dropped_by = np.full(n, "", dtype=object)

    def apply(self, step: str, traces: Traces, keep: np.ndarray) -> Traces:
        """Drop the traces where ``keep`` is false, recording ``step``; error when none is left."""
        keep = np.asarray(keep, dtype=bool)
        rows = np.asarray(traces.column("row"), dtype=np.int64)
        self.dropped_by[rows[~keep]] = step
        self.steps.append({"step": step, "dropped": int((~keep).sum()), "remaining": int(keep.sum())})
        if not keep.any():
            raise EmptyBuildError(f"no trace is left after step '{step}'. Counts per step: {self.summary()}. "
                                  "Check the verifier, answer_column and the filter settings.")
        return traces.filter(keep)

    def summary(self) -> str:
        return ", ".join(f"{s['step']} {s['remaining']}" for s in self.steps)


def run_build(cfg: BuildConfig) -> dict[str, Any]:
    """Run the build and return its stats (also written to ``output_dir/stats.json``)."""
    started = time.time()
    output = Path(cfg.output_dir)
    clean_stale(output)
    if output.exists() and not cfg.overwrite:
        raise ConfigError(f"output_dir {output} exists: choose another one or set overwrite: true")
    tokenizer = load_tokenizer(cfg.student_tokenizer, "student")

    # Load, and check what the verifier needs before any work
    traces = load_traces(cfg, tokenizer)
    references = _references(traces, cfg)
    ledger = Ledger(traces)

    # Verify
    correct = verify_all(traces.column("completion"), references, cfg)
    traces.table = traces.table.append_column("correct", pa.array(correct))
    logger.info("verified %d traces with '%s': %d correct", len(correct), cfg.verifier, int(correct.sum()))

    # Filter, dedup, decontaminate, cap
    traces = filter_traces(traces, cfg, ledger)
    traces = dedup_traces(traces, cfg, ledger)
    traces, hits = decontaminate(traces, cfg, ledger)
    traces = ledger.apply("samples_per_prompt", traces, filters.cap_per_prompt(
        traces.column("prompt_id"), traces.column("sample_index"), cfg.max_samples_per_prompt))

    # Tokenise and pack
    info = read_generation_info(cfg.input_path) if traces.kind == "generation" else None
    teacher_tokenizer = cfg.teacher_tokenizer or (info.tokenizer if info else traces.teacher)
    fmt = resolve_prompt_format(cfg, info.prompt_format if info else None)
    docs, prompt_mismatches = make_documents(traces, tokenizer, cfg, fmt, teacher_tokenizer)
    docs, overlong_dropped, overlong_split = split_overlong(docs, cfg.max_length, cfg.overlong)
    ledger.steps.append({"step": "overlong", "dropped": overlong_dropped, "remaining": len(docs)})
    if not docs:
        raise EmptyBuildError(f"every trace is longer than max_length={cfg.max_length}. Counts per step: "
                              f"{ledger.summary()}. Raise max_length or set overlong: split.")
    bins = best_fit_decreasing([len(d) for d in docs], cfg.max_length)
    logger.info("packed %d documents into %d sequences of %d", len(docs), len(bins), cfg.max_length)

    # Write everything into a staging directory, then rename
    meta = _shard_meta(cfg, tokenizer, traces)
    with staged_output(output, cfg.overwrite) as tmp:
        signal_bytes = write_shards(tmp, docs, bins, traces, meta, cfg.rows_per_shard)
        stats = _stats(cfg, traces, ledger, hits, docs, bins, meta, signal_bytes)
        stats["prompt_template_mismatches"] = prompt_mismatches
        stats["packing"] |= {"overlong_dropped": overlong_dropped, "overlong_split": overlong_split}
        lengths = np.asarray([len(d) for d in docs])
        stats["length_histogram"] = length_histogram(lengths, cfg.max_length)
        write_report(tmp, stats, lengths, cfg.max_length)
        _write_fates(tmp, ledger, correct)
        write_manifest(tmp, "build", cfg, inputs={"input": cfg.input_path}, started=started,
                       counts={s["step"]: s["remaining"] for s in ledger.steps} | {"rows": len(bins)},
                       built=meta)
    logger.info("wrote %s: %s", output, ledger.summary())
    return stats


def _references(traces: Traces, cfg: BuildConfig) -> list[str | None]:
    """The verifier's reference per trace (answers or tests), checked for gaps."""
    column = reference_column(cfg)
    names = traces.table.column_names
    refs = traces.column(column) if column is not None and column in names else None
    source_column = cfg.answer_column if column == "reference" else cfg.tests_column
    check_references(names, refs, cfg, source_column, traces.column("prompt_id"))
    return refs if refs is not None else [None] * traces.table.num_rows


def filter_traces(traces: Traces, cfg: BuildConfig, ledger: Ledger) -> Traces:
    """Step 2: pass-rate window, truncation, malformed reasoning, length bounds, wrong answers."""
    correct = np.asarray(traces.column("correct"), dtype=bool)
    if cfg.min_pass_rate > 0 or cfg.max_pass_rate < 1:
        traces = ledger.apply("pass_rate", traces, filters.pass_rate_mask(
            traces.column("prompt_id"), correct, cfg.min_pass_rate, cfg.max_pass_rate))
    if cfg.drop_truncated:
        traces = ledger.apply("truncated", traces, filters.not_truncated(traces.column("finish_reason")))
    if cfg.require_think:
        traces = ledger.apply("malformed", traces, filters.well_formed_mask(traces.column("completion")))
    traces = ledger.apply("length", traces, filters.length_mask(
        traces.table.column("n_tokens").to_numpy(), cfg.min_completion_tokens, cfg.max_completion_tokens))
    if not cfg.keep_incorrect:
        traces = ledger.apply("incorrect", traces, np.asarray(traces.column("correct"), dtype=bool))
    return traces


def _first_of_each(prompt_ids: list[str]) -> tuple[list[int], np.ndarray]:
    """Index of the first row of every prompt id, and for each row its prompt's position there."""
    first: dict[str, int] = {}
    which = np.fromiter((first.setdefault(p, len(first)) for p in prompt_ids), dtype=np.int64, count=len(prompt_ids))
    rows = np.zeros(len(first), dtype=np.int64)
    rows[which[::-1]] = np.arange(len(prompt_ids))[::-1]
    return rows.tolist(), which


def dedup_traces(traces: Traces, cfg: BuildConfig, ledger: Ledger) -> Traces:
    """Step 3: duplicate prompts (all their samples go), then duplicate completions (per prompt, or global)."""
    near = dict(near=cfg.near_dedup, threshold=cfg.dedup_threshold, ngram=cfg.dedup_ngram,
                num_perm=cfg.minhash_num_perm, seed=cfg.seed)
    if cfg.dedup_prompts:
        prompts = traces.column("prompt")
        first, which = _first_of_each(traces.column("prompt_id"))
        dup = dedup.duplicates([prompt_problem(prompts[i]) for i in first], **near)
        traces = ledger.apply("duplicate_prompt", traces, ~dup[which])
    if cfg.dedup_completions:
        groups = _first_of_each(traces.column("prompt_id"))[1] if cfg.dedup_completion_scope == "prompt" else None
        dup = dedup.duplicates(traces.column("completion"), **near, groups=groups)
        traces = ledger.apply("duplicate_completion", traces, ~dup)
    return traces


def decontaminate(traces: Traces, cfg: BuildConfig, ledger: Ledger) -> tuple[Traces, dict[str, int]]:
    """Step 4: drop traces whose prompt overlaps a benchmark problem; hits counted per benchmark (prompts)."""
    if not cfg.decontam_benchmarks and not cfg.decontam_extra_file:
        return traces, {}
    index = build_index(cfg, cfg.data_paths)
    prompts = traces.column("prompt")
    first, which = _first_of_each(traces.column("prompt_id"))
    found, hits = contaminated([prompt_problem(prompts[i]) for i in first], index)
    for name, count in sorted(hits.items()):
        logger.warning("decontamination: %d prompt(s) overlap %s", count, name)
    clean = np.asarray([not names for names in found], dtype=bool)
    return ledger.apply("contaminated", traces, clean[which]), dict(hits)


def _shard_meta(cfg: BuildConfig, tokenizer: Any, traces: Traces) -> dict[str, Any]:
    return {"kd": cfg.kd, "k": traces.k if cfg.kd else 0, "vocab_size": len(tokenizer),
            "codec": "llmdistill.codec/v1" if cfg.kd else None, "codec_bits": cfg.codec_bits if cfg.kd else None,
            "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "max_length": cfg.max_length,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}


def topk_block(docs: list[Document], traces: Traces) -> tuple[np.ndarray, np.ndarray]:
    """The teacher top-k rows of every target of ``docs``, in order: ids and log-probs (n_targets, k)."""
    assert traces.topk_ids is not None and traces.topk_logprobs is not None
    k = traces.k
    ids = [traces.topk_ids[d.row].reshape(-1, k)[d.target_rows] for d in docs]
    lps = [traces.topk_logprobs[d.row].reshape(-1, k)[d.target_rows] for d in docs]
    return np.concatenate(ids), np.concatenate(lps)


def write_shards(directory: Path, docs: list[Document], bins: list[list[int]], traces: Traces,
                 meta: dict[str, Any], rows_per_shard: int) -> int:
    """Write the packed rows as built shards; returns the bytes of teacher signal written."""
    signal_bytes = 0
    for shard, start in enumerate(range(0, len(bins), rows_per_shard)):
        rows = []
        for members in bins[start:start + rows_per_shard]:
            packed = [docs[i] for i in members]
            row = pack_row(packed)
            if meta["kd"]:
                ids, lps = topk_block(packed, traces)
                row["topk"] = encode_topk(ids, lps, meta["vocab_size"], meta["codec_bits"])
                signal_bytes += len(row["topk"])
            rows.append(row)
        write_built_shard(rows, directory / shard_name(shard), meta)
    return signal_bytes


def _stats(cfg: BuildConfig, traces: Traces, ledger: Ledger, hits: dict[str, int], docs: list[Document],
           bins: list[list[int]], meta: dict[str, Any], signal_bytes: int) -> dict[str, Any]:
    tokens = sum(len(d) for d in docs)
    targets = int(sum(int(d.loss_mask.sum()) for d in docs))
    stats: dict[str, Any] = {
        "output_dir": cfg.output_dir, "input": cfg.input_path, "input_kind": traces.kind,
        "verifier": cfg.verifier, "kd": cfg.kd, "steps": ledger.steps,
        "contamination_hits": hits,
        "packing": {"documents": len(docs), "rows": len(bins), "tokens": tokens, "target_tokens": targets,
                    "max_length": cfg.max_length, "efficiency": packing_efficiency(tokens, len(bins), cfg.max_length)},
    }
    if cfg.kd:
        stats["teacher_signal"] = {"k": meta["k"], "bytes": signal_bytes, "bytes_per_token": signal_bytes / max(targets, 1),
                                   "codec_bits": meta["codec_bits"], "vocab_size": meta["vocab_size"]}
    return stats


def _write_fates(directory: Path, ledger: Ledger, correct: np.ndarray) -> None:
    """``traces.arrow``: per input trace, its verdict and the step that dropped it (empty: kept)."""
    feather.write_feather(pa.table({
        "prompt_id": ledger.ids.column("prompt_id"),
        "sample_index": ledger.ids.column("sample_index"),
        "correct": correct,
        "dropped_by": pa.array(ledger.dropped_by.tolist(), pa.string()),
    }), str(directory / "traces.arrow"))
