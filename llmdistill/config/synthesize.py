"""Config of ``llmdistill synthesize``: the teacher writes the prompts (data-free distillation).

Composed, like generate's, from small dataclasses mixed in so the command line stays flat: the
teacher engine and server pool are generate's own (:class:`~llmdistill.config.generate.EngineConfig`,
:class:`~llmdistill.config.generate.ServerConfig`), dedup and decontamination settings are
build's (:class:`~llmdistill.config.build.DecontamConfig`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llmdistill.checking.checkers import CHECKERS, checker_help
from llmdistill.config.base import ConfigError, check_choice, check_range
from llmdistill.config.build import DecontamConfig
from llmdistill.config.generate import EngineConfig, ServerConfig, parse_shard
from llmdistill.prompts import read_text_or_file

MODES = ("magpie", "seeded")
# (temperature, top_p) of query writing per mode when unset: Magpie samples the user turn at
# T = 1 (its diversity is the point); seeded writing follows instructions, a little cooler.
MODE_SAMPLING = {"magpie": (1.0, 1.0), "seeded": (0.8, 0.95)}
SCRIPTS = ("any", "latin", "cyrillic", "greek", "cjk", "arabic")
DEFAULT_SEEDED_TEMPLATE = (
    "Here are some example questions:\n\n{examples}\n\nWrite one new question of the same kind, on a different "
    "subject. Reply with the question only."
)
DEFAULT_EVOLVE_TEMPLATE = (
    "Rewrite the following question so that it is harder or more specific: add a constraint, a step or a "
    "detail, and keep it answerable with one final answer. Reply with the rewritten question only.\n\n{question}"
)


@dataclass
class QueryWritingConfig:
    """How the teacher writes queries: the mode, its prompt and its sampling settings.

    Every prompt is rendered with the teacher tokenizer's chat template (Magpie needs its user-turn header).
    """

    mode: str = field(
        default="magpie",
        metadata={"help": "magpie: the chat template rendered up to the start of the user turn, the teacher writes "
                          "the user message | seeded: few-shot from seed_file, then evolve_steps rewrites."},
    )
    num_queries: int = field(default=1000, metadata={"help": "Queries to write (all parts together), before filters."})
    system_prompt: str | None = field(
        default=None, metadata={"help": "System message ahead of the user turn (text or a file path)."}
    )
    seed_file: str | None = field(
        default=None,
        metadata={"help": "seeded: example queries, .txt (one per line) or .jsonl with a 'prompt', 'question' or "
                          "'problem' field."},
    )
    num_examples: int = field(default=3, metadata={"help": "seeded: seed queries shown per request."})
    seeded_template: str = field(
        default=DEFAULT_SEEDED_TEMPLATE,
        metadata={"help": "seeded: the user turn asking for a new query, with '{examples}' (text or a file path)."},
    )
    evolve_steps: int = field(
        default=0, metadata={"help": "Rewrites of each query that make it harder or more specific (Evol-Instruct)."}
    )
    evolve_template: str = field(
        default=DEFAULT_EVOLVE_TEMPLATE,
        metadata={"help": "The user turn asking for a rewrite, with '{question}' (text or a file path)."},
    )
    temperature: float | None = field(
        default=None, metadata={"help": "Query sampling temperature. Unset: the mode's (magpie 1.0, seeded 0.8)."}
    )
    top_p: float | None = field(
        default=None, metadata={"help": "Query nucleus mass. Unset: the mode's (magpie 1.0, seeded 0.95)."}
    )
    max_query_tokens: int = field(
        default=512, metadata={"help": "Most tokens of one written query; a query cut at this limit is dropped."}
    )

    def _check_writing(self) -> None:
        check_choice("mode", self.mode, MODES)
        check_range("num_queries", self.num_queries, 1)
        check_range("num_examples", self.num_examples, 1)
        check_range("evolve_steps", self.evolve_steps, 0, 8)
        check_range("temperature", self.temperature, 0.0)
        check_range("top_p", self.top_p, 1e-6, 1.0)
        check_range("max_query_tokens", self.max_query_tokens, 1)
        if self.mode == "seeded" and not self.seed_file:
            raise ConfigError("mode 'seeded' needs seed_file: a .txt (one query per line) or .jsonl of examples")
        for name, slot in (("seeded_template", "{examples}"), ("evolve_template", "{question}")):
            if slot not in read_text_or_file(getattr(self, name)):
                raise ConfigError(f"{name} must contain '{slot}' (inline, or in the file it names)")

    @property
    def sampling(self) -> tuple[float, float]:
        """(temperature, top_p) of query writing: the configured ones, else the mode's."""
        temperature, top_p = MODE_SAMPLING[self.mode]
        return (temperature if self.temperature is None else self.temperature,
                top_p if self.top_p is None else self.top_p)


@dataclass
class QueryFilterConfig:
    """Length and language checks, and the solvability filter (answer agreement)."""

    min_query_tokens: int = field(default=4, metadata={"help": "Drop queries shorter than this (teacher tokens)."})
    script: str = field(
        default="latin",
        metadata={"help": f"Language check: the writing system of the queries ({' | '.join(SCRIPTS)}; any: no check)."},
    )
    min_script_fraction: float = field(
        default=0.9, metadata={"help": "Drop queries whose letters are less than this fraction in that script."}
    )
    checker: str = field(
        default="math",
        metadata={"help": f"How an answer is read for the agreement vote (the shared checker): {checker_help()}."},
    )
    num_answers: int = field(default=4, metadata={"help": "Solvability: the teacher answers each query this many times."})
    min_agreement: float = field(
        default=0.75,
        metadata={"help": "Keep a query when its most common answer has at least this share of the num_answers; "
                          "that answer becomes the 'answer' column (build's reference). 0 disables the filter."},
    )
    answer_template: str | None = field(
        default=None,
        metadata={"help": "User-turn template of the answering prompt with '{prompt}' (text or a file path); use the "
                          "instruction_template generate will use. Unset: the query as is."},
    )
    near_dedup: bool = field(default=True, metadata={"help": "Also drop near-duplicate queries (MinHash LSH, build's)."})
    dedup_threshold: float = field(
        default=0.9, metadata={"help": "Jaccard similarity of word shingles above which two queries are near-duplicates."}
    )
    dedup_ngram: int = field(default=3, metadata={"help": "Words per shingle for near-duplicate detection."})
    minhash_num_perm: int = field(default=128, metadata={"help": "MinHash permutations (more: more exact, slower)."})
    answer_temperature: float = field(default=0.6, metadata={"help": "Sampling temperature of the answers."})
    answer_top_p: float = field(default=0.95, metadata={"help": "Nucleus mass of the answers."})
    answer_max_tokens: int = field(default=4096, metadata={"help": "Most tokens of one answer."})

    def _check_filters(self) -> None:
        check_range("min_query_tokens", self.min_query_tokens, 1)
        check_choice("script", self.script, SCRIPTS)
        check_range("min_script_fraction", self.min_script_fraction, 0.0, 1.0)
        check_choice("checker", self.checker, tuple(CHECKERS))
        if self.min_agreement > 0 and not CHECKERS[self.checker].votes:
            raise ConfigError(f"checker '{self.checker}' gives no answer to vote on: pick one of "
                              f"{[n for n, c in CHECKERS.items() if c.votes]} or set min_agreement: 0")
        check_range("num_answers", self.num_answers, 1)
        check_range("min_agreement", self.min_agreement, 0.0, 1.0)
        check_range("dedup_threshold", self.dedup_threshold, 0.05, 1.0)
        check_range("dedup_ngram", self.dedup_ngram, 1, 32)
        check_range("minhash_num_perm", self.minhash_num_perm, 8, 1024)
        check_range("answer_temperature", self.answer_temperature, 0.0)
        check_range("answer_top_p", self.answer_top_p, 1e-6, 1.0)
        check_range("answer_max_tokens", self.answer_max_tokens, 1)


@dataclass
class SynthesisOutputConfig:
    """Where the prompts go and how the work is split."""

    output_dir: str = field(
        default="runs/synthesize",
        metadata={"help": "Directory of prompts.jsonl (generate's input), report.md and manifest.json."},
    )
    shard: str = field(
        default="0/1",
        metadata={"help": "'i/N': this job writes queries i, i+N, i+2N, ... to output_dir/shard-i-of-N. Run N jobs, "
                          "then once with --merge true."},
    )
    merge: bool = field(
        default=False,
        metadata={"help": "Do not synthesize: check that all N parts are complete, drop duplicates across parts and "
                          "write output_dir/prompts.jsonl and the merged manifest."},
    )
    flush_every: int = field(
        default=256, metadata={"help": "Finished queries or answers written at a time: the most a kill can lose."}
    )

    def _check_output(self) -> None:
        if not self.output_dir:
            raise ConfigError("output_dir is required")
        parse_shard(self.shard)
        check_range("flush_every", self.flush_every, 1)

    @property
    def shard_index_count(self) -> tuple[int, int]:
        """``shard`` as ``(i, N)``."""
        return parse_shard(self.shard)


@dataclass
class SynthesizeConfig(SynthesisOutputConfig, DecontamConfig, QueryFilterConfig, QueryWritingConfig,
                       ServerConfig, EngineConfig):
    """``llmdistill synthesize``: the teacher writes prompts, filtered and given agreed reference answers."""

    def __post_init__(self) -> None:
        self._check_output()
        if self.merge:  # merging only reads output_dir
            return
        self._check_engine()
        self._check_server()
        self._check_writing()
        self._check_filters()
        self._check_decontam()
