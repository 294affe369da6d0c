"""Config of ``llmdistill build``: teacher traces -> verified, deduplicated, packed training shards.

:class:`BuildConfig` is composed from one small dataclass per step (input, verify, filter,
dedup, decontaminate, tokenize/pack, output) and one for where it runs (:class:`ScaleConfig`).
The command line stays flat (``--verifier math --max_length 4096``) because the parts are
mixed in, not nested.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llmdistill.checking.checkers import CHECKERS, checker_help
from llmdistill.config.base import ConfigError, check_choice, check_range, parse_json_field

INPUT_FORMATS = ("auto", "generation", "dataset")
VERIFIER_NAMES = tuple(CHECKERS)  # the answer-checking registry shared with eval
OVERLONG = ("drop", "split")


@dataclass
class BuildInputConfig:
    """Where the traces come from and which columns hold what."""

    input_path: str = field(
        default="",
        metadata={"help": "A generation/score output directory, a local .jsonl/.parquet file, or a hub dataset id "
                          "(a plain dataset is the SFT-only path: it has no teacher log-probs, so kd must be false)."},
    )
    input_format: str = field(
        default="auto",
        metadata={"help": "auto | generation | dataset. auto: a directory with llmdistill generation shards is "
                          "'generation', anything else 'dataset'."},
    )
    dataset_split: str = field(default="train", metadata={"help": "Split of a hub dataset (dataset input only)."})
    messages_column: str = field(
        default="messages",
        metadata={"help": "Dataset column holding chat messages; the last assistant message is the completion, the "
                          "messages before it the prompt. If absent, prompt_column/completion_column are used."},
    )
    prompt_column: str = field(default="prompt", metadata={"help": "Dataset column holding the prompt text."})
    completion_column: str = field(default="completion", metadata={"help": "Dataset column holding the completion text."})
    id_column: str = field(default="id", metadata={"help": "Dataset column with a prompt id (else a hash of the prompt)."})
    answer_column: str = field(
        default="answer", metadata={"help": "Column (passthrough of the generation input) holding the reference answer "
                                            "(verifiers math, numeric, exact, choice)."}
    )
    tests_column: str = field(
        default="tests", metadata={"help": "Column with the Python test code run against a program (verifier 'code')."}
    )

    def _check_input(self) -> None:
        if not self.input_path:
            raise ConfigError("input_path is required: a generation output directory, a .jsonl/.parquet file or a hub id")
        check_choice("input_format", self.input_format, INPUT_FORMATS)


@dataclass
class VerifyConfig:
    """Step 1: is the answer right?"""

    verifier: str = field(
        default="math",
        metadata={"help": "Checker of each completion's answer (the registry eval scores with): "
                          + checker_help() + "."},
    )
    code_timeout_s: float = field(default=10.0, metadata={"help": "Wall-clock limit of one program run (verifier 'code')."})
    code_memory_mb: int = field(default=1024, metadata={"help": "Address-space limit of one program run, MiB."})

    def _check_verify(self) -> None:
        check_choice("verifier", self.verifier, VERIFIER_NAMES)
        check_range("code_timeout_s", self.code_timeout_s, 0.1)
        check_range("code_memory_mb", self.code_memory_mb, 64)


@dataclass
class FilterConfig:
    """Step 2: rejection sampling — which traces are good enough to learn from."""

    keep_incorrect: bool = field(default=False, metadata={"help": "Keep traces the verifier rejects (label only)."})
    drop_truncated: bool = field(default=True, metadata={"help": "Drop completions that did not end on their own: finish_reason 'length' (the token limit) or 'unknown_token' (cut before an id the tokenizer lacks)."})
    require_think: bool = field(
        default=True,
        metadata={"help": "Drop completions without exactly one balanced <think>...</think> block followed by a "
                          "non-empty answer."},
    )
    min_completion_tokens: int = field(default=1, metadata={"help": "Drop completions shorter than this (tokens)."})
    max_completion_tokens: int | None = field(default=None, metadata={"help": "Drop completions longer than this (tokens)."})
    max_samples_per_prompt: int | None = field(
        default=None, metadata={"help": "Keep at most this many (correct) samples per prompt; None keeps all."}
    )
    min_pass_rate: float = field(
        default=0.0, metadata={"help": "Keep only prompts the teacher solves at least this often (e.g. 0.2)."}
    )
    max_pass_rate: float = field(
        default=1.0, metadata={"help": "Keep only prompts the teacher solves at most this often (drop trivial ones)."}
    )

    def _check_filter(self) -> None:
        check_range("min_completion_tokens", self.min_completion_tokens, 0)
        check_range("max_completion_tokens", self.max_completion_tokens, 1)
        check_range("max_samples_per_prompt", self.max_samples_per_prompt, 1)
        check_range("min_pass_rate", self.min_pass_rate, 0.0, 1.0)
        check_range("max_pass_rate", self.max_pass_rate, 0.0, 1.0)
        if self.min_pass_rate > self.max_pass_rate:
            raise ConfigError(f"min_pass_rate={self.min_pass_rate} > max_pass_rate={self.max_pass_rate}: empty window")
        if self.max_completion_tokens is not None and self.max_completion_tokens < self.min_completion_tokens:
            raise ConfigError("max_completion_tokens must be >= min_completion_tokens")


@dataclass
class DedupConfig:
    """Step 3: exact and near-duplicate removal on prompts and completions."""

    dedup_prompts: bool = field(default=True, metadata={"help": "Drop prompts that duplicate an earlier prompt (all their samples)."})
    dedup_completions: bool = field(default=True, metadata={"help": "Drop completions that duplicate an earlier completion."})
    dedup_completion_scope: str = field(
        default="prompt",
        metadata={"help": "prompt: a completion is a duplicate of another sample of the same prompt | global: of any "
                          "completion (drops valid pairs when different prompts share an answer text; runs as a Ray "
                          "Data groupby over exact hashes and MinHash LSH band keys, never one in-memory index)."},
    )
    near_dedup: bool = field(default=True, metadata={"help": "Also drop near-duplicates (MinHash LSH), not only exact ones."})
    dedup_threshold: float = field(default=0.9, metadata={"help": "Jaccard similarity of word shingles above which two texts are near-duplicates."})
    dedup_ngram: int = field(default=3, metadata={"help": "Words per shingle for near-duplicate detection."})
    minhash_num_perm: int = field(default=128, metadata={"help": "MinHash permutations (more: more exact, slower)."})

    def _check_dedup(self) -> None:
        check_choice("dedup_completion_scope", self.dedup_completion_scope, ("prompt", "global"))
        check_range("dedup_threshold", self.dedup_threshold, 0.05, 1.0)
        check_range("dedup_ngram", self.dedup_ngram, 1, 32)
        check_range("minhash_num_perm", self.minhash_num_perm, 8, 1024)


@dataclass
class DecontamConfig:
    """Step 4: drop training prompts that overlap evaluation problems."""

    decontam_benchmarks: list[str] = field(
        default_factory=list,
        metadata={"help": "Benchmarks (names in the eval registry) whose problems are removed from training data, "
                          "e.g. [aime24, math500]; default none (the tiny world's config names [tiny])."},
    )
    decontam_data_paths: str | None = field(
        default=None, metadata={"help": "JSON object {benchmark: local data path} for benchmarks that need files (YAML: a mapping)."}
    )
    decontam_extra_file: str | None = field(
        default=None,
        metadata={"help": "Extra problems to decontaminate against: .txt (one per line) or .jsonl with a "
                          "'problem', 'question' or 'prompt' field."},
    )
    decontam_ngram: int = field(
        default=8,
        metadata={"help": "Word n-gram length; a shared n-gram means contamination. Problems with fewer words are "
                          "matched as a whole."},
    )

    def _check_decontam(self) -> None:
        check_range("decontam_ngram", self.decontam_ngram, 1, 64)
        parse_json_field("decontam_data_paths", self.decontam_data_paths)


@dataclass
class PackConfig:
    """Steps 5-6: the student's tokens, the teacher signal, and packing."""

    student_tokenizer: str = field(default="", metadata={"help": "Path or hub id of the student's tokenizer (with its chat template)."})
    teacher_tokenizer: str | None = field(
        default=None, metadata={"help": "Teacher tokenizer; default: the teacher recorded in the generation shards."}
    )
    system_prompt: str | None = field(
        default=None,
        metadata={"help": "System message of the student's prompts (text or a file path). Default: the one recorded "
                          "in the generation manifest, so the student sees what the teacher saw."},
    )
    instruction_template: str | None = field(
        default=None,
        metadata={"help": "Template of the user turn with '{prompt}' (text or a file path). Default: the one "
                          "recorded in the generation manifest."},
    )
    kd: bool = field(default=True, metadata={"help": "Store the teacher's top-k for token-level KD (needs a generation input "
                                                     "and the same tokenizer for teacher and student)."})
    max_length: int = field(default=4096, metadata={"help": "Tokens per packed training sequence."})
    overlong: str = field(default="drop", metadata={"help": "drop | split: what to do with a trace longer than max_length."})
    allow_prompt_mismatch: bool = field(
        default=False,
        metadata={"help": "Warn instead of failing when the student's chat template gives other prompt tokens than "
                          "the teacher saw."},
    )
    codec_bits: int = field(default=12, metadata={"help": "Bits per quantised teacher log-prob (see llmdistill.codec)."})

    def _check_pack(self) -> None:
        if not self.student_tokenizer:
            raise ConfigError("student_tokenizer is required: the path (or hub id) of the student's tokenizer")
        check_range("max_length", self.max_length, 8)
        check_choice("overlong", self.overlong, OVERLONG)
        check_range("codec_bits", self.codec_bits, 4, 24)


@dataclass
class TeachersConfig:
    """Several same-vocabulary teachers' top-k on the same traces, merged into one top-k plus tail."""

    teachers: list[str] = field(
        default_factory=list,
        metadata={"help": "Teachers to merge, each 'name=path' of a `llmdistill score` (or generate) output of the same "
                          "traces (joined on prompt_id and sample_index), e.g. [big=runs/score-a, small=runs/score-b]. "
                          "Each position's target is the weighted mixture in probability space over the union of "
                          "their top-k ids; each teacher's unknown mass (1 - its top-k mass) stays in the tail, the "
                          "k largest entries are kept (k: the largest teacher k) and the rest joins the tail. "
                          "input_path (default: the first teacher's path) gives the traces' text and verdicts."},
    )
    teacher_weights: list[float] = field(
        default_factory=list,
        metadata={"help": "One weight per teacher (normalised to sum 1); empty: equal weights."},
    )
    teacher_route_column: str | None = field(
        default=None,
        metadata={"help": "Per-example routing: a column of the input (e.g. a passthrough 'domain') naming the teacher "
                          "whose top-k alone a trace uses; a null value uses the weighted mixture."},
    )

    def _check_teachers(self) -> None:
        names = [t.partition("=")[0].strip() for t in self.teachers]
        for entry, name in zip(self.teachers, names, strict=True):
            if not name or not entry.partition("=")[2].strip():
                raise ConfigError(f"teachers: '{entry}' must be 'name=path', e.g. big=runs/score-big")
        if len(set(names)) != len(names):
            raise ConfigError(f"teachers: names {names} repeat: give each teacher its own name")
        if self.teachers and len(self.teachers) < 2:
            raise ConfigError("teachers: name at least two to merge (one teacher: set input_path to its output)")
        if self.teacher_weights and len(self.teacher_weights) != len(self.teachers):
            raise ConfigError(f"teacher_weights has {len(self.teacher_weights)} values for {len(self.teachers)} "
                              "teachers: give one weight per teacher, or none for equal weights")
        if any(not w > 0 for w in self.teacher_weights):
            raise ConfigError(f"teacher_weights {self.teacher_weights}: every weight must be > 0")
        if self.teacher_route_column and not self.teachers:
            raise ConfigError("teacher_route_column needs teachers: name the teachers it routes between")

    @property
    def teacher_paths(self) -> dict[str, str]:
        """``teachers`` as {name: path}, in order."""
        return {n.strip(): p.strip() for n, _, p in (t.partition("=") for t in self.teachers)}

    @property
    def weights(self) -> list[float]:
        """The teachers' weights, normalised to sum 1."""
        raw = self.teacher_weights or [1.0] * len(self.teachers)
        return [w / sum(raw) for w in raw]


@dataclass
class ScaleConfig:
    """Where build runs and how it bounds its memory and its shards (see llmdistill.builder.cluster)."""

    workers: int | None = field(
        default=None,
        metadata={"help": "Parts processed at once, one CPU each. Default: the machine's cores (a local Ray is started "
                          "with that many CPUs), or all CPUs of the cluster given by ray_address."},
    )
    ray_address: str | None = field(
        default=None,
        metadata={"help": "Address of a running Ray cluster to run on (e.g. 10.0.0.1:6379); default: the RAY_ADDRESS "
                          "environment variable, else a local Ray. The output_dir must be on storage every node sees."},
    )
    part_mb: int = field(
        default=512,
        metadata={"help": "Work is split into parts of at most this many MB of a generation shard on disk (whole "
                          "Parquet row groups): the unit of parallelism and of resume."},
    )
    pack_window_tokens: int = field(
        default=2_000_000,
        metadata={"help": "Documents are packed best-fit within windows of about this many tokens of a part; a "
                          "worker holds one window (about 200 B per token at top-20)."},
    )
    max_shard_mb: int = field(default=256, metadata={"help": "Largest built shard, MB (one shard is written at a time)."})
    max_row_group_mb: int = field(default=64, metadata={"help": "Largest Parquet row group of a built shard, MB."})

    def _check_scale(self) -> None:
        check_range("workers", self.workers, 1)
        check_range("part_mb", self.part_mb, 1)
        check_range("pack_window_tokens", self.pack_window_tokens, 1)
        check_range("max_shard_mb", self.max_shard_mb, 1)
        check_range("max_row_group_mb", self.max_row_group_mb, 1)
        if self.max_row_group_mb > self.max_shard_mb:
            raise ConfigError(f"max_row_group_mb={self.max_row_group_mb} > max_shard_mb={self.max_shard_mb}: "
                              "a row group cannot be larger than its shard")


# fields that change where and how fast build runs, never what it writes (left out of the resume key)
OPERATIONAL_FIELDS = ("output_dir", "overwrite", "workers", "ray_address")


@dataclass
class BuildConfig(ScaleConfig, TeachersConfig, PackConfig, DecontamConfig, DedupConfig, FilterConfig, VerifyConfig, BuildInputConfig):
    """``llmdistill build``: verify, filter, dedup, decontaminate, tokenize and pack teacher traces."""

    output_dir: str = field(default="runs/build", metadata={"help": "Where the built shards, manifest and report go. "
                                                                    "A killed build resumes from .<output_dir>.tmp-*."})
    rows_per_shard: int = field(default=2000, metadata={"help": "Most packed sequences per Parquet shard "
                                                                "(max_shard_mb bounds its size too)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing output_dir."})
    seed: int = field(default=0, metadata={"help": "Seed of the MinHash permutations of near-duplicate detection. "
                                                   "(Which samples are kept per prompt is not random: the lowest "
                                                   "sample_index ones.)"})

    def __post_init__(self) -> None:
        self._check_teachers()
        if self.teachers and not self.input_path:
            self.input_path = next(iter(self.teacher_paths.values()))
        self._check_input()
        self._check_verify()
        self._check_filter()
        self._check_dedup()
        self._check_decontam()
        self._check_pack()
        if self.teachers and not self.kd:
            raise ConfigError("teachers merge the teachers' top-k for token-level KD: set kd: true, or drop teachers")
        self._check_scale()
        check_range("rows_per_shard", self.rows_per_shard, 1)

    @property
    def data_paths(self) -> dict[str, str]:
        """``decontam_data_paths`` decoded."""
        return parse_json_field("decontam_data_paths", self.decontam_data_paths)
