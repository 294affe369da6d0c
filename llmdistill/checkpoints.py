"""Training checkpoints and the final model that survive crashes, and a full disk as one clear error.

How :class:`~llmdistill.trainer.DistillTrainer` (``_save_checkpoint``, ``save_model``) writes them:

* a checkpoint is written into ``output_dir/.checkpoint-N.tmp-<pid>/checkpoint-N`` (``<pid>``: the
  main process's), fsync'd, sealed with :data:`CHECKPOINT_MARKER` (each file's size, written
  last) and renamed to ``output_dir/checkpoint-N``: a ``checkpoint-N`` directory never holds half
  a checkpoint. Rotation (``save_total_limit``) runs after the rename and counts and deletes only
  complete checkpoints, never the one just written;
* *complete* (:func:`checkpoint_problem`): the marker is there and every file it lists has its
  recorded size; a checkpoint without a marker (written in place by an older llmdistill or by
  plain transformers) counts as complete when its ``trainer_state.json``, the file transformers
  writes last, parses and model weights are present. ``resume_from_checkpoint: latest`` takes the
  newest complete one and skips incomplete ones with a warning (:func:`resolve_resume`);
* the final model goes to ``output_dir/.model.tmp-<pid>``, is fsync'd, gets a journal listing the
  old weight files to drop, and only then replaces the old model file by file (``manifest.json``,
  the mark of a finished run, is removed first and written again by ``run_train`` at the very
  end). A kill before the journal leaves the old model untouched; a kill during the swap is
  completed from the journal when the next trainer starts on that ``output_dir``
  (:func:`clean_stale`), which also removes whatever else killed runs left;
* a full disk (ENOSPC/EDQUOT, or torch's errno-less "unexpected pos" with no space left) during
  either save removes the partial copy and raises a :class:`~llmdistill.config.base.UserError`
  naming the stage, the path, the bytes needed and free, and the last good checkpoint.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

from transformers.trainer_callback import ExportableState, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from llmdistill.config.base import RESUME_LATEST, ConfigError, normalize_resume
from llmdistill.log import get_logger
from llmdistill.outputs import pid_alive

logger = get_logger(__name__)

CHECKPOINT_MARKER = "checkpoint_complete.json"
TRAINER_STATE = "trainer_state.json"  # transformers' TRAINER_STATE_NAME: the file its checkpoint save writes last
TOKENS_FILE = "trained_tokens.json"  # in each train checkpoint: target tokens trained up to it, all processes'
RUN_RECORD_FILE = "run_record.json"  # in each train checkpoint: the model the run started from, the machine
ONPOLICY_STATE = "state.json"  # written last into an onpolicy checkpoint: its presence marks the checkpoint complete
ADAPTER_DIR = "adapter"  # an onpolicy LoRA student's adapter, beside the merged final model
#: The final model's staging directory holds this journal once it is complete (see ``_swap_in_model``).
_MODEL_JOURNAL = ".swap.json"
_CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
# what killed runs leave: staged checkpoints, checkpoints set aside for deletion, a staged final model
_STALE_NAME = re.compile(rf"^\.(?:{PREFIX_CHECKPOINT_DIR}-\d+\.(?:tmp|del)|model\.tmp)-(\d+)$")
_TRANSFORMERS_IN_PROGRESS = "checkpoint-is-incomplete.txt"  # transformers' JIT-checkpoint sentinel
_WEIGHT_FILE = re.compile(r"^(?!training_args\.bin$).*\.(safetensors|bin|pt|pth)$|.*\.index\.json$|^adapter_config\.json$")
_TORCH_WRITE_FAILED = ("unexpected pos", "file write failed", "PytorchStreamWriter failed", "iostream error")
_warned_incomplete: set[str] = set()


def checkpoint_step(path: str | Path) -> int | None:
    """N for a directory named ``checkpoint-N``, else None."""
    match = _CHECKPOINT_NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def checkpoint_problem(path: str | Path) -> str | None:
    """None when ``path`` holds a complete checkpoint, else what is wrong with it.

    Complete: the :data:`CHECKPOINT_MARKER` is there and every file it lists has its recorded
    size. Without a marker (a checkpoint written in place by plain transformers or an older
    llmdistill), ``trainer_state.json`` -- the last file transformers writes -- must parse and
    model weights must be present.
    """
    path = Path(path)
    if not path.is_dir():
        return "no such directory"
    if (path / _TRANSFORMERS_IN_PROGRESS).exists():
        return f"it holds transformers' {_TRANSFORMERS_IN_PROGRESS}"
    marker = path / CHECKPOINT_MARKER
    if marker.is_file():
        try:
            files = json.loads(marker.read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return f"its {CHECKPOINT_MARKER} is unreadable"
        for name, size in files.items():
            actual = path / name
            if not actual.is_file():
                return f"{name} is missing"
            if actual.stat().st_size != size:
                return f"{name} has {actual.stat().st_size} bytes instead of {size}"
        return None
    try:
        json.loads((path / TRAINER_STATE).read_text())["global_step"]
    except FileNotFoundError:
        return f"no {TRAINER_STATE} (the file a checkpoint save writes last)"
    except (OSError, ValueError, KeyError, TypeError):
        return f"{TRAINER_STATE} is unreadable"
    weights = [p for p in path.iterdir() if _WEIGHT_FILE.match(p.name) or p.name.startswith(("global_step",
                                                                                              "pytorch_model_fsdp"))]
    return None if weights else "no model weights"


def complete_checkpoints(run_dir: str | Path, warn: bool = True) -> list[Path]:
    """The complete ``checkpoint-N`` directories of ``run_dir``, oldest step first.

    Args:
        run_dir: the training output directory.
        warn: log a warning (once per directory) for each incomplete one that is skipped.
    """
    run_dir = Path(run_dir)
    found = sorted((checkpoint_step(p), p) for p in (run_dir.iterdir() if run_dir.is_dir() else ())
                   if checkpoint_step(p) is not None and p.is_dir())
    complete = []
    for _, path in found:
        problem = checkpoint_problem(path)
        if problem is None:
            complete.append(path)
        elif warn and str(path) not in _warned_incomplete:
            _warned_incomplete.add(str(path))
            logger.warning("skipping incomplete checkpoint %s (%s): a run was interrupted while writing it", path,
                           problem)
    return complete


def latest_complete_checkpoint(run_dir: str | Path, warn: bool = True) -> Path | None:
    """The complete checkpoint of ``run_dir`` with the highest step, or None."""
    complete = complete_checkpoints(run_dir, warn=warn)
    return complete[-1] if complete else None


def resolve_resume(value: Any, output_dir: str | Path) -> str | None:
    """The checkpoint to resume from: ``latest``/true -> newest complete one in ``output_dir``.

    Args:
        value: ``resume_from_checkpoint`` (a path, ``latest``/``true``/True, or None/False).
        output_dir: where ``latest`` looks.

    Returns:
        A complete checkpoint directory, or None (start from scratch; also ``latest`` without any).

    Raises:
        ConfigError: an explicit path that is not a complete checkpoint (naming the newest complete one).
    """
    value = normalize_resume(value)
    if value is None:
        return None
    if value == RESUME_LATEST:
        found = latest_complete_checkpoint(output_dir)
        if found is None:
            logger.info("resume_from_checkpoint=latest: no complete checkpoint in %s, training from the start",
                        output_dir)
            return None
        logger.info("resume_from_checkpoint=latest: resuming from %s", found)
        return str(found)
    path = Path(value).expanduser()
    problem = checkpoint_problem(path)
    if problem is None:
        return str(path)
    newest = latest_complete_checkpoint(path.parent, warn=False) or latest_complete_checkpoint(output_dir, warn=False)
    hint = (f"the newest complete checkpoint is {newest}: resume from it, or set resume_from_checkpoint: latest"
            if newest is not None else f"there is no complete checkpoint in {path.parent} to resume from")
    raise ConfigError(f"resume_from_checkpoint={value}: {path} is not a complete checkpoint ({problem}); {hint}")


def clean_stale(run_dir: str | Path) -> None:
    """Finish or remove what killed runs left in ``run_dir``.

    A staged final model whose journal was written is swapped in (the kill came during the
    swap); every other staging or set-aside directory is removed. Directories of a process that
    is still running (another run writing here right now) are left alone.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    for path in sorted(run_dir.iterdir()):
        match = _STALE_NAME.match(path.name)
        if match is None:
            continue
        pid = int(match.group(1))
        if pid != os.getpid() and pid_alive(pid):
            continue
        if path.name.startswith(".model.") and (path / _MODEL_JOURNAL).is_file():
            logger.warning("completing the swap of the final model from %s (a run was killed while swapping it)", path)
            swap_in_model(path, run_dir)
            continue
        logger.info("removing %s, left by an interrupted run", path)
        shutil.rmtree(path, ignore_errors=True)


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.EBADF, errno.EROFS):  # directories on some filesystems
            raise
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> dict[str, int]:
    """fsync every file and directory under ``root``; returns each file's size by relative path."""
    sizes = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath) / name
            _fsync(path)
            sizes[str(path.relative_to(root))] = path.stat().st_size
        _fsync(Path(dirpath))
    return sizes


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def seal_checkpoint(staged: Path, step: int) -> None:
    """fsync a staged checkpoint, then write its marker (the last file) and fsync that too."""
    files = _fsync_tree(staged)
    files.pop(CHECKPOINT_MARKER, None)
    _write_synced(staged / CHECKPOINT_MARKER, json.dumps({"step": step, "files": files}, indent=1))
    _fsync(staged)


def publish_checkpoint(staged: Path, final: Path, owner: int) -> None:
    """Rename a sealed checkpoint into place; an existing directory of that name is set aside first."""
    aside = None
    if final.exists():
        aside = final.with_name(f".{final.name}.del-{owner}")
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(final, aside)
    os.rename(staged, final)
    _fsync(final.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def set_aside_and_delete(path: Path, owner: int) -> None:
    """Delete a checkpoint without ever leaving a half-deleted ``checkpoint-N`` behind."""
    aside = path.with_name(f".{path.name}.del-{owner}")
    os.rename(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


def seal_model(staging: Path, out: Path) -> None:
    """fsync the staged final model and write its journal: the old weight files it makes obsolete."""
    files = _fsync_tree(staging)
    new = {name.split(os.sep)[0] for name in files}
    obsolete = sorted(p.name for p in out.iterdir() if p.is_file() and _WEIGHT_FILE.match(p.name) and p.name not in new)
    _write_synced(staging / _MODEL_JOURNAL, json.dumps({"remove": obsolete}))
    _fsync(staging)


def swap_in_model(staging: Path, out: Path) -> None:
    """Move a sealed final model into ``out``, dropping obsolete old weights; safe to run again after a kill."""
    journal = json.loads((staging / _MODEL_JOURNAL).read_text())
    (out / "manifest.json").unlink(missing_ok=True)  # `out` stops holding the old finished run
    for item in sorted(staging.iterdir()):
        if item.name == _MODEL_JOURNAL:
            continue
        target = out / item.name
        if item.is_dir() and target.is_dir():  # e.g. a DeepSpeed global_step directory
            shutil.rmtree(target)
        os.replace(item, target)
    for name in journal.get("remove", []):
        (out / name).unlink(missing_ok=True)
    _fsync(out)
    shutil.rmtree(staging, ignore_errors=True)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def free_bytes(path: Path) -> int:
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _error_chain(err: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    while err is not None and err not in chain and len(chain) < 10:
        chain.append(err)
        err = err.__cause__ or err.__context__
    return chain


def is_disk_full(err: BaseException, where: str | Path, needed: int = 0) -> bool:
    """Whether ``err`` means the disk (or quota) holding ``where`` is full.

    OSError ENOSPC/EDQUOT and their messages (safetensors wraps them in its own error) count;
    torch's zip writer fails with an errno-less "unexpected pos", which counts when the free
    space at ``where`` is below ``needed`` (at least 1 MiB).
    """
    chain = _error_chain(err)
    for e in chain:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e)
        if any(s in text for s in ("No space left on device", "Disk quota exceeded", "os error 28", "os error 122")):
            return True
    if any(isinstance(e, RuntimeError) and any(s in str(e) for s in _TORCH_WRITE_FAILED) for e in chain):
        return free_bytes(Path(where)) < max(needed, 1 << 20)
    return False


class StopRequest:
    """SIGTERM, as Slurm sends it ahead of a job's time limit (``--signal``), asks a training loop to
    stop after the step under way (:attr:`signum` set): it saves a checkpoint and exits with status
    128 + the signal, so a resubmitted job resumes (a signal during the last step lets the run
    finish). Installed from the main thread only (where Python runs signal handlers), once the output
    directory exists (before that, nothing is written and SIGTERM ends the process as usual); the
    previous handler comes back on exit. Used by ``onpolicy`` and, agreed over all processes
    (:class:`StopOnSignal`), by ``train``.

    Args:
        repeat_exits: a second SIGTERM exits at once. Off for ``train``: under ``accelerate launch``
            (torchrun) a worker gets the signal from the launcher as well as from Slurm, and a second
            one must not cut the checkpoint short.
    """

    def __init__(self, repeat_exits: bool = True) -> None:
        self.signum: int | None = None
        self.repeat_exits = repeat_exits
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            if self.repeat_exits:
                raise SystemExit(128 + signum)
            return  # already stopping after this step
        self.signum = signum
        logger.warning("%s: stopping after this step with a checkpoint%s", signal.Signals(signum).name,
                       " (again to stop now)" if self.repeat_exits else "")


def stop_message(signum: int, step: int, max_steps: int, checkpoint: str | Path) -> str:
    """The one line a run stopped by a signal logs."""
    return (f"stopped by {signal.Signals(signum).name} after step {step} of {max_steps}: {checkpoint} saved; "
            "resume with --resume_from_checkpoint latest")


class StopOnSignal(TrainerCallback):
    """A ``TrainerCallback`` that ends transformers' ``train`` after the step under way once any
    process got a stop request: after each optimizer step the processes sum their
    flags (one scalar all-reduce), so all of them save the same checkpoint at the same step and stop
    together, whichever of them Slurm or the launcher signalled. :attr:`signum` is then set on every
    process. A request during the last step lets the run finish.

    Args:
        stop: this process's :class:`StopRequest`.
        accelerator: the trainer's ``Accelerator`` (its ``reduce`` over the processes).
    """

    def __init__(self, stop: StopRequest, accelerator: Any):
        self.stop, self.accelerator = stop, accelerator
        self.signum: int | None = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        asked = self.stop.signum is not None
        if self.accelerator.num_processes > 1:  # the one collective (and host sync) a step, only when shared
            import torch

            flag = torch.tensor([float(asked)], device=self.accelerator.device)
            asked = float(self.accelerator.reduce(flag, reduction="sum").item()) > 0
        if asked and state.global_step < state.max_steps:
            self.signum = self.stop.signum or signal.SIGTERM  # the signalled processes all got SIGTERM
            control.should_log = True  # the steps since the last log: in log_history and the checkpoint
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.signum is not None:  # saved already: save_strategy epoch would save the same step again
            control.should_save = False
        return control



class RunClock(TrainerCallback, ExportableState):
    """The wall seconds a training run has spent, over every process that ran it: a run resumed from a
    checkpoint continues from the seconds the checkpoint saved, so a run split over several scheduler
    jobs reports its whole time. Log entries carry it as ``elapsed_s``, the final manifest as
    ``wall_time_total_s`` (``wall_time_s`` is the last process's). ``train`` keeps it among the
    trainer's callbacks (transformers writes :meth:`state` into each checkpoint's ``trainer_state.json``);
    ``onpolicy`` writes :attr:`elapsed` into its checkpoints' state.

    Args:
        before: the seconds of the processes before this one (0 for a fresh run).
        started: when this process's run started, Unix seconds. None: when the process itself started,
            which is what transformers gives a clock it rebuilds from a checkpoint
            (``restore_callback_states_from_checkpoint``: ``RunClock(**state()["args"])``), so the seconds
            this process spent before the restore (imports, model loading) still count.
    """

    def __init__(self, before: float = 0.0, started: float | None = None):
        import psutil

        self.before = before
        self.started = psutil.Process().create_time() if started is None else started

    @property
    def elapsed(self) -> float:
        return self.before + time.time() - self.started

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps (transformers' ``ExportableState``): the seconds so far."""
        return {"args": {"before": round(self.elapsed, 3)}, "attributes": {}}

    @classmethod
    def resumed(cls, checkpoint: str | Path | None, started: float) -> RunClock:
        """The clock of a ``train`` run resumed from ``checkpoint`` (its ``trainer_state.json``), or a fresh one
        (also for a checkpoint saved without a clock)."""
        from transformers import TrainerState
        from transformers.trainer import TRAINER_STATE_NAME

        saved = None
        if checkpoint is not None and (Path(checkpoint) / TRAINER_STATE_NAME).is_file():
            state = TrainerState.load_from_json(str(Path(checkpoint) / TRAINER_STATE_NAME))
            saved = (state.stateful_callbacks or {}).get(cls.__name__)
        return cls(float(saved["args"]["before"]) if saved else 0.0, started)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        # a checkpoint saved without a clock has no entry for it, which transformers' save expects
        state.stateful_callbacks.setdefault(type(self).__name__, self.state())
        return control
