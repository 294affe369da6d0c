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


def plot_histogram(lengths: np.ndarray, max_length: int, path: Path) -> None:
    """Save a PNG histogram of document lengths (matplotlib, Agg: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    ax.hist(lengths, bins=min(64, max(8, int(np.sqrt(len(lengths))))), color="#4c72b0")
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
        lines += [f"Teacher top-{t['k']} signal: {t['bytes_per_token']:.1f} bytes per target token "
                  f"({t['codec_bits']}-bit log-prob gaps, vocab {t['vocab_size']}).", ""]
    lines += [f"![document lengths]({HISTOGRAM})", ""]
    return "\n".join(lines)


def write_report(directory: Path, stats: dict[str, Any], lengths: np.ndarray, max_length: int) -> None:
    """Write ``stats.json``, ``REPORT.md`` and the histogram into ``directory``."""
    write_json_atomic(directory / "stats.json", stats)
    (directory / "REPORT.md").write_text(report_markdown(stats))
    plot_histogram(lengths, max_length, directory / HISTOGRAM)
