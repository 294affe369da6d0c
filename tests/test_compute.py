"""What a trained model cost (llmdistill.compute): the records of the stages that trained it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from llmdistill.compute import checkpoint_compute, stage_compute, training_compute

pytestmark = pytest.mark.unit

MACHINE = {"cpu": "AMD EPYC", "cpu_family": "26", "cpu_model": "2", "vector": "AVX-512", "cpus": 2,
           "memory_gib": 23.5, "gpus": []}


def stage(directory: Path, name: str, student: str | Path, counts: dict, wall_s: float, total_s: float | None = None,
          seconds: dict | None = None, **config) -> Path:
    """A finished stage's output directory with the manifest fields the record reads."""
    directory.mkdir(parents=True)
    manifest = {"stage": name, "config": config, "machine": MACHINE, "counts": counts, "wall_time_s": wall_s,
                "inputs": {"student": {"path": str(student), "fingerprint": "x"}}}
    if total_s is not None:
        manifest["wall_time_total_s"] = total_s
    if seconds is not None:
        manifest["compute"] = {"seconds": seconds}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


def onpolicy_checkpoint(run: Path, step: int, counters: dict, wall_s: float) -> Path:
    directory = run / f"checkpoint-{step}"
    directory.mkdir(parents=True)
    (directory / "state.json").write_text(json.dumps({"step": step, "counters": counters, "wall_time_total_s": wall_s,
                                                      "history": []}))
    return directory


def train_checkpoint(run: Path, step: int, before: float | None, tokens: int | None) -> Path:
    directory = run / f"checkpoint-{step}"
    directory.mkdir(parents=True)
    callbacks = {"RunClock": {"args": {"before": before}, "attributes": {}}} if before is not None else {}
    (directory / "trainer_state.json").write_text(json.dumps(
        {"global_step": step, "stateful_callbacks": callbacks,
         "log_history": [{"step": step, "loss": 1.0, "trained_tokens": 999.0}]}))
    (directory / "model.safetensors").write_bytes(b"weights")
    if tokens is not None:
        (directory / "trained_tokens.json").write_text(json.dumps({"trained_tokens": tokens}))
    return directory


ONPOLICY_COUNTS = {"optimizer_steps": 100, "offline_steps": 0, "trained_tokens": 80_000, "rollout_tokens": 81_000,
                   "teacher_tokens_scored": 81_000}


@pytest.fixture
def chain(tmp_path):
    """An untrained student (no record) → an SFT warm start (resumed once) → on-policy."""
    init = tmp_path / "student"
    init.mkdir()
    warm = stage(tmp_path / "train-warm", "train", init, {"global_steps": 900, "trained_tokens": 747_000},
                 wall_s=20.0, total_s=32.0, student_init="pretrained")
    onpolicy = stage(tmp_path / "train-onpolicy", "onpolicy", warm, ONPOLICY_COUNTS, wall_s=23.0,
                     seconds={"rollout": 6.0, "scoring": 5.0, "training": 4.0, "sync": 1.0})
    return init, warm, onpolicy


def test_a_finished_stage_reads_its_manifest(chain):
    """All the processes' seconds of a resumed stage; the seconds the stage did not time are setup and saving."""
    init, warm, onpolicy = chain
    assert stage_compute(warm) == {
        "path": str(warm), "stage": "train", "step": 900, "wall_s": 32.0, "optimizer_steps": 900,
        "trained_tokens": 747_000, "phases_s": {"training": 32.0}, "machine": MACHINE, "started_from": str(init)}
    record = stage_compute(onpolicy)
    assert record["phases_s"] == {"rollout": 6.0, "scoring": 5.0, "training": 4.0, "sync": 1.0,
                                  "setup and saving": 7.0}
    assert (record["rollout_tokens"], record["teacher_tokens_scored"], record["started_from"]) == (
        81_000, 81_000, str(warm))


def test_an_on_policy_student_counts_its_warm_start(chain):
    init, warm, onpolicy = chain
    total = training_compute(onpolicy)
    assert [s["path"] for s in total["stages"]] == [str(warm), str(onpolicy)]
    assert {k: v for k, v in total.items() if k != "stages"} == {
        "wall_s": 55.0, "optimizer_steps": 1000, "trained_tokens": 827_000, "rollout_tokens": 81_000,
        "teacher_tokens_scored": 81_000}
    assert training_compute(warm)["wall_s"] == 32.0 and training_compute(warm)["rollout_tokens"] == 0
    assert training_compute(init) is None and training_compute("Qwen/Qwen2.5-7B") is None


def test_a_checkpoint_reads_its_own_run_state_and_its_runs_start(chain):
    """An on-policy checkpoint's counters and clock up to its step, after the warm start its run started from;
    a train checkpoint's clock, its step and its token count."""
    init, warm, onpolicy = chain
    counters = {**{k: v // 4 for k, v in ONPOLICY_COUNTS.items()},
                "seconds": {"rollout": 1.5, "scoring": 1.0, "training": 1.0, "sync": 0.25}}
    ckpt = onpolicy_checkpoint(onpolicy, 25, counters, wall_s=9.0)
    record = checkpoint_compute(ckpt)
    assert (record["stage"], record["step"], record["wall_s"], record["optimizer_steps"], record["rollout_tokens"]) == (
        "onpolicy", 25, 9.0, 25, 20_250)
    assert record["phases_s"]["setup and saving"] == pytest.approx(5.25)
    assert record["started_from"] == str(warm) and record["machine"] == MACHINE
    total = training_compute(ckpt)
    assert (total["wall_s"], total["optimizer_steps"]) == (41.0, 925)

    sft = train_checkpoint(warm, 450, before=16.5, tokens=373_500)
    assert {k: checkpoint_compute(sft)[k] for k in ("stage", "step", "wall_s", "optimizer_steps", "trained_tokens",
                                                   "started_from")} == {
        "stage": "train", "step": 450, "wall_s": 16.5, "optimizer_steps": 450, "trained_tokens": 373_500,
        "started_from": str(init)}
    # without trained_tokens.json (a plain transformers checkpoint): the log's last count
    assert checkpoint_compute(train_checkpoint(warm, 500, before=18.0, tokens=None))["trained_tokens"] == 999


def test_what_has_no_record_counts_nothing(tmp_path, chain, caplog):
    """A checkpoint of an unfinished run counts its own stage only; a checkpoint without the run's clock, an
    incomplete one, a teacher the student was built from (drop_layers), a damaged record: nothing more."""
    init, warm, onpolicy = chain
    unfinished = tmp_path / "unfinished"
    ckpt = onpolicy_checkpoint(unfinished, 10, {**ONPOLICY_COUNTS, "seconds": {}}, wall_s=4.0)
    assert [s["path"] for s in training_compute(ckpt)["stages"]] == [str(ckpt)]
    assert checkpoint_compute(train_checkpoint(unfinished, 20, before=None, tokens=5)) is None
    incomplete = train_checkpoint(unfinished, 30, before=3.0, tokens=5)
    (incomplete / "model.safetensors").unlink()
    assert checkpoint_compute(incomplete) is None and checkpoint_compute(unfinished / "other") is None

    layers = stage(tmp_path / "train-layers", "train", warm, {"global_steps": 10, "trained_tokens": 100}, wall_s=2.0,
                   student_init="drop_layers")
    assert [s["path"] for s in training_compute(layers)["stages"]] == [str(layers)]
    eval_dir = stage(tmp_path / "eval", "eval", init, {}, wall_s=1.0)
    assert training_compute(eval_dir) is None

    (warm / "manifest.json").write_text("{")
    with caplog.at_level(logging.WARNING):
        assert [s["path"] for s in training_compute(onpolicy)["stages"]] == [str(onpolicy)]
    assert f"{warm}: its training record could not be read" in caplog.text
    looped = stage(tmp_path / "looped", "onpolicy", tmp_path / "looped", ONPOLICY_COUNTS, wall_s=1.0)
    assert len(training_compute(looped)["stages"]) == 1
