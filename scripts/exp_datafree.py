"""Data-free distillation on the tiny world: a KD student from teacher-synthesized prompts vs one from real prompts.

For one seed, at the demo's budget (the demo's generate/build/train/eval configs, the KD arm):
1. real arm: the demo's 2,400 train-split prompts -> generate -> build -> train (KD);
2. data-free arm: ``llmdistill synthesize`` (``configs/synthesize_tiny.yaml``, the question-writing
   teacher of :mod:`llmdistill.tinyworld.questions`), the first ``--max_prompts`` kept (default 2,400:
   as many prompts as the real arm; 0: all) -> the same generate -> build -> train;
3. eval of both students on the held-out set (pass@1), and the synthesized set against the real one:
   distinct operation patterns and difficulty levels (read back with
   :func:`~llmdistill.tinyworld.questions.parse_question`), the share each filter dropped, how many
   prompts decontamination caught, and how often the agreed answer is the true one.

Every stage runs as ``python -m llmdistill <stage> --config <out>/configs/<arm>-<stage>.yaml``.

    python scripts/exp_datafree.py --seed 0 --output_dir runs/datafree   # -> runs/datafree/seed-0/summary-datafree-2400.json

An arm already trained in the seed's directory from the same prompts and configs (a fingerprint beside it) is
reused: the real arm, when only ``--max_prompts`` changes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import yaml

from llmdistill.config.base import read_yaml
from llmdistill.demo import link
from llmdistill.manifest import read_manifest
from llmdistill.tinyworld.bootstrap import bootstrap_teacher, student_init
from llmdistill.tinyworld.questions import parse_question, question_writer
from llmdistill.tinyworld.task import generate_problems, to_records, write_jsonl

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
NUM_PROMPTS = 2400  # the demo's (configs/demo.yaml)


def stage_config(stage: str, settings: dict) -> dict:
    """The config a stage runs: its shipped tiny-world YAML with ``settings`` put in."""
    shipped = CONFIGS / ("train_tiny_kd.yaml" if stage == "train" else f"{stage}_tiny.yaml")
    return {**read_yaml(shipped, _config_class(stage)), **settings}


def run(stage: str, name: str, settings: dict, out: Path) -> None:
    """Run one stage in its own process from its shipped config with ``settings`` put in."""
    path = out / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(stage_config(stage, settings), sort_keys=False))
    print(f"[exp] {name}: llmdistill {stage} --config {path}", flush=True)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
           "TOKENIZERS_PARALLELISM": "false"}
    if subprocess.run([sys.executable, "-m", "llmdistill", stage, "--config", str(path)], env=env).returncode:
        raise SystemExit(f"stage {name} failed; its config is {path}")


def _config_class(stage: str) -> type:
    from llmdistill.cli import COMMANDS, resolve

    return resolve(COMMANDS[stage][0])


def arm_stages(name: str, prompts: Path, out: Path, teacher: Path, student: Path, seed: int) -> list[tuple[str, dict]]:
    """The settings of one arm's generate, build and train (KD) stages."""
    return [("generate", {"model": str(teacher), "dataset": str(prompts), "passthrough_columns": ["answer"],
                          "output_dir": str(out / name / "generate"), "seed": seed}),
            ("build", {"input_path": str(out / name / "generate"), "student_tokenizer": str(student),
                       "output_dir": str(out / name / "build"), "seed": seed}),
            ("train", {"student_model": str(student), "data_dir": str(out / name / "build"),
                       "output_dir": str(out / name / f"kd-{name}"), "seed": seed, "data_seed": seed})]


def arm_fingerprint(prompts: Path, stages: list[tuple[str, dict]]) -> str:
    """What decides an arm's student: the prompt file's bytes and every stage's config."""
    digest = hashlib.sha256(prompts.read_bytes())
    for stage, settings in stages:
        digest.update(json.dumps(stage_config(stage, settings), sort_keys=True, default=str).encode())
    return digest.hexdigest()


def arm(name: str, prompts: Path, out: Path, teacher: Path, student: Path, seed: int) -> Path:
    """generate -> build -> train (KD) on one prompt file; returns the student's directory. An arm an earlier
    run of this script trained in ``out`` from the same prompts and configs (its fingerprint) is reused."""
    stages = arm_stages(name, prompts, out, teacher, student, seed)
    trained, mark = out / name / f"kd-{name}", out / name / "fingerprint.txt"  # eval names a model by its directory
    key = arm_fingerprint(prompts, stages)
    if (trained / "manifest.json").is_file() and mark.is_file() and mark.read_text() == key:
        print(f"[exp] {name}: reusing {trained} (same prompts and configs)", flush=True)
        return trained
    for stage, settings in stages:
        run(stage, f"{name}-{stage}", settings, out)
    mark.write_text(key)
    return trained


def profile(questions: list[str]) -> dict:
    """Operation patterns and difficulty levels of a prompt set, over the questions whose arithmetic reads
    (names or objects may be mixed up); ``strictly_valid``: questions the task itself could have written."""
    ok = [p for q in questions if (p := parse_question(q, strict=False)) is not None]
    return {"prompts": len(questions), "arithmetic_parsed": len(ok),
            "strictly_valid": sum(parse_question(q) is not None for q in questions),
            "distinct_op_patterns": len({p.ops for p in ok}),
            "difficulty": {str(d): round(c / max(1, len(ok)), 3) for d, c in sorted(Counter(p.difficulty for p in ok).items())}}


def set_summary(synthesized: Path, used: Path, real: Path) -> dict:
    """The synthesized set (the part of it the student learns from, ``used``) against the real one:
    diversity, what each filter dropped, answer accuracy."""
    counts = read_manifest(synthesized)["counts"]
    rows = [json.loads(line) for line in used.read_text().splitlines()]
    truth = [parse_question(r["prompt"], strict=False) for r in rows]
    parsed = sum(t is not None for t in truth)
    return {
        "synthesized": profile([r["prompt"] for r in rows]),
        "real": profile([json.loads(line)["prompt"] for line in real.read_text().splitlines()]),
        "dropped_share": {k.removeprefix("dropped_"): round(v / counts["written"], 4)
                          for k, v in counts.items() if k.startswith("dropped_")},
        "written": counts["written"], "kept": counts["kept"], "used": len(rows),
        "decontamination_caught": counts["dropped_contaminated"],
        "agreed_answer_correct (parsed prompts)": round(sum(
            t is not None and str(t.answer) == r["answer"] for t, r in zip(truth, rows, strict=True)) / max(1, parsed), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default="runs/datafree")
    parser.add_argument("--num_queries", type=int, default=4000, help="queries written before the filters")
    parser.add_argument("--max_prompts", type=int, default=NUM_PROMPTS,
                        help="synthesized prompts the data-free student learns from: the first this many kept (the "
                             "queries are i.i.d. samples, so a prefix is a random subset); default: the demo's "
                             f"{NUM_PROMPTS}, as many as the real arm; 0: all kept")
    parser.add_argument("--synthesize_only", action="store_true",
                        help="stop after synthesize: the synthesized set's numbers, no students")
    args = parser.parse_args()
    out = Path(args.output_dir) / f"seed-{args.seed}"
    out.mkdir(parents=True, exist_ok=True)

    # Models: the shipped teacher distils; its question-writing copy writes (and answers) the prompts
    teacher = link(bootstrap_teacher(0), out / "models" / "teacher")
    writer = link(question_writer(0), out / "models" / "question-writer")
    student = link(student_init(args.seed), out / "models" / "student-init")

    # Prompts: the demo's real ones, and synthesized ones
    real = write_jsonl(out / "data" / "real.jsonl",
                       to_records(generate_problems(NUM_PROMPTS, seed=10_000 + args.seed, split="train")))
    run("synthesize", "synthesize", {"model": str(writer), "num_queries": args.num_queries, "seed": args.seed,
                                     "output_dir": str(out / "synthesize")}, out)
    synthesized = out / "synthesize" / "prompts.jsonl"
    datafree = "datafree"
    if args.max_prompts:
        datafree = f"datafree-{args.max_prompts}"
        kept = synthesized.read_text().splitlines(keepends=True)
        if len(kept) < args.max_prompts:
            raise SystemExit(f"only {len(kept)} synthesized prompts were kept: raise --num_queries")
        synthesized = out / "data" / f"synthesized-{args.max_prompts}.jsonl"
        synthesized.write_text("".join(kept[:args.max_prompts]))

    summary = {"seed": args.seed, **set_summary(out / "synthesize", synthesized, real)}
    if not args.synthesize_only:
        # Two KD students at the demo's budget, and their held-out pass@1
        students = {name: arm(name, prompts, out, teacher, student, args.seed)
                    for name, prompts in (("real", real), (datafree, synthesized))}
        run("eval", f"eval-{datafree}", {"models": ",".join(str(s) for s in students.values()),
                                          "output_dir": str(out / f"eval-{datafree}"), "seed": args.seed}, out)
        results = json.loads((out / f"eval-{datafree}" / "results.json").read_text())["results"]
        pass1 = {name: results[str(path)]["tiny"]["pass@1"] for name, path in students.items()}
        summary.update({"pass@1": pass1, "datafree_over_real": round(pass1[datafree] / pass1["real"], 4)})
    (out / f"summary-{datafree}.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
