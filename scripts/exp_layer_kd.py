"""Experiment: does feature or attention distillation add anything to KD on the tiny world?

One arm, one seed, at the demo's student budget (``configs/train_tiny_kd.yaml``: 1,800 steps x 4
packed rows, the demo's built data of that seed), then the demo's held-out eval
(``configs/eval_tiny.yaml``: 500 problems x 4 samples at T = 0.6). Prints pass@1 and its
standard error, and appends one JSON line to ``<out>/results.jsonl``.

Arms (the shipped configs, with this seed's paths put in, nothing else changed):

* ``kd``: KD on the stored top-20 (``train_tiny_kd.yaml``), the demo's random-init 64 x 2 student;
* ``kd_dropinit``: the same KD objective, online teacher, student = the teacher's blocks 0 and 2
  (DistilBERT's initialisation: 128 x 2);
* ``kd_feature_randinit``: KD + MSE feature term (``train_tiny_feature.yaml``), random-init 64 x 2
  student through a learned 64 -> 128 projection;
* ``kd_feature_dropinit``: KD + MSE feature term, drop-layer 128 x 2 student (no projection);
* ``kd_attention``: KD + attention KL of the last blocks (``train_tiny_attention.yaml``, eager).

The data is the demo's build of that seed: ``runs/demo/build`` for seed 0 (``make demo``),
``runs/demo-seeds/seed-<S>/build`` for the others (``llmdistill demo --seeds 0,1,2``).

    python scripts/exp_layer_kd.py --seed 0 --arm kd_feature_dropinit
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

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
ARMS = {
    "kd": ("train_tiny_kd.yaml", {}),
    "kd_dropinit": ("train_tiny_kd.yaml", {"student_init": "drop_layers"}),
    "kd_feature_randinit": ("train_tiny_feature.yaml", {}),
    "kd_feature_dropinit": ("train_tiny_feature.yaml", {"student_init": "drop_layers"}),
    "kd_attention": ("train_tiny_attention.yaml", {}),
}


def demo_build(seed: int) -> Path:
    return ROOT / ("runs/demo/build" if seed == 0 else f"runs/demo-seeds/seed-{seed}/build")


def run_stage(stage: str, shipped: str, overrides: dict, config_path: Path) -> None:
    data = {**yaml.safe_load((CONFIGS / shipped).read_text()), **overrides}
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(yaml.safe_dump(data, sort_keys=False))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "llmdistill", stage, "--config", str(config_path)], env=env)
    if proc.returncode != 0:
        sys.exit(f"exp_layer_kd: {stage} failed (exit {proc.returncode}); its config is {config_path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--arm", choices=sorted(ARMS), required=True)
    parser.add_argument("--out", default="runs/exp-layer-kd")
    parser.add_argument("--data_dir", default=None, help="built shards (default: the demo's build of --seed)")
    args = parser.parse_args()

    from llmdistill.tinyworld.bootstrap import bootstrap_teacher, student_init

    data = Path(args.data_dir) if args.data_dir else demo_build(args.seed)
    if not (data / "manifest.json").is_file():
        sys.exit(f"exp_layer_kd: no built data in {data}: run `llmdistill demo --seeds {args.seed}` first "
                 "(or pass --data_dir)")
    teacher = bootstrap_teacher(seed=0)
    shipped, changes = ARMS[args.arm]
    run_dir = Path(args.out) / f"{args.arm}-seed{args.seed}"
    overrides = {"student_model": str(student_init(args.seed)), "data_dir": str(data), "output_dir": str(run_dir),
                 "seed": args.seed, "data_seed": args.seed, **changes}
    if shipped != "train_tiny_kd.yaml" or changes:
        overrides["teacher_model"] = str(teacher)
    if changes.get("student_init") == "drop_layers":
        overrides["student_model"] = ""

    # Train
    started = time.time()
    run_stage("train", shipped, overrides, run_dir / "train.yaml")
    train_s = time.time() - started
    # Evaluate (the demo's held-out protocol)
    eval_dir = run_dir / "eval"
    run_stage("eval", "eval_tiny.yaml", {"models": str(run_dir), "output_dir": str(eval_dir), "seed": args.seed},
              run_dir / "eval.yaml")
    tiny = json.loads((eval_dir / "results.json").read_text())["results"][str(run_dir)]["tiny"]
    row = {"arm": args.arm, "seed": args.seed, "pass@1": tiny["pass@1"], "pass@1_se": tiny["pass@1_se"],
           "train_s": round(train_s, 1), "data": str(data)}
    with open(Path(args.out) / "results.jsonl", "a") as fh:
        fh.write(json.dumps(row) + "\n")
    print(f"{args.arm} seed {args.seed}: held-out pass@1 {tiny['pass@1']:.3f} ± {tiny['pass@1_se']:.3f} "
          f"(train {train_s:.0f} s)")


if __name__ == "__main__":
    main()
