"""Benchmark definitions: one YAML file per benchmark, parsed and checked into a :class:`BenchmarkSpec`.

A definition says everything needed to run a benchmark without reading harness code:

* ``name``, ``description``, ``size`` (problems in the canonical dataset, for dry runs);
* ``source``: where the rows come from -- ``hub`` (+ ``config``, ``split``) for a Hugging Face
  dataset, ``package_file: "package:relative/path"`` for a data file shipped inside an
  installed package, or ``python: "module:function"`` (+ ``args``) for generated data. When
  ``package_file`` or ``python`` is given it is what loads; ``hub`` then only names the
  canonical dataset the local copy mirrors;
* ``columns``: our field -> the dataset's column (``id``, ``problem``, ``answer``, ``tests``,
  ``entry_point``, ``incorrect_1``...);
* ``gold``: how the gold answer is read from the ``answer`` column (e.g. GSM8K's ``####``);
* ``prompt``: the user message, a ``template`` with ``{problem}`` (and ``{options}`` for
  multiple choice, whose ``options`` section says how they are shuffled and lettered);
  ``code_prefix`` for code benchmarks. Chat templating happens later, in the harness;
* ``checker`` (a name in :data:`llmdistill.checking.checkers.CHECKERS`) and ``extractor``
  (what the checker reads from the response after its think block);
* ``protocol``: ``num_samples``, ``temperature``, ``top_p``, ``max_tokens``;
* ``published``: reference results of known models, each with its source.

Templates substitute ``{name}`` placeholders only; other braces (``\\boxed{}``) are kept.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmdistill.checking.checkers import CHECKERS
from llmdistill.checking.extract import final_number
from llmdistill.config.base import UserError

FIELDS = ("id", "problem", "answer", "tests", "entry_point")
_EXTRA_FIELD = re.compile(r"incorrect_\d+")
_PLACEHOLDER = re.compile(r"\{(\w+)\}")
_PYTHON_REF = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")
_PACKAGE_REF = re.compile(r"[A-Za-z_][\w.]*:[^:]+")

_KEYS = {"name", "description", "size", "source", "columns", "gold", "prompt", "checker", "extractor",
         "protocol", "published"}
_REQUIRED = ("name", "description", "size", "source", "columns", "prompt", "checker", "protocol")
_SOURCE_KEYS = {"hub", "config", "split", "package_file", "python", "args"}
_PROMPT_KEYS = {"template", "strip_problem", "options", "code_prefix"}
_OPTIONS_KEYS = {"choices", "letters", "line", "shuffle_seed"}
_GOLD_KEYS = {"number_after"}
_PROTOCOL_KEYS = ("num_samples", "temperature", "top_p", "max_tokens")
_PUBLISHED_KEYS = {"model", "metric", "value", "source", "note"}


class BenchmarkError(UserError):
    """A benchmark that cannot be found, defined or loaded, with what to do about it."""


@dataclass(frozen=True)
class Item:
    """One benchmark problem, ready to prompt and score.

    Attributes:
        id: stable problem id.
        prompt: the user message (instruction included; multiple-choice options already shuffled).
        answer: the gold answer (number, LaTeX, or choice letter; empty for code), as shown in details.
        problem: the raw problem text, as used for decontamination.
        tests: code benchmarks: the test code, defining ``check(candidate)`` (or plain asserts).
        entry_point: code benchmarks: the function passed to ``check`` (None: plain asserts).
        code_prefix: code benchmarks: the code the completion is appended to (HumanEval's prompt).
    """

    id: str
    prompt: str
    answer: str
    problem: str
    tests: str | None = None
    entry_point: str | None = None
    code_prefix: str = ""

    @property
    def reference(self) -> Any:
        """What the checker compares a response with: a :class:`llmdistill.checking.checkers.Reference`."""
        from llmdistill.checking.checkers import Reference

        return Reference(answer=self.answer or None, tests=self.tests, entry_point=self.entry_point,
                         code_prefix=self.code_prefix)


@dataclass(frozen=True)
class Source:
    """Where a benchmark's rows come from (see the module docstring)."""

    hub: str | None = None
    config: str | None = None
    split: str | None = None
    package_file: str | None = None
    python: str | None = None
    args: dict[str, Any] = field(default_factory=dict)

    @property
    def local(self) -> bool:
        """The rows are on this machine (bundled or generated): no hub round trip."""
        return bool(self.package_file or self.python)

    def describe(self) -> str:
        """One line for listings: ``hub: org/name``, ``package: pkg:path`` or ``python: mod:fn``."""
        if self.python:
            return f"python: {self.python}"
        if self.package_file:
            return f"package: {self.package_file}"
        return f"hub: {self.hub}"


@dataclass(frozen=True)
class ChoiceOptions:
    """How multiple-choice options are built into the prompt, and the gold letter found.

    Attributes:
        choices: our fields holding the options; the first is the correct one.
        letters: the letters given to the shuffled options, in order.
        line: how one option is written, with ``{letter}`` and ``{text}``.
        shuffle_seed: the ``random.Random`` seed string, with ``{id}``: the order depends only on
            the problem id, so it is the same in every run and for every model.
    """

    choices: tuple[str, ...]
    letters: str
    line: str
    shuffle_seed: str

    def render(self, row: dict[str, Any], item_id: str) -> tuple[str, str]:
        """The option lines and the gold letter of one row."""
        texts = [str(row[c]).strip() for c in self.choices]
        order = list(range(len(texts)))
        random.Random(render(self.shuffle_seed, {"id": item_id})).shuffle(order)
        lines = [render(self.line, {"letter": self.letters[pos], "text": texts[src]})
                 for pos, src in enumerate(order)]
        return "\n".join(lines), self.letters[order.index(0)]


@dataclass(frozen=True)
class PublishedResult:
    """A published score of a known model on this benchmark (percent)."""

    model: str
    metric: str
    value: float
    source: str
    note: str | None = None


@dataclass(frozen=True)
class BenchmarkSpec:
    """One benchmark definition (one YAML file in ``definitions/``).

    Attributes:
        name: registry key (the file's stem).
        description: one line for listings.
        source: where the rows come from.
        size: problems in the canonical dataset (for dry runs without the data).
        columns: our field (``id``, ``problem``, ``answer``, ...) -> the dataset's column.
        template: the user message, with ``{problem}`` (and ``{options}``).
        checker: the checker's name in the checking registry.
        extractor: what the checker reads from the response.
        num_samples, temperature, top_p, max_tokens: default sampling protocol.
        strip_problem: strip whitespace around the problem text before use.
        gold_number_after: the gold is the last number after this marker of the answer column.
        options: multiple choice: how options are shuffled and lettered (gold = the letter).
        code_prefix: code benchmarks: template of the code the completion is appended to.
        published: reference results of known models.
        path: the definition file.
    """

    name: str
    description: str
    source: Source
    size: int
    columns: dict[str, str]
    template: str
    checker: str
    extractor: str | None
    num_samples: int
    temperature: float
    top_p: float
    max_tokens: int
    strip_problem: bool = False
    gold_number_after: str | None = None
    options: ChoiceOptions | None = None
    code_prefix: str | None = None
    published: tuple[PublishedResult, ...] = ()
    path: Path | None = field(default=None, compare=False)

    # Names the harness used before definitions were files
    @property
    def scorer(self) -> str:
        return self.checker

    @property
    def hub_id(self) -> str | None:
        return self.source.hub

    @property
    def hub_config(self) -> str | None:
        return self.source.config

    @property
    def split(self) -> str | None:
        return self.source.split

    def gold(self, row: dict[str, Any]) -> str:
        """The gold answer of a renamed row (the letter is set by :meth:`to_item` for choices)."""
        answer = str(row.get("answer", ""))
        marker = self.gold_number_after
        if marker is not None and marker in answer:
            return final_number(answer.split(marker)[-1]) or answer.strip()
        return answer.strip()

    def to_item(self, row: dict[str, Any], index: int) -> Item:
        """The :class:`Item` of one row whose columns are already renamed to our fields."""
        item_id = str(row.get("id", index))
        problem = str(row["problem"])
        if self.strip_problem:
            problem = problem.strip()
        values, answer = {"problem": problem}, self.gold(row)
        if self.options is not None:
            values["options"], answer = self.options.render(row, item_id)
        code = self.checker == "code"
        return Item(id=item_id, prompt=render(self.template, values), answer=answer, problem=problem,
                    tests=str(row["tests"]) if code else None,
                    entry_point=str(row["entry_point"]) if code and "entry_point" in row else None,
                    code_prefix=render(self.code_prefix, values) if self.code_prefix else "")


def render(template: str, values: dict[str, str]) -> str:
    """Substitute ``{name}`` placeholders in one pass (substituted text is not rescanned)."""
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)


# ---------------------------------------------------------------------------------------
# Parsing and validation


def checker_names() -> tuple[str, ...]:
    """The checkers a definition may name: the checking registry's, less ``none``."""
    # "none" accepts every response: fine for unverifiable training traces, meaningless for a benchmark
    return tuple(n for n in CHECKERS if n != "none")


class _Checker:
    """Collects a definition file's problems into one error naming the file and the keys."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, key: str, message: str) -> BenchmarkError:
        return BenchmarkError(f"benchmark definition {self.path}: {key or 'the file'}: {message}")

    def mapping(self, value: Any, key: str, allowed: set[str] | tuple[str, ...],
                required: tuple[str, ...] = ()) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(key, f"must be a mapping, got {type(value).__name__}")
        unknown = sorted(str(k) for k in value if k not in allowed)
        if unknown:
            raise self.fail(f"{key}.{unknown[0]}" if key else unknown[0],
                            f"unknown key; allowed: {', '.join(sorted(allowed))}")
        for k in required:
            if k not in value or value[k] is None:
                raise self.fail(f"{key}.{k}" if key else k, "missing")
        return value

    def string(self, value: Any, key: str, optional: bool = False) -> str | None:
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key, f"must be a non-empty string, got {value!r}")
        return value

    def integer(self, value: Any, key: str, low: int = 1) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise self.fail(key, f"must be an integer >= {low}, got {value!r}")
        return value

    def number(self, value: Any, key: str, low: float, high: float | None = None) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or value < low or (
                high is not None and value > high):
            bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
            raise self.fail(key, f"must be a number {bounds}, got {value!r}")
        return float(value)

    def template(self, value: Any, key: str, allowed: tuple[str, ...], required: tuple[str, ...]) -> str:
        text = self.string(value, key)
        assert text is not None
        names = _PLACEHOLDER.findall(text)
        unknown = sorted(set(names) - set(allowed))
        if unknown:
            raise self.fail(key, f"unknown placeholder {{{unknown[0]}}}; allowed: "
                                 f"{', '.join('{' + a + '}' for a in allowed)}")
        missing = [r for r in required if r not in names]
        if missing:
            raise self.fail(key, f"must contain {{{missing[0]}}}")
        return text


def _args(c: _Checker, raw: Any) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(isinstance(k, str) and k.isidentifier() for k in raw):
        raise c.fail("source.args", f"must be a mapping of keyword arguments, got {raw!r}")
    return dict(raw)


def _source(c: _Checker, raw: Any) -> Source:
    data = c.mapping(raw, "source", _SOURCE_KEYS)
    src = Source(hub=c.string(data.get("hub"), "source.hub", optional=True),
                 config=c.string(data.get("config"), "source.config", optional=True),
                 split=c.string(data.get("split"), "source.split", optional=True),
                 package_file=c.string(data.get("package_file"), "source.package_file", optional=True),
                 python=c.string(data.get("python"), "source.python", optional=True),
                 args=_args(c, data.get("args")))
    if src.package_file and src.python:
        raise c.fail("source", "give either package_file or python, not both")
    if not (src.hub or src.package_file or src.python):
        raise c.fail("source", "needs hub (+ split), package_file or python")
    if src.hub and not src.split:
        raise c.fail("source.split", "missing (the hub dataset's split)")
    if src.python and not _PYTHON_REF.fullmatch(src.python):
        raise c.fail("source.python", f"must be 'module:function', got {src.python!r}")
    if src.package_file and not _PACKAGE_REF.fullmatch(src.package_file):
        raise c.fail("source.package_file", f"must be 'package:relative/path', got {src.package_file!r}")
    if src.args and not src.python:
        raise c.fail("source.args", "only for a python source")
    return src


def _columns(c: _Checker, raw: Any, checker: str) -> dict[str, str]:
    if not isinstance(raw, dict):
        raise c.fail("columns", f"must be a mapping of our field -> dataset column, got {type(raw).__name__}")
    for ours, theirs in raw.items():
        if ours not in FIELDS and not _EXTRA_FIELD.fullmatch(str(ours)):
            raise c.fail(f"columns.{ours}", f"unknown field; allowed: {', '.join(FIELDS)}, incorrect_<n>")
        c.string(theirs, f"columns.{ours}")
    needed = ["problem"] + (["tests"] if checker == "code" else ["answer"])
    for ours in needed:
        if ours not in raw:
            raise c.fail(f"columns.{ours}", f"missing (checker '{checker}' needs it)")
    return {str(k): str(v) for k, v in raw.items()}


def _options(c: _Checker, raw: Any, columns: dict[str, str]) -> ChoiceOptions:
    data = c.mapping(raw, "prompt.options", _OPTIONS_KEYS, required=tuple(sorted(_OPTIONS_KEYS)))
    choices = data["choices"]
    if not isinstance(choices, list) or len(choices) < 2:
        raise c.fail("prompt.options.choices", "must list at least two fields (the correct one first)")
    for choice in choices:
        if choice not in columns:
            raise c.fail("prompt.options.choices", f"'{choice}' is not a field of columns")
    letters = c.string(data["letters"], "prompt.options.letters")
    assert letters is not None
    if len(letters) != len(choices) or len(set(letters)) != len(letters):
        raise c.fail("prompt.options.letters", f"needs {len(choices)} distinct letters, got {letters!r}")
    return ChoiceOptions(choices=tuple(str(x) for x in choices), letters=letters,
                         line=c.template(data["line"], "prompt.options.line", ("letter", "text"), ("letter", "text")),
                         shuffle_seed=c.template(data["shuffle_seed"], "prompt.options.shuffle_seed", ("id",), ("id",)))


def _published(c: _Checker, raw: Any) -> tuple[PublishedResult, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise c.fail("published", "must be a list of {model, metric, value, source}")
    out = []
    for i, entry in enumerate(raw):
        key = f"published[{i}]"
        data = c.mapping(entry, key, _PUBLISHED_KEYS, required=("model", "metric", "value", "source"))
        out.append(PublishedResult(model=str(c.string(data["model"], f"{key}.model")),
                                   metric=str(c.string(data["metric"], f"{key}.metric")),
                                   value=c.number(data["value"], f"{key}.value", 0.0, 100.0),
                                   source=str(c.string(data["source"], f"{key}.source")),
                                   note=c.string(data.get("note"), f"{key}.note", optional=True)))
    return tuple(out)


def parse_definition(data: Any, path: Path) -> BenchmarkSpec:
    """Check one parsed definition and build its spec.

    Raises:
        BenchmarkError: naming the file and the offending key.
    """
    c = _Checker(path)
    data = c.mapping(data, "", _KEYS, required=_REQUIRED)
    name = c.string(data["name"], "name")
    if name != path.stem:
        raise c.fail("name", f"'{name}' must equal the file name '{path.stem}'")
    checker = c.string(data["checker"], "checker")
    valid = checker_names()
    if checker not in valid:
        raise c.fail("checker", f"unknown checker '{checker}'; valid: {', '.join(valid)}")
    extractor = c.string(data.get("extractor"), "extractor", optional=True)
    if extractor is not None:
        expected = CHECKERS[str(checker)].extractor if str(checker) in CHECKERS else None
        if extractor != expected:
            raise c.fail("extractor", f"'{extractor}' is not what checker '{checker}' reads; "
                                      f"use {expected}")
    columns = _columns(c, data["columns"], str(checker))

    prompt = c.mapping(data["prompt"], "prompt", _PROMPT_KEYS, required=("template",))
    options = _options(c, prompt["options"], columns) if prompt.get("options") is not None else None
    placeholders = ("problem", "options") if options else ("problem",)
    template = c.template(prompt["template"], "prompt.template", placeholders, placeholders)
    strip_problem = prompt.get("strip_problem", False)
    if not isinstance(strip_problem, bool):
        raise c.fail("prompt.strip_problem", f"must be true or false, got {strip_problem!r}")
    code_prefix = prompt.get("code_prefix")
    if code_prefix is not None:
        if checker != "code":
            raise c.fail("prompt.code_prefix", "only for the code checker")
        code_prefix = c.template(code_prefix, "prompt.code_prefix", ("problem",), ())
    if options is not None and checker != "choice":
        raise c.fail("prompt.options", f"multiple-choice options need the choice checker, not '{checker}'")
    if options is None and checker == "choice":
        raise c.fail("prompt.options", "missing (the choice checker needs lettered options)")

    gold = c.mapping(data.get("gold") or {}, "gold", _GOLD_KEYS)
    number_after = c.string(gold.get("number_after"), "gold.number_after", optional=True)

    protocol = c.mapping(data["protocol"], "protocol", set(_PROTOCOL_KEYS), required=_PROTOCOL_KEYS)
    return BenchmarkSpec(
        name=str(name), description=str(c.string(data["description"], "description")),
        source=_source(c, data["source"]), size=c.integer(data["size"], "size"), columns=columns,
        template=template, checker=str(checker), extractor=extractor,
        num_samples=c.integer(protocol["num_samples"], "protocol.num_samples"),
        temperature=c.number(protocol["temperature"], "protocol.temperature", 0.0),
        top_p=c.number(protocol["top_p"], "protocol.top_p", 0.0, 1.0),
        max_tokens=c.integer(protocol["max_tokens"], "protocol.max_tokens"),
        strip_problem=strip_problem, gold_number_after=number_after, options=options, code_prefix=code_prefix,
        published=_published(c, data.get("published")), path=path,
    )


def load_definition(path: str | Path) -> BenchmarkSpec:
    """Read and check one definition file.

    Raises:
        BenchmarkError: unreadable YAML, or a definition that does not validate (naming the file and key).
    """
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise BenchmarkError(f"benchmark definition {path}: cannot be read: {err}") from err
    return parse_definition(data, path)
