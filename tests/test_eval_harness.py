"""The eval harness: config checks, dry run, reports, and one real vLLM run (2 engine starts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli  # tests/ is on sys.path (pytest's rootdir conftest)

from llmdistill.config.base import ConfigError, load_config
from llmdistill.config.eval import EvalConfig
from llmdistill.eval.engine import adapter_base
from llmdistill.eval.harness import evaluate_models
from llmdistill.eval.report import model_labels, plot_results, results_markdown
from llmdistill.formats import read_details, write_details
from llmdistill.manifest import describe_machine, machine

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.unit
def test_config_rejects_unknown_benchmark_and_missing_models():
    with pytest.raises(ConfigError, match="valid names: aime24, aime25, gpqa_diamond, gsm8k, humaneval, math500, tiny"):
        EvalConfig(models="m", benchmarks="tiny,aime2099")
    with pytest.raises(ConfigError, match="models is empty"):  # checked when evaluating: a dry run needs none
        evaluate_models(EvalConfig(benchmarks="tiny"))
    with pytest.raises(ConfigError, match="data_path holds one benchmark"):
        EvalConfig(models="m", benchmarks="tiny,math500", data_path="x.jsonl")
    with pytest.raises(ConfigError, match="column_map must be a JSON object"):
        EvalConfig(models="m", column_map="{not json")


@pytest.mark.unit
def test_each_problem_samples_from_its_own_seed_off_cpu(monkeypatch):
    """On a GPU, every problem gets a seed of its own, the same in every run: one shared seed would give
    sample j of every problem the same noise (vLLM seeds sample j ``seed + j``), and the standard
    errors, computed across problems, assume independent problems. vLLM's CPU backend takes no
    per-request seed (its engine seed is used)."""
    from types import SimpleNamespace

    from vllm.platforms import current_platform

    from llmdistill.eval.harness import _request_seeds

    items = [SimpleNamespace(id=f"p{i}") for i in range(1000)]
    monkeypatch.setattr(current_platform, "is_cpu", lambda: False)
    seeds = _request_seeds(0, items)
    assert len(set(seeds)) == 1000 and all(0 <= s < 2**31 for s in seeds)
    assert seeds == _request_seeds(0, items) and seeds != _request_seeds(1, items)
    assert _request_seeds(0, items[::-1]) == seeds[::-1]  # a problem's seed is its own, not its position's
    monkeypatch.setattr(current_platform, "is_cpu", lambda: True)
    assert _request_seeds(0, items) is None


@pytest.mark.unit
def test_shipped_yaml_loads():
    config = load_config(EvalConfig, REPO / "configs" / "eval_tiny.yaml", models="teacher")
    assert config.benchmark_list == ["tiny"] and config.enforce_eager and config.num_samples == 4


@pytest.mark.unit
def test_eval_plan_lists_counts_and_token_budget_without_a_model(tmp_path):
    from llmdistill.plan import make_plan

    config = EvalConfig(models="a,b", benchmarks="tiny,humaneval,aime24", output_dir=str(tmp_path / "out"))
    plan = make_plan("eval", config)
    assert plan["tiny"] == "500 problems x 4 samples x 96 max tokens = 192000 tokens (local)"
    assert plan["humaneval"].startswith("164 problems")
    assert plan["aime24"].endswith(f"= {30 * 64 * 32768} tokens (hub: HuggingFaceH4/aime_2024)")
    assert plan["token budget in all"] == 2 * plan["token budget per model"]
    assert not (tmp_path / "out").exists()


@pytest.mark.unit
@pytest.mark.parametrize("flag", [["--dry_run"], ["--dry_run", "true"], ["--dry_run=true"], ["--dry_run", "1"]])
def test_dry_run_from_the_command_line(flag):
    env = {**os.environ, "COLUMNS": "200"}
    out = subprocess.run([sys.executable, "-m", "llmdistill", "eval", "--benchmarks", "tiny", *flag,
                          "--limit", "10", "--num_samples", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "10 problems x 2 samples x 96 max tokens = 1920 tokens" in out.stdout


@pytest.mark.unit
def test_dry_run_false_runs_and_a_bad_value_is_refused():
    from llmdistill.cli import pop_flag
    from llmdistill.config.base import ConfigError

    assert pop_flag(["--a", "1", "--dry_run", "false", "--b"], "dry_run") == (False, ["--a", "1", "--b"])
    assert pop_flag(["--dry_run", "--limit", "3"], "dry_run") == (True, ["--limit", "3"])
    with pytest.raises(ConfigError, match="--dry_run takes true or false"):
        pop_flag(["--dry_run=maybe"], "dry_run")


def _fake_results() -> dict:
    metrics = {"num_problems": 3, "num_samples": 4, "pass@1": 0.5, "pass@1_se": 0.1, "pass@k": {"2": 0.7, "4": 0.9},
               "maj@k": {"2": 0.6, "4": 0.66}, "truncation_rate": 0.25, "mean_tokens": 41.2}
    settings = {"num_problems": 3, "num_samples": 4, "temperature": 0.6, "top_p": 0.95, "max_tokens": 96,
                "scorer": "numeric"}
    return {"models": ["org/a", "org/b"], "benchmarks": {"tiny": settings},
            "results": {"org/a": {"tiny": metrics}, "org/b": {"tiny": {**metrics, "pass@1": 0.25}}}}


@pytest.mark.unit
def test_markdown_puts_models_side_by_side_and_chart_is_written(tmp_path):
    md = results_markdown(_fake_results())
    assert "| metric | org/a | org/b |" in md
    assert "| pass@1 (%) ± s.e. | 50.0 ± 10.0 | 25.0 ± 10.0 |" in md
    assert "| pass@4 (%) | 90.0 | 90.0 |" in md and "| maj@4 (%) | 66.0 | 66.0 |" in md
    assert "| truncated (%) | 25.0 | 25.0 |" in md
    plot_results(_fake_results(), tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    assert model_labels([str(tmp_path), "org/x"]) == {str(tmp_path): tmp_path.name, "org/x": "org/x"}
    for run in ("sft", "kd"):
        (tmp_path / run / "checkpoint-6").mkdir(parents=True)
    checkpoints = [str(tmp_path / run / "checkpoint-6") for run in ("sft", "kd")]
    assert model_labels(checkpoints) == dict(zip(checkpoints, ["sft/checkpoint-6", "kd/checkpoint-6"], strict=True))


@pytest.mark.unit
def test_the_report_puts_each_trained_models_compute_beside_its_accuracy(tmp_path):
    """A row per model with a training record (its stages in order, the sums), none for a hub model; the
    machine the training ran on; the accuracy-against-compute chart."""
    from llmdistill.eval.report import plot_accuracy_vs_compute

    machine = {"cpu": "AMD EPYC", "cpu_family": "26", "cpu_model": "2", "vector": "AVX-512", "cpus": 2,
               "memory_gib": 23.5, "gpus": []}
    run = tmp_path / "train-onpolicy"
    stages = [{"path": str(tmp_path / "train-warm"), "stage": "train", "machine": machine},
              {"path": str(run), "stage": "onpolicy", "machine": machine, "rollout_tokens": 5000}]
    results = _fake_results()
    (run / "checkpoint-50").mkdir(parents=True)  # local paths: labelled by their last component
    final, checkpoint = str(run), str(run / "checkpoint-50")
    for model, share in ((final, 1.0), (checkpoint, 0.5)):
        results["models"].append(model)
        results["results"][model] = results["results"]["org/b"]
        results.setdefault("compute", {})[model] = {
            "wall_s": 1234.5 * share, "optimizer_steps": int(1000 * share), "trained_tokens": int(800_000 * share),
            "rollout_tokens": int(80_000 * share), "teacher_tokens_scored": int(80_000 * share),
            "stages": [stages[0], {**stages[1], "path": model}]}
    results["machine"] = machine
    md = results_markdown(results)
    assert "Wall seconds of all the processes that ran them, on this machine" in md
    assert ("| train-onpolicy | train (train-warm) → onpolicy (train-onpolicy) | 1,000 | 800,000 | 80,000 | 80,000 | "
            "1,234.5 |") in md
    assert ("| train-onpolicy/checkpoint-50 | train (train-warm) → onpolicy (train-onpolicy/checkpoint-50) | 500 | 400,000 | 40,000 "
            "| 40,000 | 617.2 |") in md
    assert "| org/a |" not in md.split("## Training compute")[1]
    other = {**machine, "vector": "AVX2", "cpu_family": "25"}
    results["machine"] = other
    assert "on AMD EPYC (family 26, model 2), AVX-512, 2 CPUs, 23.5 GiB:" in results_markdown(results)
    plot_accuracy_vs_compute(results, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    del results["compute"]
    assert "## Training compute" not in results_markdown(results)


@pytest.mark.unit
def test_parameters_are_counted_from_the_checkpoint_and_compared_with_the_reference(tiny_teacher_dir,
                                                                                   tiny_student_dir):
    from transformers import AutoModelForCausalLM

    from llmdistill.eval.harness import count_parameters, efficiency

    sizes = {m: sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(m).parameters())
             for m in (tiny_teacher_dir, tiny_student_dir)}
    assert {m: count_parameters(m) for m in sizes} == sizes and count_parameters("org/hub-model") is None
    metrics = {"pass@1": 0.8, "generation": {"tokens": 500, "seconds": 2.0}}
    results = {tiny_teacher_dir: {"tiny": metrics},
               tiny_student_dir: {"tiny": {**metrics, "pass@1": 0.6, "generation": {"tokens": 900, "seconds": 1.5}}}}
    eff = efficiency(results, tiny_teacher_dir)[tiny_student_dir]
    assert eff == {"parameters": sizes[tiny_student_dir], "generation_tokens_per_s": 600.0,
                   "compression_vs_reference": round(sizes[tiny_teacher_dir] / sizes[tiny_student_dir], 2),
                   "pass@1_retained_vs_reference": {"tiny": 0.75}}
    assert "pass@1_retained_vs_reference" not in efficiency(results, None)[tiny_student_dir]


@pytest.mark.unit
def test_details_roundtrip(tmp_path):
    row = {"model": "m", "benchmark": "tiny", "problem_id": "p", "sample_index": 0, "gold": "4", "response": "r",
           "extracted": None, "correct": False, "finish_reason": "length", "n_tokens": 96}
    write_details([row], tmp_path / "d.parquet")
    assert read_details(tmp_path / "d.parquet").to_pylist() == [row]


@pytest.mark.unit
def test_existing_output_dir_is_not_overwritten(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="--overwrite"):
        evaluate_models(EvalConfig(models="m", output_dir=str(tmp_path), limit=2))
    assert (tmp_path / "keep.txt").exists()


@pytest.mark.unit
def test_adapter_detection(tmp_path):
    assert adapter_base(str(tmp_path)) is None
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/models/base"}))
    assert adapter_base(str(tmp_path)) == "/models/base"


def _scrambling_adapter(base: Path, out: Path) -> Path:
    """A LoRA adapter on ``base`` with large random B: if it is applied, the model is broken."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(0))
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(base)).save_pretrained(str(out))
    return out


@pytest.mark.integration
def test_tiny_teacher_and_lora_adapter_end_to_end(tmp_path, tiny_teacher_dir):
    """Two engine starts: the bootstrapped teacher, then a LoRA adapter served on it."""
    from llmdistill.tinyworld.bootstrap import teacher_accuracy

    adapter = _scrambling_adapter(Path(tiny_teacher_dir), tmp_path / "adapter")
    out = tmp_path / "eval"
    run_cli("eval", "--models", f"{tiny_teacher_dir},{adapter}", "--reference_model", str(tiny_teacher_dir),
            "--benchmarks", "tiny", "--limit", "100", "--num_samples", "4", "--enforce_eager", "true",
            "--max_model_len", "256", "--kv_cache_space_gb", "1", "--output_dir", str(out))
    assert sorted(p.name for p in out.iterdir()) == ["details.parquet", "manifest.json", "results.json",
                                                     "results.md", "results.png"]
    results = json.loads((out / "results.json").read_text())
    teacher, scrambled = (results["results"][str(m)]["tiny"] for m in (tiny_teacher_dir, adapter))
    assert teacher["num_problems"] == 100 and teacher["num_samples"] == 4
    assert abs(teacher["pass@1"] - teacher_accuracy(tiny_teacher_dir)) < 0.15  # sampled vs greedy, 100 problems
    assert teacher["pass@1"] <= teacher["pass@k"]["4"] <= 1.0
    assert scrambled["pass@1"] < 0.5 * teacher["pass@1"]  # the adapter really was applied

    details = read_details(out / "details.parquet").to_pylist()
    assert len(details) == 2 * 100 * 4
    mine = [d for d in details if d["model"] == str(tiny_teacher_dir)]
    per_problem = {}
    for d in mine:
        per_problem.setdefault(d["problem_id"], []).append(d["correct"])
    assert sum(sum(v) for v in per_problem.values()) / len(mine) == pytest.approx(teacher["pass@1"])
    for d in mine[:50]:
        assert d["correct"] == (d["extracted"] == d["gold"])
        assert d["finish_reason"] in ("stop", "length") and 0 < d["n_tokens"] <= 96
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "eval" and manifest["counts"]["samples"] == 800
    assert "| metric |" in (out / "results.md").read_text()
    assert f"Machine: {describe_machine(machine())}." in (out / "results.md").read_text()
    eff = results["efficiency"]
    assert eff[str(tiny_teacher_dir)]["compression_vs_reference"] == 1.0
    assert eff[str(tiny_teacher_dir)]["pass@1_retained_vs_reference"] == {"tiny": 1.0}
    assert eff[str(adapter)]["parameters"] is None  # an adapter alone has no model size
    assert eff[str(adapter)]["pass@1_retained_vs_reference"]["tiny"] == pytest.approx(
        scrambled["pass@1"] / teacher["pass@1"], abs=1e-4)
    assert all(row["generation_tokens_per_s"] > 0 for row in eff.values())
    assert "## Efficiency" in (out / "results.md").read_text()
