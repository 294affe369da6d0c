"""The demo end to end, at a size that fits CI: every stage through the CLI, then the report.

The full-size claim (KD beats SFT on held-out accuracy) is what `make demo` measures; here the
pipeline's plumbing is checked against the stages' own outputs, and a re-run must reuse them.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from llmdistill.config.base import ConfigError, load_config
from llmdistill.config.demo import DemoConfig
from llmdistill.manifest import describe_machine, machine

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
# the CI-sized demo: the shipped stage configs with these values changed
SMALL = {"generate_tiny.yaml": {"num_samples": 2}, "build_tiny.yaml": {"max_length": 256},
         "train_tiny_sft.yaml": {"max_steps": 12, "per_device_train_batch_size": 2, "save_steps": 6, "logging_steps": 4},
         "train_tiny_kd.yaml": {"max_steps": 12, "per_device_train_batch_size": 2, "save_steps": 6, "logging_steps": 4},
         "train_tiny_warm.yaml": {"max_steps": 4, "per_device_train_batch_size": 2, "save_steps": 6,
                                  "logging_steps": 4},
         "onpolicy_tiny.yaml": {"max_steps": 3, "warmup_steps": 1, "prompts_per_step": 4, "max_new_tokens": 24,
                                "save_steps": 2, "logging_steps": 1},
         "eval_tiny.yaml": {"limit": 40, "num_samples": 2}}


def small_configs(directory: Path) -> Path:
    """A copy of the shipped tiny configs, shrunk to CI size."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, changes in SMALL.items():
        data = yaml.safe_load((CONFIGS / name).read_text())
        (directory / name).write_text(yaml.safe_dump({**data, **changes}, sort_keys=False))
    return directory


@pytest.mark.unit
def test_demo_config_checks_seeds_and_its_stage_configs(tmp_path):
    assert load_config(DemoConfig, CONFIGS / "demo.yaml").seed_list == [0]
    assert DemoConfig(seeds="0, 1,2").seed_list == [0, 1, 2]
    with pytest.raises(ConfigError, match="comma-separated integers"):
        DemoConfig(seeds="a,b")
    with pytest.raises(ConfigError, match="lacks generate_tiny.yaml"):
        DemoConfig(configs_dir=str(tmp_path))


@pytest.mark.unit
def test_shipped_demo_config_states_the_defaults():
    """`make demo` runs configs/demo.yaml: it must say what the DemoConfig defaults (and the README) say."""
    shipped = yaml.safe_load((CONFIGS / "demo.yaml").read_text())
    defaults = DemoConfig()
    differing = {k: (v, getattr(defaults, k)) for k, v in shipped.items() if getattr(defaults, k) != v}
    assert not differing, f"configs/demo.yaml disagrees with DemoConfig defaults: {differing}"


@pytest.mark.unit
def test_each_tiny_config_is_exactly_the_demos_stage(tmp_path):
    """The demo overrides only paths and seeds: everything else comes from configs/*_tiny.yaml."""
    from llmdistill.config.demo import STAGE_FILES
    from llmdistill.demo import STAGE_CLASSES, stage_configs

    cfg = DemoConfig(configs_dir=str(CONFIGS))
    configs = stage_configs(cfg, 3, tmp_path / "run", tmp_path / "teacher", tmp_path / "student")
    overridden = {"dataset", "model", "input_path", "student_tokenizer", "student_model", "data_dir", "models",
                  "output_dir", "seed", "data_seed", "teacher_model", "reference_model"}
    for name, values in configs.items():
        shipped = yaml.safe_load((CONFIGS / STAGE_FILES[name]).read_text())
        assert set(values) - overridden <= set(shipped), name
        assert {k: v for k, v in values.items() if k not in overridden} == \
            {k: v for k, v in shipped.items() if k not in overridden}, name
        assert values["seed"] == 3 and str(tmp_path / "run") in values["output_dir"]
        load_config(STAGE_CLASSES[name.split("_")[0]], **values)  # every demo stage config is valid
    sft, kd = configs["train_sft"], configs["train_kd"]
    assert {k: v for k, v in sft.items() if k not in ("alpha", "output_dir")} == \
        {k: v for k, v in kd.items() if k not in ("alpha", "output_dir")}, "SFT and KD must differ only in alpha"
    assert sft["alpha"] == 0.0 < kd["alpha"]
    warm = configs["train_warm"]  # the on-policy arm's warm start: a shorter SFT run
    assert {k: v for k, v in sft.items() if k not in ("max_steps", "warmup_steps", "output_dir")} == \
        {k: v for k, v in warm.items() if k not in ("max_steps", "warmup_steps", "output_dir")}
    assert warm["max_steps"] < sft["max_steps"]
    assert configs["onpolicy"]["student_model"] == warm["output_dir"]
    assert configs["onpolicy"]["dataset"] == configs["generate"]["dataset"]  # the same training prompts
    assert configs["eval"]["models"].split(",")[-1] == configs["onpolicy"]["output_dir"]
    # the accuracy-against-time curves: every checkpoint the shipped configs save before their last step
    run = tmp_path / "run"
    assert configs["eval_curve"]["models"].split(",") == [
        *(str(run / arm / f"checkpoint-{step}") for arm in ("train-sft", "train-kd") for step in (450, 900, 1350)),
        str(run / "train-warm" / "checkpoint-450"),
        *(str(run / "train-onpolicy" / f"checkpoint-{step}") for step in (25, 50, 75)),
        str(run / "train-warm")]
    assert configs["eval_curve"]["output_dir"] == str(run / "eval-curve")


@pytest.mark.integration
def test_demo_small_end_to_end_and_reuse(tmp_path, tiny_teacher_dir):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "llmdistill", "demo", "--config", str(CONFIGS / "demo.yaml"), "--output_dir", str(out),
           "--num_prompts", "48", "--configs_dir", str(small_configs(tmp_path / "configs")), "--workers", "2"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]

    # every stage ran from a saved config and left its manifest
    for stage in ("generate", "build", "train_sft", "train_kd", "train_warm", "onpolicy", "eval", "eval_curve"):
        assert (out / "configs" / f"{stage}.yaml").is_file()
    for sub in ("generate", "build", "train-sft", "train-kd", "train-warm", "train-onpolicy", "eval", "eval-curve"):
        assert (out / sub / "manifest.json").is_file(), sub
    assert (out / "manifest.json").is_file()
    # the training arms ran two at a time, their output in logs/
    for stage in ("train_sft", "train_kd", "train_warm", "onpolicy"):
        assert (out / "logs" / f"{stage}.log").stat().st_size > 0, stage
    assert "training arms ran 2 at a time, each stage in its own process on one thread." in (out / "REPORT.md").read_text()
    sft = yaml.safe_load((out / "configs" / "train_sft.yaml").read_text())
    kd = yaml.safe_load((out / "configs" / "train_kd.yaml").read_text())
    assert sft["alpha"] == 0.0 and kd["alpha"] > 0
    assert {k: v for k, v in sft.items() if k not in ("alpha", "output_dir")} == \
        {k: v for k, v in kd.items() if k not in ("alpha", "output_dir")}, "SFT and KD must differ only in alpha"

    # the report's numbers are the eval stage's numbers
    summary = json.loads((out / "summary.json").read_text())
    results = json.loads((out / "eval" / "results.json").read_text())["results"]
    models = yaml.safe_load((out / "configs" / "eval.yaml").read_text())["models"].split(",")
    assert Path(models[0]).resolve() == Path(tiny_teacher_dir).resolve()
    by_label = {r["model"]: r for r in summary["results"]}
    labels = ("teacher", "student (untrained)", "SFT student", "KD student", "on-policy student")
    for label, model in zip(labels, models, strict=True):
        assert by_label[label]["pass@1"] == pytest.approx(results[model]["tiny"]["pass@1"])
    report = (out / "REPORT.md").read_text()
    for arm, model in (("KD student", models[3]), ("on-policy student", models[4])):
        versus = summary["versus_sft"][arm]
        assert versus["mean"] == pytest.approx(results[model]["tiny"]["pass@1"] - results[models[2]]["tiny"]["pass@1"])
        # the paired difference is the same arm − SFT, read problem by problem from the eval details
        paired = versus["paired"]["0"]
        assert paired["diff"] == pytest.approx(versus["mean"])
        assert f"{paired['diff']:+.3f} ± {paired['se']:.3f}" in report
    for label in by_label:
        assert f"| {label} | {by_label[label]['pass@1']:.3f}" in report
    for name in ("accuracy.png", "loss_curves.png", "accuracy_vs_compute.png"):
        assert (out / name).stat().st_size > 1000, name
    # each arm's compute is its stages' own record: the on-policy arm counts its warm start
    compute = summary["compute"]["0"]
    manifests = {sub: json.loads((out / sub / "manifest.json").read_text())
                 for sub in ("train-sft", "train-warm", "train-onpolicy")}
    assert compute["SFT student"]["optimizer_steps"] == 12 == manifests["train-sft"]["counts"]["global_steps"]
    assert compute["SFT student"]["trained_tokens"] == manifests["train-sft"]["counts"]["trained_tokens"] > 0
    on_policy = compute["on-policy student"]
    assert on_policy["optimizer_steps"] == 4 + 3
    assert on_policy["wall_s"] == pytest.approx(manifests["train-warm"]["wall_time_s"]
                                                + manifests["train-onpolicy"]["wall_time_s"], abs=0.1)
    assert on_policy["rollout_tokens"] == manifests["train-onpolicy"]["counts"]["rollout_tokens"] > 0
    assert set(on_policy["phases_s"]) == {"warm start (SFT)", "rollout", "scoring", "training", "sync",
                                          "setup and saving"}
    assert sum(on_policy["phases_s"].values()) == pytest.approx(on_policy["wall_s"], abs=0.5)  # every second placed
    # the accuracy-against-time curves: the checkpoints' pass@1 from eval-curve, placed at the arm's seconds
    curve_results = json.loads((out / "eval-curve" / "results.json").read_text())["results"]
    curves = summary["curves"]["0"]
    untrained = results[models[1]]["tiny"]["pass@1"]
    sft = curves["SFT student"]
    assert [(p["stage"], p["step"]) for p in sft] == [("init", 0), ("train_sft", 6), ("train_sft", 12)]
    assert sft[0]["pass@1"] == untrained and sft[0]["seconds"] == 0.0
    assert sft[1]["pass@1"] == curve_results[str(out / "train-sft" / "checkpoint-6")]["tiny"]["pass@1"]
    assert sft[2]["pass@1"] == results[models[2]]["tiny"]["pass@1"]
    assert 0 < sft[1]["seconds"] < sft[2]["seconds"] == pytest.approx(compute["SFT student"]["wall_s"], abs=0.1)
    op = curves["on-policy student"]
    assert [(p["stage"], p["step"]) for p in op] == [("init", 0), ("train_warm", 4), ("onpolicy", 2), ("onpolicy", 3)]
    warm_s = manifests["train-warm"]["wall_time_s"]
    assert op[1]["seconds"] == pytest.approx(warm_s, abs=0.1)
    assert op[1]["pass@1"] == curve_results[str(out / "train-warm")]["tiny"]["pass@1"]
    assert op[2]["pass@1"] == curve_results[str(out / "train-onpolicy" / "checkpoint-2")]["tiny"]["pass@1"]
    assert warm_s < op[2]["seconds"] < op[3]["seconds"] == pytest.approx(on_policy["wall_s"], abs=0.1)
    assert "When the on-policy arm had spent its training time, the SFT curve" in report
    # eval's own report reads the same records: each trained model's compute, the warm start counted
    evaluated = json.loads((out / "eval" / "results.json").read_text())["compute"]
    assert sorted(evaluated) == sorted(models[2:])  # not the teacher, not the untrained student
    assert [Path(s["path"]).name for s in evaluated[models[4]]["stages"]] == ["train-warm", "train-onpolicy"]
    assert evaluated[models[4]]["wall_s"] == pytest.approx(on_policy["wall_s"], abs=0.1)
    assert evaluated[models[4]]["optimizer_steps"] == 7
    assert evaluated[models[4]]["rollout_tokens"] == on_policy["rollout_tokens"]
    assert "| on-policy student | train (train-warm) → onpolicy (train-onpolicy) | 7 |" in \
        (out / "eval" / "results.md").read_text().replace(f"| {Path(models[4]).name} |", "| on-policy student |")
    curve_compute = json.loads((out / "eval-curve" / "results.json").read_text())["compute"]
    assert curve_compute[str(out / "train-onpolicy" / "checkpoint-2")]["wall_s"] == pytest.approx(op[2]["seconds"],
                                                                                                 abs=0.1)
    assert curve_compute[str(out / "train-sft" / "checkpoint-6")]["wall_s"] == pytest.approx(sft[1]["seconds"], abs=0.1)
    for eval_dir in ("eval", "eval-curve"):
        assert (out / eval_dir / "accuracy_vs_compute.png").stat().st_size > 1000, eval_dir
    efficiency = json.loads((out / "eval" / "results.json").read_text())["efficiency"]
    assert f"| teacher | {efficiency[models[0]]['parameters']:,} |" in report
    gen = json.loads((out / "generate" / "manifest.json").read_text())["counts"]
    assert re.search(rf"prompts: {gen['input_rows']} → teacher traces: {48 * 2}", report)
    # the machine every figure came from, as the stages' manifests recorded it
    assert f"Machine: {describe_machine(machine())}." in report

    # a re-run with the same settings reuses every stage
    res2 = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert res2.returncode == 0, res2.stderr[-3000:]
    summary2 = json.loads((out / "summary.json").read_text())
    stage_times = {k: v for k, v in summary2["timings"].items() if k not in ("teacher bootstrap", "prompts")}
    assert all(v == 0.0 for v in stage_times.values()), stage_times
    assert summary2["results"] == summary["results"]


@pytest.mark.unit
def test_the_dry_run_counts_the_arms_and_the_curve_checkpoints_from_the_shipped_configs():
    """The plan of the shipped demo: its three arms' steps, and the eval of 5 models (500 problems x 4
    samples) and of the 11 models the curves evaluate (the list the test above checks)."""
    from llmdistill.plan import make_plan

    plan = make_plan("demo", DemoConfig(configs_dir=str(CONFIGS)))
    assert plan["optimizer steps per arm"] == "SFT student 1800, KD student 1800, on-policy student 900 + 100"
    assert plan["eval generations"] == "10000 (5 models), and 22000 (11 checkpoints)"
    assert "train_warm then onpolicy" in plan["stages"] and "eval of 5 models" in plan["stages"]


@pytest.mark.unit
def test_a_stage_reruns_exactly_when_its_inputs_changed(tmp_path, monkeypatch):
    """Reuse is per config *and* inputs: new SFT weights are evaluated again; the KD run is kept."""
    import llmdistill.demo as demo

    stamps: dict[str, list[str]] = {}

    def fake_run_stage(name, overrides, run_dir, reuse, header="", log=None):
        stamps.setdefault(name, []).append(header)
        out = Path(overrides["output_dir"])
        out.mkdir(parents=True, exist_ok=True)
        if not (out / "manifest.json").exists():
            (out / "manifest.json").write_text(json.dumps({"stage": name, "run": 1}))
        return 0.0

    monkeypatch.setattr(demo, "run_stage", fake_run_stage)
    monkeypatch.setattr(demo, "collect", lambda run_dir, timings, models, configs: timings)
    monkeypatch.setattr(demo, "load_config", lambda cls, **values: None)
    monkeypatch.setattr("llmdistill.tinyworld.bootstrap.student_init", lambda seed: tmp_path / "student")
    (tmp_path / "student").mkdir()
    (tmp_path / "teacher").mkdir()
    cfg = DemoConfig(output_dir=str(tmp_path / "out"), num_prompts=4, configs_dir=str(CONFIGS))
    demo.run_seed(cfg, 0, tmp_path / "out", tmp_path / "teacher")
    demo.run_seed(cfg, 0, tmp_path / "out", tmp_path / "teacher")  # nothing changed: identical stamps
    assert all(first == second for first, second in stamps.values())
    # the SFT student is retrained (a new manifest): only eval, which reads it, sees a new input
    (tmp_path / "out" / "train-sft" / "manifest.json").write_text(json.dumps({"stage": "train_sft", "run": 2}))
    demo.run_seed(cfg, 0, tmp_path / "out", tmp_path / "teacher")
    changed = {name for name, seen in stamps.items() if seen[2] != seen[1]}
    assert changed == {"eval", "eval_curve"}
    # a new warm start is distilled on-policy again; SFT, KD and (until the new on-policy student exists) eval are kept
    (tmp_path / "out" / "train-warm" / "manifest.json").write_text(json.dumps({"stage": "train_warm", "run": 2}))
    demo.run_seed(cfg, 0, tmp_path / "out", tmp_path / "teacher")
    assert {name for name, seen in stamps.items() if seen[3] != seen[2]} == {"onpolicy", "eval_curve"}
    # other llmdistill code, or a teacher retrained in place (same path, new weights): every stage again
    monkeypatch.setattr(demo, "code_fingerprint", lambda: "other code")
    demo.run_seed(cfg, 0, tmp_path / "out", tmp_path / "teacher")
    assert all(seen[4] != seen[3] for seen in stamps.values())
    (tmp_path / "teacher" / "model.safetensors").write_bytes(b"retrained")
    demo.run_seed(cfg, 0, tmp_path / "out", tmp_path / "teacher")
    assert all(seen[5] != seen[4] for seen in stamps.values())
    # seconds measured with other threads per stage, or another number of arms side by side: every stage again
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    demo.run_seed(cfg, 0, tmp_path / "out", tmp_path / "teacher")
    assert all(seen[6] != seen[5] for seen in stamps.values())
    demo.run_seed(DemoConfig(output_dir=str(tmp_path / "out"), num_prompts=4, configs_dir=str(CONFIGS),
                             workers=cfg.worker_count + 1), 0, tmp_path / "out", tmp_path / "teacher")
    assert all(seen[7] != seen[6] for seen in stamps.values())


@pytest.mark.unit
def test_the_training_arms_run_side_by_side_and_none_starts_after_a_failure():
    import llmdistill.demo as demo

    lock, started, logs, running = threading.Lock(), [], {}, {"now": 0, "most": 0}

    def run(name, log):
        with lock:
            started.append(name)
            logs[name] = log
            running["now"] += 1
            running["most"] = max(running["most"], running["now"])
        time.sleep({"fail": 0.1, "slow": 0.5}.get(name, 0.2))
        with lock:
            running["now"] -= 1
        if name == "fail":
            raise RuntimeError("demo stage 'fail' failed")
        return 1.0

    assert demo.run_lanes([("warm", "onpolicy"), ("sft",), ("kd",)], run, workers=2) == dict.fromkeys(
        ("warm", "onpolicy", "sft", "kd"), 1.0)
    assert running["most"] == 2 and started.index("warm") < started.index("onpolicy")
    assert logs == {name: demo.LOGS / f"{name}.log" for name in ("warm", "onpolicy", "sft", "kd")}
    started.clear()
    with pytest.raises(RuntimeError, match="'fail' failed"):
        demo.run_lanes([("fail", "after"), ("slow",), ("never",)], run, workers=2)
    assert sorted(started) == ["fail", "slow"]  # the running stage ended; nothing started after the failure
    started.clear()
    running["most"] = 0
    demo.run_lanes([("warm", "onpolicy"), ("sft",)], run, workers=1)
    assert started == ["warm", "onpolicy", "sft"] and running["most"] == 1 and logs["sft"] is None


@pytest.mark.unit
def test_teacher_signal_is_measured_on_the_loss_support(tmp_path):
    """Top-k plus one tail bucket, tempered like the KD loss: checked against a hand computation."""
    import math

    import numpy as np

    from llmdistill.demo import teacher_signal
    from llmdistill.formats import write_generation_shard

    row = {"prompt_id": "p", "sample_index": 0, "prompt": "q", "prompt_text": "q", "prompt_token_ids": [1],
           "completion": "a", "completion_token_ids": np.asarray([5, 6], dtype=np.int32), "finish_reason": "stop",
           "topk_ids": np.asarray([[5, 7], [6, 8]], dtype=np.int32),
           "topk_logprobs": np.log(np.asarray([[0.5, 0.25], [0.9, 0.1 - 1e-9]], dtype=np.float32)),
           "token_logprobs": np.log(np.asarray([0.5, 0.9], dtype=np.float32))}
    write_generation_shard([row], tmp_path / "part-000000.parquet", 2, "teacher")
    signal = teacher_signal(tmp_path, temperature=2.0)
    # position 1: (0.5, 0.25, tail 0.25); position 2: (0.9, 0.1, tail ~0)
    h1 = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    h2 = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))
    assert signal["positions"] == 2
    assert signal["top1_T1"] == pytest.approx((0.5 + 0.9) / 2, abs=1e-6)
    assert signal["entropy_T1"] == pytest.approx((h1 + h2) / 2, abs=1e-4)
    tempered1 = math.sqrt(0.5) / (math.sqrt(0.5) + 2 * math.sqrt(0.25))
    tempered2 = math.sqrt(0.9) / (math.sqrt(0.9) + math.sqrt(0.1))
    assert signal["top1_T_kd"] == pytest.approx((tempered1 + tempered2) / 2, abs=1e-3)


@pytest.mark.unit
def test_each_arm_minus_sft_is_paired_by_problem_over_the_eval_details(tmp_path):
    from llmdistill.demo import paired_minus_sft
    from llmdistill.formats import write_details

    # two problems, two samples each; the teacher's rows must be ignored
    rows = [("teacher", "p1", True), ("teacher", "p1", True),
            ("sft", "p1", True), ("sft", "p1", False), ("sft", "p2", False), ("sft", "p2", False),
            ("kd", "p2", True), ("kd", "p1", True), ("kd", "p2", False), ("kd", "p1", True)]
    write_details([{"model": m, "benchmark": "tiny", "problem_id": p, "sample_index": 0, "gold": "1", "response": "",
                    "extracted": None, "correct": c, "finish_reason": "stop", "n_tokens": 1} for m, p, c in rows],
                  tmp_path / "details.parquet")
    got = paired_minus_sft(tmp_path, "sft", {"KD": "kd", "KD again": "kd"})
    # per-problem KD − SFT: p1 1 - 0.5 = 0.5, p2 0.5 - 0 = 0.5 → mean 0.5, no spread
    assert got == {name: {"diff": pytest.approx(0.5), "se": pytest.approx(0.0)} for name in ("KD", "KD again")}


@pytest.mark.unit
def test_checkpoint_steps_are_the_ones_the_training_stage_keeps():
    from llmdistill.demo import checkpoint_steps

    sft = {"max_steps": 1800, "save_strategy": "steps"}
    assert checkpoint_steps("train_sft", {**sft, "save_steps": 450}) == [450, 900, 1350]
    assert checkpoint_steps("train_sft", {**sft, "save_steps": 0.25}) == [450, 900, 1350]  # a fraction, rounded up
    assert checkpoint_steps("train_sft", {**sft, "save_steps": 0.3}) == [540, 1080, 1620]
    assert checkpoint_steps("train_sft", {"max_steps": 1800}) == [500, 1000, 1500]  # transformers' defaults
    assert checkpoint_steps("train_sft", {**sft, "save_steps": 100, "save_total_limit": 3}) == [1600, 1700]
    assert checkpoint_steps("train_sft", {**sft, "save_steps": 100, "save_total_limit": 1}) == []
    assert checkpoint_steps("train_sft", {"max_steps": 1800, "save_strategy": "no", "save_steps": 450}) == []
    assert checkpoint_steps("train_sft", {"max_steps": 1800, "save_strategy": "epoch"}) == []
    assert checkpoint_steps("onpolicy", {"max_steps": 500, "save_steps": 125}) == [125, 250, 375]
    assert checkpoint_steps("onpolicy", {"max_steps": 500}) == []  # on-policy saves only when asked


@pytest.mark.unit
def test_accuracy_curves_place_each_checkpoint_at_the_seconds_its_arm_had_spent(tmp_path):
    """Each checkpoint at the seconds its run had spent when it was saved (the run's clock in the checkpoint),
    the final model at its manifest's total over all processes of a resumed run (not the last one's); the
    on-policy arm's after its warm start's; pass@1 from eval-curve and the final eval."""
    from llmdistill.demo import accuracy_curves
    from llmdistill.demo_report import curve_lines

    stages = {  # directory: (config, wall_time_total_s, {checkpoint step: the run's seconds when it was saved})
        "train-sft": ({"max_steps": 100, "save_steps": 40}, 50.0, {40: 20.0, 80: 37.5}),
        "train-kd": ({"max_steps": 100, "save_steps": 40}, 60.0, {40: 20.0, 80: 40.0}),
        "train-warm": ({"max_steps": 60, "save_steps": 40}, 30.0, {40: 16.3}),
        # resumed after its checkpoint: 20 s over both processes, of which the manifest's wall_time_s (8 s) the last
        "train-onpolicy": ({"max_steps": 20, "save_steps": 10}, 20.0, {10: 8.0}),
    }
    configs = {}
    for directory, (config, total, saved) in stages.items():
        run = tmp_path / directory
        run.mkdir()
        stage = {"train-sft": "train_sft", "train-kd": "train_kd", "train-warm": "train_warm"}.get(directory, "onpolicy")
        name = "onpolicy" if stage == "onpolicy" else "train"
        counts = {"optimizer_steps" if name == "onpolicy" else "global_steps": config["max_steps"], "trained_tokens": 1}
        (run / "manifest.json").write_text(json.dumps({"stage": name, "config": {}, "counts": counts,
                                                       "wall_time_s": 8.0, "wall_time_total_s": total}))
        for step, seconds in saved.items():
            (run / f"checkpoint-{step}").mkdir()
            if name == "onpolicy":
                counters = {"optimizer_steps": step, "trained_tokens": 1, "rollout_tokens": 1,
                            "teacher_tokens_scored": 1, "seconds": {}}
                state = {"step": step, "counters": counters, "wall_time_total_s": seconds}
                (run / f"checkpoint-{step}" / "state.json").write_text(json.dumps(state))
            else:
                clock = {"RunClock": {"args": {"before": seconds}, "attributes": {}}}
                (run / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps(
                    {"global_step": step, "stateful_callbacks": clock}))
                (run / f"checkpoint-{step}" / "model.safetensors").write_bytes(b"w")
        configs[stage] = {**config, **({"save_strategy": "steps"} if stage != "onpolicy" else {})}
    configs["eval_curve"] = {}
    curve_scores = {"train-sft/checkpoint-40": 0.1, "train-sft/checkpoint-80": 0.2, "train-kd/checkpoint-40": 0.3,
                    "train-kd/checkpoint-80": 0.4, "train-warm/checkpoint-40": 0.05, "train-warm": 0.15,
                    "train-onpolicy/checkpoint-10": 0.25}
    (tmp_path / "eval-curve").mkdir()
    (tmp_path / "eval-curve" / "results.json").write_text(json.dumps(
        {"results": {str(tmp_path / m): {"tiny": {"pass@1": p}} for m, p in curve_scores.items()}}))
    scores = {"student (untrained)": {"pass@1": 0.01}, "SFT student": {"pass@1": 0.5}, "KD student": {"pass@1": 0.6},
              "on-policy student": {"pass@1": 0.35}}

    curves = accuracy_curves(tmp_path, configs, scores)
    as_tuples = {label: [(p["stage"], p["step"], p["seconds"], p["pass@1"]) for p in points]
                 for label, points in curves.items()}
    assert as_tuples == {
        "SFT student": [("init", 0, 0.0, 0.01), ("train_sft", 40, 20.0, 0.1), ("train_sft", 80, 37.5, 0.2),
                        ("train_sft", 100, 50.0, 0.5)],
        "KD student": [("init", 0, 0.0, 0.01), ("train_kd", 40, 20.0, 0.3), ("train_kd", 80, 40.0, 0.4),
                       ("train_kd", 100, 60.0, 0.6)],
        "on-policy student": [("init", 0, 0.0, 0.01), ("train_warm", 40, 16.3, 0.05), ("train_warm", 60, 30.0, 0.15),
                              ("onpolicy", 10, 38.0, 0.25), ("onpolicy", 20, 50.0, 0.35)],
    }
    # where SFT stood when the on-policy arm ended (50 s): SFT had finished by then
    report = "\n".join(curve_lines({0: {"curves": curves}}))
    assert "seed 0: SFT had finished (0.500 at 50 s) against on-policy's 0.350" in report
    curves["on-policy student"][-1]["seconds"] = 30.0  # earlier: between SFT's 20 s (0.1) and 37.5 s (0.2)
    report = "\n".join(curve_lines({0: {"curves": curves}}))
    assert f"seed 0: SFT {0.1 + 0.1 * 10 / 17.5:.3f} at 30 s against on-policy's 0.350" in report


@pytest.mark.unit
def test_the_timings_average_only_the_seeds_that_ran_a_stage():
    """Seeds 0-2 reused from an earlier invocation took 0 s here: they do not pull the mean down, and
    the teacher bootstrap (timed for the first seed only) is its own seconds, not a fifth of them."""
    from llmdistill.demo_report import stage_timings

    runs = {seed: {"timings": {"teacher bootstrap": 900.0 if seed == 0 else 0.0, "train_sft": 0.0 if seed < 3 else
                               180.0 + seed, "generate": 0.0}} for seed in range(5)}
    assert stage_timings(runs) == {"teacher bootstrap": 900.0, "train_sft": 183.5, "generate": 0.0}


@pytest.mark.unit
def test_the_report_names_the_machine_and_which_stages_ran_elsewhere():
    """One machine: one line. Stages reused from a run on another CPU: each machine with its stages."""
    from llmdistill.demo_report import machine_line

    zen5, zen3 = "AMD EPYC (family 26, model 2), AVX-512, 2 CPUs, 23.5 GiB", "AMD EPYC (family 25, model 1), AVX2, 2 CPUs, 23.5 GiB"
    assert machine_line({0: {"machines": {"generate": zen5, "eval": zen5}}}) == f"Machine: {zen5}."
    runs = {0: {"machines": {"train_sft": zen3, "eval": zen5}}, 1: {"machines": {"train_sft": zen5, "eval": zen5}}}
    assert machine_line(runs) == ("Machines (stages reused from elsewhere, so figures from different machines sit side "
                                  f"by side): {zen3}: train_sft (seed 0); {zen5}: eval (seed 0), train_sft (seed 1), "
                                  "eval (seed 1).")
