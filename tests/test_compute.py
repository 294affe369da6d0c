"""What a trained model cost (llmdistill.compute): the records of the stages that trained it."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from llmdistill.compute import checkpoint_compute, run_record, stage_compute, training_compute
from llmdistill.manifest import fingerprint, machine

pytestmark = pytest.mark.unit

MACHINE = {"cpu": "AMD EPYC", "cpu_family": "26", "cpu_model": "2", "vector": "AVX-512", "cpus": 2,
           "memory_gib": 23.5, "gpus": []}


def started(student: Path) -> dict:
    """A student input as a stage's manifest records it."""
    return {"path": str(student), "fingerprint": fingerprint(student)}


def stage(directory: Path, name: str, student: Path, counts: dict, wall_s: float, total_s: float | None = None,
          seconds: dict | None = None, **config) -> Path:
    """A finished stage's output directory with the manifest fields the record reads."""
    directory.mkdir(parents=True)
    manifest = {"stage": name, "config": config, "machine": MACHINE, "counts": counts, "wall_time_s": wall_s,
                "inputs": {"student": started(student)}}
    if total_s is not None:
        manifest["wall_time_total_s"] = total_s
    if seconds is not None:
        manifest["compute"] = {"seconds": seconds}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


def onpolicy_checkpoint(run: Path, step: int, counters: dict, wall_s: float, student: Path | None) -> Path:
    directory = run / f"checkpoint-{step}"
    directory.mkdir(parents=True)
    state = {"step": step, "counters": counters, "wall_time_total_s": wall_s, "history": []}
    if student is not None:
        state["run_record"] = {"started_from": started(student), "machine": MACHINE}
    (directory / "state.json").write_text(json.dumps(state))
    return directory


def train_checkpoint(run: Path, step: int, before: float | None, tokens: int, student: Path | None) -> Path:
    directory = run / f"checkpoint-{step}"
    directory.mkdir(parents=True)
    callbacks = {"RunClock": {"args": {"before": before}, "attributes": {}}} if before is not None else {}
    (directory / "trainer_state.json").write_text(json.dumps({"global_step": step, "stateful_callbacks": callbacks}))
    (directory / "model.safetensors").write_bytes(b"weights")
    (directory / "trained_tokens.json").write_text(json.dumps({"trained_tokens": tokens}))
    if student is not None:
        (directory / "run_record.json").write_text(json.dumps({"started_from": started(student), "machine": MACHINE}))
    return directory


ONPOLICY_COUNTS = {"optimizer_steps": 100, "offline_steps": 0, "trained_tokens": 80_000, "rollout_tokens": 81_000,
                   "teacher_tokens_scored": 81_000}
QUARTER = {**{k: v // 4 for k, v in ONPOLICY_COUNTS.items()},
           "seconds": {"rollout": 1.5, "scoring": 1.0, "training": 1.0, "sync": 0.25}}


@pytest.fixture
def chain(tmp_path):
    """An untrained student (no record) → an SFT warm start (resumed once) → on-policy."""
    init = tmp_path / "student"
    init.mkdir()
    (init / "config.json").write_text("{}")
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
        "trained_tokens": 747_000, "phases_s": {"training": 32.0}, "machine": MACHINE, "started_from": started(init)}
    record = stage_compute(onpolicy)
    assert record["phases_s"] == {"rollout": 6.0, "scoring": 5.0, "training": 4.0, "sync": 1.0,
                                  "setup and saving": 7.0}
    assert (record["rollout_tokens"], record["teacher_tokens_scored"], record["started_from"]) == (
        81_000, 81_000, started(warm))


def test_an_on_policy_student_counts_its_warm_start(chain):
    init, warm, onpolicy = chain
    total = training_compute(onpolicy)
    assert [s["path"] for s in total["stages"]] == [str(warm), str(onpolicy)]
    assert {k: v for k, v in total.items() if k != "stages"} == {
        "wall_s": 55.0, "optimizer_steps": 1000, "trained_tokens": 827_000, "rollout_tokens": 81_000,
        "teacher_tokens_scored": 81_000}
    assert training_compute(warm)["wall_s"] == 32.0 and training_compute(warm)["rollout_tokens"] == 0
    assert training_compute(init) is None
    # an on-policy LoRA run's adapter, beside its merged model: the run's record
    (onpolicy / "adapter").mkdir()
    assert training_compute(onpolicy / "adapter") == total


def test_a_checkpoint_reads_its_own_run_state_and_record(tmp_path, chain):
    """An on-policy checkpoint's counters and clock up to its step, then the warm start its run recorded, even
    before the run has finished (no manifest yet); a train checkpoint's clock, step and token count."""
    init, warm, onpolicy = chain
    running = tmp_path / "running"
    ckpt = onpolicy_checkpoint(running, 25, QUARTER, wall_s=9.0, student=warm)
    record = checkpoint_compute(ckpt)
    assert (record["stage"], record["step"], record["wall_s"], record["optimizer_steps"], record["rollout_tokens"]) == (
        "onpolicy", 25, 9.0, 25, 20_250)
    assert record["phases_s"]["setup and saving"] == pytest.approx(5.25)
    assert record["started_from"] == started(warm) and record["machine"] == MACHINE
    total = training_compute(ckpt)
    assert [s["path"] for s in total["stages"]] == [str(warm), str(ckpt)]
    assert (total["wall_s"], total["optimizer_steps"]) == (41.0, 925)

    sft = train_checkpoint(tmp_path / "sft-running", 450, before=16.5, tokens=373_500, student=init)
    assert {k: checkpoint_compute(sft)[k] for k in ("stage", "step", "wall_s", "optimizer_steps", "trained_tokens",
                                                   "phases_s", "started_from")} == {
        "stage": "train", "step": 450, "wall_s": 16.5, "optimizer_steps": 450, "trained_tokens": 373_500,
        "phases_s": {"training": 16.5}, "started_from": started(init)}


def test_an_older_checkpoint_takes_its_start_from_the_finished_runs_manifest(chain):
    init, warm, onpolicy = chain
    ckpt = onpolicy_checkpoint(onpolicy, 50, QUARTER, wall_s=9.0, student=None)
    assert checkpoint_compute(ckpt)["started_from"] == started(warm)
    assert [s["path"] for s in training_compute(ckpt)["stages"]] == [str(warm), str(ckpt)]
    unfinished = onpolicy_checkpoint(onpolicy.parent / "unfinished", 50, QUARTER, wall_s=9.0, student=None)
    assert checkpoint_compute(unfinished)["started_from"] is None


def test_a_start_that_moved_or_changed_is_left_out_with_a_warning(tmp_path, chain, caplog):
    init, warm, onpolicy = chain
    with caplog.at_level(logging.WARNING):
        manifest = json.loads((warm / "manifest.json").read_text())
        (warm / "manifest.json").write_text(json.dumps({**manifest, "wall_time_total_s": 99.0}))  # trained again
        assert [s["path"] for s in training_compute(onpolicy)["stages"]] == [str(onpolicy)]
        assert f"{onpolicy} started from {warm}, which has changed since" in caplog.text
        shutil.move(warm, tmp_path / "moved")
        assert [s["path"] for s in training_compute(onpolicy)["stages"]] == [str(onpolicy)]
        assert f"{onpolicy} started from {warm}, which is no longer there" in caplog.text


def test_what_has_no_record_counts_nothing(tmp_path, chain, caplog):
    """A checkpoint without the run's clock or incomplete, a teacher the student was built from (drop_layers),
    another stage's output, a damaged record (never an error: eval reports without it)."""
    init, warm, onpolicy = chain
    run = tmp_path / "run"
    assert checkpoint_compute(train_checkpoint(run, 20, before=None, tokens=5, student=init)) is None
    incomplete = train_checkpoint(run, 30, before=3.0, tokens=5, student=init)
    assert checkpoint_compute(incomplete) is not None
    (incomplete / "model.safetensors").unlink()
    assert checkpoint_compute(incomplete) is None

    layers = stage(tmp_path / "train-layers", "train", warm, {"global_steps": 10, "trained_tokens": 100}, wall_s=2.0,
                   student_init="drop_layers")
    assert [s["path"] for s in training_compute(layers)["stages"]] == [str(layers)]
    assert training_compute(stage(tmp_path / "eval", "eval", init, {}, wall_s=1.0)) is None

    with caplog.at_level(logging.WARNING):
        for damaged in ("{", "[]"):
            (warm / "manifest.json").write_text(damaged)
            assert training_compute(warm) is None
            assert [s["path"] for s in training_compute(onpolicy)["stages"]] == [str(onpolicy)]
    assert f"{warm}: its training record could not be read (JSONDecodeError" in caplog.text
    assert f"{warm}: its training record could not be read (AttributeError" in caplog.text


def test_the_run_record_names_the_start_as_a_manifest_would(chain):
    init, warm, onpolicy = chain
    assert run_record(str(warm)) == {"started_from": started(warm), "machine": machine()}
    assert run_record("Qwen/Qwen2.5-Math-7B")["started_from"] == {"path": "Qwen/Qwen2.5-Math-7B", "fingerprint": "hub"}
    assert run_record(None)["started_from"] is None
