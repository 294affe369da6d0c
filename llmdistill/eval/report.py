"""Eval outputs: results.json, a side-by-side markdown table and a chart.

The per-sample details table is a data contract and lives in :mod:`llmdistill.formats`
(:func:`~llmdistill.formats.write_details`, :func:`~llmdistill.formats.read_details`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmdistill.manifest import describe_machine


def model_labels(models: list[str]) -> dict[str, str]:
    """Short column labels: a local path's last component (a ``checkpoint-N``'s with its run's), a hub id as
    is; made unique."""
    labels: dict[str, str] = {}
    for model in models:
        path = Path(model).resolve()
        label = (model if not path.exists() else path.name if not path.name.startswith("checkpoint-")
                 else f"{path.parent.name}/{path.name}")
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
    lines += compute_markdown(results, labels)
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


def trained_by(record: dict[str, Any]) -> str:
    """A training record's stages in order, each as ``stage (its directory)``, a checkpoint with its run's."""
    def where(path: str) -> str:
        p = Path(path).resolve()
        return f"{p.parent.name}/{p.name}" if p.name.startswith("checkpoint-") else p.name

    return " → ".join(f"{stage['stage']} ({where(stage['path'])})" for stage in record["stages"])


def compute_markdown(results: dict[str, Any], labels: dict[str, str]) -> list[str]:
    """What each model's training spent (:func:`llmdistill.compute.training_compute`: the stages that
    trained it, a warm start included), beside its accuracy; the machine each figure came from."""
    compute = results.get("compute")
    if not compute:
        return []
    here = describe_machine(results["machine"]) if results.get("machine") else None
    trained_on = {describe_machine(s["machine"]) for record in compute.values() for s in record["stages"]
                  if s.get("machine")}
    place = ("this machine" if trained_on == {here} else "; ".join(sorted(trained_on)) if trained_on
             else "a machine not recorded")
    lines = ["## Training compute", "",
             "From the records of the stages that trained each model (a warm start it started from included). "
             f"Wall seconds of all the processes that ran them, on {place}: they compare runs of one machine.", "",
             "| model | trained by | optimizer steps | trained tokens | rollout tokens | teacher tokens scored | "
             "training wall s |", "|---|---|---|---|---|---|---|"]

    def count(record: dict[str, Any], key: str) -> str:
        return f"{record[key]:,}" if record[key] or any(key in s for s in record["stages"]) else "–"

    for model, record in compute.items():
        lines.append(f"| {labels.get(model, model)} | {trained_by(record)} | {record['optimizer_steps']:,} | "
                     f"{record['trained_tokens']:,} | {count(record, 'rollout_tokens')} | "
                     f"{count(record, 'teacher_tokens_scored')} | {record['wall_s']:,.1f} |")
    return lines + [""]


def plot_accuracy_vs_compute(results: dict[str, Any], path: str | Path) -> None:
    """pass@1 (± 1 s.e.) against training wall seconds, one panel per benchmark: the models with a training
    record as points, those of one run (its checkpoints and its final model) joined in order; the models
    without one (a teacher, an untrained student, a hub model) as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models, benches = list(results["results"]), list(results["benchmarks"])
    labels, compute = model_labels(models), results.get("compute") or {}
    runs: dict[str, list[str]] = {}  # a run: the directory of the stage that trained the model last
    for model in models:
        if model in compute:
            last = Path(compute[model]["stages"][-1]["path"]).resolve()
            runs.setdefault(str(last.parent if last.name.startswith("checkpoint-") else last), []).append(model)
    fig, axes = plt.subplots(1, len(benches), figsize=(5.5 * len(benches), 3.8), squeeze=False)
    for ax, bench in zip(axes[0], benches, strict=True):
        def score(model: str, b: str = bench) -> tuple[float, float]:
            metrics = results["results"][model][b]
            return 100 * metrics["pass@1"], 100 * metrics["pass@1_se"]

        for run, members in runs.items():
            members = sorted(members, key=lambda m: compute[m]["wall_s"])
            ys, errs = zip(*(score(m) for m in members), strict=True)
            ax.errorbar([compute[m]["wall_s"] for m in members], ys, yerr=errs, marker="o", capsize=3,
                        label=Path(run).name)
        for model in models:
            if model not in compute:
                ax.axhline(score(model)[0], linestyle="--", linewidth=1, color="grey")
                ax.annotate(labels[model], (0, score(model)[0]), xycoords=("axes fraction", "data"),
                            fontsize="small", va="bottom")
        ax.set_title(bench)
        ax.set_xlabel("training wall seconds")
        ax.set_xlim(left=0)
        ax.set_ylabel("pass@1 (%)")
        ax.set_ylim(0, 105)
        ax.legend(fontsize="small", loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
