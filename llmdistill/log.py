"""One rank-aware logger factory and progress bars for every stage.

Importing llmdistill configures no logging: :func:`get_logger` only names a child of the
``llmdistill`` logger. The ``llmdistill`` command calls :func:`setup_logging` once; then only
the main process (rank 0) logs at INFO and draws progress, other ranks log warnings and errors
only, so an 8-GPU run prints one stream, not eight. A program that uses llmdistill as a library
configures logging itself (or calls :func:`setup_logging`).
"""

from __future__ import annotations

import logging
import os

from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

_ROOT = "llmdistill"


def rank() -> int:
    """This process's global rank (0 when not launched by torchrun/accelerate/SLURM)."""
    for var in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def is_main_process() -> bool:
    return rank() == 0


def get_logger(name: str) -> logging.Logger:
    """The logger of module ``name``, under the ``llmdistill`` logger (nothing is configured)."""
    return logging.getLogger(_ROOT).getChild(name.removeprefix(_ROOT + "."))


class _Handler(RichHandler):
    """The handler :func:`setup_logging` installs (its own class, so a second call finds it)."""


def setup_logging() -> logging.Logger:
    """Send llmdistill's log records to the terminal: INFO on rank 0, WARNING on other ranks.

    For programs (the ``llmdistill`` command), never called on import. Idempotent: a second
    call changes nothing. The records do not propagate to the root logger, so a root handler
    set up elsewhere does not print them twice.

    Returns:
        The ``llmdistill`` logger.
    """
    root = logging.getLogger(_ROOT)
    if any(isinstance(h, _Handler) for h in root.handlers):
        return root
    handler = _Handler(show_path=False, rich_tracebacks=False, markup=False)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO if is_main_process() else logging.WARNING)
    root.propagate = False
    return root


def progress(transient: bool = False) -> Progress:
    """A rich progress display (disabled on non-main ranks and when ``LLMDISTILL_NO_PROGRESS`` is set)."""
    disable = not is_main_process() or bool(os.environ.get("LLMDISTILL_NO_PROGRESS"))
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        transient=transient,
        disable=disable,
    )
