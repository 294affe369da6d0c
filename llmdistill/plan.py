"""``--dry_run`` for every stage: resolve the config, print the plan and a resource estimate.

Nothing is loaded (no model, no engine, no hub access); counts come from local files and
manifests when they exist, and otherwise the estimate says what it is per unit of work.
The numbers are upper bounds (every trace at ``max_tokens``) unless labelled otherwise.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

from llmdistill.config.base import config_to_dict
from llmdistill.formats import read_generation_info
from llmdistill.generate.resources import bytes_per_token, job_resources
from llmdistill.manifest import MANIFEST, read_manifest

GIB = 1024**3
# bf16 weights + bf16 grads + fp32 master weights + two fp32 Adam moments.
BYTES_PER_PARAM_FULL_FT = 2 + 2 + 4 + 4 + 4


def count_local_rows(path: str) -> int | None:
    """Rows of a local JSONL/JSON/Parquet file, or None for a hub id."""
    p = Path(path)
    if not p.is_file():
        return None
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(p).metadata.num_rows
    if p.suffix == ".jsonl":
        with p.open() as fh:
            return sum(1 for line in fh if line.strip())
    data = json.loads(p.read_text())
    return len(data) if isinstance(data, list) else None


def params_from_name(model: str) -> float | None:
    """Parameter count read from a checkpoint's config, else from a name like ``Qwen2.5-Math-7B``."""
    cfg = Path(model) / "config.json"
    if cfg.is_file():
        c = json.loads(cfg.read_text())
        h, n, v = c.get("hidden_size"), c.get("num_hidden_layers"), c.get("vocab_size")
        inter = c.get("intermediate_size", 4 * (h or 0))
        if h and n and v:
            # q and o are h x h; k and v are h x (kv heads x head dim): narrower under grouped-query attention
            heads = c.get("num_attention_heads") or 1
            kv_width = (c.get("num_key_value_heads") or heads) * (c.get("head_dim") or h // heads)
            attention = 2 * h * h + 2 * h * kv_width
            return float(n * (attention + 3 * h * inter) + v * h * (1 if c.get("tie_word_embeddings") else 2))
    match = re.search(r"(\d+(?:\.\d+)?)\s*[bB](?![a-zA-Z])", model)
    return float(match[1]) * 1e9 if match else None


def topk_bytes_per_token(k: int, vocab_size: int, bits: int) -> float:
    """Bytes per target token of the built-shard top-k encoding, measured on the codec itself."""
    import numpy as np

    from llmdistill.codec import encode_topk

    n = 256
    rng = np.random.default_rng(0)
    ids = np.stack([rng.choice(vocab_size, size=k, replace=False) for _ in range(n)])
    lps = np.sort(rng.normal(-8, 4, size=(n, k)).clip(max=0), axis=1)[:, ::-1].astype(np.float32)
    return len(encode_topk(ids, lps, vocab_size, bits)) / n


def _generate_plan(cfg: Any, stage: str) -> dict[str, Any]:
    rows = count_local_rows(cfg.dataset)
    if cfg.max_prompts is not None:
        rows = min(rows, cfg.max_prompts) if rows is not None else cfg.max_prompts
    i, n = cfg.shard_index_count
    prompts = math.ceil(rows / n) if rows is not None else None
    samples = getattr(cfg, "num_samples", 1)
    max_tokens = getattr(cfg, "max_tokens", None)
    k = cfg.logprobs_top_k
    per_token = bytes_per_token(k)  # int32 id + float32 log-prob per top-k entry, + the token itself
    plan: dict[str, Any] = {
        "prompts (this shard)": prompts if prompts is not None else "unknown: hub dataset (set max_prompts to bound it)",
        "shard": f"{i}/{n}",
        "completions": prompts * samples if prompts is not None else f"{samples} per prompt",
        "top-k stored per token": k,
        "disk per completion token (raw, before zstd)": f"{per_token} B",
    }
    if stage == "generate" and max_tokens:
        plan["max new tokens per completion"] = max_tokens
        if prompts is not None:
            tokens = prompts * samples * max_tokens
            plan["generated tokens (upper bound)"] = f"{tokens:.3g}"
            plan["teacher log-prob disk (upper bound)"] = f"{tokens * per_token / GIB:.2f} GiB"
        else:
            plan["teacher log-prob disk per 1k prompts (upper bound)"] = (
                f"{1000 * samples * max_tokens * per_token / GIB:.2f} GiB")
    if cfg.backend == "server":
        plan["GPUs"] = f"held by {len(cfg.server_urls)} external vLLM server(s)"
    else:
        plan["GPUs per job"] = cfg.tensor_parallel_size * cfg.pipeline_parallel_size
        plan["GPUs over all N jobs"] = cfg.tensor_parallel_size * cfg.pipeline_parallel_size * n
    plan.update(job_resources(cfg, prompts * samples if prompts is not None else None))
    return plan


def _build_plan(cfg: Any) -> dict[str, Any]:
    plan: dict[str, Any] = {"input": cfg.input_path, "verifier": cfg.verifier, "kd (store teacher top-k)": cfg.kd,
                            "packed length": cfg.max_length, "decontaminate against": cfg.decontam_benchmarks}
    info = read_generation_info(cfg.input_path) if Path(cfg.input_path).is_dir() else None
    if info is not None:
        plan["input counts (from its manifest)"] = read_manifest(cfg.input_path).get("counts", {})
    if cfg.kd and info is not None:
        key = f"top-{info.k} bytes per target token (vocab {info.vocab_size}, {cfg.codec_bits} bits)"
        plan[key] = round(topk_bytes_per_token(info.k, info.vocab_size, cfg.codec_bits), 1)
    elif cfg.kd:
        plan["top-k bytes per target token"] = (f"unknown until {cfg.input_path}/manifest.json exists: it records "
                                                "the teacher's k and vocabulary size")
    from llmdistill.builder.estimate import build_estimate

    plan.update(build_estimate(cfg, info.k if info else None, info.vocab_size if info else None))
    return plan


def _train_plan(cfg: Any) -> dict[str, Any]:
    from llmdistill.formats import built_footprint

    plan: dict[str, Any] = {"student": cfg.student_model, "data": cfg.data_dir,
                            "loss": f"alpha={cfg.alpha} ({cfg.alpha_schedule}) x T^2 x {cfg.divergence} + CE",
                            "GPUs": "as launched: `accelerate launch --num_processes N` (see configs/accelerate/)"}
    params = params_from_name(cfg.student_model)
    if params:
        plan["student parameters"] = f"{params / 1e9:.2f} B"
        if not cfg.use_peft:
            total = params * BYTES_PER_PARAM_FULL_FT
            plan["model + optimizer states, full fine-tune"] = (
                f"{total / GIB:.0f} GiB in all; / N GPUs under ZeRO-3 (e.g. {total / GIB / 16:.1f} GiB on 16)")
        elif not cfg.load_in_4bit:
            plan["frozen weights (bf16)"] = f"{params * 2 / GIB:.1f} GiB per GPU (not sharded by DDP)"
        else:
            plan["frozen weights (NF4)"] = (f"at least {params * 0.5 / GIB:.1f} GiB per GPU (embeddings and LM head "
                                            "stay 16-bit; not sharded by DDP)")
            if cfg.save_merged:  # llmdistill.train.merged_student
                kwargs = cfg.model_init_kwargs or {}
                width = 4 if "float32" in str(kwargs.get("dtype", kwargs.get("torch_dtype", ""))) else 2
                plan["merging the adapter at the end (save_merged)"] = (
                    f"the main process loads the base again unquantised, {params * width / GIB:.0f} GiB of host "
                    "RAM, merges the adapter there and saves that; save_merged: false saves the adapter alone")
    if (Path(cfg.data_dir) / MANIFEST).is_file():
        plan["built data (from its manifest)"] = read_manifest(cfg.data_dir).get("counts", {})
    # The data is memory-mapped from an Arrow copy made once per machine (llmdistill.train.load_built)
    cache = cfg.data_cache_dir or f"{cfg.data_dir}/.arrow_cache"
    try:
        size = built_footprint(cfg.data_dir)
        plan["built data (from the shards)"] = (f"{size['rows']} packed rows, {size['tokens']:.4g} tokens, "
                                                f"{size['parquet_bytes'] / GIB:.2f} GiB of Parquet")
        plan["Arrow cache per machine (disk)"] = f"about {size['arrow_bytes'] / GIB:.2f} GiB in {cache}"
    except FileNotFoundError:
        vocab = _vocab_size(cfg.student_model) or 151_936
        per_token = 9 + topk_bytes_per_token(20, vocab, 12)
        plan["Arrow cache per machine (disk)"] = (
            f"not built yet: about {per_token:.0f} B per packed token at top-20 over {vocab:,} ids (9 B of ids, "
            f"positions and mask + the top-k of a target token), {per_token * 1e9 / GIB:.0f} GiB per 1e9 tokens, "
            f"in {cache}")
    plan["host RAM per process for data"] = (
        "independent of the data size: rows are read from the memory-mapped Arrow files through the page cache "
        "(one copy per machine, shared by its processes, evicted under memory pressure); each step holds its "
        f"micro-batches only ({cfg.dataloader_num_workers} DataLoader worker(s) per process "
        f"{'read the tokens' if cfg.teacher_model else 'decode the top-k'})")
    if cfg.teacher_model:
        plan["teacher signal"] = (f"online: {cfg.teacher_model} beside the student, one forward per micro-batch "
                                  f"(top-{cfg.teacher_top_k} plus tail; 0 = full distribution); the stored top-k "
                                  "is not read")
    plan["micro-batch"] = f"{cfg.per_device_train_batch_size} packed rows x grad-accum {cfg.gradient_accumulation_steps}"
    plan["epochs / max_steps"] = f"{cfg.num_train_epochs} / {cfg.max_steps}"
    return plan


def _vocab_size(model: str) -> int | None:
    cfg = Path(model) / "config.json"
    return json.loads(cfg.read_text()).get("vocab_size") if cfg.is_file() else None


def _onpolicy_plan(cfg: Any) -> dict[str, Any]:
    from llmdistill.onpolicy import check_shares, offline_steps

    check_shares(cfg, int(os.environ.get("WORLD_SIZE", "1")))  # as the launched run would
    offline = int(offline_steps(cfg.seed, cfg.on_policy_fraction, cfg.max_steps).sum())
    steps = cfg.max_steps - offline
    plan: dict[str, Any] = {"student": cfg.student_model, "objective": cfg.objective,
                            "optimizer steps": f"{cfg.max_steps}: {steps} on-policy, {offline} on offline batches "
                                               f"(on_policy_fraction {cfg.on_policy_fraction})"}
    if offline:
        plan["offline batches"] = f"{cfg.offline_rows_per_step} packed built rows of {cfg.offline_data_dir} per step"
    if steps:
        plan.update(_onpolicy_steps(cfg, steps))
    params = params_from_name(cfg.student_model)
    if params:
        plan["student parameters"] = f"{params / 1e9:.2f} B"
        if cfg.use_peft:
            width = 2 if cfg.bf16 else 4
            plan[f"student weights ({'bf16' if cfg.bf16 else 'fp32'}, frozen) + LoRA adapter"] = (
                f"{params * width / GIB:.0f} GiB + the rank-{cfg.lora_r} adapter's weights, grads and AdamW moments "
                "(fp32), in each training process (replicated: data-parallel, not sharded)")
        else:
            plan["student weights + grads + AdamW (fp32)"] = (
                f"{params * 16 / GIB:.0f} GiB, in each training process (replicated: data-parallel, not sharded; "
                "use_peft trains a LoRA adapter)")
    if cfg.gradient_checkpointing or cfg.micro_batch_tokens:
        plan["activations kept for a backward"] = (
            (f"<= {cfg.micro_batch_tokens} positions at a time" if cfg.micro_batch_tokens else "a whole step's")
            + ("; each layer's recomputed in the backward (gradient checkpointing)"
               if cfg.gradient_checkpointing else ""))
    return plan


def _onpolicy_steps(cfg: Any, steps: int) -> dict[str, Any]:
    """Per on-policy step: the rollouts, the tokens the teacher scores, and the GPUs of each phase."""
    samples = cfg.prompts_per_step * cfg.samples_per_prompt
    rollout = samples * cfg.max_new_tokens
    engine = {"vllm": f"in-process vLLM engine colocated with the trainer (gpu_memory_utilization "
                      f"{cfg.gpu_memory_utilization}), weights synced every {cfg.sync_every} step(s)",
              "server": f"{len(cfg.rollout_urls)} vLLM server(s) of the student, weights written to "
                        f"{cfg.rollout_weights_dir} and reloaded every "
                        f"{cfg.sync_every} step(s)" + ("; the next step's rollouts sampled while this one trains "
                                                       "(one update behind)" if cfg.async_rollouts else ""),
              "transformers": "model.generate on the training weights"}[cfg.rollout_backend]
    if cfg.use_peft and cfg.rollout_backend != "transformers":
        engine += ("; the LoRA adapter loaded as a vLLM LoRA at each sync" if cfg.lora_rollouts == "adapter"
                   else "; base + LoRA delta loaded as plain weights at each sync")
    if cfg.steps_per_rollout > 1:
        engine += (f"; the prompts of {cfg.steps_per_rollout} steps sampled in one batch "
                   f"({cfg.steps_per_rollout * samples} samples), then trained a step at a time")
    if cfg.rollout_backend == "vllm" and cfg.sleep_mode:
        engine += (f"; asleep while the student trains (vLLM sleep mode, level {cfg.sleep_level}: "
                   + ("weights and KV cache freed)" if cfg.sleep_level == 2 else "weights to CPU RAM, KV cache freed)"))
    plan: dict[str, Any] = {
        "teachers": cfg.teachers,
        "rollouts per step": f"{cfg.prompts_per_step} prompts x {cfg.samples_per_prompt} samples = {samples}, "
                             f"<= {cfg.max_new_tokens} new tokens each: {engine}",
        "rollout tokens per step (upper bound)": rollout,
        "rollout tokens, whole run (upper bound)": f"{rollout * steps:.3g}",
    }
    read = f"{samples * cfg.max_model_len}" if cfg.max_model_len else f"{rollout} + the {samples} prompts"
    plan["teacher tokens scored per step (upper bound: prompt + completion)"] = read
    plan["teacher scoring"] = (f"{cfg.teacher_backend}: one prefill per sample, top-{cfg.logprobs_top_k} and the "
                               "sampled token's log-prob at every completion position")
    processes = int(os.environ.get("WORLD_SIZE", "1"))  # the launch's: `accelerate launch --num_processes N`
    each = (f"{processes} training processes ({cfg.prompts_per_step // processes} prompts of each step each), "
            "data-parallel" if processes > 1 else "one training process")
    each += f" (WORLD_SIZE={processes}: dry-run with the launch's number of processes)"
    counted: list[int | None] = [processes]
    if cfg.rollout_backend == "server":
        plan["GPUs: training"] = f"{processes}: {each}, each holding the student and its optimizer"
        plan["GPUs: rollouts"], gpus = _server_gpus(len(cfg.rollout_urls), cfg.rollout_server_gpus, "rollout_server_gpus")
        counted.append(gpus)
    else:
        plan["GPUs: rollout + training"] = f"{processes}: {each}, each holding the student, its optimizer and a rollout engine"
    if cfg.teacher_backend == "server":
        plan["GPUs: teacher scoring"], gpus = _server_gpus(len(cfg.teacher_urls), cfg.teacher_server_gpus,
                                                           "teacher_server_gpus")
        counted.append(gpus)
    elif cfg.teacher_backend == "vllm":
        plan["GPUs: teacher scoring"] = ("0 more: the teacher's vLLM engine in each training process "
                                         f"(teacher_gpu_memory_utilization {cfg.teacher_gpu_memory_utilization})")
    else:
        plan["GPUs: teacher scoring"] = "0 more: the teacher runs in each training process"
    if None not in counted:
        plan["GPUs in all"] = sum(counted)
    return plan


def _server_gpus(servers: int, per_server: int | None, field_name: str) -> tuple[str, int | None]:
    """How a pool of vLLM servers is printed, and its GPU count when the config gives it."""
    if per_server:
        return f"{servers} vLLM server(s) x {per_server} = {servers * per_server}", servers * per_server
    return f"held by {servers} vLLM server(s) (set {field_name} to count them)", None


def _demo_plan(cfg: Any) -> dict[str, Any]:
    from llmdistill.config.base import read_yaml
    from llmdistill.config.eval import EvalConfig
    from llmdistill.config.generate import GenerateConfig
    from llmdistill.config.onpolicy import OnPolicyConfig
    from llmdistill.config.train import TrainConfig
    from llmdistill.demo import ARM_STAGES, STAGE_DIRS, curve_models

    gen = read_yaml(cfg.stage_file("generate"), GenerateConfig)
    ev = read_yaml(cfg.stage_file("eval"), EvalConfig)
    training = {stage: read_yaml(cfg.stage_file(stage), OnPolicyConfig if stage == "onpolicy" else TrainConfig)
                for stage in STAGE_DIRS}
    per_model = ev.get("limit", 500) * ev.get("num_samples", 1)
    checkpoints = len(curve_models(Path(cfg.output_dir), training))
    return {
        "seeds": cfg.seed_list,
        "stage configs": f"{cfg.configs_dir}/*_tiny.yaml (paths and seeds overridden)",
        "stages": "bootstrap teacher (shipped, else trained and cached) → generate → build → "
                  + " | ".join(" then ".join(stages) for stages in ARM_STAGES.values())
                  + f" (side by side) → eval of {len(ARM_STAGES) + 2} models, and of the checkpoints for the curves",
        "teacher traces": cfg.num_prompts * gen.get("num_samples", 1),
        "optimizer steps per arm": ", ".join(f"{label} " + " + ".join(str(training[s].get("max_steps")) for s in stages)
                                             for label, stages in ARM_STAGES.items()),
        "eval generations": f"{(len(ARM_STAGES) + 2) * per_model} (5 models), and {checkpoints * per_model} "
                            f"({checkpoints} checkpoints)",
        "GPUs": 0,
    }


def make_plan(stage: str, cfg: Any) -> dict[str, Any]:
    """The plan of one stage as an ordered mapping (printed by ``--dry_run``)."""
    if stage in ("generate", "score"):
        plan = _generate_plan(cfg, stage)
    elif stage == "build":
        plan = _build_plan(cfg)
    elif stage == "train":
        plan = _train_plan(cfg)
    elif stage == "eval":
        from llmdistill.eval.harness import eval_plan

        plan = eval_plan(cfg)
    elif stage == "onpolicy":
        plan = _onpolicy_plan(cfg)
    elif stage == "demo":
        plan = _demo_plan(cfg)
    elif stage == "synthesize":
        from llmdistill.synthesis.stage import synthesis_plan

        plan = synthesis_plan(cfg)
    else:
        raise ValueError(f"no dry-run plan for stage {stage!r}")
    return {"stage": stage, "output_dir": cfg.output_dir, **plan}


def print_plan(stage: str, cfg: Any) -> dict[str, Any]:
    """Print the resolved config and the plan; return the plan."""
    from rich.console import Console
    from rich.table import Table

    plan = make_plan(stage, cfg)
    console = Console()
    table = Table(title=f"llmdistill {stage} --dry_run", show_header=False)
    for key, value in plan.items():
        table.add_row(str(key), json.dumps(value) if isinstance(value, (dict, list)) else str(value))
    console.print(table)
    resolved = config_to_dict(cfg)
    console.print(f"resolved config: {len(resolved)} fields; nothing was loaded or written.")
    return plan
