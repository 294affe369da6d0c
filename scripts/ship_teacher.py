"""Train the tiny world's seed-0 teacher with the current code and ship it inside the package.

    python scripts/ship_teacher.py

Run it after editing anything that decides the teacher's weights (the tiny-world task, tokenizer,
models, recipe or the prompt format): ``tests/test_tinyworld.py`` fails until the shipped copy's
key is the current one. The copy goes to ``llmdistill/tinyworld/shipped/tiny-teacher-<key>/``
(~3 MB); older shipped teachers are removed.
"""

from __future__ import annotations

import shutil

from llmdistill.log import setup_logging
from llmdistill.manifest import read_manifest
from llmdistill.tinyworld.bootstrap import SHIPPED, bootstrap_teacher


def main() -> None:
    setup_logging()
    trained = bootstrap_teacher(0, use_shipped=False)
    target = SHIPPED / trained.name
    for old in SHIPPED.glob("tiny-teacher-*") if SHIPPED.is_dir() else []:
        if old.name != trained.name:
            shutil.rmtree(old)
    if not target.is_dir():
        shutil.copytree(trained, target)
    print(f"shipped {target} (held-out greedy accuracy {read_manifest(target)['heldout_accuracy']:.3f})")


if __name__ == "__main__":
    main()
