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

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
# the CI-sized demo: the shipped stage configs with these values changed
SMALL = {"generate_tiny.yaml": {"num_samples": 2}, "build_tiny.yaml": {"max_length": 256},
         "train_tiny_sft.yaml": {"max_steps": 12, "per_device_train_batch_size": 2},
         "train_tiny_kd.yaml": {"max_steps": 12, "per_device_train_batch_size": 2},
         "train_tiny_warm.yaml": {"max_steps": 4, "per_device_train_batch_size": 2},
         "onpolicy_tiny.yaml": {"max_steps": 3, "warmup_steps": 1, "prompts_per_step": 4, "max_new_tokens": 24},
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


@pytest.mark.integration
def test_demo_small_end_to_end_and_reuse(tmp_path, tiny_teacher_dir):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "llmdistill", "demo", "--config", str(CONFIGS / "demo.yaml"), "--output_dir", str(out),
           "--num_prompts", "48", "--configs_dir", str(small_configs(tmp_path / "configs")), "--workers", "2"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]

    # every stage ran from a saved config and left its manifest
    for stage in ("generate", "build", "train_sft", "train_kd", "train_warm", "onpolicy", "eval"):
        assert (out / "configs" / f"{stage}.yaml").is_file()
    for sub in ("generate", "build", "train-sft", "train-kd", "train-warm", "train-onpolicy", "eval"):
        assert (out / sub / "manifest.json").is_file(), sub
    assert (out / "manifest.json").is_file()
    # the training arms ran two at a time, their output in logs/
    for stage in ("train_sft", "train_kd", "train_warm", "onpolicy"):
        assert (out / "logs" / f"{stage}.log").stat().st_size > 0, stage
    assert "training arms ran 2 at a time" in (out / "REPORT.md").read_text()
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
    assert set(on_policy["phases_s"]) == {"warm start (SFT)", "rollout", "scoring", "training", "sync"}
    efficiency = json.loads((out / "eval" / "results.json").read_text())["efficiency"]
    assert f"| teacher | {efficiency[models[0]]['parameters']:,} |" in report
    gen = json.loads((out / "generate" / "manifest.json").read_text())["counts"]
    assert re.search(rf"prompts: {gen['input_rows']} → teacher traces: {48 * 2}", report)

    # a re-run with the same settings reuses every stage
    res2 = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert res2.returncode == 0, res2.stderr[-3000:]
    summary2 = json.loads((out / "summary.json").read_text())
    stage_times = {k: v for k, v in summary2["timings"].items() if k not in ("teacher bootstrap", "prompts")}
    assert all(v == 0.0 for v in stage_times.values()), stage_times
    assert summary2["results"] == summary["results"]


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
    monkeypatch.setattr(demo, "collect", lambda run_dir, timings, models, temperature: timings)
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
    assert changed == {"eval"}
    # a new warm start is distilled on-policy again; SFT, KD and (until the new on-policy student exists) eval are kept
    (tmp_path / "out" / "train-warm" / "manifest.json").write_text(json.dumps({"stage": "train_warm", "run": 2}))
    demo.run_seed(cfg, 0, tmp_path / "out", tmp_path / "teacher")
    assert {name for name, seen in stamps.items() if seen[3] != seen[2]} == {"onpolicy"}


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
