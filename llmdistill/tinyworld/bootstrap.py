"""The tiny world's checkpoints: the teacher (shipped, else trained once and cached) and student inits.

The teacher is what the demo and the integration tests distil from, so it must be good (>= 90%
greedy accuracy on held-out problems) and the same for everyone. Its recipe is
:mod:`llmdistill.tinyworld.recipe`; the key of a checkpoint hashes the seed, the settings and
:func:`code_version`. The package ships the seed-0 teacher its own code trained
(``llmdistill/tinyworld/shipped/``, written by ``scripts/ship_teacher.py``): it is used exactly
when its key is the current one, so a first run skips minutes of training, and any edit to what
decides the teacher's weights falls back to training (and fails a test until it is shipped
again). Other seeds are trained on first use and cached under ``cache_dir()``; a cached
directory appears by rename only once it is complete.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from llmdistill import prompts
from llmdistill.log import get_logger
from llmdistill.manifest import MANIFEST, read_manifest, write_manifest
from llmdistill.tinyworld import models, recipe, task, tokenizer
from llmdistill.tinyworld.models import make_model, num_params, save_model
from llmdistill.tinyworld.recipe import (
    EVAL_PROBLEMS,
    EVAL_SEED,
    TeacherTrainSettings,
    greedy_accuracy,
    heldout_eval_problems,
    train_teacher,
)
from llmdistill.tinyworld.tokenizer import build_tokenizer

logger = get_logger(__name__)
SHIPPED = Path(__file__).parent / "shipped"


def cache_dir() -> Path:
    """Where tiny-world checkpoints are cached: ``$LLMDISTILL_CACHE`` or ``~/.cache/llmdistill``."""
    return Path(os.environ.get("LLMDISTILL_CACHE", "~/.cache/llmdistill")).expanduser()


def code_version() -> str:
    """Hash of what decides the teacher's weights: the task, tokenizer, models, prompt format and recipe.

    Editing any of them invalidates the cache (and the shipped teacher); this module's caching
    and shipping plumbing does not.
    """
    h = hashlib.sha256()
    for module in (task, tokenizer, models, prompts, recipe):
        h.update(Path(module.__file__).read_bytes())
    return h.hexdigest()[:12]


def _cache_key(kind: str, seed: int, settings: TeacherTrainSettings | None) -> str:
    payload = {"kind": kind, "seed": seed, "code": code_version(),
               "settings": dataclasses.asdict(settings) if settings else None}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


@contextmanager
def _locked(path: Path):
    """Hold an exclusive file lock: concurrent callers wait for one build instead of racing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process that holds %s", path)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build_cached(target: Path, build: Callable[[Path], None]) -> Path:
    """Return ``target``, building it first (into a temp dir, then rename) if it is absent."""
    if (target / MANIFEST).is_file():
        return target
    with _locked(target.with_name(target.name + ".lock")):
        if (target / MANIFEST).is_file():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            build(tmp)
            if target.exists():  # a stale half cache from before atomic writes: replace it
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def bootstrap_teacher(seed: int = 0, settings: TeacherTrainSettings | None = None, use_shipped: bool = True) -> Path:
    """The trained teacher's checkpoint dir (model + tokenizer + manifest): the shipped one when it
    was made by this code with these settings, else the cached one, else trained now.

    Training takes 4-16 minutes on 2 CPU cores; afterwards the cached copy is returned at once.
    The manifest records the settings, wall time and measured held-out greedy accuracy.
    """
    settings = settings or TeacherTrainSettings()
    name = f"tiny-teacher-{_cache_key('teacher', seed, settings)}"
    if use_shipped and (SHIPPED / name / MANIFEST).is_file():
        return SHIPPED / name
    target = cache_dir() / name

    def build(out: Path) -> None:
        started = time.time()
        logger.info("bootstrapping the tiny teacher (seed %d, %d steps) into %s", seed, settings.steps, target)
        model, tok = train_teacher(seed, settings)
        save_model(model, tok, out)
        train_time = time.time() - started
        accuracy = greedy_accuracy(out, heldout_eval_problems())
        logger.info("tiny teacher: held-out greedy accuracy %.3f after %.0f s of training", accuracy, train_time)
        write_manifest(out, "bootstrap-teacher", settings, started=started,
                       counts={"steps": settings.steps, "train_problems": settings.steps * settings.batch_size,
                               "params": num_params(model), "heldout_problems": EVAL_PROBLEMS},
                       seed=seed, code_version=code_version(), train_wall_time_s=round(train_time, 1),
                       heldout_accuracy=accuracy, eval_seed=EVAL_SEED)

    return _build_cached(target, build)


def student_init(seed: int = 0) -> Path:
    """A cached random-init student checkpoint (same tokenizer as the teacher) for ``seed``."""
    target = cache_dir() / f"tiny-student-{_cache_key('student', seed, None)}"

    def build(out: Path) -> None:
        started = time.time()
        tok = build_tokenizer()
        model = make_model("student", tok, seed=seed)
        save_model(model, tok, out)
        write_manifest(out, "student-init", None, started=started, counts={"params": num_params(model)},
                       seed=seed, code_version=code_version())

    return _build_cached(target, build)


def teacher_accuracy(model_dir: str | Path) -> float:
    """The held-out accuracy recorded in a bootstrapped teacher's manifest."""
    value = read_manifest(model_dir).get("heldout_accuracy")
    if not isinstance(value, float):
        raise ValueError(f"{model_dir}/{MANIFEST} has no 'heldout_accuracy': is it a bootstrapped teacher?")
    return value
