"""Step 4: decontamination — drop training prompts that overlap an evaluation problem.

A training prompt is contaminated by a benchmark when they share a word ``n``-gram (default 8,
after :func:`~llmdistill.builder.dedup.normalize`). A text with fewer than ``n`` words is matched
as a whole: a short benchmark problem contaminates every prompt containing it, and a short
prompt is contaminated when a benchmark problem contains it.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

from llmdistill.builder.dedup import normalize
from llmdistill.config.base import ConfigError, jsonl_objects
from llmdistill.config.build import DecontamConfig
from llmdistill.log import get_logger

logger = get_logger(__name__)


def _grams(words: list[str], n: int) -> set[str]:
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


class NgramIndex:
    """Word n-grams of named collections of problems, for contamination look-ups."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._ngrams: dict[str, set[str]] = defaultdict(set)  # n-gram -> names
        self._short: dict[int, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))  # whole short problems
        self._problems: list[tuple[str, list[str]]] = []
        self._inner: dict[int, dict[str, set[str]]] = {}  # m-grams of all problems, for short prompts

    def add(self, name: str, problems: list[str]) -> None:
        """Index the problems of one benchmark (or file) under ``name``."""
        for problem in problems:
            words = normalize(problem).split()
            if not words:
                continue
            self._problems.append((name, words))
            if len(words) < self.n:
                self._short[len(words)][" ".join(words)].add(name)
            for gram in _grams(words, self.n):
                self._ngrams[gram].add(name)
        self._inner.clear()

    def _grams_of_problems(self, m: int) -> dict[str, set[str]]:
        """m-grams (m < n) of every problem, built on first use."""
        if m not in self._inner:
            index: dict[str, set[str]] = defaultdict(set)
            for name, words in self._problems:
                for gram in _grams(words, m):
                    index[gram].add(name)
            self._inner[m] = index
        return self._inner[m]

    def hits(self, text: str) -> set[str]:
        """Names of the collections ``text`` overlaps."""
        words = normalize(text).split()
        if not words:
            return set()
        if len(words) >= self.n:
            found = {name for gram in _grams(words, self.n) for name in self._ngrams.get(gram, ())}
        else:  # a short prompt: is it inside a problem?
            found = set(self._grams_of_problems(len(words)).get(" ".join(words), ()))
        for length, whole in self._short.items():  # short problems inside the prompt
            found.update(name for gram in _grams(words, length) for name in whole.get(gram, ()))
        return found


def read_problem_file(path: str | Path) -> list[str]:
    """Problems from a .txt (one per line) or .jsonl (``problem``/``question``/``prompt`` field) file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"decontam_extra_file {path} does not exist")
    if path.suffix != ".jsonl":
        return [line for line in path.read_text().splitlines() if line.strip()]
    problems = []
    for line_no, rec in jsonl_objects(path, ConfigError):
        field = next((f for f in ("problem", "question", "prompt") if f in rec), None)
        if field is None:
            raise ConfigError(f"{path}, line {line_no}: needs a 'problem', 'question' or 'prompt' field, has {sorted(rec)}")
        problems.append(str(rec[field]))
    return problems


def build_index(cfg: DecontamConfig, data_paths: dict[str, str]) -> NgramIndex:
    """The n-gram index of every configured benchmark and the extra file.

    Benchmarks are read through their definitions (:mod:`llmdistill.benchmarks`), never through
    the eval stage; a generated benchmark (the tiny world) loads its rows the same way.

    Raises:
        ConfigError: a benchmark that cannot be loaded, with how to point at a local copy.
    """
    from llmdistill.benchmarks import BenchmarkError, load_benchmark_problems

    index = NgramIndex(cfg.decontam_ngram)
    for name in cfg.decontam_benchmarks:
        try:
            problems = load_benchmark_problems(name, data_path=data_paths.get(name))
        except BenchmarkError as err:
            raise ConfigError(
                f"decontamination against '{name}' failed: {err}. Give a local copy with "
                f"decontam_data_paths='{{\"{name}\": \"FILE\"}}' or remove it from decontam_benchmarks."
            ) from err
        index.add(name, problems)
        logger.info("decontaminating against %s (%d problems)", name, len(problems))
    if cfg.decontam_extra_file:
        index.add(f"file:{Path(cfg.decontam_extra_file).name}", read_problem_file(cfg.decontam_extra_file))
    return index


def contaminated(problems: list[str], index: NgramIndex) -> tuple[list[set[str]], Counter]:
    """Which collections each problem overlaps.

    Args:
        problems: training problem texts (one per unique prompt is enough).
        index: the benchmark n-gram index.

    Returns:
        Per problem, the set of matching collection names; and the hit count per collection.
    """
    found = [index.hits(p) for p in problems]
    return found, Counter(name for names in found for name in names)
