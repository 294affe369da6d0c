"""``llmdistill demo``: the DeepSeek-R1 distillation recipe in miniature, on a CPU.

1. bootstrap the tiny teacher (cached per machine) and a random-init student;
2. the teacher answers fresh training prompts with vLLM, keeping its top-k log-probs;
3. build: rejection sampling (verify), filter, dedup, decontaminate against the held-out set, pack;
4. train two students from the same initial weights on the same data for the same steps:
   SFT-only (``alpha = 0``) and KD (``alpha > 0``);
5. on-policy distillation: a short SFT run (the warm start), then the student samples answers to
   the training prompts and learns from the teacher's grades of every token of them;
6. evaluate the five arms (teacher, untrained student, SFT, KD, on-policy) on the held-out set;
7. write ``REPORT.md`` with the numbers this run produced, the compute each arm spent, plots, and
   every stage's manifest.

Each stage runs as ``python -m llmdistill <stage> --config <output_dir>/configs/<stage>.yaml``
in its own process on one thread, exactly as a user would run it; the configs stay in the output
directory. The three training arms (SFT, KD, warm start then on-policy) do not depend on each
other, so they run side by side, as many at once as the machine has cores (``workers``).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from llmdistill.compute import checkpoint_compute, stage_compute
from llmdistill.config.base import load_config, read_yaml
from llmdistill.config.build import BuildConfig
from llmdistill.config.demo import DemoConfig
from llmdistill.config.eval import EvalConfig
from llmdistill.config.generate import GenerateConfig
from llmdistill.config.onpolicy import OnPolicyConfig
from llmdistill.config.train import TrainConfig
from llmdistill.demo_report import LABELS
from llmdistill.formats import read_details
from llmdistill.log import get_logger
from llmdistill.manifest import (
    MANIFEST,
    describe_machine,
    fingerprint,
    read_manifest,
    write_json_atomic,
    write_manifest,
)

logger = get_logger(__name__)

STAGE_CLASSES = {"generate": GenerateConfig, "build": BuildConfig, "train": TrainConfig, "onpolicy": OnPolicyConfig,
                 "eval": EvalConfig}
# The trained arms and the stages whose training compute each one spent (the warm start counts for on-policy).
ARM_STAGES = {"SFT student": ("train_sft",), "KD student": ("train_kd",), "on-policy student": ("train_warm", "onpolicy")}
STAGE_DIRS = {"train_sft": "train-sft", "train_kd": "train-kd", "train_warm": "train-warm", "onpolicy": "train-onpolicy"}
# The training arms between build and eval, independent of each other: the longest first.
ARM_LANES = [("train_warm", "onpolicy"), ("train_sft",), ("train_kd",)]
LOGS = Path("logs")  # under the run directory: the output of the stages that ran side by side
CURVE = Path("eval-curve")  # under the run directory: the eval of the arms' intermediate checkpoints


def stage_configs(cfg: DemoConfig, seed: int, run_dir: Path, teacher: Path, student: Path) -> dict[str, dict]:
    """Each stage's shipped config (``cfg.configs_dir``) with this run's paths and seed put in.

    Nothing else is overridden: ``llmdistill <stage> --config configs/<stage>_tiny.yaml`` with the
    same paths re-runs the demo's stage exactly.

    Args:
        cfg: the demo config.
        seed: this run's seed (prompts, sampling, student init and data order).
        run_dir: the output directory of this seed.
        teacher: the bootstrapped teacher checkpoint.
        student: the random-init student checkpoint.
    """
    prompts = str(run_dir / "data" / "prompts.jsonl")
    trained = {name: run_dir / directory for name, directory in STAGE_DIRS.items()}
    paths = {
        "generate": {"dataset": prompts, "model": str(teacher), "output_dir": str(run_dir / "generate"), "seed": seed},
        "build": {"input_path": str(run_dir / "generate"), "student_tokenizer": str(student),
                  "output_dir": str(run_dir / "build"), "seed": seed},
        **{name: {"student_model": str(student), "data_dir": str(run_dir / "build"), "output_dir": str(trained[name]),
                  "seed": seed, "data_seed": seed} for name in ("train_sft", "train_kd", "train_warm")},
        "onpolicy": {"student_model": str(trained["train_warm"]), "teacher_model": str(teacher), "dataset": prompts,
                     "output_dir": str(trained["onpolicy"]), "seed": seed},
        "eval": {"models": ",".join(str(m) for m in eval_models(run_dir, teacher, student)),
                 "reference_model": str(teacher), "output_dir": str(run_dir / "eval"), "seed": seed},
    }
    configs = {name: {**read_yaml(cfg.stage_file(name), STAGE_CLASSES[name.split("_")[0]]), **overrides}
               for name, overrides in paths.items()}
    curve = curve_models(run_dir, configs)
    if curve:  # the same eval settings as the arms' final models, on their checkpoints
        configs["eval_curve"] = {**read_yaml(cfg.stage_file("eval_curve"), EvalConfig),
                                 "models": ",".join(str(m) for m in curve), "reference_model": "",
                                 "output_dir": str(run_dir / CURVE), "seed": seed}
    return configs


def checkpoint_steps(stage: str, config: dict[str, Any]) -> list[int]:
    """The steps before its last at which a training stage keeps a checkpoint, from its config with the
    defaults filled in: every ``save_steps`` (below 1: that fraction of ``max_steps``, rounded up, as in
    transformers) when ``save_strategy`` is ``steps`` (on-policy: ``save_steps`` > 0), the last
    ``save_total_limit`` of them counting the one at the final step."""
    defaults = {f.name: f.default for f in dataclasses.fields(STAGE_CLASSES[stage.split("_")[0]])}

    def setting(name: str) -> Any:
        return config[name] if name in config else defaults.get(name)

    every, last = setting("save_steps") or 0, setting("max_steps")
    if setting("save_strategy") not in (None, "steps") or every <= 0:  # on-policy has no save_strategy
        return []
    every = int(every) if every >= 1 else math.ceil(last * every)
    steps = list(range(every, last, every))
    limit = setting("save_total_limit")
    if limit:  # transformers deletes the oldest; the final step's checkpoint is one of those kept
        steps = steps[len(steps) - (limit - 1):] if limit > 1 else []
    return steps


def curve_models(run_dir: Path, configs: dict[str, dict]) -> list[Path]:
    """What the accuracy-against-time curves evaluate beyond the five arms' models: every arm's
    intermediate checkpoints, and the warm start's final model (the on-policy arm's midpoint)."""
    models = []
    for stage in STAGE_DIRS:
        models += [run_dir / STAGE_DIRS[stage] / f"checkpoint-{step}"
                   for step in checkpoint_steps(stage, configs[stage])]
    return [*models, run_dir / STAGE_DIRS["train_warm"]] if models else []


def eval_models(run_dir: Path, teacher: Path, student: Path) -> list[Path]:
    """The models of the five arms, in :data:`~llmdistill.demo_report.LABELS` order."""
    return [teacher, student, *(run_dir / STAGE_DIRS[name] for name in ("train_sft", "train_kd", "onpolicy"))]


def stage_threads() -> str:
    """Threads of each stage's process: one unless OMP_NUM_THREADS says otherwise (one gives the same
    numbers on any core count, and arms side by side do not contend)."""
    return os.environ.get("OMP_NUM_THREADS", "1")


def run_stage(name: str, overrides: dict, run_dir: Path, reuse: bool, header: str = "", log: Path | None = None) -> float:
    """Run one stage in its own process; skip it when ``reuse`` and it already finished with these settings.

    Args:
        log: where the stage's output goes (a stage running beside others); None: this terminal.

    Returns:
        The stage's wall time in seconds (0 when skipped).
    """
    stage = name.split("_")[0]
    load_config(STAGE_CLASSES[stage], **overrides)  # validate before any work starts
    config_path = run_dir / "configs" / f"{name}.yaml"
    # The header names what the stable model links point to, so a new teacher is never "the same config".
    text = header + yaml.safe_dump(overrides, sort_keys=False)
    done = Path(overrides["output_dir"]) / MANIFEST
    if reuse and done.is_file() and config_path.is_file() and config_path.read_text() == text:
        logger.info("%s: reusing %s (same config)", name, overrides["output_dir"])
        return 0.0
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(text)
    logger.info("%s: llmdistill %s --config %s%s", name, stage, config_path, f" > {log}" if log else "")
    started = time.time()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": stage_threads()}
    command = [sys.executable, "-m", "llmdistill", stage, "--config", str(config_path)]
    if log is None:
        proc = subprocess.run(command, env=env)
    else:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as sink:
            proc = subprocess.run(command, env=env, stdout=sink, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        where = f"; its output is in {log}" if log is not None else ""
        raise RuntimeError(f"demo stage '{name}' failed (exit {proc.returncode}); its config is {config_path}{where}")
    logger.info("%s: done in %.0f s", name, time.time() - started)
    return time.time() - started


def run_lanes(lanes: list[tuple[str, ...]], run: Callable[[str, Path | None], float], workers: int) -> dict[str, float]:
    """The independent training arms, ``workers`` at a time: each lane's stages in order, the lanes side by
    side (each stage its own process, its output in ``logs/<stage>.log`` when it shares the machine).

    Returns:
        Each stage's wall time. Once a stage fails no other starts; the first failure is raised when the
        stages already running have ended.
    """
    if workers <= 1:
        return {name: run(name, None) for lane in lanes for name in lane}
    failed = threading.Event()
    errors: list[BaseException] = []  # in the order they happened

    def run_lane(lane: tuple[str, ...]) -> dict[str, float]:
        seconds: dict[str, float] = {}
        for name in lane:
            if failed.is_set():
                break
            try:
                seconds[name] = run(name, LOGS / f"{name}.log")
            except BaseException as err:
                failed.set()
                errors.append(err)
                logger.error("%s; waiting for the stages still running", err)
                raise
        return seconds

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(run_lane, lane) for lane in lanes]
    if errors:
        raise errors[0]
    return {name: seconds for future in futures for name, seconds in future.result().items()}


def write_prompts(cfg: DemoConfig, seed: int, path: Path) -> int:
    """Fresh training prompts from the tiny world's train split (never the held-out set)."""
    from llmdistill.tinyworld.task import generate_problems, to_records, write_jsonl

    problems = generate_problems(cfg.num_prompts, seed=10_000 + seed, split="train")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(path, to_records(problems))
    return len(problems)


def code_fingerprint() -> str:
    """A hash of llmdistill's Python sources: a demo stage is reused only by the code that ran it."""
    package = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        h.update(f"{path.relative_to(package)}\n".encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def run_seed(cfg: DemoConfig, seed: int, run_dir: Path, teacher: Path) -> dict[str, Any]:
    """The generate → build → train (SFT, KD, warm start) → on-policy → eval pipeline for one seed."""
    from llmdistill.tinyworld.bootstrap import student_init

    student = link(student_init(seed), run_dir / "models" / "student-init")
    teacher = link(teacher, run_dir / "models" / "teacher")
    configs = stage_configs(cfg, seed, run_dir, teacher, student)
    # Prompts are rewritten every time (same settings, same bytes): their content hash drives reuse below.
    t0 = time.time()
    prompts_path = run_dir / "data" / "prompts.jsonl"
    write_prompts(cfg, seed, prompts_path)
    timings = {"prompts": time.time() - t0}
    # what every stage's result depends on beyond its config: the teacher's weights (one retrained in
    # place keeps its path), the student's initialisation, and llmdistill's own code
    weights = teacher / "model.safetensors"
    header = (f"# teacher: {teacher.resolve()} {fingerprint(weights if weights.is_file() else teacher)}\n"
              f"# student init: {student.resolve()}\n# llmdistill code: {code_fingerprint()}\n"
              # how the seconds a stage records were measured: a stage run otherwise is not reused
              f"# threads per stage: {stage_threads()}, arms side by side: {cfg.worker_count}\n")
    models = eval_models(run_dir, teacher, student)
    inputs = {"generate": [prompts_path], "build": [run_dir / "generate"], "train_sft": [run_dir / "build"],
              "train_kd": [run_dir / "build"], "train_warm": [run_dir / "build"],
              "onpolicy": [prompts_path, run_dir / STAGE_DIRS["train_warm"]], "eval": models[2:],
              "eval_curve": [run_dir / directory for directory in STAGE_DIRS.values()]}

    def run(name: str, log: Path | None = None) -> float:
        # The inputs' fingerprints are part of what "the same config" means: a stage whose input was
        # just rewritten (a new manifest) runs again; one whose inputs did not change is reused.
        stamp = header + "".join(f"# input {p.name}: {fingerprint(p)}\n" for p in inputs[name])
        return run_stage(name, configs[name], run_dir, cfg.reuse, stamp, log if log is None else run_dir / log)

    for name in ("generate", "build"):
        timings[name] = run(name)
    timings |= run_lanes(ARM_LANES, run, cfg.worker_count)
    # the final models' eval and the checkpoints' (one thread each) side by side
    timings |= run_lanes([("eval",), ("eval_curve",)] if "eval_curve" in configs else [("eval",)], run,
                         min(2, cfg.worker_count))
    run_info = collect(run_dir, timings, [str(m) for m in models], configs)
    return {**run_info, "configs": configs, "wall_s": time.time() - t0, "workers": cfg.worker_count,
            "threads": stage_threads()}


def link(target: Path, name: Path) -> Path:
    """A stable name in the output directory for a checkpoint in the cache (what the configs refer to)."""
    name.parent.mkdir(parents=True, exist_ok=True)
    if name.is_symlink() or name.exists():
        if name.resolve() == Path(target).resolve():
            return name
        name.unlink()
    name.symlink_to(Path(target).resolve(), target_is_directory=True)
    return name


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def teacher_signal(generate_dir: Path, temperature: float) -> dict[str, float]:
    """How much the teacher's top-k says beyond its sampled text: mean top-1 probability and entropy.

    Measured on the teacher's own traces at T = 1 and at the distillation temperature, on the same
    k + 1 points the KD loss uses (the top-k plus one bucket for the rest of the vocabulary).
    """
    import torch

    from llmdistill.formats import read_generation_table
    from llmdistill.losses import teacher_support_logprobs

    table, k = read_generation_table(generate_dir, columns=["topk_logprobs"])
    logprobs = torch.tensor(table.column("topk_logprobs").combine_chunks().flatten().to_numpy().reshape(-1, k))
    points = teacher_support_logprobs(logprobs, dtype=torch.float64)
    out: dict[str, float] = {"positions": float(len(points))}
    for name, t in (("T1", 1.0), ("T_kd", temperature)):
        z = torch.log_softmax(points / t, dim=-1)
        p = z.exp()
        out[f"top1_{name}"] = float(p[:, 0].mean())
        out[f"entropy_{name}"] = float(-(p * z).sum(dim=-1).mean())
    return out


def paired_minus_sft(eval_dir: Path, sft: str, others: dict[str, str]) -> dict[str, dict[str, float]]:
    """Each arm's pass@1 minus the SFT student's on the held-out problems, with the paired standard
    error over the problems (from the eval details): ``{label: {"diff", "se"}}``."""
    from llmdistill.eval.metrics import paired_difference

    rows = read_details(eval_dir / "details.parquet", columns=["model", "problem_id", "correct"]).to_pylist()
    correct: dict[str, dict[str, list[bool]]] = {m: {} for m in (sft, *others.values())}
    for row in rows:
        if row["model"] in correct:
            correct[row["model"]].setdefault(row["problem_id"], []).append(row["correct"])
    out = {}
    for label, model in others.items():
        diff, se = paired_difference(correct[sft], correct[model])
        out[label] = {"diff": diff, "se": se}
    return out


def arm_compute(run_dir: Path) -> dict[str, dict[str, Any]]:
    """What each trained arm spent, from its stages' records (:func:`~llmdistill.compute.stage_compute`):
    wall seconds of every training phase (the warm start included for on-policy), optimizer steps,
    trained tokens, and for on-policy the rollout tokens, teacher tokens scored and seconds per phase
    (rollout, scoring, training, sync)."""
    out: dict[str, dict[str, Any]] = {}
    for label, stages in ARM_STAGES.items():
        arm: dict[str, Any] = {"wall_s": 0.0, "optimizer_steps": 0, "trained_tokens": 0, "phases_s": {}}
        for stage in stages:
            record = stage_compute(run_dir / STAGE_DIRS[stage])
            arm["wall_s"] += record["wall_s"]
            arm["optimizer_steps"] += record["optimizer_steps"]
            arm["trained_tokens"] += record["trained_tokens"]
            for key in ("rollout_tokens", "teacher_tokens_scored"):
                if key in record:
                    arm[key] = record[key]
            name = "warm start (SFT)" if stage == "train_warm" else None
            for phase, seconds in record["phases_s"].items():
                key = name or phase
                arm["phases_s"][key] = round(arm["phases_s"].get(key, 0.0) + seconds, 1)
        arm["wall_s"] = round(arm["wall_s"], 1)
        out[label] = arm
    return out


def accuracy_curves(run_dir: Path, configs: dict[str, dict], scores: dict[str, dict]) -> dict[str, list[dict]]:
    """Each trained arm's held-out pass@1 against its training wall seconds: the untrained student at 0,
    every intermediate checkpoint (the ``eval_curve`` stage; the on-policy arm's seconds include its
    warm start), the final model (the ``eval`` stage). Points: ``{"stage", "step", "seconds", "pass@1"}``."""
    curve = _read(run_dir / CURVE / "results.json")["results"] if "eval_curve" in configs else {}

    def curve_point(stage: str, step: int, model: Path, offset: float) -> dict[str, Any]:
        record = checkpoint_compute(model) if model.name.startswith("checkpoint-") else stage_compute(model)
        if record is None:
            raise ValueError(f"{model}: no training record (a checkpoint saved without its run's clock)")
        seconds = offset + record["wall_s"]
        return {"stage": stage, "step": step, "seconds": round(seconds, 1),
                "pass@1": curve[str(model)]["tiny"]["pass@1"]}

    out = {}
    for label, stages in ARM_STAGES.items():
        points = [{"stage": "init", "step": 0, "seconds": 0.0, "pass@1": scores[LABELS[1]]["pass@1"]}]
        offset = 0.0
        for stage in stages:
            stage_dir = run_dir / STAGE_DIRS[stage]
            if curve:
                points += [curve_point(stage, step, stage_dir / f"checkpoint-{step}", offset)
                           for step in checkpoint_steps(stage, configs[stage])]
            if stage != stages[-1] and curve:
                points.append(curve_point(stage, configs[stage]["max_steps"], stage_dir, offset))
            offset += stage_compute(stage_dir)["wall_s"]
        points.append({"stage": stages[-1], "step": configs[stages[-1]]["max_steps"], "seconds": round(offset, 1),
                       "pass@1": scores[label]["pass@1"]})
        out[label] = points
    return out


def stage_machines(run_dir: Path) -> dict[str, str]:
    """The machine each of a seed's stages ran on, from its manifest (a reused stage may come from another)."""
    dirs = {"generate": run_dir / "generate", "build": run_dir / "build",
            **{stage: run_dir / directory for stage, directory in STAGE_DIRS.items()}, "eval": run_dir / "eval"}
    return {stage: describe_machine(manifest["machine"]) if "machine" in manifest else "not recorded"
            for stage, path in dirs.items() if (path / MANIFEST).is_file() for manifest in [read_manifest(path)]}


def collect(run_dir: Path, timings: dict[str, float], models: list[str], configs: dict[str, dict]) -> dict[str, Any]:
    """The numbers of one seed's run, read back from the stages' own outputs."""
    gen = read_manifest(run_dir / "generate")["counts"]
    stats = _read(run_dir / "build" / "stats.json")
    results = _read(run_dir / "eval" / "results.json")["results"]
    scores = {label: results[m]["tiny"] for label, m in zip(LABELS, models, strict=True)}
    efficiency = _read(run_dir / "eval" / "results.json").get("efficiency", {})
    history = {kind: _read(run_dir / f"train-{kind}" / "log_history.json") for kind in ("sft", "kd", "onpolicy")}
    return {"generate": gen, "build": stats, "eval": scores, "history": history, "timings": timings,
            "efficiency": {label: efficiency.get(m, {}) for label, m in zip(LABELS, models, strict=True)},
            "compute": arm_compute(run_dir), "curves": accuracy_curves(run_dir, configs, scores),
            "machines": stage_machines(run_dir),
            "teacher_signal": teacher_signal(run_dir / "generate", configs["train_kd"]["temperature"]),
            "minus_sft": paired_minus_sft(run_dir / "eval", models[2], {LABELS[3]: models[3], LABELS[4]: models[4]})}


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run the miniature R1 recipe and write ``REPORT.md``; returns the summary."""
    from llmdistill.demo_report import write_report
    from llmdistill.tinyworld.bootstrap import bootstrap_teacher

    started = time.time()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    # Teacher (trained once per machine, then cached)
    t0 = time.time()
    teacher = bootstrap_teacher(cfg.teacher_seed)
    bootstrap_s = time.time() - t0

    # One pipeline per seed
    seeds = cfg.seed_list
    runs = {}
    for seed in seeds:
        run_dir = out if len(seeds) == 1 else out / f"seed-{seed}"
        runs[seed] = run_seed(cfg, seed, run_dir, teacher)
        runs[seed]["timings"]["teacher bootstrap"] = bootstrap_s if seed == seeds[0] else 0.0
        runs[seed]["wall_s"] += runs[seed]["timings"]["teacher bootstrap"]

    # Report
    summary = write_report(cfg, runs, out, teacher)
    write_json_atomic(out / "summary.json", summary)
    write_manifest(out, "demo", cfg, inputs={"teacher": teacher}, counts=summary["counts"], started=started)
    return summary
