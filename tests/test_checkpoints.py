"""``llmdistill train`` survives crashes: checkpoints and the final model appear only whole.

Kill tests run the real CLI in a subprocess whose save pauses at a chosen point (a wrapper
script patches ``torch.save``, the safetensors writer or ``os.replace``), SIGKILL it there,
then check what is on disk and that ``resume_from_checkpoint: latest`` finishes the run with the
weights of an uninterrupted one. Disk-full tests inject ENOSPC, and use a real 3 MiB tmpfs when
this process may mount one.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from llmdistill.checkpoints import CHECKPOINT_MARKER, checkpoint_problem, clean_stale, resolve_resume
from llmdistill.config.base import ConfigError, UserError, parse_config
from llmdistill.config.train import TrainConfig
from llmdistill.tinyworld.kd_data import write_tiny_built
from llmdistill.tinyworld.task import generate_problems
from llmdistill.train import run_train
from llmdistill.trainer import DistillTrainer

ROOT = Path(__file__).resolve().parents[1]

# Steps 1-4, a checkpoint every 2 steps: checkpoint-2, checkpoint-4, then the final model.
RUN = dict(alpha=0.5, max_steps=4, per_device_train_batch_size=2, learning_rate=3e-3, logging_steps=1,
           save_strategy="steps", save_steps=2, gradient_checkpointing=False, report_to="none", seed=0,
           disable_tqdm=True)

# Runs `llmdistill <argv...>` and, at the point named by argv[1], writes argv[2] and sleeps (to be killed).
WRAPPER = '''
import os, sys, time
from pathlib import Path

import torch

mode, signal_file = sys.argv[1], Path(sys.argv[2])


def pause():
    signal_file.write_text("paused")
    time.sleep(600)


def truncate_to_half(path):
    with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) // 2)


if mode == "checkpoint":  # checkpoint-4: its weights written, its optimizer state half written
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        if str(f).endswith("optimizer.pt") and "checkpoint-4" in str(f):
            truncate_to_half(f)
            pause()

    torch.save = save
elif mode == "final-write":  # the final model's weights half written
    import transformers.modeling_utils as modeling_utils

    real_save_file = modeling_utils.safe_save_file

    def save_file(tensors, filename, *args, **kwargs):
        real_save_file(tensors, filename, *args, **kwargs)
        if "checkpoint-" not in str(filename):
            truncate_to_half(filename)
            pause()

    modeling_utils.safe_save_file = save_file
elif mode == "final-swap":  # two files of the new final model moved into output_dir, the rest not yet
    real_replace, moved = os.replace, []

    def replace(src, dst, *args, **kwargs):
        real_replace(src, dst, *args, **kwargs)
        if ".model.tmp-" in str(src):
            moved.append(dst)
            if len(moved) == 2:
                pause()

    os.replace = replace

from llmdistill.cli import main

main(sys.argv[3:])
'''


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_tokenizer, tiny_random_teacher_dir):
    return write_tiny_built(tmp_path_factory.mktemp("built"), tiny_tokenizer, generate_problems(64, seed=0),
                            tiny_random_teacher_dir, k=8, max_length=128)


def config(out: Path, student, data, **overrides) -> TrainConfig:
    return TrainConfig(**{**RUN, "output_dir": str(out), "student_model": str(student), "data_dir": str(data),
                          **overrides})


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_student_dir, built) -> Path:
    """An uninterrupted run: checkpoint-2, checkpoint-4 and the final model."""
    out = tmp_path_factory.mktemp("reference") / "out"
    run_train(config(out, tiny_student_dir, built))
    return out


@pytest.fixture
def records():
    """The llmdistill log records of the test (the CLI's setup_logging stops them reaching caplog)."""
    logger, seen = logging.getLogger("llmdistill"), []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: seen.append(record.getMessage())
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield seen
    logger.removeHandler(handler)
    logger.setLevel(level)


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "model.safetensors")


def assert_same_weights(a: Path, b: Path, exact: bool = True) -> None:
    """Equal weights (``exact=False``: up to 1e-6, for runs in two processes)."""
    wa, wb = weights(a), weights(b)
    assert sorted(wa) == sorted(wb)
    for name in wa:
        assert torch.equal(wa[name], wb[name]) if exact else torch.allclose(wa[name], wb[name], rtol=0, atol=1e-6), name


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


def unchanged(directory: Path, before: dict[str, bytes]) -> bool:
    """The files of ``before`` are all there, byte for byte (TRL adds a README.md model card)."""
    now = files(directory)
    return {name: now.get(name) for name in before} == before and set(now) - set(before) <= {"README.md"}


def run_until_paused(tmp_path: Path, out: Path, student, data, mode: str) -> int:
    """Start `llmdistill train` in a subprocess, SIGKILL it where ``mode`` pauses; returns its pid."""
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(yaml.safe_dump({**RUN, "output_dir": str(out), "student_model": str(student),
                                        "data_dir": str(data)}))
    wrapper, signal_file = tmp_path / "wrapper.py", tmp_path / "paused"
    wrapper.write_text(WRAPPER)
    proc = subprocess.Popen([sys.executable, str(wrapper), mode, str(signal_file), "train", "--config", str(run_yaml)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not signal_file.exists():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (code {proc.returncode}) before pausing at {mode}: {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the run did not reach {mode} in time")
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stderr.close()
    return proc.pid


def checkpoint_names(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if "checkpoint" in p.name)


# ---- kill tests ------------------------------------------------------------------------------


@pytest.mark.integration
def test_kill_while_writing_a_checkpoint_leaves_only_complete_ones_and_latest_resumes(
        tmp_path, tiny_student_dir, built, reference, records, monkeypatch):
    out = tmp_path / "out"
    pid = run_until_paused(tmp_path, out, tiny_student_dir, built, "checkpoint")

    # checkpoint-4 exists only under its temporary name; every checkpoint-N is complete
    assert checkpoint_names(out) == [f".checkpoint-4.tmp-{pid}", "checkpoint-2"]
    staged = out / f".checkpoint-4.tmp-{pid}" / "checkpoint-4"
    assert (staged / "optimizer.pt").stat().st_size < (reference / "checkpoint-4" / "optimizer.pt").stat().st_size
    assert checkpoint_problem(out / "checkpoint-2") is None
    assert checkpoint_problem(staged) is not None

    # a checkpoint written in place by a killed older run (the case): only its config.json
    (out / "checkpoint-3").mkdir()
    shutil.copy(out / "checkpoint-2" / "config.json", out / "checkpoint-3")

    steps = []
    real_step = DistillTrainer.training_step
    monkeypatch.setattr(DistillTrainer, "training_step",
                        lambda self, *a, **kw: steps.append(self.state.global_step) or real_step(self, *a, **kw))
    run_train(config(out, tiny_student_dir, built, resume_from_checkpoint="latest", save_total_limit=1))

    assert steps == [2, 3]  # resumed after step 2: trained steps 3 and 4 only
    assert any("skipping incomplete checkpoint" in r and "checkpoint-3" in r for r in records)
    assert any(f"removing {out / f'.checkpoint-4.tmp-{pid}'}" in r for r in records)
    # the stale temporary checkpoint is gone; rotation (limit 1) deleted checkpoint-2 only after
    # checkpoint-4 was complete, and neither counted nor deleted the incomplete checkpoint-3
    assert checkpoint_names(out) == ["checkpoint-3", "checkpoint-4"]
    assert checkpoint_problem(out / "checkpoint-4") is None
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert_same_weights(out, reference)
    assert_same_weights(out / "checkpoint-4", reference / "checkpoint-4")


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["final-write", "final-swap"])
def test_kill_while_saving_the_final_model_never_leaves_half_a_model(tmp_path, tiny_student_dir, built, reference,
                                                                    mode):
    out = tmp_path / "out"
    shutil.copytree(tiny_student_dir, out)  # the complete model of an earlier, finished run
    (out / "manifest.json").write_text(json.dumps({"stage": "train"}))
    before = files(out)
    pid = run_until_paused(tmp_path, out, tiny_student_dir, built, mode)
    staging = out / f".model.tmp-{pid}"
    assert staging.is_dir()

    if mode == "final-write":  # the new weights were half written: the old model is untouched
        assert unchanged(out, before)
        clean_stale(out)  # what the next run does first
        assert unchanged(out, before)
    else:  # killed mid-swap: the finished-run mark is gone and the next start completes the swap
        assert not (out / "manifest.json").exists()
        assert (out / "model.safetensors").read_bytes() == before["model.safetensors"]  # not swapped yet
        clean_stale(out)
        assert_same_weights(out, reference, exact=False)
        assert files(out)["config.json"] == files(reference)["config.json"]
    assert not staging.exists()


@pytest.mark.integration
def test_a_merged_lora_model_replaces_the_old_model_and_its_obsolete_weights(tmp_path, tiny_student_dir, built):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    shutil.copytree(tiny_student_dir, out)
    for name in ("adapter_model.safetensors", "adapter_config.json"):  # an earlier adapter-only run's
        (out / name).write_text("{}")
    run_train(config(out, tiny_student_dir, built, use_peft=True, lora_r=4, save_merged=True, max_steps=2,
                     save_strategy="no"))
    assert not (out / "adapter_model.safetensors").exists() and not (out / "adapter_config.json").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    merged, student = (AutoModelForCausalLM.from_pretrained(d).state_dict() for d in (out, tiny_student_dir))
    assert any(not torch.equal(merged[k], student[k]) for k in student)  # the LoRA update was merged in


# ---- a full disk -------------------------------------------------------------------------------


@pytest.mark.integration
def test_disk_full_while_writing_a_checkpoint_names_path_bytes_stage_and_keeps_the_last_good_one(
        tmp_path, tiny_student_dir, built, monkeypatch):
    out = tmp_path / "out"
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if str(f).endswith("optimizer.pt") and "checkpoint-4" in str(f):
            Path(f).write_bytes(b"\0" * 1000)  # what was written before the disk filled up
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(UserError) as caught:
        run_train(config(out, tiny_student_dir, built, save_total_limit=1))
    message = str(caught.value)
    needed = sum(p.stat().st_size for p in (out / "checkpoint-2").iterdir())
    assert message.startswith("train: saving checkpoint-4: no space left on the disk writing ")
    assert f"{out}/.checkpoint-4.tmp-{os.getpid()}" in message
    assert f"({needed} bytes)" in message and "bytes) are free" in message
    assert f"the last good checkpoint {out / 'checkpoint-2'} is intact" in message
    assert "\n" not in message
    assert checkpoint_names(out) == ["checkpoint-2"]  # the partial copy is gone, limit 1 deleted nothing
    assert checkpoint_problem(out / "checkpoint-2") is None


@pytest.mark.integration
def test_disk_full_while_writing_the_final_model_leaves_the_old_one(tmp_path, tiny_student_dir, built, monkeypatch):
    import transformers.modeling_utils as modeling_utils
    from safetensors import SafetensorError

    out = tmp_path / "out"
    shutil.copytree(tiny_student_dir, out)
    (out / "manifest.json").write_text(json.dumps({"stage": "train"}))
    before = files(out)
    real_save_file = modeling_utils.safe_save_file

    def save_file(tensors, filename, *args, **kwargs):
        if "checkpoint-" not in str(filename):  # what safetensors raises on a full disk
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_save_file(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(modeling_utils, "safe_save_file", save_file)
    with pytest.raises(UserError, match=r"^train: saving the final model: no space left on the disk writing .*"
                                        r"bytes\) are free; the partial copy was removed and the previous model in "):
        run_train(config(out, tiny_student_dir, built))
    assert unchanged(out, before)
    assert checkpoint_names(out) == ["checkpoint-2", "checkpoint-4"]


@pytest.fixture
def small_disk(tmp_path):
    """A real 3 MiB tmpfs: room for one checkpoint of the tiny student (1.8 MB) but not two."""
    mount = tmp_path / "disk"
    mount.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True,
                              timeout=30)
    except (OSError, subprocess.SubprocessError) as err:
        pytest.skip(f"cannot mount a tmpfs: {err}")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=30)


@pytest.mark.integration
def test_a_really_full_disk_names_the_stage_and_keeps_the_last_good_checkpoint(small_disk, tiny_student_dir, built):
    out = small_disk / "out"
    with pytest.raises(UserError) as caught:  # torch's writer fails without an errno: "unexpected pos"
        run_train(config(out, tiny_student_dir, built))
    message = str(caught.value)
    assert message.startswith("train: saving checkpoint-4: no space left on the disk writing ")
    assert f"the last good checkpoint {out / 'checkpoint-2'} is intact" in message
    assert checkpoint_names(out) == ["checkpoint-2"]
    assert checkpoint_problem(out / "checkpoint-2") is None


# ---- resume_from_checkpoint ------------------------------------------------------------------------


@pytest.mark.unit
def test_resume_true_or_latest_from_yaml_and_the_command_line(tmp_path):
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text("resume_from_checkpoint: true\n")
    assert parse_config(TrainConfig, ["--config", str(run_yaml)]).resume_from_checkpoint == "latest"
    for text, expected in (("true", "latest"), ("Latest", "latest"), ("false", None), ("ckpt/checkpoint-3",
                                                                                      "ckpt/checkpoint-3")):
        parsed = parse_config(TrainConfig, ["--resume_from_checkpoint", text])
        assert parsed.resume_from_checkpoint == expected, text
    assert TrainConfig(resume_from_checkpoint=True).resume_from_checkpoint == "latest"
    # onpolicy reads the setting as train does (one definition: config.base.normalize_resume)
    from llmdistill.config.onpolicy import OnPolicyConfig

    op_yaml = tmp_path / "op.yaml"
    op_yaml.write_text("dataset: p.jsonl\nstudent_model: s\nteacher_model: t\nresume_from_checkpoint: true\n")
    assert parse_config(OnPolicyConfig, ["--config", str(op_yaml)]).resume_from_checkpoint == "latest"
    for text, expected in (("Latest", "latest"), ("false", None), ("ckpt/checkpoint-3", "ckpt/checkpoint-3")):
        parsed = parse_config(OnPolicyConfig, ["--config", str(op_yaml), "--resume_from_checkpoint", text])
        assert parsed.resume_from_checkpoint == expected, text
    with pytest.raises(ConfigError, match="resume_from_checkpoint=3: expected a checkpoint directory"):
        TrainConfig(resume_from_checkpoint=3)


@pytest.mark.unit
def test_a_clock_transformers_restores_from_a_checkpoint_counts_this_process_from_its_start():
    """``restore_callback_states_from_checkpoint`` makes transformers rebuild each stateful callback as
    ``type(cb)(**saved_args)``: the rebuilt clock keeps the saved seconds and counts this process from
    its start, not from the moment of the restore."""
    from types import SimpleNamespace

    import psutil
    from transformers import Trainer, TrainerControl
    from transformers.trainer_callback import CallbackHandler

    from llmdistill.checkpoints import RunClock

    saved = RunClock(before=40.0, started=time.time() - 2.0).state()
    assert saved["args"]["before"] == pytest.approx(42.0, abs=0.5)
    handler = CallbackHandler([RunClock(before=0.0, started=time.time())], None, None, None, None)
    trainer = SimpleNamespace(args=SimpleNamespace(restore_callback_states_from_checkpoint=True),
                              state=SimpleNamespace(stateful_callbacks={"RunClock": saved}),
                              callback_handler=handler, control=TrainerControl())
    Trainer._load_callback_state(trainer)
    (clock,) = [c for c in handler.callbacks if isinstance(c, RunClock)]
    assert clock.before == saved["args"]["before"]
    assert clock.started == psutil.Process().create_time()
    assert clock.elapsed >= clock.before + time.time() - psutil.Process().create_time() - 0.01


@pytest.mark.integration
def test_resolve_resume_takes_the_newest_complete_checkpoint(tmp_path, reference, records):
    out = tmp_path / "out"
    out.mkdir()
    assert resolve_resume("latest", out) is None  # nothing yet: train from the start
    assert any("no complete checkpoint" in r for r in records)
    for step in (2, 4):
        shutil.copytree(reference / f"checkpoint-{step}", out / f"checkpoint-{step}")
    (out / "checkpoint-6").mkdir()  # killed right after it appeared: only its config.json
    shutil.copy(reference / "config.json", out / "checkpoint-6")
    with open(out / "checkpoint-4" / "optimizer.pt", "r+b") as fh:  # sealed, then truncated
        fh.truncate(100)

    for value in ("latest", "true", True):
        assert resolve_resume(value, out) == str(out / "checkpoint-2")
    assert any("skipping incomplete checkpoint" in r and "checkpoint-6" in r for r in records)
    assert any("checkpoint-4" in r and "optimizer.pt has 100 bytes" in r for r in records)
    assert resolve_resume(str(out / "checkpoint-2"), out) == str(out / "checkpoint-2")
    for value in (None, False, "false"):
        assert resolve_resume(value, out) is None
    with pytest.raises(ConfigError, match=rf"{out / 'checkpoint-6'} is not a complete checkpoint \(no trainer_state"
                                          rf".*the newest complete checkpoint is {out / 'checkpoint-2'}"):
        resolve_resume(str(out / "checkpoint-6"), out)

    (out / "checkpoint-2" / CHECKPOINT_MARKER).unlink()  # as written by plain transformers: still complete
    assert checkpoint_problem(out / "checkpoint-2") is None
    (out / "checkpoint-2" / "trainer_state.json").unlink()
    assert resolve_resume("latest", out) is None
