"""``REPORT.md`` of ``llmdistill demo``: every number is read from the stages' own outputs."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from llmdistill.config.demo import DemoConfig

LABELS = ("teacher", "student (untrained)", "SFT student", "KD student", "on-policy student")
COLORS = ("#555555", "#bbbbbb", "#4c72b0", "#dd8452", "#55a868")
TRAINED = LABELS[2:]


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


def gap_closed(scores: dict[str, dict], label: str) -> float | None:
    """How much of the untrained student → teacher gap an arm closed (1 = the teacher's pass@1)."""
    low, high = scores[LABELS[1]]["pass@1"], scores[LABELS[0]]["pass@1"]
    return (scores[label]["pass@1"] - low) / (high - low) if high > low else None


def versus_sft(runs: dict[int, dict]) -> dict[str, dict[str, Any]]:
    """The KD and on-policy students against the SFT student, seed by seed: each seed's paired
    difference and its standard error over the held-out problems (evaluation noise), the spread of
    the differences over seeds (training noise), wins, wins by more than 2 paired standard errors,
    and the share of the untrained → teacher gap each arm closed."""
    out = {}
    for label in TRAINED[1:]:
        paired = {seed: run["minus_sft"][label] for seed, run in runs.items()}
        diffs = [p["diff"] for p in paired.values()]
        mean, spread = _mean_spread(diffs)
        gaps = {seed: gap_closed(run["eval"], label) for seed, run in runs.items()}
        out[label] = {"paired": paired, "mean": mean, "std": spread, "seeds": len(diffs),
                      "wins": sum(d > 0 for d in diffs), "clear_wins": sum(p["diff"] > 2 * p["se"] for p in paired.values()),
                      "gap_closed": gaps, "min_gap_closed": min((g for g in gaps.values() if g is not None), default=None)}
    return out


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

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar([r["model"].replace(" student", "\nstudent") for r in rows], [r["pass@1"] for r in rows],
           yerr=[r["spread"] for r in rows], capsize=6, color=COLORS[:len(rows)])
    for i, r in enumerate(rows):
        ax.text(i, r["pass@1"] + r["spread"] + 0.01, f"{r['pass@1']:.3f}", ha="center")
    ax.set_ylabel("held-out pass@1")
    ax.set_ylim(0, 1.05)
    ax.set_title("tiny world: teacher vs students")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_compute(runs: dict[int, dict], path: Path) -> None:
    """Held-out pass@1 of each trained arm against the wall seconds its training phases took: a curve
    through its checkpoints per seed, the final model marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    alpha = 1.0 if len(runs) == 1 else 0.6
    for label, color in zip(TRAINED, COLORS[2:], strict=True):
        for i, run in enumerate(runs.values()):
            curve = run["curves"][label]
            ax.plot([p["seconds"] for p in curve], [p["pass@1"] for p in curve], color=color, alpha=alpha,
                    marker=".", lw=1.2, label=label if i == 0 else None)
            ax.scatter([curve[-1]["seconds"]], [curve[-1]["pass@1"]], color=color, s=40, zorder=3)
    teacher = statistics.fmean(run["eval"][LABELS[0]]["pass@1"] for run in runs.values())
    ax.axhline(teacher, color=COLORS[0], ls="--", lw=1, label="teacher")
    ax.set_xlabel("training wall seconds on this machine (warm start included)")
    ax.set_ylabel("held-out pass@1")
    ax.set_ylim(0, 1.05)
    ax.set_xlim(left=0)
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
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


def compute_table(runs: dict[int, dict], rows: list[dict[str, Any]]) -> str:
    """Efficiency beside accuracy: parameters, compression against the teacher, generation speed,
    accuracy retained, and what each trained arm spent (means over seeds)."""
    first = next(iter(runs.values()))
    teacher_p1 = rows[0]["pass@1"]
    lines = ["| model | parameters | compression | generation tokens/s | pass@1 retained | gap closed | "
             "training wall s | optimizer steps | trained tokens | rollout tokens | teacher tokens scored |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        label = row["model"]
        eff = first["efficiency"].get(label, {})
        speed = [run["efficiency"].get(label, {}).get("generation_tokens_per_s") for run in runs.values()]
        speed = [v for v in speed if v]
        cells = [f"{eff['parameters']:,}" if eff.get("parameters") else "–",
                 f"{eff['compression_vs_reference']:.1f}×" if eff.get("compression_vs_reference") else "–",
                 f"{statistics.fmean(speed):,.0f}" if speed else "–",
                 f"{row['pass@1'] / teacher_p1:.1%}" if teacher_p1 else "–"]
        gaps = [gap_closed(run["eval"], label) for run in runs.values()]
        cells.append(f"{statistics.fmean(gaps):.1%}" if label in TRAINED and None not in gaps else "–")
        if label in TRAINED:
            arms = [run["compute"][label] for run in runs.values()]
            cells += [f"{statistics.fmean(a['wall_s'] for a in arms):.0f}",
                      f"{statistics.fmean(a['optimizer_steps'] for a in arms):,.0f}",
                      f"{statistics.fmean(a['trained_tokens'] for a in arms):,.0f}"]
            cells += [f"{statistics.fmean(a[k] for a in arms):,.0f}" if k in arms[0] else "–"
                      for k in ("rollout_tokens", "teacher_tokens_scored")]
        else:
            cells += ["–"] * 5
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sft_at_same_time(run: dict[str, Any], label: str) -> str:
    """Where the SFT curve stood when ``label``'s arm ended: linear between its points, or "finished" past
    its last one. Empty when SFT has no intermediate checkpoint (its curve would be a guess)."""
    import numpy as np

    sft, arm = run["curves"][LABELS[2]], run["curves"][label][-1]
    if len(sft) < 3:
        return ""
    mine = f"{label.replace(' student', '')}'s {arm['pass@1']:.3f}"
    if arm["seconds"] >= sft[-1]["seconds"]:
        return f"SFT had finished ({sft[-1]['pass@1']:.3f} at {sft[-1]['seconds']:.0f} s) against {mine}"
    at = np.interp(arm["seconds"], [p["seconds"] for p in sft], [p["pass@1"] for p in sft])
    return f"SFT {at:.3f} at {arm['seconds']:.0f} s against {mine}"


def curve_lines(runs: dict[int, dict]) -> list[str]:
    """The accuracy-against-time points of every arm and seed, and where SFT stood when the on-policy arm ended."""
    lines = ["| seed | arm | pass@1 at training wall seconds (stage, step) |", "|---|---|---|"]
    for seed, run in runs.items():
        for label in TRAINED:
            points = [f"{p['seconds']:.0f} s: {p['pass@1']:.3f}" + (f" ({p['stage']} {p['step']})" if p["step"] else "")
                      for p in run["curves"][label]]
            lines.append(f"| {seed} | {label} | " + " · ".join(points) + " |")
    same_time = {seed: sft_at_same_time(run, LABELS[4]) for seed, run in runs.items()}
    if all(same_time.values()):
        lines += ["", "When the on-policy arm had spent its training time, the SFT curve (linear between its "
                  "checkpoints) stood at: " + "; ".join(f"seed {seed}: {text}" for seed, text in same_time.items())
                  + "."]
    return lines


def _verdict(label: str, comparison: dict[str, Any], multi: bool) -> str:
    short = label.replace(" student", "")
    gap = comparison["min_gap_closed"]
    return (f"{short} beat SFT in {comparison['wins']} of {comparison['seeds']} seed(s), by more than 2 paired "
            f"standard errors in {comparison['clear_wins']}; mean pass@1 difference ({short} − SFT) = "
            f"{comparison['mean']:+.3f}" + (f" ± {comparison['std']:.3f} (std over seeds)" if multi else "")
            + (f"; it closed at least {gap:.0%} of the untrained → teacher gap" if gap is not None else ""))


def _per_seed_lines(runs: dict[int, dict]) -> list[str]:
    lines = ["| seed | SFT | KD | on-policy | KD − SFT ± paired s.e. | on-policy − SFT ± paired s.e. |",
             "|---|---|---|---|---|---|"]
    for seed, run in runs.items():
        p1 = [run["eval"][label]["pass@1"] for label in TRAINED]
        diffs = [run["minus_sft"][label] for label in TRAINED[1:]]
        lines.append(f"| {seed} | " + " | ".join(f"{v:.3f}" for v in p1) + " | "
                     + " | ".join(f"{d['diff']:+.3f} ± {d['se']:.3f}" for d in diffs) + " |")
    return lines


def stage_timings(runs: dict[int, dict[str, Any]]) -> dict[str, float]:
    """Each stage's seconds in this invocation, the mean over the seeds that ran it: a stage reused from
    an earlier run took 0 s here (its own seconds are in the compute table, from its manifest), and the
    teacher bootstrap runs once, for the first seed. 0: reused by every seed."""
    stages = dict.fromkeys(stage for run in runs.values() for stage in run["timings"])
    return {stage: statistics.fmean([ran for run in runs.values() if (ran := run["timings"].get(stage, 0.0))]
                                    or [0.0]) for stage in stages}


def machine_line(runs: dict[int, dict]) -> str:
    """Which machine the report's figures came from; when stages ran on several, which ran where."""
    where: dict[str, list[str]] = {}
    for seed, run in runs.items():
        for stage, machine in run.get("machines", {}).items():
            where.setdefault(machine, []).append(f"{stage} (seed {seed})" if len(runs) > 1 else stage)
    if len(where) <= 1:
        return f"Machine: {next(iter(where), 'not recorded')}."
    return "Machines (stages reused from elsewhere, so figures from different machines sit side by side): " + "; ".join(
        f"{machine}: {', '.join(stages)}" for machine, stages in where.items()) + "."


def write_report(cfg: DemoConfig, runs: dict[int, dict], out: Path, teacher: Path) -> dict[str, Any]:
    """Write REPORT.md and its plots; print the results table; return the summary."""
    from rich.console import Console
    from rich.markdown import Markdown

    rows = results_rows(runs)
    comparison = versus_sft(runs)
    multi = len(runs) > 1
    plot_accuracy(rows, out / "accuracy.png")
    plot_compute(runs, out / "accuracy_vs_compute.png")
    plot_losses(runs, out / "loss_curves.png")
    first = next(iter(runs.values()))
    counts = pipeline_counts(first)
    timings = stage_timings(runs)

    kd, ev, op = first["configs"]["train_kd"], first["configs"]["eval"], first["configs"]["onpolicy"]
    gen, warm = first["configs"]["generate"], first["configs"]["train_warm"]
    verdicts = [_verdict(label, comparison[label], multi) for label in TRAINED[1:]]
    table = results_table(rows, multi)
    costs = compute_table(runs, rows)
    lines = [
        "# llmdistill demo: R1-style distillation in miniature",
        "",
        f"Teacher `{teacher}`. Students of the same random initialisation: SFT-only (alpha = 0) and KD "
        f"(alpha = {kd['alpha']}, T = {kd['temperature']}, {kd['divergence']}, teacher top-{gen['logprobs_top_k']}) "
        f"trained {kd['max_steps']} steps on the same built data; on-policy: {warm['max_steps']} SFT steps (the warm "
        f"start), then {op['max_steps']} steps on its own samples ({op['prompts_per_step']} prompts a step at "
        f"T = {op['rollout_temperature']}, {op['objective']} against the teacher's top-{op['logprobs_top_k']} on every "
        f"token, weights synced every {op['sync_every']} step(s)). Held-out set: {ev['limit']} tiny-world problems "
        f"never seen in training, {ev['num_samples']} samples each at T = {ev['temperature']}, top-p = {ev['top_p']}. "
        f"Seeds: {', '.join(map(str, runs))}. Stage configs: `{cfg.configs_dir}/*_tiny.yaml`.",
        "",
        machine_line(runs),
        "",
        "## Results",
        "",
        table,
        "",
        *[line for v in verdicts for line in (f"**{v}.**", "")],
        "Per seed (pass@1; differences with their standard error paired over the held-out problems, which "
        "measures evaluation noise, not training noise):",
        "",
        *_per_seed_lines(runs),
        "",
        "![accuracy](accuracy.png)",
        "",
        "## Compute and efficiency" + (" (means over seeds)" if multi else ""),
        "",
        "Wall seconds of every training phase of an arm on this machine (the on-policy arm's warm start, "
        "rollouts, teacher scoring, updates and weight syncs included; generating and building the offline "
        "data that SFT and KD read is not counted for any arm). Trained tokens are target tokens. Generation "
        "tokens/s: vLLM during the eval, same machine.",
        "",
        costs,
        "",
        "Per phase (seconds): " + "; ".join(
            f"{label}: " + ", ".join(f"{k} {v:.0f}" for k, v in first["compute"][label]["phases_s"].items())
            for label in TRAINED) + (" (first seed)" if multi else ""),
        "",
        "### Accuracy against training time",
        "",
        "Held-out pass@1 of each arm's intermediate checkpoints (the same eval as the final models), placed at "
        "the wall seconds the arm had spent when it reached them (from each stage's log entries and manifest; "
        "the on-policy arm's warm start included).",
        "",
        *curve_lines(runs),
        "",
        "![accuracy against compute](accuracy_vs_compute.png)",
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
        "## Timings (seconds" + (", mean over the seeds that ran the stage" if multi else "") + ")",
        "",
        "| stage | seconds |", "|---|---|",
        *[f"| {stage} | {sec:.1f} |" if sec else f"| {stage} | reused |" for stage, sec in timings.items()],
        f"| total (wall) | {statistics.fmean(run.get('wall_s', sum(run['timings'].values())) for run in runs.values()):.1f} |",
        "",
        f"The training arms ran {first.get('workers', 1)} at a time, each stage in its own process on "
        + ("one thread." if str(first.get("threads", "1")) == "1" else f"{first['threads']} threads (OMP_NUM_THREADS)."),
        "",
        "Every stage's config is in `configs/` and its manifest in its output directory.",
    ]
    (out / "REPORT.md").write_text("\n".join(lines) + "\n")
    spent = ["| arm | training wall s | optimizer steps | trained tokens |", "|---|---|---|---|",
             *[f"| {label} | {statistics.fmean(r['compute'][label]['wall_s'] for r in runs.values()):.0f} | "
               f"{statistics.fmean(r['compute'][label]['optimizer_steps'] for r in runs.values()):,.0f} | "
               f"{statistics.fmean(r['compute'][label]['trained_tokens'] for r in runs.values()):,.0f} |"
               for label in TRAINED]]
    Console().print(Markdown("\n".join(["## llmdistill demo", "", machine_line(runs), "", table, "",
                                         *[f"{v}.\n" for v in verdicts],
                                         *spent, "", f"Report: {out / 'REPORT.md'}"])))
    return {"results": rows, "versus_sft": comparison, "compute": {seed: run["compute"] for seed, run in runs.items()},
            "curves": {seed: run["curves"] for seed, run in runs.items()},
            "counts": {"seeds": len(runs), **_flat(counts)}, "timings": timings, "report": str(out / "REPORT.md")}
