"""What a trained model cost: the training compute its stages recorded.

One reading of the records, for the demo's report and for eval's:

* a finished ``train`` or ``onpolicy`` output (or an on-policy LoRA run's ``adapter/``): its
  ``manifest.json`` (optimizer steps, trained tokens, the on-policy rollout tokens and teacher tokens
  scored, wall seconds of all the processes that ran it, and seconds per phase where the stage
  times them);
* one of its ``checkpoint-N`` directories: the run state saved in it, which holds the same counts up
  to step N (``state.json`` for ``onpolicy``; ``trainer_state.json`` with the run's clock and
  ``trained_tokens.json`` for ``train``) and the run's record (:func:`run_record`: the model the run
  started from, the machine), so a checkpoint of a run still going is counted like a finished one's;
* then the model it started from, while that is an llmdistill training output too (a warm start):
  :func:`training_compute` adds its record, so an on-policy student's compute includes its SFT warm
  start. The start is followed only while it is the model that was recorded (its fingerprint, as the
  manifests' inputs have it): one moved, deleted or trained again since is left out with a warning.
  A student built from the teacher's layers (``student_init: drop_layers``) does not count the
  teacher's training.

Wall seconds are the machine's that trained the model (each record names it): they compare runs of
one machine, not of two.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from llmdistill.checkpoints import (
    ADAPTER_DIR,
    ONPOLICY_STATE,
    RUN_RECORD_FILE,
    TOKENS_FILE,
    TRAINER_STATE,
    checkpoint_problem,
    checkpoint_step,
)
from llmdistill.log import get_logger
from llmdistill.manifest import MANIFEST, fingerprint, machine, read_manifest

logger = get_logger(__name__)

TRAINING_STAGES = ("train", "onpolicy")
COUNTS = ("optimizer_steps", "trained_tokens", "rollout_tokens", "teacher_tokens_scored")


def run_record(student: str | None) -> dict[str, Any]:
    """What a training run's checkpoints keep of the run beside its counts: the model its student started
    from (a path with its fingerprint, as a manifest's inputs record it; None when the student was built
    from another model's layers) and the machine."""
    started = None
    if student:
        local = Path(student).exists()
        started = {"path": os.path.abspath(student) if local else student,
                   "fingerprint": fingerprint(student) if local else "hub"}
    return {"started_from": started, "machine": machine()}


def stage_wall_s(manifest: dict[str, Any]) -> float:
    """A stage's wall seconds: of all the processes that ran it when it was resumed (``wall_time_total_s``)."""
    return manifest.get("wall_time_total_s", manifest["wall_time_s"])


def _phases(seconds: dict[str, float] | None, wall_s: float) -> dict[str, float]:
    """Seconds per phase, and the rest of the wall time (engines and models starting, saving) as its own phase."""
    phases = {k: round(v, 3) for k, v in (seconds or {"training": wall_s}).items()}
    if (rest := wall_s - sum(phases.values())) > 0.05:
        phases["setup and saving"] = round(rest, 3)
    return phases


def _started_from(manifest: dict[str, Any]) -> dict[str, str] | None:
    """The model a finished training stage's student started from (its ``student`` input), unless the
    student was built from the teacher's layers."""
    if (manifest.get("config") or {}).get("student_init", "pretrained") != "pretrained":
        return None
    return (manifest.get("inputs") or {}).get("student")


def stage_compute(directory: str | Path) -> dict[str, Any]:
    """The compute a finished ``train`` or ``onpolicy`` stage recorded in its manifest.

    Returns:
        ``{"path", "stage", "step", "wall_s", "optimizer_steps", "trained_tokens", ["rollout_tokens",
        "teacher_tokens_scored",] "phases_s", "machine", "started_from"}``; ``started_from`` is
        ``{"path", "fingerprint"}`` or None.
    """
    manifest = read_manifest(directory)
    counts, wall = manifest["counts"], stage_wall_s(manifest)
    steps = counts.get("global_steps", counts.get("optimizer_steps", 0))
    return {"path": str(directory), "stage": manifest["stage"], "step": steps, "wall_s": wall,
            "optimizer_steps": steps, "trained_tokens": counts.get("trained_tokens", 0),
            **{k: counts[k] for k in ("rollout_tokens", "teacher_tokens_scored") if k in counts},
            "phases_s": _phases((manifest.get("compute") or {}).get("seconds"), wall),
            "machine": manifest.get("machine"), "started_from": _started_from(manifest)}


def checkpoint_compute(directory: str | Path) -> dict[str, Any] | None:
    """The compute up to a ``checkpoint-N`` of a ``train`` or ``onpolicy`` run, from the run state saved in
    it; None for a directory that is not such a checkpoint, or one saved without the run's clock. The
    starting model and the machine come from the run's record in the checkpoint (checkpoints saved before
    it was kept: from the run's manifest, when the run finished)."""
    directory = Path(directory)
    if checkpoint_step(directory) is None:
        return None
    if (directory / ONPOLICY_STATE).is_file():
        state = json.loads((directory / ONPOLICY_STATE).read_text())
        counters, wall = state["counters"], state["wall_time_total_s"]
        record = {"stage": "onpolicy", "step": state["step"], "wall_s": wall,
                  **{k: counters[k] for k in COUNTS}, "phases_s": _phases(counters.get("seconds"), wall)}
        kept = state.get("run_record")
    elif (directory / TRAINER_STATE).is_file() and checkpoint_problem(directory) is None:
        state = json.loads((directory / TRAINER_STATE).read_text())
        clock = ((state.get("stateful_callbacks") or {}).get("RunClock") or {}).get("args", {})
        if "before" not in clock:  # saved without the run's clock: no wall time to place it by
            return None
        wall = clock["before"]
        tokens = (json.loads((directory / TOKENS_FILE).read_text())["trained_tokens"]
                  if (directory / TOKENS_FILE).is_file() else 0)
        record = {"stage": "train", "step": state["global_step"], "wall_s": wall,
                  "optimizer_steps": state["global_step"], "trained_tokens": int(tokens),
                  "phases_s": _phases(None, wall)}
        kept = json.loads((directory / RUN_RECORD_FILE).read_text()) if (directory / RUN_RECORD_FILE).is_file() else None
    else:
        return None
    if kept is None:  # an older checkpoint: its run's manifest, if the run finished
        manifest = read_manifest(directory.parent) if (directory.parent / MANIFEST).is_file() else {}
        kept = {"machine": manifest.get("machine"), "started_from": _started_from(manifest) if manifest else None}
    return {"path": str(directory), **record, "machine": kept["machine"], "started_from": kept["started_from"]}


def _record(path: Path) -> dict[str, Any] | None:
    """The training record of ``path``: a finished stage's, a checkpoint's, or an on-policy LoRA run's adapter's
    (its run's)."""
    if (path / MANIFEST).is_file():
        manifest = read_manifest(path)
        return stage_compute(path) if manifest.get("stage") in TRAINING_STAGES else None
    if path.name == ADAPTER_DIR and (path.parent / MANIFEST).is_file():
        return _record(path.parent)
    return checkpoint_compute(path)


def _start(record: dict[str, Any]) -> Path | None:
    """The model a record's run started from, while it is the one recorded: a moved, deleted or changed one
    is left out with a warning (its compute would be missing or another run's)."""
    start = record["started_from"]
    if not start or start.get("fingerprint") == "hub":
        return None
    path = Path(start["path"])
    if not path.exists():
        logger.warning("%s started from %s, which is no longer there: the compute of that start is left out",
                       record["path"], path)
        return None
    if fingerprint(path) != start["fingerprint"]:
        logger.warning("%s started from %s, which has changed since (trained again?): the compute of that start is "
                       "left out", record["path"], path)
        return None
    return path


def training_compute(model: str | Path) -> dict[str, Any] | None:
    """Everything a local model's training spent: its own stage's record (or its checkpoint's) and those of
    the llmdistill training outputs it started from, first trained first.

    Returns:
        None for a model without a record (a hub id, a model llmdistill did not train); else
        ``{"wall_s", "optimizer_steps", "trained_tokens", "rollout_tokens", "teacher_tokens_scored",
        "stages": [record, ...]}`` (the sums over the stages; a record as :func:`stage_compute` returns).
        A record that cannot be read is logged and ends the chain: the report never fails on one.
    """
    stages: list[dict[str, Any]] = []
    path: Path | None = Path(model)
    seen: set[Path] = set()
    while path is not None and path.is_dir() and path.resolve() not in seen:
        seen.add(path.resolve())
        try:
            record = _record(path)
        except Exception as err:  # a damaged or foreign record: the eval it reports on stands without it
            logger.warning("%s: its training record could not be read (%s: %s); its compute is left out", path,
                           type(err).__name__, err)
            record = None
        if record is None:
            break
        stages.append(record)
        path = _start(record)
    if not stages:
        return None
    stages.reverse()
    total = {"wall_s": round(sum(s["wall_s"] for s in stages), 3),
             **{k: sum(s.get(k, 0) for s in stages) for k in COUNTS}}
    return {**total, "stages": stages}
