"""Configs of ``llmdistill generate`` and ``llmdistill score``.

Both are composed from small dataclasses, one per concern (where the prompts come from, how
they are formatted, the teacher engine, the servers, the output), mixed in so the command
line stays flat (``--model ... --temperature 0.6 --shard 3/8``).

The log-probs both commands store are the teacher's raw distribution at temperature 1,
whatever the sampling temperature: vLLM computes them before temperature and top-p.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from llmdistill.config.base import ConfigError, check_choice, check_range, parse_json_field
from llmdistill.vllm_runtime import DTYPES
from llmdistill.vllm_runtime import MODES as ENGINE_PROCESS_MODES

BACKENDS = ("offline", "server")
EXECUTOR_BACKENDS = ("mp", "ray", "uni", "external_launcher")
VLLM_DEFAULT_MAX_LOGPROBS = 20

# Fields that only change how a run is executed, not what it writes: a resumed run may change
# them. Every other field must match the run being resumed.
OPERATIONAL_FIELDS = frozenset({
    "output_dir", "flush_every", "flush_seconds", "max_in_flight", "max_prompts", "merge", "backend",
    "server_urls", "server_model", "concurrency_per_server", "progress_timeout", "max_retries", "retry_backoff",
    "health_interval", "stream_interval", "tensor_parallel_size", "pipeline_parallel_size",
    "distributed_executor_backend", "gpu_memory_utilization", "enforce_eager", "max_logprobs",
    "vllm_multiprocessing",
    # fields of earlier versions, so their runs can be resumed
    "batch_size", "max_concurrency", "request_timeout",
})


def parse_shard(spec: str) -> tuple[int, int]:
    """``"i/N"`` -> ``(i, N)`` with ``0 <= i < N``.

    Raises:
        ConfigError: the spec is not of that form.
    """
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec or "")
    if not match or int(match[1]) >= int(match[2]):
        raise ConfigError(f"shard={spec!r} must be 'i/N' with 0 <= i < N, e.g. '0/1' or '3/8'")
    return int(match[1]), int(match[2])


@dataclass
class PromptSourceConfig:
    """Where the prompts come from and which columns hold what."""

    dataset: str = field(
        default="",
        metadata={"help": "A hub dataset id (loaded with datasets.load_dataset) or a local .jsonl/.json/.parquet file."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Config name of a hub dataset."})
    dataset_split: str = field(default="train", metadata={"help": "Split of a hub dataset."})
    prompt_column: str = field(
        default="prompt",
        metadata={"help": "Column holding the prompt: plain text, or a list of chat messages ({role, content})."},
    )
    id_column: str | None = field(
        default=None,
        metadata={"help": "Column holding a unique prompt id; unset: a stable hash of the prompt is the id."},
    )
    passthrough_columns: list[str] = field(
        default_factory=list,
        metadata={"help": "Input columns copied to every output row (e.g. the reference 'answer')."},
    )
    max_prompts: int | None = field(
        default=None, metadata={"help": "Use only the first N rows of the input (smoke runs)."}
    )

    def _check_source(self) -> None:
        if not self.dataset:
            raise ConfigError("dataset is required: a hub dataset id or a local .jsonl/.json/.parquet file")
        if not self.prompt_column:
            raise ConfigError("prompt_column must name the input column that holds the prompt")
        check_range("max_prompts", self.max_prompts, 1)


@dataclass
class PromptFormatConfig:
    """How a prompt becomes the text the teacher sees."""

    use_chat_template: bool = field(
        default=True,
        metadata={"help": "Format prompts with the teacher tokenizer's chat template (and its generation prompt). "
                          "false: the prompt text is used as is (base models)."},
    )
    system_prompt: str | None = field(
        default=None, metadata={"help": "System message: the text itself or the path of a file holding it."}
    )
    instruction_template: str | None = field(
        default=None,
        metadata={"help": "Template of the user turn containing '{prompt}', e.g. '{prompt}\\nPlease reason step by "
                          "step, and put your final answer within \\\\boxed{}.'; or the path of a file holding it."},
    )


@dataclass
class EngineConfig:
    """The teacher and the vLLM engine that runs it."""

    model: str = field(default="", metadata={"help": "Teacher: a local checkpoint directory or a hub model id."})
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer path/id if not the model's."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the checkpoint."})
    dtype: str = field(default="auto", metadata={"help": f"Model dtype for vLLM: {' | '.join(DTYPES)}."})
    max_model_len: int | None = field(
        default=None,
        metadata={"help": "Context length; longer prompts are skipped and counted. Unset: the model's (offline) "
                          "or the server's."},
    )
    tensor_parallel_size: int = field(default=1, metadata={"help": "GPUs per model replica (tensor parallel)."})
    pipeline_parallel_size: int = field(default=1, metadata={"help": "Pipeline-parallel stages (multi-node)."})
    distributed_executor_backend: str | None = field(
        default=None, metadata={"help": "mp | ray | uni | external_launcher; ray for multi-node. Unset: vLLM picks."}
    )
    gpu_memory_utilization: float = field(default=0.9, metadata={"help": "Fraction of GPU memory vLLM may use."})
    enforce_eager: bool = field(default=False, metadata={"help": "Disable CUDA graphs / torch.compile (faster start)."})
    max_logprobs: int | None = field(
        default=None,
        metadata={"help": "The engine's cap on top-k log-probs (vLLM max_logprobs). Offline: passed to the engine, "
                          "unset means logprobs_top_k. Server: the --max-logprobs the servers run with, unset means "
                          "vLLM's default 20."},
    )
    engine_kwargs: str | None = field(
        default=None,
        metadata={"help": "Further vllm.LLM keyword arguments as a JSON object, e.g. '{\"max_num_seqs\": 512}'."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the engine's sampling."})
    max_in_flight: int | None = field(
        default=None,
        metadata={"help": "Offline: sequences handed to the engine at once; a new one is added as one finishes, so "
                          "memory does not grow with the number of prompts. Unset: 2 x the engine's max_num_seqs "
                          "(vLLM's own choice for its offline pooling), enough to keep the scheduler full."},
    )
    vllm_multiprocessing: str = field(
        default="auto",
        metadata={"help": "auto | on | off: vLLM's engine core in its own process (on, vLLM's default) or in this "
                          "one (off). auto: off when vLLM runs on CPU (faster there), vLLM's default elsewhere."},
    )

    def _check_engine(self) -> None:
        if not self.model:
            raise ConfigError("model is required: the teacher's checkpoint directory or hub id")
        check_choice("dtype", self.dtype, DTYPES)
        check_range("max_model_len", self.max_model_len, 2)
        check_range("tensor_parallel_size", self.tensor_parallel_size, 1)
        check_range("pipeline_parallel_size", self.pipeline_parallel_size, 1)
        check_choice("vllm_multiprocessing", self.vllm_multiprocessing, ENGINE_PROCESS_MODES)
        if self.distributed_executor_backend is not None:
            check_choice("distributed_executor_backend", self.distributed_executor_backend, EXECUTOR_BACKENDS)
        check_range("gpu_memory_utilization", self.gpu_memory_utilization, 0.01, 1.0)
        check_range("max_logprobs", self.max_logprobs, 0)
        check_range("max_in_flight", self.max_in_flight, 1)
        self.engine_kwargs_dict  # noqa: B018 - fails fast on malformed JSON

    @property
    def engine_kwargs_dict(self) -> dict:
        """``engine_kwargs`` decoded."""
        return parse_json_field("engine_kwargs", self.engine_kwargs)


@dataclass
class ServerConfig:
    """``backend: server``: a pool of OpenAI-compatible vLLM servers instead of an in-process engine."""

    backend: str = field(
        default="offline",
        metadata={"help": "offline: an in-process vLLM engine | server: requests to running vLLM servers."},
    )
    server_urls: list[str] = field(
        default_factory=list, metadata={"help": "Base URLs of the servers, e.g. http://node1:8000 (backend server)."}
    )
    server_model: str | None = field(
        default=None, metadata={"help": "Model name the servers serve (--served-model-name). Unset: model."}
    )
    concurrency_per_server: int | None = field(
        default=None,
        metadata={"help": "Requests in flight per server. Unset: read from the server (max_num_seqs x data-parallel "
                          "size, from /server_info, which vLLM serves with VLLM_SERVER_DEV_MODE=1), else 64. Set it "
                          "to the servers' --max-num-seqs divided by the number of clients sharing them."},
    )
    progress_timeout: float = field(
        default=600.0,
        metadata={"help": "Seconds without a new token (score: without the answer) after which a request has failed "
                          "and is retried on another server. Waiting in a server's queue does not count; a server "
                          "whose requests all stall that long is taken out of the pool."},
    )
    max_retries: int = field(
        default=5, metadata={"help": "Retries of one failed request (connection, stall, HTTP 5xx/429), each on "
                                     "another server when there is one. Only the failed request is retried."}
    )
    retry_backoff: float = field(default=1.0, metadata={"help": "First retry delay in seconds; doubles each retry."})
    health_interval: float = field(
        default=10.0,
        metadata={"help": "Seconds between health checks (GET /health) of each server. A server that fails one is "
                          "taken out of the pool and its requests go to the others; it rejoins when healthy."},
    )
    stream_interval: int = field(
        default=16,
        metadata={"help": "Tokens per streamed chunk (vLLM's per-request stream_interval): fewer, larger chunks "
                          "cost the server and the client less per token."},
    )

    def _check_server(self) -> None:
        check_choice("backend", self.backend, BACKENDS)
        if self.backend == "server" and not self.server_urls:
            raise ConfigError("backend 'server' needs server_urls, e.g. --server_urls http://127.0.0.1:8000")
        check_range("concurrency_per_server", self.concurrency_per_server, 1)
        check_range("progress_timeout", self.progress_timeout, 0.1)
        check_range("max_retries", self.max_retries, 0)
        check_range("retry_backoff", self.retry_backoff, 0.0)
        check_range("health_interval", self.health_interval, 0.1)
        check_range("stream_interval", self.stream_interval, 1)


@dataclass
class OutputConfig:
    """Where the shards go, how the work is split, and top-k size."""

    output_dir: str = field(default="runs/generate", metadata={"help": "Directory of the Parquet shards and manifest.json."})
    logprobs_top_k: int = field(
        default=20,
        metadata={"help": "Top-k log-probs stored per completion token (raw, T = 1). 0 stores only the "
                          "log-prob of each completion token."},
    )
    flush_every: int = field(
        default=512,
        metadata={"help": "The most finished completions a kill can lose: completions are written as they finish, "
                          "a shard of flush_every / 2 at a time (atomically, in the background, while the next half "
                          "fills). See flush_seconds; whichever comes first."},
    )
    flush_seconds: float = field(
        default=120.0,
        metadata={"help": "The longest a finished completion stays unwritten (a shard is written every "
                          "flush_seconds / 2 at least): what a kill can lose, in time. See flush_every."},
    )
    shard: str = field(
        default="0/1",
        metadata={"help": "'i/N': this job handles part i of N of the prompts (by hash of the id), written to "
                          "output_dir/shard-i-of-N. Run N jobs, then once with --merge true."},
    )
    merge: bool = field(
        default=False,
        metadata={"help": "Do not generate: check that all N parts in output_dir are complete and write the "
                          "merged manifest.json."},
    )

    def _check_output(self) -> None:
        if not self.output_dir:
            raise ConfigError("output_dir is required")
        check_range("logprobs_top_k", self.logprobs_top_k, 0)
        check_range("flush_every", self.flush_every, 1)
        check_range("flush_seconds", self.flush_seconds, 0.0)
        parse_shard(self.shard)

    @property
    def shard_index_count(self) -> tuple[int, int]:
        """``shard`` as ``(i, N)``."""
        return parse_shard(self.shard)


def _check_topk_cap(cfg: EngineConfig | ServerConfig | OutputConfig) -> None:
    cap = cfg.max_logprobs
    if cap is None:
        cap = VLLM_DEFAULT_MAX_LOGPROBS if cfg.backend == "server" else cfg.logprobs_top_k
    if cfg.logprobs_top_k > cap:
        fix = ("start the servers with --max-logprobs and set max_logprobs to match" if cfg.backend == "server"
               else "raise max_logprobs")
        raise ConfigError(f"logprobs_top_k={cfg.logprobs_top_k} exceeds the engine's max_logprobs={cap}: "
                          f"lower logprobs_top_k or {fix}")


REWRITE_PLACEHOLDERS = ("{prompt}", "{reference}")
DEFAULT_REWRITE_TEMPLATE = ("{prompt}\n\nA reference solution:\n{reference}\n\nSolve the problem again in your own words "
                            "and give the same final answer.")


@dataclass
class RewriteConfig:
    """Self-generated targets (SDFT): the model rewrites the reference answers of an SFT set in its own words."""

    rewrite_column: str | None = field(
        default=None,
        metadata={"help": "SDFT mode: the input column holding each prompt's reference answer. The model reads "
                          "rewrite_template (the prompt and this reference) and samples its own version; the stored "
                          "prompt stays the original one, so `build` (kd: false) verifies the rewrites against "
                          "answer_column and trains on (prompt -> the model's own words)."},
    )
    rewrite_template: str = field(
        default=DEFAULT_REWRITE_TEMPLATE,
        metadata={"help": "User turn of a rewrite request with '{prompt}' and '{reference}' (text or a file path); "
                          "system_prompt, instruction_template and the chat template apply around it."},
    )

    def _check_rewrite(self) -> None:
        from llmdistill.prompts import read_text_or_file

        template = read_text_or_file(self.rewrite_template) or ""
        missing = [p for p in REWRITE_PLACEHOLDERS if p not in template]
        if self.rewrite_column and missing:
            raise ConfigError(f"rewrite_template must contain {' and '.join(missing)}; got {template[:80]!r}")


@dataclass
class GenerateConfig(OutputConfig, ServerConfig, EngineConfig, PromptFormatConfig, RewriteConfig, PromptSourceConfig):
    """``llmdistill generate``: the teacher samples completions and keeps its top-k log-probs per token."""

    num_samples: int = field(default=4, metadata={"help": "Completions sampled per prompt."})
    temperature: float = field(default=0.6, metadata={"help": "Sampling temperature (log-probs stay raw, T = 1)."})
    top_p: float = field(default=0.95, metadata={"help": "Nucleus sampling mass."})
    max_tokens: int = field(default=4096, metadata={"help": "Maximum completion tokens."})

    def __post_init__(self) -> None:
        self._check_output()
        if self.merge:  # merging only reads output_dir
            return
        self._check_source()
        self._check_engine()
        self._check_server()
        _check_topk_cap(self)
        self._check_rewrite()
        check_range("num_samples", self.num_samples, 1)
        check_range("temperature", self.temperature, 0.0)
        check_range("top_p", self.top_p, 1e-6, 1.0)
        check_range("max_tokens", self.max_tokens, 1)


@dataclass
class ScoreConfig(OutputConfig, ServerConfig, EngineConfig, PromptFormatConfig, PromptSourceConfig):
    """``llmdistill score``: the teacher's top-k log-probs on existing (prompt, completion) pairs, by one prefill."""

    output_dir: str = field(default="runs/score", metadata={"help": "Directory of the Parquet shards and manifest.json."})
    completion_column: str | None = field(
        default="completion",
        metadata={"help": "Column holding the completion text. Unset: prompt_column holds chat messages whose last "
                          "(assistant) turn is the completion."},
    )
    sample_index_column: str | None = field(
        default=None,
        metadata={"help": "Column holding the sample index. Unset: 0, 1, ... over the rows sharing a prompt id."},
    )
    append_eos: bool = field(
        default=True,
        metadata={"help": "Score the tokenizer's EOS token after the completion (the completion ends the turn)."},
    )

    def __post_init__(self) -> None:
        self._check_output()
        if self.merge:
            return
        self._check_source()
        self._check_engine()
        self._check_server()
        _check_topk_cap(self)
