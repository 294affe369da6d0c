"""Eval outputs: results.json, a side-by-side markdown table and a chart.

The per-sample details table is a data contract and lives in :mod:`llmdistill.formats`
(:func:`~llmdistill.formats.write_details`, :func:`~llmdistill.formats.read_details`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmdistill.manifest import describe_machine


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
    if results.get("machine"):  # sampling settles with the hardware's rounding, and tokens/s are this machine's
        lines += [f"Machine: {describe_machine(results['machine'])}.", ""]
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
    lines += efficiency_markdown(results, labels)
    return "\n".join(lines)


def efficiency_markdown(results: dict[str, Any], labels: dict[str, str]) -> list[str]:
    """Student efficiency beside accuracy: parameters, compression and accuracy retained against the
    reference model (the teacher), generation tokens/s on this hardware."""
    eff = results.get("efficiency")
    if not eff:
        return []
    reference = results.get("reference_model")
    lines = ["## Efficiency", "", "Generation tokens/s: vLLM on this machine, all benchmarks' samples of a model."
             + (f" Compression and accuracy retained are against {labels.get(reference, reference)}." if reference
                else ""), "",
             "| model | parameters | compression | generation tokens/s | pass@1 retained |", "|---|---|---|---|---|"]
    for model, row in eff.items():
        params = f"{row['parameters']:,}" if row.get("parameters") else "–"
        ratio = f"{row['compression_vs_reference']:.1f}×" if row.get("compression_vs_reference") else "–"
        speed = f"{row['generation_tokens_per_s']:,.0f}" if row.get("generation_tokens_per_s") else "–"
        kept = row.get("pass@1_retained_vs_reference") or {}
        retained = ", ".join(f"{b} {100 * v:.1f}%" for b, v in kept.items() if v is not None) or "–"
        lines.append(f"| {labels[model]} | {params} | {ratio} | {speed} | {retained} |")
    return lines + [""]


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
