"""Two tiny teachers merged, the better single teacher, and one born-again round, at the demo's budget.

One run trains and evaluates one arm for one seed and prints its held-out pass@1:

  best_single  KD student on the top-k of the better of the two tiny teachers (held-out greedy
               accuracy recorded in each teacher's bootstrap manifest);
  merged       KD student on both teachers' top-k merged (equal weights: `build` with `teachers`);
  born_again   KD student whose teacher is the best_single arm's KD student (same initial weights);
               the best_single arm runs first when it has not.

Every arm trains on the same traces, so the arms differ only in the top-k signal: tiny teacher
seed 0 answers the demo's prompts for this seed (configs/generate_tiny.yaml), the traces that
stopped are written to JSONL, and each teacher re-scores them (`llmdistill score`, one prefill).
Each stage runs its shipped config (generate_tiny, score_tiny, build_tiny, train_tiny_kd,
eval_tiny) with only paths and seeds overridden; a stage whose output exists with the same
config is reused. The second teacher is bootstrapped from `--teacher_seeds`' second seed (minutes
of CPU, then cached).

    python scripts/exp_multi_teacher.py --seed 0 --arm merged
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from llmdistill.config.base import read_yaml
from llmdistill.config.build import BuildConfig
from llmdistill.config.eval import EvalConfig
from llmdistill.config.generate import GenerateConfig, ScoreConfig
from llmdistill.config.train import TrainConfig
from llmdistill.formats import iter_generations
from llmdistill.manifest import MANIFEST, read_manifest
from llmdistill.tinyworld.task import write_jsonl

ROOT = Path(__file__).resolve().parents[1]
CLASSES = {"generate": GenerateConfig, "score": ScoreConfig, "build": BuildConfig, "train": TrainConfig,
           "eval": EvalConfig}
ARMS = ("merged", "best_single", "born_again")


def run(stage: str, shipped: str, overrides: dict, out: Path, name: str) -> Path:
    """``llmdistill <stage>`` on ``configs/<shipped>`` with ``overrides``; reused when done with the same config."""
    config = {**read_yaml(ROOT / "configs" / shipped, CLASSES[stage]), **overrides}
    path = out / "configs" / f"{name}.yaml"
    text = yaml.safe_dump(config, sort_keys=False)
    output = Path(config["output_dir"])
    if (output / MANIFEST).is_file() and path.is_file() and path.read_text() == text:
        print(f"{name}: reusing {output}", flush=True)
        return output
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"{name}: llmdistill {stage} --config {path}", flush=True)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
           "TOKENIZERS_PARALLELISM": "false"}
    if subprocess.run([sys.executable, "-m", "llmdistill", stage, "--config", str(path)], env=env).returncode:
        raise SystemExit(f"{name} failed; its config is {path}")
    return output


def export_traces(generation: Path, path: Path) -> Path:
    """The generated traces that stopped (not truncated), as (prompt, completion) pairs to re-score."""
    rows = [{"id": r.prompt_id, "sample_index": r.sample_index, "prompt": r.prompt, "completion": r.completion,
             "answer": r.extra["answer"]} for r in iter_generations(generation) if r.finish_reason == "stop"]
    return write_jsonl(path, rows)


def score(model: Path, traces: Path, out: Path, name: str, seed: int) -> Path:
    return run("score", "score_tiny.yaml", {"model": str(model), "dataset": str(traces), "id_column": "id",
                                             "sample_index_column": "sample_index", "output_dir": str(out / name),
                                             "seed": seed}, out, name)


def kd_student(build: dict, student: Path, out: Path, name: str, seed: int, steps: dict) -> Path:
    """build (build_tiny.yaml + ``build``) -> KD student (train_tiny_kd.yaml, ``steps`` overriding its budget)."""
    data = run("build", "build_tiny.yaml", {**build, "student_tokenizer": str(student),
                                             "output_dir": str(out / f"build-{name}"), "seed": seed},
               out, f"build-{name}")
    return run("train", "train_tiny_kd.yaml", {"student_model": str(student), "data_dir": str(data),
                                                "output_dir": str(out / f"train-{name}"), "seed": seed,
                                                "data_seed": seed, **steps}, out, f"train-{name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arm", choices=ARMS, required=True)
    parser.add_argument("--teacher_seeds", default="0,1", help="the two tiny teachers' bootstrap seeds")
    parser.add_argument("--out", default="runs/exp_multi_teacher")
    parser.add_argument("--max_steps", type=int, default=None,
                        help="smoke runs only: fewer training steps than the demo's (train_tiny_kd.yaml)")
    args = parser.parse_args()
    started = time.time()
    steps = {"max_steps": args.max_steps, "warmup_steps": args.max_steps // 20} if args.max_steps else {}

    from llmdistill.config.demo import DemoConfig
    from llmdistill.demo import write_prompts
    from llmdistill.tinyworld.bootstrap import bootstrap_teacher, student_init

    # Teachers, student, prompts (the demo's for this seed)
    out = Path(args.out).resolve() / f"seed-{args.seed}"
    seeds = [int(s) for s in args.teacher_seeds.split(",")]
    teachers = {f"t{s}": bootstrap_teacher(s) for s in seeds}
    accuracy = {name: read_manifest(path)["heldout_accuracy"] for name, path in teachers.items()}
    best = max(accuracy, key=accuracy.get)
    student = student_init(args.seed)
    prompts = out / "data" / "prompts.jsonl"
    write_prompts(DemoConfig(), args.seed, prompts)

    # The traces: the first teacher's answers, re-scored by every teacher
    generation = run("generate", "generate_tiny.yaml", {"model": str(teachers[f"t{seeds[0]}"]),
                                                        "dataset": str(prompts), "output_dir": str(out / "generate"),
                                                        "seed": args.seed}, out, "generate")
    traces = export_traces(generation, out / "data" / "traces.jsonl")
    scored = {name: score(path, traces, out, f"score-{name}", args.seed) for name, path in teachers.items()}

    # The arm
    models: dict[str, Path] = {}
    if args.arm in ("best_single", "born_again"):
        models["best_single"] = kd_student({"input_path": str(scored[best])}, student, out, "best_single", args.seed,
                                         steps)
    if args.arm == "merged":
        models["merged"] = kd_student({"input_path": str(scored[f"t{seeds[0]}"]), "teacher_weights": [0.5, 0.5],
                                       "teachers": [f"{n}={p}" for n, p in scored.items()]}, student, out, "merged",
                                      args.seed, steps)
    if args.arm == "born_again":
        self_scored = score(models["best_single"], traces, out, "score-best_single", args.seed)
        models["born_again"] = kd_student({"input_path": str(self_scored)}, student, out, "born_again", args.seed,
                                           steps)

    # Held-out pass@1 (eval_tiny.yaml: 500 problems x 4 samples)
    evaluated = run("eval", "eval_tiny.yaml", {"models": ",".join(str(m) for m in models.values()),
                                               "output_dir": str(out / f"eval-{args.arm}"), "seed": args.seed},
                    out, f"eval-{args.arm}")
    results = json.loads((evaluated / "results.json").read_text())["results"]
    summary = {"seed": args.seed, "arm": args.arm, "teacher_accuracy": accuracy, "best_single_teacher": best,
               "pass@1": {name: results[str(m)]["tiny"]["pass@1"] for name, m in models.items()},
               "pass@1_se": {name: results[str(m)]["tiny"]["pass@1_se"] for name, m in models.items()},
               "wall_s": round(time.time() - started, 1)}
    (out / f"{args.arm}.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
