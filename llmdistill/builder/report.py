"""Step 7 (part): ``stats.json``, ``REPORT.md`` and the length histogram of a build."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from llmdistill.manifest import write_json_atomic

HISTOGRAM = "lengths.png"


def length_histogram(lengths: np.ndarray, max_length: int, bins: int = 32) -> dict[str, list[float]]:
    """Histogram of document lengths in tokens, ``bins`` equal bins over ``[0, max_length]``."""
    counts, edges = np.histogram(lengths, bins=bins, range=(0, max_length))
    return {"edges": edges.round(1).tolist(), "counts": counts.tolist()}


def coverage_summary(counts: np.ndarray, total: float) -> dict[str, float]:
    """Mean, p5 and p50 of the teacher's probability mass inside its top-k, per target token, from a
    histogram over [0, 1] (``counts``, merged over parts) and the sum of the masses."""
    n = int(counts.sum())
    if not n:
        return {"tokens": 0, "mean": 0.0, "p5": 0.0, "p50": 0.0}
    cumulative = np.cumsum(counts) / n
    edges = np.arange(1, len(counts) + 1) / len(counts)

    def quantile(q: float) -> float:
        return round(float(edges[int(np.searchsorted(cumulative, q))]), 4)

    return {"tokens": n, "mean": round(total / n, 4), "p5": quantile(0.05), "p50": quantile(0.5)}


def plot_histogram(histogram: dict[str, list[float]], max_length: int, path: Path) -> None:
    """Save a PNG of the document-length histogram (matplotlib, Agg: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    edges = np.asarray(histogram["edges"])
    ax.bar(edges[:-1], histogram["counts"], width=np.diff(edges), align="edge", color="#4c72b0")
    ax.axvline(max_length, color="#c44e52", linestyle="--", label=f"max_length = {max_length}")
    ax.set_xlabel("document length (tokens)")
    ax.set_ylabel("documents")
    ax.set_title("Training documents by length")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _table(rows: list[tuple[Any, ...]], header: tuple[str, ...]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def report_markdown(stats: dict[str, Any]) -> str:
    """A short human-readable summary of ``stats.json``."""
    lines = [f"# Build report: {stats['output_dir']}", "",
             f"Input `{stats['input']}` ({stats['input_kind']}), verifier `{stats['verifier']}`, "
             f"kd = {stats['kd']}.", "", "## Traces after every step", ""]
    lines += _table([(s["step"], s["dropped"], s["remaining"]) for s in stats["steps"]], ("step", "dropped", "remaining"))
    lines += ["", "## Contamination", ""]
    hits = stats["contamination_hits"]
    lines += _table(sorted(hits.items()), ("benchmark", "prompts hit")) if hits else ["No prompt overlaps a benchmark."]
    p = stats["packing"]
    lines += ["", "## Packing", "",
              f"{p['documents']} documents ({p['tokens']} tokens, {p['target_tokens']} targets) in {p['rows']} "
              f"sequences of {p['max_length']}: efficiency {p['efficiency']:.2%}; over-long dropped "
              f"{p['overlong_dropped']}, split {p['overlong_split']}.", ""]
    if stats.get("teacher_signal"):
        t = stats["teacher_signal"]
        c = stats["teacher_topk_coverage"]
        lines += [f"Teacher top-{t['k']} signal: {t['bytes_per_token']:.1f} bytes per target token "
                  f"({t['codec_bits']}-bit log-prob gaps, vocab {t['vocab_size']}). The top-{t['k']} holds "
                  f"{c['mean']:.1%} of the teacher's probability per token on average (p5 {c['p5']:.1%}, "
                  f"median {c['p50']:.1%}).", ""]
    lines += [f"![document lengths]({HISTOGRAM})", ""]
    lines += _parts_markdown(stats)
    return "\n".join(lines)


def _parts_markdown(stats: dict[str, Any]) -> list[str]:
    run = stats["run"]
    lines = ["## Parts", "", f"{run['parts']} parts on {run['runtime']['workers']} worker(s) "
             f"({run['runtime']['address']}, {run['runtime']['cpus']} CPUs), {run['wall_s']:.1f} s; "
             f"{run['resumed']} part(s) reused from an interrupted run.", ""]
    slowest = sorted(run["timings"], key=lambda p: -(p["verdicts_s"] + p["shards_s"]))[:10]
    rows = [(p["part"], p["rows"], p["completion_tokens"], p["verdicts_s"], p["shards_s"], p["worker"]) for p in slowest]
    lines += [f"The {len(rows)} slowest (all of them in stats.json, `run.timings`):", ""]
    return lines + _table(rows, ("part", "traces", "tokens", "verdicts s", "shards s", "worker")) + [""]


def write_report(directory: Path, stats: dict[str, Any]) -> None:
    """Write ``stats.json``, ``REPORT.md`` and the histogram into ``directory``."""
    write_json_atomic(directory / "stats.json", stats)
    (directory / "REPORT.md").write_text(report_markdown(stats))
    plot_histogram(stats["length_histogram"], stats["packing"]["max_length"], directory / HISTOGRAM)
