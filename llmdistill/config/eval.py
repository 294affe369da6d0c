"""``EvalConfig``: the public API of ``llmdistill eval``."""

from __future__ import annotations

from dataclasses import dataclass, field

from llmdistill.config.base import ConfigError, check_choice, check_range, parse_json_field
from llmdistill.vllm_runtime import DTYPES
from llmdistill.vllm_runtime import MODES as ENGINE_PROCESS_MODES


def split_list(text: str) -> list[str]:
    """``"a, b,c"`` -> ``["a", "b", "c"]``."""
    return [part.strip() for part in text.split(",") if part.strip()]


@dataclass
class EvalConfig:
    """Benchmark one or more models with the R1 sampling protocol (or the tiny world's)."""

    models: str = field(default="", metadata={
        "help": "Comma-separated models: hub ids, local checkpoints, or LoRA adapter directories "
                "(detected by adapter_config.json). Evaluated one engine at a time."})
    benchmarks: str = field(default="tiny", metadata={
        "help": "Comma-separated benchmark names: the files of llmdistill/benchmarks/definitions/ (tiny, math500, "
                "aime24, gpqa_diamond, humaneval, ...; an unknown name lists them all)."})
    output_dir: str = field(default="runs/eval", metadata={"help": "Where details, results and the report go."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing non-empty output_dir."})
    reference_model: str | None = field(default=None, metadata={
        "help": "The teacher among models: every other model's compression ratio (its parameters against the "
                "teacher's) and accuracy retained (its pass@1 over the teacher's) are reported against it."})
    data_path: str | None = field(default=None, metadata={
        "help": "Local copy of the (single) benchmark: .jsonl/.jsonl.gz/.json/.parquet/.csv."})
    column_map: str | None = field(default=None, metadata={
        "help": 'JSON mapping our fields to data_path columns, e.g. \'{"problem": "question"}\'.'})
    limit: int | None = field(default=None, metadata={"help": "Evaluate only the first N problems per benchmark."})
    num_samples: int | None = field(default=None, metadata={
        "help": "Samples per problem (default per benchmark: 64 AIME, 4 MATH-500, 8 GPQA, 4 tiny)."})
    temperature: float | None = field(default=None, metadata={"help": "Sampling temperature (default 0.6)."})
    top_p: float | None = field(default=None, metadata={"help": "Nucleus sampling top-p (default 0.95)."})
    max_tokens: int | None = field(default=None, metadata={
        "help": "Max new tokens per response (default 32768; 96 for tiny)."})
    k_values: str = field(default="", metadata={
        "help": "Comma-separated k for pass@k and maj@k (default: powers of 2 below n, and n)."})
    system_prompt: str | None = field(default=None, metadata={"help": "Optional system message for every prompt."})
    seed: int = field(default=0, metadata={
        "help": "Sampling seed. It seeds the engine (LLM(seed=...)) and, on GPU, every request too "
                "(SamplingParams.seed); on vLLM's CPU backend per-request seeds crash the engine, so there only "
                "the engine-wide seed is used."})
    dtype: str = field(default="auto", metadata={"help": f"Model dtype for vLLM: {' | '.join(DTYPES)}."})
    max_model_len: int | None = field(default=None, metadata={
        "help": "vLLM context length (default: the model's); small values shrink the KV cache."})
    enforce_eager: bool = field(default=False, metadata={
        "help": "Skip CUDA graphs / compilation: much faster engine start, slower decoding."})
    gpu_memory_utilization: float = field(default=0.9, metadata={"help": "vLLM GPU memory fraction."})
    kv_cache_space_gb: int | None = field(default=None, metadata={
        "help": "CPU only: KV cache size in GiB (sets VLLM_CPU_KVCACHE_SPACE when it is not set)."})
    tensor_parallel_size: int = field(default=1, metadata={"help": "vLLM tensor parallel size."})
    vllm_multiprocessing: str = field(default="auto", metadata={
        "help": "auto | on | off: vLLM's engine core in its own process (on) or in this one (off). auto: off when "
                "vLLM runs on CPU (faster there), vLLM's default elsewhere."})
    lora_mode: str = field(default="vllm", metadata={
        "help": "How LoRA adapters are served: 'vllm' (enable_lora + LoRARequest) or 'merge' "
                "(merge into the base with peft, in a temp dir)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the hub."})
    code_timeout_s: float = field(default=10.0, metadata={"help": "Per-program timeout of code benchmarks."})
    code_memory_mb: int = field(default=1024, metadata={"help": "Per-program memory limit of code benchmarks."})
    code_workers: int = field(default=2, metadata={"help": "Code programs run concurrently."})
    plot: bool = field(default=True, metadata={"help": "Write results.png (bar chart with error bars)."})

    def __post_init__(self) -> None:
        from llmdistill.benchmarks import BenchmarkError, parse_names

        try:
            names = parse_names(self.benchmarks)
        except BenchmarkError as err:
            raise ConfigError(str(err)) from None
        if not names:
            raise ConfigError("benchmarks is empty: name at least one, e.g. --benchmarks tiny")
        if self.data_path and len(names) != 1:
            raise ConfigError(f"data_path holds one benchmark, but benchmarks={self.benchmarks!r} names {len(names)}")
        parse_json_field("column_map", self.column_map)  # fail on bad JSON now, not mid-run
        check_range("limit", self.limit, 1)
        check_range("num_samples", self.num_samples, 1)
        check_range("temperature", self.temperature, 0.0)
        check_range("top_p", self.top_p, 0.0, 1.0)
        check_range("max_tokens", self.max_tokens, 1)
        check_range("max_model_len", self.max_model_len, 1)
        check_range("gpu_memory_utilization", self.gpu_memory_utilization, 0.01, 1.0)
        check_range("kv_cache_space_gb", self.kv_cache_space_gb, 1)
        check_range("tensor_parallel_size", self.tensor_parallel_size, 1)
        check_range("code_timeout_s", self.code_timeout_s, 0.1)
        check_range("code_memory_mb", self.code_memory_mb, 64)
        check_range("code_workers", self.code_workers, 1)
        check_choice("lora_mode", self.lora_mode, ("vllm", "merge"))
        check_choice("vllm_multiprocessing", self.vllm_multiprocessing, ENGINE_PROCESS_MODES)
        check_choice("dtype", self.dtype, DTYPES)
        for k in self.ks:
            check_range("k_values", k, 1)
        self._check_ks_fit(names)
        if self.reference_model and self.reference_model not in self.model_list:
            raise ConfigError(f"reference_model {self.reference_model} is not one of models: add it to models "
                              "(the teacher is evaluated beside its students)")

    def _check_ks_fit(self, names: list[str]) -> None:
        """pass@k and maj@k need k <= n samples per problem: refuse a k no benchmark can report."""
        from llmdistill.benchmarks import get_spec

        for name in names:
            n = self.num_samples or get_spec(name).num_samples
            too_big = [k for k in self.ks if k > n]
            if too_big:
                raise ConfigError(f"k_values {too_big} exceed the {n} sample(s) per problem of benchmark '{name}': "
                                  f"pass@k needs k <= n; lower k_values or raise num_samples")

    @property
    def model_list(self) -> list[str]:
        return split_list(self.models)

    @property
    def benchmark_list(self) -> list[str]:
        return split_list(self.benchmarks)

    @property
    def column_map_dict(self) -> dict[str, str]:
        return parse_json_field("column_map", self.column_map)

    @property
    def ks(self) -> list[int]:
        try:
            return [int(k) for k in split_list(self.k_values)]
        except ValueError:
            raise ConfigError(f"k_values={self.k_values!r} must be comma-separated integers, e.g. 1,8,64") from None
