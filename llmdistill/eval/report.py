"""Eval outputs: the per-sample details table, results.json, a side-by-side markdown table, a chart.

Eval details (``details.parquet``), one row per sample:

====================  ===========  ======================================================
model                 string       model id/path as given in ``models``
benchmark             string       registry name
problem_id            string       the item's id
sample_index          int32        0 .. n-1
gold                  string       the gold answer (empty for code)
response              string       the full generated text
extracted             string|null  the extracted answer (``null``: none found)
correct               bool
finish_reason         string       ``stop`` | ``length``
n_tokens              int32        response length in tokens
====================  ===========  ======================================================
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from llmdistill.formats import SchemaError, shard_metadata, write_parquet_atomic

DETAILS_SCHEMA = "llmdistill.eval_details"
DETAILS_SCHEMA_VERSION = 1
DETAILS_COLUMNS: dict[str, pa.DataType] = {
    "model": pa.string(),
    "benchmark": pa.string(),
    "problem_id": pa.string(),
    "sample_index": pa.int32(),
    "gold": pa.string(),
    "response": pa.string(),
    "extracted": pa.string(),
    "correct": pa.bool_(),
    "finish_reason": pa.string(),
    "n_tokens": pa.int32(),
}


def write_details(rows: list[dict[str, Any]], path: str | Path) -> None:
    """Write the per-sample details table atomically (schema in the module docstring)."""
    table = pa.table({name: pa.array([r[name] for r in rows], type=typ) for name, typ in DETAILS_COLUMNS.items()})
    meta = {b"llmdistill": json.dumps({"schema": DETAILS_SCHEMA, "schema_version": DETAILS_SCHEMA_VERSION}).encode()}
    write_parquet_atomic(table.replace_schema_metadata(meta), path)


def read_details(path: str | Path) -> pa.Table:
    """Read a details table written by :func:`write_details`."""
    meta = shard_metadata(path)
    if (meta.get("schema"), meta.get("schema_version")) != (DETAILS_SCHEMA, DETAILS_SCHEMA_VERSION):
        raise SchemaError(f"{path} holds {meta.get('schema')} v{meta.get('schema_version')}, expected "
                          f"{DETAILS_SCHEMA} v{DETAILS_SCHEMA_VERSION}: re-run `llmdistill eval`")
    return pq.read_table(path)


def model_labels(models: list[str]) -> dict[str, str]:
    """Short column labels: a local path's last component, a hub id as is; made unique."""
    labels: dict[str, str] = {}
    for model in models:
        label = Path(model).name if Path(model).exists() else model
        while label in labels.values():
            label = f"{label}'"
        labels[model] = label
    return labels


def _largest_k(metrics: dict[str, Any]) -> str | None:
    return max(metrics["pass@k"], key=int, default=None)


def _cells(metrics: dict[str, Any], k: str | None) -> list[str]:
    return [
        f"{100 * metrics['pass@1']:.1f} ± {100 * metrics['pass@1_se']:.1f}",
        f"{100 * metrics['pass@k'][k]:.1f}" if k in metrics["pass@k"] else "–",
        f"{100 * metrics['maj@k'][k]:.1f}" if k in metrics["maj@k"] else "–",
        f"{100 * metrics['truncation_rate']:.1f}",
        f"{metrics['mean_tokens']:.0f}",
    ]


def results_markdown(results: dict[str, Any]) -> str:
    """One table per benchmark, models side by side as columns; rates in percent."""
    models = list(results["results"])
    labels = model_labels(models)
    lines = ["# Evaluation results", ""]
    for bench, settings in results["benchmarks"].items():
        k = _largest_k(results["results"][models[0]][bench])
        lines += [f"## {bench}", "",
                  f"{settings['num_problems']} problems × {settings['num_samples']} samples, "
                  f"T = {settings['temperature']}, top-p = {settings['top_p']}, "
                  f"max {settings['max_tokens']} new tokens.", ""]
        names = ["pass@1 (%) ± s.e.", f"pass@{k or 'k'} (%)", f"maj@{k or 'k'} (%)", "truncated (%)",
                 "mean length (tokens)"]
        cells = {m: _cells(results["results"][m][bench], k) for m in models}
        lines.append("| metric | " + " | ".join(labels[m] for m in models) + " |")
        lines.append("|---|" + "---|" * len(models))
        for i, name in enumerate(names):
            lines.append(f"| {name} | " + " | ".join(cells[m][i] for m in models) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_results(results: dict[str, Any], path: str | Path) -> None:
    """Bar chart of pass@1 per benchmark (one bar per model) with ±1 s.e. error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models, benches = list(results["results"]), list(results["benchmarks"])
    labels = model_labels(models)
    width = 0.8 / max(1, len(models))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(benches) * max(1, len(models)) ** 0.5), 3.6))
    for i, model in enumerate(models):
        xs = [b + (i - (len(models) - 1) / 2) * width for b in range(len(benches))]
        ys = [100 * results["results"][model][b]["pass@1"] for b in benches]
        errs = [100 * results["results"][model][b]["pass@1_se"] for b in benches]
        ax.bar(xs, ys, width, yerr=errs, capsize=3, label=labels[model])
    ax.set_xticks(range(len(benches)), benches)
    ax.set_ylabel("pass@1 (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize="small", loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
