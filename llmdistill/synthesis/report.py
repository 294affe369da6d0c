"""Synthesize's outputs: ``prompts.jsonl`` (generate's input), ``report.md`` and ``manifest.json``,
per part and merged across the parts of a ``--shard i/N`` run.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

from llmdistill.builder.dedup import duplicates
from llmdistill.config.base import ConfigError
from llmdistill.config.synthesize import SynthesizeConfig
from llmdistill.manifest import MANIFEST, read_manifest, write_manifest

PROMPTS = "prompts.jsonl"
REPORT = "report.md"
PART_DIR = re.compile(r"shard-(\d+)-of-(\d+)")
FILTERS = ("malformed", "length", "language", "duplicate", "contaminated", "unsolvable", "duplicate_across_parts")
# what generate reads from prompts.jsonl (the id is the content hash generate would compute itself)
GENERATE_SETTINGS = {"dataset": PROMPTS, "prompt_column": "prompt", "id_column": "id", "passthrough_columns": ["answer"]}


def write_prompts(path: Path, rows: list[dict]) -> None:
    """One JSON object per line, via a temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)


def report_text(counts: dict[str, Any]) -> str:
    """A short Markdown report: what each filter dropped, as a count and a share of the written queries."""
    written = max(1, counts.get("written", 0))
    lines = ["# llmdistill synthesize", "", f"Queries written: {counts.get('written', 0)}", "",
             "| filter | dropped | share of written |", "|---|---:|---:|"]
    for name in FILTERS:
        if f"dropped_{name}" in counts:
            dropped = counts[f"dropped_{name}"]
            lines.append(f"| {name} | {dropped} | {dropped / written:.1%} |")
    lines += ["", f"Kept: {counts.get('kept', 0)} ({counts.get('kept', 0) / written:.1%} of written)."]
    if counts.get("contaminated_by"):
        lines.append("Contamination hits per benchmark: "
                     + ", ".join(f"{k} {v}" for k, v in sorted(counts["contaminated_by"].items())) + ".")
    if counts.get("agreement_histogram"):
        lines.append("Answer agreement (share of the most common answer: queries): "
                     + ", ".join(f"{k}: {v}" for k, v in counts["agreement_histogram"].items()) + ".")
    return "\n".join(lines) + "\n"


def write_outputs(directory: Path, cfg: SynthesizeConfig, rows: list[dict], counts: dict[str, Any],
                  started: float, **extra: Any) -> dict[str, Any]:
    """``prompts.jsonl``, ``report.md`` and the complete manifest of one part (or of the merge)."""
    directory.mkdir(parents=True, exist_ok=True)
    write_prompts(directory / PROMPTS, rows)
    (directory / REPORT).write_text(report_text(counts), encoding="utf-8")
    index, count = cfg.shard_index_count
    return write_manifest(directory, "synthesize", cfg, inputs={"model": cfg.model}, counts=counts, started=started,
                          complete=True, shard={"index": index, "count": count},
                          generate_input={**GENERATE_SETTINGS, "dataset": str(directory / PROMPTS)}, **extra)


def _sum(parts: list[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {}
    for counts in parts:
        for key, value in counts.items():
            if isinstance(value, dict):
                total[key] = _sum([total.get(key, {}), value])
            elif isinstance(value, int | float):
                total[key] = total.get(key, 0) + value
    return total


def merge_parts(cfg: SynthesizeConfig) -> dict[str, Any]:
    """Check that all N parts are complete, drop duplicates across them and write the merged outputs.

    Raises:
        ConfigError: no parts, parts of different N, or a part that is missing or unfinished.
    """
    started = time.time()
    out = Path(cfg.output_dir)
    found = {tuple(map(int, m.groups())): p for p in out.glob("shard-*-of-*")
             if p.is_dir() and (m := PART_DIR.fullmatch(p.name))}
    totals = {n for _, n in found}
    if len(totals) != 1:
        raise ConfigError(f"{out}: expected the parts of one --shard i/N run, found {sorted(p.name for p in found.values())}")
    n = totals.pop()
    missing = [i for i in range(n) if (i, n) not in found or not (found[(i, n)] / MANIFEST).is_file()
               or not read_manifest(found[(i, n)]).get("complete")]
    if missing:
        raise ConfigError(f"{out}: parts {missing} of {n} are missing or unfinished: run them (--shard i/{n}) first")
    manifests = [read_manifest(found[(i, n)]) for i in range(n)]
    rows = [json.loads(line) for i in range(n)
            for line in (found[(i, n)] / PROMPTS).read_text(encoding="utf-8").splitlines() if line.strip()]
    run = SynthesizeConfig(**{**manifests[0]["config"], "output_dir": str(out), "shard": "0/1", "merge": True})
    dup = duplicates([r["prompt"] for r in rows], near=run.near_dedup, threshold=run.dedup_threshold,
                     ngram=run.dedup_ngram, num_perm=run.minhash_num_perm) if rows else []
    kept = [r for r, d in zip(rows, dup, strict=True) if not d]
    counts = _sum([m["counts"] for m in manifests])
    counts["dropped_duplicate_across_parts"] = len(rows) - len(kept)
    counts["kept"] = len(kept)
    return write_outputs(out, run, kept, counts, started, parts=n)
