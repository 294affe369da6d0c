"""Train the tiny world's seed-0 teacher and its question writer with the current code; ship both.

    python scripts/ship_teacher.py

Run it after editing anything that decides the teacher's weights (the tiny-world task, tokenizer,
models, recipe or the prompt format): ``tests/test_tinyworld.py`` fails until the shipped copy's
key is the current one. The copy goes to ``llmdistill/tinyworld/shipped/tiny-teacher-<key>/``
(~3 MB); older shipped teachers are removed. The question writer (the teacher fine-tuned on whole
conversations, :func:`llmdistill.tinyworld.questions.question_writer`, which ``synthesize``'s tiny
config and tests use) follows it to ``shipped/tiny-question-writer-<key>/``, checked by
``tests/test_synthesize.py``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from llmdistill.log import setup_logging
from llmdistill.manifest import read_manifest
from llmdistill.tinyworld.bootstrap import SHIPPED, bootstrap_teacher
from llmdistill.tinyworld.questions import question_writer


def ship(trained: Path, prefix: str) -> None:
    """Copy a trained checkpoint into the package, replacing older ones of its kind."""
    target = SHIPPED / trained.name
    for old in SHIPPED.glob(f"{prefix}-*") if SHIPPED.is_dir() else []:
        if old.name != trained.name:
            shutil.rmtree(old)
    if not target.is_dir():
        shutil.copytree(trained, target)
    print(f"shipped {target} (held-out greedy accuracy {read_manifest(target)['heldout_accuracy']:.3f})")


def main() -> None:
    setup_logging()
    ship(bootstrap_teacher(0, use_shipped=False), "tiny-teacher")
    ship(question_writer(0, use_shipped=False), "tiny-question-writer")


if __name__ == "__main__":
    main()
