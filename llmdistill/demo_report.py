"""``REPORT.md`` of ``llmdistill demo``: every number is read from the stages' own outputs."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from llmdistill.config.demo import DemoConfig

LABELS = ("teacher", "student (untrained)", "SFT student", "KD student")


def _mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def results_rows(runs: dict[int, dict]) -> list[dict[str, Any]]:
    """One row per model: pass@1 (mean ± s.e. for one seed, mean ± std over seeds) and the rest."""
    rows = []
    for label in LABELS:
        per_seed = [run["eval"][label] for run in runs.values()]
        p1 = [m["pass@1"] for m in per_seed]
        mean, spread = _mean_spread(p1)
        if len(per_seed) == 1:
            spread = per_seed[0]["pass@1_se"]
        k = max(per_seed[0]["pass@k"], key=int) if per_seed[0]["pass@k"] else None
        rows.append({
            "model": label, "pass@1": mean, "spread": spread, "per_seed": p1,
            "pass@k": statistics.fmean(m["pass@k"][k] for m in per_seed) if k else None,
            "maj@k": statistics.fmean(m["maj@k"][k] for m in per_seed) if k and per_seed[0]["maj@k"] else None,
            "k": k, "truncation": statistics.fmean(m["truncation_rate"] for m in per_seed),
            "tokens": statistics.fmean(m["mean_tokens"] for m in per_seed),
        })
    return rows


def results_table(rows: list[dict[str, Any]], multi_seed: bool) -> str:
    spread = "± std over seeds" if multi_seed else "± s.e."
    k = rows[0]["k"]
    lines = [f"| model | pass@1 {spread} | pass@{k} | maj@{k} | truncated | mean tokens |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        pk = f"{r['pass@k']:.3f}" if r["pass@k"] is not None else "–"
        mk = f"{r['maj@k']:.3f}" if r["maj@k"] is not None else "–"
        lines.append(f"| {r['model']} | {r['pass@1']:.3f} ± {r['spread']:.3f} | {pk} | {mk} | "
                     f"{r['truncation']:.1%} | {r['tokens']:.1f} |")
    return "\n".join(lines)


def kd_vs_sft(runs: dict[int, dict]) -> dict[str, Any]:
    """The paired comparison the demo exists to show, per seed and overall."""
    diffs = {seed: run["eval"]["KD student"]["pass@1"] - run["eval"]["SFT student"]["pass@1"]
             for seed, run in runs.items()}
    mean, spread = _mean_spread(list(diffs.values()))
    return {"per_seed": diffs, "paired": {seed: run["kd_minus_sft"] for seed, run in runs.items()},
            "mean": mean, "std": spread, "kd_wins": sum(d > 0 for d in diffs.values()), "seeds": len(diffs)}


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def pipeline_counts(run: dict) -> dict[str, Any]:
    """prompts → traces → kept → packed, read from the generate manifest and the build stats."""
    gen, stats = run["generate"], run["build"]
    steps = {s["step"]: s["remaining"] for s in stats["steps"]}
    return {
        "prompts": gen["input_rows"],
        "teacher traces": gen["rows"],
        "kept traces": stats["packing"]["documents"],
        "packed sequences": stats["packing"]["rows"],
        "packing efficiency": round(stats["packing"]["efficiency"], 4),
        "after each build step": steps,
        "contamination hits": stats["contamination_hits"],
    }


def plot_accuracy(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    colors = ["#555555", "#bbbbbb", "#4c72b0", "#dd8452"]
    ax.bar([r["model"] for r in rows], [r["pass@1"] for r in rows], yerr=[r["spread"] for r in rows],
           capsize=6, color=colors)
    for i, r in enumerate(rows):
        ax.text(i, r["pass@1"] + r["spread"] + 0.01, f"{r['pass@1']:.3f}", ha="center")
    ax.set_ylabel("held-out pass@1")
    ax.set_ylim(0, 1.05)
    ax.set_title("tiny world: teacher vs students")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_losses(runs: dict[int, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for seed, run in runs.items():
        for kind, color in (("sft", "#4c72b0"), ("kd", "#dd8452")):
            points = [(h["step"], h["ce_loss"]) for h in run["history"][kind] if "ce_loss" in h]
            if points:
                label = f"{kind.upper()} student: CE" if seed == next(iter(runs)) else None
                ax.plot(*zip(*points, strict=True), color=color, alpha=0.8, label=label)
            kd_points = [(h["step"], h["kd_loss"]) for h in run["history"][kind] if "kd_loss" in h and kind == "kd"]
            if kd_points:
                label = "KD student: KD term" if seed == next(iter(runs)) else None
                ax.plot(*zip(*kd_points, strict=True), color=color, ls="--", alpha=0.8, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("nats per target token (training batches)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _signal_lines(signal: dict[str, float], temperature: float) -> list[str]:
    """What the KD student gets beyond the text: the teacher's sharpness at T = 1 and at the KD temperature."""
    return [f"What the teacher's top-k adds to its text, over {signal['positions']:.0f} trace positions: mean top-1 "
            f"probability {signal['top1_T1']:.3f} at T = 1 (entropy {signal['entropy_T1']:.3f} nats) and "
            f"{signal['top1_T_kd']:.3f} at the KD temperature T = {temperature} (entropy "
            f"{signal['entropy_T_kd']:.3f} nats). A top-1 near 1 means the KD target is almost the sampled token.", ""]


def write_report(cfg: DemoConfig, runs: dict[int, dict], out: Path, teacher: Path) -> dict[str, Any]:
    """Write REPORT.md and its plots; print the results table; return the summary."""
    from rich.console import Console
    from rich.markdown import Markdown

    rows = results_rows(runs)
    comparison = kd_vs_sft(runs)
    multi = len(runs) > 1
    plot_accuracy(rows, out / "accuracy.png")
    plot_losses(runs, out / "loss_curves.png")
    first = next(iter(runs.values()))
    counts = pipeline_counts(first)
    timings = {stage: statistics.fmean(run["timings"].get(stage, 0.0) for run in runs.values())
               for stage in first["timings"]}

    kd, ev = first["configs"]["train_kd"], first["configs"]["eval"]
    gen = first["configs"]["generate"]
    verdict = (f"KD beat SFT in {comparison['kd_wins']} of {comparison['seeds']} seed(s); "
               f"mean pass@1 difference (KD − SFT) = {comparison['mean']:+.3f}"
               + (f" ± {comparison['std']:.3f} (std over seeds)" if multi else ""))
    table = results_table(rows, multi)
    lines = [
        "# llmdistill demo: R1-style distillation in miniature",
        "",
        f"Teacher `{teacher}`; students of the same random initialisation trained for {kd['max_steps']} steps on "
        f"the same built data: SFT-only (alpha = 0) and KD (alpha = {kd['alpha']}, T = {kd['temperature']}, "
        f"{kd['divergence']}, teacher top-{gen['logprobs_top_k']}). Held-out set: {ev['limit']} tiny-world "
        f"problems never seen in training, {ev['num_samples']} samples each at T = {ev['temperature']}, "
        f"top-p = {ev['top_p']}. Seeds: {', '.join(map(str, runs))}. Stage configs: `{cfg.configs_dir}/*_tiny.yaml`.",
        "",
        "## Results",
        "",
        table,
        "",
        f"**{verdict}.**",
        "",
        "Per seed (pass@1; KD − SFT ± its standard error paired over the held-out problems, which measures "
        "evaluation noise, not training noise): " + "; ".join(
            f"seed {s}: SFT {r['eval']['SFT student']['pass@1']:.3f}, KD {r['eval']['KD student']['pass@1']:.3f}"
            + f", {r['kd_minus_sft']['diff']:+.3f} ± {r['kd_minus_sft']['se']:.3f}"
            for s, r in runs.items()),
        "",
        "![accuracy](accuracy.png)",
        "",
        "## Pipeline" + (f" (seed {next(iter(runs))})" if multi else ""),
        "",
        f"- prompts: {counts['prompts']} → teacher traces: {counts['teacher traces']} → kept after rejection "
        f"sampling and filters: {counts['kept traces']} → packed sequences: {counts['packed sequences']} "
        f"(packing efficiency {counts['packing efficiency']:.1%})",
        f"- after each build step: {counts['after each build step']}",
        f"- contamination hits against the held-out benchmark: {counts['contamination hits']}",
        "",
        "## Training",
        "",
        *_signal_lines(first["teacher_signal"], kd["temperature"]),
        "![losses](loss_curves.png)",
        "",
        "## Timings (seconds" + (", mean over seeds" if multi else "") + ")",
        "",
        "| stage | seconds |", "|---|---|",
        *[f"| {stage} | {sec:.1f} |" if sec else f"| {stage} | reused |" for stage, sec in timings.items()],
        f"| total | {sum(timings.values()):.1f} |",
        "",
        "Every stage's config is in `configs/` and its manifest in its output directory.",
    ]
    (out / "REPORT.md").write_text("\n".join(lines) + "\n")
    Console().print(Markdown("\n".join(["## llmdistill demo", "", table, "", verdict])))
    return {"results": rows, "kd_vs_sft": comparison, "counts": {"seeds": len(runs), **_flat(counts)},
            "timings": timings, "report": str(out / "REPORT.md")}
