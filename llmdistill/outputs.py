"""Stage outputs that appear only whole: write into a staging directory, then swap it in.

A stage writes everything into ``.<name>.tmp-<pid>`` beside its output directory. When the
stage has finished, the staging directory and the old output are exchanged in one atomic
``renameat2(RENAME_EXCHANGE)``, so at every instant ``<name>`` is either the complete old output
or the complete new one; the old one is deleted afterwards. A SIGKILL at any point leaves the
previous output in place and at most a staging directory, which the next run of any stage
writing there removes. Where the filesystem cannot exchange (``renameat2`` unsupported), the old
output is first renamed to ``.<name>.old-<pid>`` and restored by the next run if the kill came
between the two renames.

A stage that resumes (``build``) stages into ``.<name>.tmp-<key>`` instead (:func:`resumable_output`),
where ``key`` identifies its config and input: a re-run with the same key finds the finished work
of a killed run there, while a run with another key removes it as stale. A lock held for the
whole run (``flock``, released by the kernel even on SIGKILL) tells a live writer from a dead one.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from llmdistill.config.base import ConfigError, UserError
from llmdistill.log import get_logger

logger = get_logger(__name__)

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


@functools.cache
def _renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths; False where the system or filesystem cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (another run may be writing here right now)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner(path: Path) -> int | None:
    try:
        return int(path.name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return None


LOCK = ".lock"


def _locked_by_another(path: Path) -> bool:
    """Whether a live run holds the lock of the resumable staging directory ``path``."""
    try:
        fd = os.open(path / LOCK, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops a lock taken just now (and never one of another descriptor)
    return False


def clean_stale(output: Path, keep: Path | None = None) -> None:
    """Remove what killed runs left beside ``output``; put back an old output a kill left renamed away.

    Args:
        output: the stage's output directory.
        keep: a resumable staging directory (:func:`resumable_output`) to leave in place.
    """
    if not output.parent.is_dir():
        return
    for kind in ("old", "tmp"):
        for path in sorted(output.parent.glob(f".{output.name}.{kind}-*")):
            pid = _owner(path)
            if path == keep or (pid is not None and pid != os.getpid() and pid_alive(pid)):
                continue  # ours to resume, or another run that is writing here right now
            if pid is None and _locked_by_another(path):
                continue  # a resumable run that is writing here right now
            if kind == "old" and not output.exists():
                logger.warning("restoring %s from %s (a run was killed while swapping it)", output, path.name)
                os.replace(path, output)
                continue
            logger.info("removing %s left by a killed run", path)
            shutil.rmtree(path, ignore_errors=True)


def swap_in(staging: Path, output: Path) -> None:
    """Make the complete ``staging`` directory the ``output``; the old output survives until then."""
    if not output.exists():
        os.replace(staging, output)
        return
    if exchange(staging, output):
        shutil.rmtree(staging, ignore_errors=True)  # now holds the old output
        return
    old = output.with_name(f".{output.name}.old-{os.getpid()}")
    os.replace(output, old)
    os.replace(staging, output)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_output(output: str | Path, overwrite: bool) -> Iterator[Path]:
    """A fresh staging directory that becomes ``output`` only when the body completes.

    Raises:
        ConfigError: ``output`` exists, is not empty, and ``overwrite`` is false.
    """
    output = Path(output)
    clean_stale(output)
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise ConfigError(f"output_dir {output} exists: choose another one or set overwrite: true")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        swap_in(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def resumable_output(output: str | Path, key: str, overwrite: bool) -> Iterator[Path]:
    """A staging directory named after ``key`` that survives a kill and becomes ``output`` when the body completes.

    The body finds in it whatever a killed run with the same ``key`` finished (it decides what to
    reuse). While the body runs, the directory is locked; a staging directory of another key
    that no live run holds is removed as stale. When the body raises a
    :class:`~llmdistill.config.base.UserError` (bad input or settings: a re-run would fail the same
    way) the staging directory is removed; on any other error (a crash, a kill, a lost node) it is
    kept for the next run.

    Raises:
        ConfigError: ``output`` exists, is not empty, and ``overwrite`` is false; or another run
            with the same key is writing the staging directory now.
    """
    output = Path(output)
    staging = output.with_name(f".{output.name}.tmp-{key}")
    clean_stale(output, keep=staging)
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise ConfigError(f"output_dir {output} exists: choose another one or set overwrite: true")
    staging.mkdir(parents=True, exist_ok=True)
    fd = os.open(staging / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(f"another run is writing {staging} right now (same config and input): wait for it "
                          "to finish, or stop it") from None
    try:
        yield staging
        (staging / LOCK).unlink(missing_ok=True)
        swap_in(staging, output)
        shutil.rmtree(staging, ignore_errors=True)  # the old output, after an exchange
    except UserError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        os.close(fd)
