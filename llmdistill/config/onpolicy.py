"""Config of ``llmdistill onpolicy``: the student samples, the teacher grades every token, the student learns.

:class:`OnPolicyConfig` is composed from one small dataclass per concern (prompts, teachers,
rollouts, loss, optimisation); the command line stays flat (``--objective reverse_kl``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from llmdistill.checking.checkers import CHECKERS
from llmdistill.config.base import (
    CheckpointRef,
    ConfigError,
    check_choice,
    check_range,
    normalize_resume,
)
from llmdistill.config.generate import VLLM_DEFAULT_MAX_LOGPROBS
from llmdistill.config.lora import LoraSettings
from llmdistill.vllm_runtime import DTYPES, VLLM_LORA_RANKS

ROLLOUT_BACKENDS = ("vllm", "server", "transformers")
LORA_ROLLOUTS = ("adapter", "merged")
MAX_VLLM_LORA_RANK = VLLM_LORA_RANKS[-1]  # the largest max_lora_rank vLLM accepts
TEACHER_BACKENDS = ("transformers", "vllm", "server")
OBJECTIVES = ("reverse_kl", "jsd", "sampled_reverse_kl")
TOPK_OBJECTIVES = ("reverse_kl", "jsd")  # the divergences an offline batch (teacher top-k, no sampled log-prob) supports
ANSWER_CHECKERS = tuple(name for name, c in CHECKERS.items() if c.needs == "answer")  # the reward's: answer column


@dataclass
class PromptsConfig:
    """The prompt stream the student answers (read once, then drawn in a seeded order)."""

    dataset: str = field(default="", metadata={
        "help": "Prompts: a local .jsonl/.json/.parquet file (one row per prompt) or a hub dataset id."})
    dataset_config: str | None = field(default=None, metadata={"help": "Config name of a hub dataset."})
    dataset_split: str = field(default="train", metadata={"help": "Split of a hub dataset."})
    prompt_column: str = field(default="prompt", metadata={"help": "Column with the prompt (text or chat messages)."})
    id_column: str | None = field(default="id", metadata={"help": "Column with a prompt id (else a hash of the prompt)."})
    answer_column: str | None = field(default="answer", metadata={
        "help": "Column with the reference answer, for the answer-checker reward (reward_weight > 0) and the logs."})
    system_prompt: str | None = field(default=None, metadata={"help": "System message (text or a file path)."})
    instruction_template: str | None = field(default=None, metadata={
        "help": "User-turn template with '{prompt}' (text or a file path)."})
    use_chat_template: bool = field(default=True, metadata={"help": "Render prompts with the student's chat template."})


@dataclass
class TeachersConfig:
    """Who grades the student's tokens."""

    teacher_model: str = field(default="", metadata={
        "help": "The teacher (path or hub id). Several teachers, one per domain: 'name=path,name=path' with "
                "teacher_column naming each prompt's teacher. They must share the student's tokenizer."})
    teacher_column: str | None = field(default=None, metadata={
        "help": "Prompt column holding the teacher name of each prompt (multi-teacher routing)."})
    teacher_backend: str = field(default="transformers", metadata={
        "help": "transformers: the teacher runs in this process, one prefill forward per step (small teachers) | "
                "vllm: an in-process vLLM engine of the teacher scores each sample by one prompt_logprobs prefill "
                "(the score stage's offline engine), beside the student on its device | "
                "server: a pool of `vllm serve` servers (teacher_urls) scores each sample by one prompt_logprobs "
                "request over prompt + completion, the `llmdistill score` code path; teacher_model is then the "
                "model name the servers serve."})
    teacher_urls: list[str] = field(default_factory=list, metadata={
        "help": "teacher_backend server: base URLs of the teacher's vLLM servers, e.g. http://node1:8000. With "
                "several teachers, each URL is 'name=url' for the teacher it serves."})
    teacher_max_logprobs: int | None = field(default=None, metadata={
        "help": f"teacher_backend server: the --max-logprobs the servers run with (unset: vLLM's default "
                f"{VLLM_DEFAULT_MAX_LOGPROBS}); logprobs_top_k may not exceed it."})
    teacher_server_gpus: int | None = field(default=None, metadata={
        "help": "teacher_backend server: GPUs each teacher server holds (its tensor x pipeline parallel size). The "
                "client does not use it: the dry-run plan counts GPUs with it, and the recipe's test checks it "
                "against the job that starts the servers."})
    teacher_timeout: float = field(default=600.0, metadata={
        "help": "teacher_backend server: seconds to wait for a server to answer /health at the start, and for a "
                "scoring reply before it is retried on another server."})
    teacher_dtype: str = field(default="float32", metadata={"help": "Teacher weights dtype (float32 | bfloat16)."})
    teacher_gpu_memory_utilization: float = field(default=0.3, metadata={
        "help": "teacher_backend vllm: GPU memory fraction of the teacher's in-process engine (the trainer and the "
                "rollout engine share the GPU)."})
    logprobs_top_k: int = field(default=20, metadata={
        "help": "Teacher log-probs kept per completion token (the top-k plus one tail bucket form the loss support)."})


@dataclass
class RolloutConfig:
    """How the current student samples."""

    rollout_backend: str = field(default="vllm", metadata={
        "help": "vllm: an in-process vLLM engine holding a copy of the student, weights synced every sync_every "
                "steps | server: the student's own vLLM servers (rollout_urls), weights synced through "
                "rollout_sync_dir | transformers: model.generate on the training weights (no copy, no sync)."})
    lora_rollouts: str = field(default="adapter", metadata={
        "help": "use_peft: how the rollout engine gets the LoRA student | adapter: it holds the base weights and "
                "loads the adapter as a vLLM LoRA at every sync (the adapter, not the model; vLLM's LoRA kernels "
                "in generation) | merged: base + adapter delta loaded as plain weights (the whole model at every "
                "sync; plain generation)."})
    rollout_urls: list[str] = field(default_factory=list, metadata={
        "help": "rollout_backend server: base URLs of vLLM servers of the student, started with "
                "VLLM_SERVER_DEV_MODE=1 (their /collective_rpc reloads the weights), e.g. "
                "'VLLM_SERVER_DEV_MODE=1 vllm serve <student_model> --port 8001'."})
    rollout_sync_dir: str | None = field(default=None, metadata={
        "help": "rollout_backend server: where each sync writes the student's weights (safetensors) for the servers "
                "to reload; it must be a path the servers see (a shared filesystem across nodes). Unset: "
                "output_dir/rollout-weights."})
    rollout_server_gpus: int | None = field(default=None, metadata={
        "help": "rollout_backend server: GPUs each rollout server holds (for the dry run's GPU count)."})
    rollout_timeout: float = field(default=600.0, metadata={
        "help": "rollout_backend server: seconds to wait for a server to answer at the start, for one request's "
                "completions (up to 64 prompts, not streamed), and for a weight reload."})
    async_rollouts: bool = field(default=False, metadata={
        "help": "rollout_backend server: the servers sample the next step's rollouts while this step is scored "
                "and trained (off-policy by one more update, as PipelineRL and TRL's async trainers). The weights "
                "are synced between two batches: with sync_every 1 a step trains on samples of the weights one "
                "update old (policy_lag 1 in the log)."})
    prompts_per_step: int = field(default=16, metadata={"help": "Prompts per optimizer step."})
    samples_per_prompt: int = field(default=1, metadata={"help": "Student completions per prompt."})
    max_new_tokens: int = field(default=96, metadata={"help": "Token budget of one student completion."})
    rollout_temperature: float = field(default=1.0, metadata={"help": "Student sampling temperature."})
    rollout_top_p: float = field(default=1.0, metadata={"help": "Student nucleus sampling top-p."})
    sync_every: int = field(default=1, metadata={
        "help": "Optimizer steps between weight syncs to the rollout engine (1: every rollout is on-policy)."})
    steps_per_rollout: int = field(default=1, metadata={
        "help": "Optimizer steps per rollout (GRPO's steps_per_generation): the prompts of this many consecutive "
                "steps are sampled in one batch, then trained a step at a time. A rollout engine pays mostly per "
                "decoding iteration, so one large batch costs far less than as many small ones; the k-th step of a "
                "group trains on samples of weights k - 1 updates older (policy_lag in the log). The teachers grade "
                "a group's samples in one call, kept until its last step (12 bytes x logprobs_top_k per completion "
                "token). Weights are synced only before a rollout: sync_every must be 1 or a multiple of it."})
    dtype: str = field(default="float32", metadata={"help": f"Rollout engine dtype: {' | '.join(DTYPES)}."})
    max_model_len: int | None = field(default=None, metadata={"help": "Rollout engine context length."})
    enforce_eager: bool = field(default=True, metadata={"help": "vLLM: skip graph capture (faster start)."})
    gpu_memory_utilization: float = field(default=0.3, metadata={
        "help": "vLLM GPU memory fraction of the colocated rollout engine (the trainer shares the GPU)."})
    kv_cache_space_gb: int | None = field(default=1, metadata={"help": "CPU only: vLLM KV cache size in GiB."})
    sleep_mode: bool = field(default=False, metadata={
        "help": "GPU only (vLLM sleep mode): the colocated rollout engine frees its GPU memory while the student "
                "trains. Level 2 (weights and KV cache dropped) when the weights are synced before every "
                "rollout, as they are reloaded then anyway; else level 1 (weights kept in CPU RAM). Without CUDA "
                "the engine stays awake, with a warning."})

    @property
    def sleep_level(self) -> int:
        """vLLM's sleep level of the rollout engine (:attr:`sleep_mode`): 2 (weights dropped) only when they
        are all reloaded at every wake-up (before each rollout); a LoRA student's base never changes, so it
        stays in CPU RAM (1)."""
        adapters = getattr(self, "use_peft", False) and self.lora_rollouts == "adapter"
        return 2 if self.sync_every in (1, self.steps_per_rollout) and not adapters else 1


@dataclass
class ObjectiveConfig:
    """What the student minimises on its own tokens."""

    objective: str = field(default="reverse_kl", metadata={
        "help": "reverse_kl: per-token KL(student || teacher) on the teacher's top-k plus the tail bucket | jsd: "
                "generalized JSD(beta) on the same support | sampled_reverse_kl: the sampled-token estimate "
                "log p_student(x) - log p_teacher(x) as a per-token advantage (policy gradient)."})
    jsd_beta: float = field(default=0.5, metadata={"help": "beta of generalized JSD (0: forward KL, 1: reverse KL)."})
    temperature: float = field(default=1.0, metadata={
        "help": "Distillation temperature of the top-k objectives (reverse_kl, jsd): both sides tempered on the "
                "teacher's top-k plus the tail bucket, the loss scaled by T^2, as in offline KD and GKD. Rollouts "
                "use rollout_temperature."})
    offline_data_dir: str | None = field(default=None, metadata={
        "help": "Built shards of teacher traces with their top-k (`llmdistill build`, kd: true) to mix in, GKD's "
                "lambda < 1."})
    on_policy_fraction: float = field(default=1.0, metadata={
        "help": "GKD's lambda: the fraction of steps trained on the student's own samples. The others (a seeded "
                "choice per step index) train on a batch of offline_data_dir with the same divergence: no rollout, "
                "no scoring (0: pure offline KD)."})
    offline_rows_per_step: int = field(default=4, metadata={
        "help": "Packed built rows in the batch of an offline step (each up to the build's max_length tokens)."})
    reward_weight: float = field(default=0.0, metadata={
        "help": "Weight of an extra REINFORCE term with the answer checker's verdict as reward (0: off)."})
    checker: str = field(default="numeric", metadata={
        "help": f"Answer checker of the reward and of the logged reward ({' | '.join(ANSWER_CHECKERS)}; "
                "llmdistill.checking)."})
    loss_chunk_size: int = field(default=1024, metadata={"help": "Target tokens per chunk of the chunked loss."})
    pack_tokens: int = field(default=2048, metadata={
        "help": "Most positions per forward pass of the teacher's scoring and the student's loss: a step's samples "
                "run as right-padded batches of at most this many positions (count x longest; a longer sample runs "
                "alone)."})
    micro_batch_tokens: int = field(default=0, metadata={
        "help": "Most positions per forward + backward of the student's loss: a step's samples are split into "
                "micro-batches of whole samples (a longer sample alone) whose gradients add up to the step's. "
                "Bounds the activations a step keeps for its backward (0: the whole step in one backward)."})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "Recompute each layer's activations in the backward (HF gradient checkpointing, non-reentrant): "
                "a micro-batch keeps about one layer's activations instead of all of them."})
    bf16: bool = field(default=False, metadata={
        "help": "The student's forward and backward under bfloat16 autocast (the LM head's logits in bf16, the "
                "loss's log-softmax in fp32 per chunk). With use_peft the frozen base weights are also held in "
                "bfloat16 (half the memory) and so is the final merged student; the adapter and every trained "
                "weight stay fp32."})


@dataclass
class OnPolicyConfig(ObjectiveConfig, RolloutConfig, TeachersConfig, PromptsConfig, LoraSettings):
    """``llmdistill onpolicy``: sample → score → loss → step → sync, with checkpoints and cost accounting.

    With ``use_peft`` (:class:`~llmdistill.config.lora.LoraSettings`, as ``train``) the student trains a LoRA
    adapter; the rollout engine keeps the base weights and gets the adapter at every sync (``lora_rollouts``)."""

    student_model: str = field(default="", metadata={
        "help": "The student to improve: a checkpoint (warm start from an SFT or KD run) or a hub id."})
    output_dir: str = field(default="runs/onpolicy", metadata={"help": "Checkpoints, the final student and the manifest."})
    max_steps: int = field(default=100, metadata={"help": "Optimizer steps."})
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak AdamW learning rate."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warm-up steps, then linear decay to 0."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0: off)."})
    seed: int = field(default=0, metadata={"help": "Seed of the prompt order, sampling and the engine."})
    logging_steps: int = field(default=10, metadata={"help": "Steps between log lines."})
    save_steps: int = field(default=0, metadata={"help": "Steps between checkpoints (0: only the final student)."})
    save_total_limit: int | None = field(default=None, metadata={
        "help": "Keep only the newest this many checkpoints (weights and optimizer each); unset: all of them."})
    resume_from_checkpoint: CheckpointRef | None = field(default=None, metadata={
        "help": "A checkpoint directory, or 'latest' for the newest complete one in output_dir."})
    overwrite: bool = field(default=False, metadata={
        "help": "Replace what an earlier run left in output_dir: its final model and manifest, and its checkpoints "
                "unless this run resumes from one. Without it a finished run, or checkpoints not resumed, are "
                "refused (a resume of a finished run returns at once)."})

    def __post_init__(self) -> None:
        self.resume_from_checkpoint = normalize_resume(self.resume_from_checkpoint)  # as train reads it
        # pure offline KD (on_policy_fraction 0) samples no prompt and asks no teacher
        needed = ("student_model",) if self.on_policy_fraction == 0 else ("dataset", "student_model", "teacher_model")
        for name in needed:
            if not getattr(self, name):
                raise ConfigError(f"{name} is required")
        check_choice("rollout_backend", self.rollout_backend, ROLLOUT_BACKENDS)
        check_choice("lora_rollouts", self.lora_rollouts, LORA_ROLLOUTS)
        if (self.use_peft and self.lora_rollouts == "adapter" and self.rollout_backend != "transformers"
                and self.lora_r > MAX_VLLM_LORA_RANK):
            raise ConfigError(f"lora_r={self.lora_r}: vLLM serves LoRA adapters up to rank {MAX_VLLM_LORA_RANK}; "
                              "lower lora_r or set lora_rollouts: merged")
        check_choice("teacher_backend", self.teacher_backend, TEACHER_BACKENDS)
        check_choice("objective", self.objective, OBJECTIVES)
        check_choice("dtype", self.dtype, DTYPES)
        check_choice("teacher_dtype", self.teacher_dtype, ("float32", "bfloat16"))
        for name in ("prompts_per_step", "samples_per_prompt", "max_new_tokens", "sync_every", "steps_per_rollout",
                     "max_steps", "logprobs_top_k", "loss_chunk_size", "logging_steps", "pack_tokens",
                     "offline_rows_per_step"):
            check_range(name, getattr(self, name), 1)
        if self.sync_every > 1 and self.sync_every % self.steps_per_rollout:
            raise ConfigError(f"sync_every={self.sync_every} with steps_per_rollout={self.steps_per_rollout}: weights "
                              "are synced only before a rollout, so set sync_every to 1 or a multiple of "
                              "steps_per_rollout")
        check_range("rollout_temperature", self.rollout_temperature, 0.0)
        check_range("rollout_top_p", self.rollout_top_p, 0.0, 1.0)
        if self.rollout_temperature == 0 and self.samples_per_prompt > 1:
            raise ConfigError(f"greedy rollouts are all the same: with rollout_temperature 0 set samples_per_prompt 1, "
                              f"or sample at a temperature > 0 (samples_per_prompt is {self.samples_per_prompt})")
        check_range("jsd_beta", self.jsd_beta, 0.0, 1.0)
        if not self.temperature > 0:
            raise ConfigError(f"temperature={self.temperature} must be > 0 (1: the teacher's and student's own "
                              "distributions)")
        if self.temperature != 1 and self.objective == "sampled_reverse_kl":
            raise ConfigError(f"temperature={self.temperature} applies to the top-k objectives only: with objective "
                              "sampled_reverse_kl leave it at 1 (rollout_temperature sets the sampling)")
        if self.objective == "sampled_reverse_kl" and (self.rollout_temperature != 1 or self.rollout_top_p != 1):
            raise ConfigError(f"objective sampled_reverse_kl with rollout_temperature={self.rollout_temperature} and "
                              f"rollout_top_p={self.rollout_top_p}: the sampled-token estimate is the reverse KL's "
                              "gradient only for tokens drawn from the student's own distribution; set both to 1, or "
                              "use objective reverse_kl (exact on the teacher's top-k at every position)")
        check_range("on_policy_fraction", self.on_policy_fraction, 0.0, 1.0)
        check_range("reward_weight", self.reward_weight, 0.0)
        check_range("learning_rate", self.learning_rate, 0.0)
        check_range("warmup_steps", self.warmup_steps, 0, self.max_steps)
        check_range("save_steps", self.save_steps, 0)
        if self.save_total_limit is not None:
            check_range("save_total_limit", self.save_total_limit, 1)
        check_range("micro_batch_tokens", self.micro_batch_tokens, 0)
        self.check_lora()
        if self.on_policy_fraction < 1.0 and not self.offline_data_dir:
            raise ConfigError("on_policy_fraction < 1 mixes in offline batches: set offline_data_dir to built shards")
        if self.offline_data_dir and self.on_policy_fraction == 1.0:
            raise ConfigError(f"offline_data_dir {self.offline_data_dir} is read only by offline steps: set "
                              "on_policy_fraction below 1 (GKD's lambda) to mix them in, or drop offline_data_dir")
        if self.reward_weight > 0 and not self.answer_column:
            raise ConfigError(f"reward_weight={self.reward_weight} rewards answers the checker accepts: set "
                              "answer_column to the prompts' reference-answer column")
        # the reward compares a sample's answer with the row's reference answer (not code tests)
        check_choice("checker", self.checker, ANSWER_CHECKERS)
        if self.on_policy_fraction < 1.0 and self.objective not in TOPK_OBJECTIVES:
            raise ConfigError(f"on_policy_fraction < 1: offline batches hold the teacher's top-k, not its log-prob of "
                              f"a student's token, so objective must be one of {list(TOPK_OBJECTIVES)}, "
                              f"not {self.objective}")
        if self.on_policy_fraction > 0:
            self._check_teachers()
            self._check_rollouts()

    def _check_rollouts(self) -> None:
        if self.sleep_mode and self.rollout_backend == "transformers":
            raise ConfigError("sleep_mode is for the colocated vLLM engine (rollout_backend: vllm): with "
                              "rollout_backend: transformers the student samples with its own weights, no engine")
        if self.rollout_backend != "server":
            for name in ("rollout_urls", "rollout_sync_dir", "rollout_server_gpus", "async_rollouts"):
                if getattr(self, name):
                    why = (" (in process, sampling and training share one Python interpreter and cannot overlap)"
                           if name == "async_rollouts" else "")
                    raise ConfigError(f"{name} is for rollout_backend: server, not {self.rollout_backend}{why}")
            return
        if not self.rollout_urls:
            raise ConfigError("rollout_backend server needs rollout_urls: the student's vLLM servers, started with "
                              "VLLM_SERVER_DEV_MODE=1, e.g. --rollout_urls http://127.0.0.1:8001")
        if self.sleep_mode:
            raise ConfigError("sleep_mode is for the colocated engine (rollout_backend: vllm): a rollout server "
                              "keeps its own GPUs")
        check_range("rollout_timeout", self.rollout_timeout, 0.1)
        check_range("rollout_server_gpus", self.rollout_server_gpus, 1)

    def _check_teachers(self) -> None:
        if len(self.teachers) > 1 and not self.teacher_column:
            raise ConfigError("several teachers need teacher_column: the prompt column that names each prompt's teacher")
        if self.teacher_backend == "vllm":
            check_range("teacher_gpu_memory_utilization", self.teacher_gpu_memory_utilization, 0.01, 1.0)
            engines = [f"{len(self.teachers)} x teacher_gpu_memory_utilization {self.teacher_gpu_memory_utilization}"]
            share = len(self.teachers) * self.teacher_gpu_memory_utilization
            if self.rollout_backend == "vllm":
                engines.append(f"gpu_memory_utilization {self.gpu_memory_utilization} (the rollout engine)")
                share += self.gpu_memory_utilization
            if share >= 1.0:
                raise ConfigError(f"the in-process vLLM engines would take {share:.2f} of the GPU ({' + '.join(engines)}), "
                                  "leaving nothing for the student: lower them so they add up to well below 1")
        if self.teacher_backend != "server":
            if self.teacher_urls:
                raise ConfigError("teacher_urls are for teacher_backend: server (the teacher runs in this process "
                                  f"with teacher_backend: {self.teacher_backend})")
            return
        if not self.teacher_urls:
            raise ConfigError("teacher_backend server needs teacher_urls, e.g. --teacher_urls http://127.0.0.1:8000")
        self.teacher_url_pools  # noqa: B018 - fails now on a URL of no teacher, or a teacher without one
        check_range("teacher_timeout", self.teacher_timeout, 0.1)
        check_range("teacher_max_logprobs", self.teacher_max_logprobs, 1)
        check_range("teacher_server_gpus", self.teacher_server_gpus, 1)
        cap = self.teacher_max_logprobs or VLLM_DEFAULT_MAX_LOGPROBS
        if self.logprobs_top_k > cap:
            raise ConfigError(f"logprobs_top_k={self.logprobs_top_k} exceeds the teacher servers' max_logprobs={cap}: "
                              "lower logprobs_top_k, or start the servers with --max-logprobs and set "
                              "teacher_max_logprobs to match")

    @property
    def teachers(self) -> dict[str, str]:
        """Teacher name -> model: ``'a=path,b=path'``, or one unnamed teacher under ``'default'``.

        A part whose text before ``=`` holds a ``/`` is a path with ``=`` in it (``runs/lr=1e-4/final``),
        not a name: teacher names are plain words."""
        parts = [p.strip() for p in self.teacher_model.split(",") if p.strip()]
        named = [p for p in parts if "=" in p and "/" not in p.partition("=")[0]]
        if len(parts) == 1 and not named:
            return {"default": parts[0]}
        out: dict[str, str] = {}
        for part in parts:
            name, sep, path = part.partition("=") if part in named else ("", "", part)
            if not sep or not name.strip() or not path.strip():
                raise ConfigError(f"teacher_model: '{part}' is not name=path (several teachers are 'a=path,b=path')")
            if name.strip() in out:
                raise ConfigError(f"teacher_model: the name '{name.strip()}' is given twice ({out[name.strip()]} and "
                                  f"{path.strip()}): give each teacher its own name")
            out[name.strip()] = path.strip()
        return out

    @property
    def rollout_weights_dir(self) -> str:
        """Where syncs write the weights a rollout engine loads: ``rollout_sync_dir``, else ``output_dir/rollout-weights``."""
        return self.rollout_sync_dir or str(Path(self.output_dir) / "rollout-weights")

    @property
    def teacher_url_pools(self) -> dict[str, list[str]]:
        """Teacher name -> the server URLs that serve it (teacher_backend server)."""
        names = list(self.teachers)
        pools: dict[str, list[str]] = {name: [] for name in names}
        for entry in self.teacher_urls:
            name, sep, url = entry.partition("=")
            if "://" in name:  # a plain URL (with a query string)
                name, sep, url = "", "", entry
            if not sep and len(names) == 1:
                name, url = names[0], entry
            elif not sep or name.strip() not in pools:
                raise ConfigError(f"teacher_urls: '{entry}' must be 'name=url' with name one of {names} "
                                  "(several teachers: each URL names the teacher it serves)")
            pools[name.strip()].append(url.strip())
        missing = [name for name, urls in pools.items() if not urls]
        if missing:
            raise ConfigError(f"teacher_backend server: no URL in teacher_urls for teacher(s) {missing}")
        return pools
