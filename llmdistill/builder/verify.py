"""Step 1: verify each completion's final answer with a checker of :mod:`llmdistill.checking`.

The config's ``verifier`` names an entry of :data:`~llmdistill.checking.checkers.CHECKERS`, the
same registry ``eval`` scores with, so a (completion, reference, checker) gets the same verdict
in both stages. Each checker declares which reference it needs (an answer or tests); the build
checks that its input has that column before any work.
"""

from __future__ import annotations

import os

import numpy as np

from llmdistill.checking.checkers import CHECKERS, Reference, check_many
from llmdistill.config.base import ConfigError
from llmdistill.config.build import VerifyConfig


def check_references(columns: list[str], references: list[str | None] | None, cfg: VerifyConfig,
                     column_name: str, ids: list[str]) -> None:
    """Fail before any work when the verifier needs a column the input does not have (or has gaps in).

    Raises:
        ConfigError: naming the column and the first row without a value.
    """
    if CHECKERS[cfg.verifier].needs is None:
        return
    if references is None:
        raise ConfigError(
            f"verifier '{cfg.verifier}' needs a '{column_name}' column; the input has {sorted(columns)}. "
            f"Set answer_column/tests_column to the right column, or use verifier: none."
        )
    missing = [i for i, ref in enumerate(references) if ref is None or ref == ""]
    if missing:
        raise ConfigError(
            f"verifier '{cfg.verifier}' needs a reference in column '{column_name}', but {len(missing)} row(s) have "
            f"none (first: row {missing[0]}, prompt_id {ids[missing[0]]}). Fill them, or use verifier: none."
        )


def verify_all(completions: list[str], references: list[str | None], cfg: VerifyConfig) -> np.ndarray:
    """Verdicts of every completion, by :func:`llmdistill.checking.checkers.check_many`.

    Args:
        completions: the completion texts (think block included).
        references: per completion, the reference answer or tests (None entries for ``none``).
        cfg: the verify config.

    Returns:
        bool array, one verdict per completion.
    """
    needs = CHECKERS[cfg.verifier].needs
    refs = [Reference(**{needs: r}) if needs is not None else Reference() for r in references]
    verdicts = check_many(cfg.verifier, completions, refs, workers=os.cpu_count() or 1,
                          timeout_s=cfg.code_timeout_s, memory_mb=cfg.code_memory_mb)
    return np.asarray([v.correct for v in verdicts], dtype=bool)
