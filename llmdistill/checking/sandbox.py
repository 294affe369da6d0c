"""Run model-written Python in a subprocess with a timeout, a memory cap, no network and a temp dir.

What each run gets:

* **A fresh temporary directory** as its working directory (and ``HOME``/``TMPDIR``), deleted
  afterwards, and a minimal environment (no inherited secrets, tokens or proxies).
* **A timeout**: the program runs in its own process group; on timeout the whole group is
  killed, so children it forked die too.
* **Resource limits** (``setrlimit`` before exec): address space ``memory_mb``, file size 64 MB,
  no core dumps.
* **No network**: when ``unshare --net`` works (Linux, root or CAP_SYS_ADMIN; checked once per
  process), the program runs in an empty network namespace, so even the loopback is down and
  nothing on the host is reachable. Otherwise a preamble makes creating a socket raise.
* **A write guard**: a preamble wraps ``open``/``os.open`` and the file-removing and -renaming
  ``os`` functions so that writing, deleting or renaming a path outside the temp dir raises
  ``PermissionError``, and disables ``os.system``, ``os.exec*``, ``os.fork`` and
  ``subprocess`` (a child shell would not be guarded).

What it does NOT protect against: the write guard and the socket fallback are Python-level;
code that goes below Python (``ctypes``, a C extension) can get around them, and the program can
read any file the evaluating user can read. This is the protection HumanEval-style harnesses
give; for untrusted models at scale, run the evaluation itself in a container or VM.
"""

from __future__ import annotations

import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from llmdistill.log import get_logger

logger = get_logger(__name__)

MAX_FILE_BYTES = 64 * 1024 * 1024
MAX_OUTPUT_CHARS = 20_000

_GUARD = r'''
import builtins as _b, io as _io, os as _os, os.path as _p
_ROOT = _p.realpath(_os.getcwd())
def _inside(path):
    if isinstance(path, int):
        return True
    full = _p.realpath(_os.fsdecode(path))
    return full == _ROOT or full.startswith(_ROOT + _os.sep) or full == "/dev/null"
def _deny(what, path):
    raise PermissionError(f"sandbox: {what} outside the working directory is not allowed: {path!r}")
def _wrap_open(real):
    def guarded(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and not _inside(file):
            _deny("writing", file)
        return real(file, mode, *args, **kwargs)
    return guarded
_b.open = _io.open = _wrap_open(_b.open)
_real_os_open = _os.open
def _os_open(path, flags, *args, **kwargs):
    writes = _os.O_WRONLY | _os.O_RDWR | _os.O_CREAT | _os.O_APPEND | _os.O_TRUNC
    if flags & writes and not _inside(path):
        _deny("writing", path)
    return _real_os_open(path, flags, *args, **kwargs)
_os.open = _os_open
def _guard_paths(name, nargs):
    real = getattr(_os, name)
    def guarded(*args, **kwargs):
        for path in args[:nargs]:
            if not _inside(path):
                _deny(name, path)
        return real(*args, **kwargs)
    setattr(_os, name, guarded)
for _name, _n in (("remove", 1), ("unlink", 1), ("rmdir", 1), ("mkdir", 1), ("makedirs", 1),
                  ("rename", 2), ("replace", 2), ("chmod", 1), ("truncate", 1), ("symlink", 2), ("link", 2)):
    _guard_paths(_name, _n)
def _no_process(*args, **kwargs):
    raise PermissionError("sandbox: starting processes is not allowed")
for _name in ("system", "popen", "fork", "forkpty", "execv", "execve", "execvp", "execvpe", "execl",
              "execle", "execlp", "execlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "posix_spawn",
              "posix_spawnp", "killpg", "kill"):
    if hasattr(_os, _name):
        setattr(_os, _name, _no_process)
import subprocess as _sp
_sp.Popen = _no_process
del _b, _io, _name, _n
'''

_NO_SOCKET = r'''
import socket as _socket
def _no_socket(*args, **kwargs):
    raise PermissionError("sandbox: network access is not allowed")
_socket.socket = _socket.create_connection = _socket.socketpair = _no_socket
'''


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one sandboxed run.

    ``status`` is ``passed`` (exit code 0), ``failed`` (non-zero exit: an exception, a failed
    assertion, a memory error, a signal), ``timeout`` (killed after ``timeout_s``) or ``error``
    (the sandbox itself could not run the program). Exit code 0 alone does not show that any test
    ran: the ``code`` checker also requires a per-run token printed after the tests
    (:func:`llmdistill.checking.checkers.check_code`).
    """

    passed: bool
    status: str
    stdout: str
    stderr: str


@functools.cache
def network_namespace_available() -> bool:
    """Whether ``unshare --net`` can run a program here (checked once per process)."""
    if shutil.which("unshare") is None:
        return False
    try:
        probe = subprocess.run(["unshare", "--net", sys.executable, "-c", "pass"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    if probe.returncode != 0:
        logger.warning("unshare --net is not usable here (%s): sockets are disabled by a Python preamble "
                       "instead", probe.stderr.decode(errors="replace").strip()[:200])
    return probe.returncode == 0


def _limits(memory_mb: int) -> None:
    """Runs in the child between fork and exec."""
    memory = memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_FSIZE, (MAX_FILE_BYTES, MAX_FILE_BYTES))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _environment(workdir: str) -> dict[str, str]:
    return {
        "PATH": os.path.dirname(sys.executable) + ":/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONHASHSEED": "0",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_python(program: str, timeout_s: float = 10, memory_mb: int = 1024) -> SandboxResult:
    """Run a Python program in the sandbox described in the module docstring.

    Args:
        program: the full program text (for HumanEval: prompt + completion + tests + check call).
        timeout_s: wall-clock limit in seconds; the process group is killed when it is reached.
        memory_mb: address-space limit of the program, in MiB.

    Returns:
        A :class:`SandboxResult`; ``passed`` is true only for exit code 0.
    """
    isolated_net = network_namespace_available()
    preamble = _GUARD if isolated_net else _NO_SOCKET + _GUARD
    workdir = tempfile.mkdtemp(prefix="llmdistill-sandbox-")
    try:
        script = os.path.join(workdir, "program.py")
        with open(script, "w") as fh:
            fh.write(preamble + "\n" + program + "\n")
        command = [sys.executable, "-I", "program.py"]
        if isolated_net:
            command = ["unshare", "--net", *command]
        try:
            proc = subprocess.Popen(
                command, cwd=workdir, env=_environment(workdir), stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                preexec_fn=functools.partial(_limits, memory_mb),
            )
        except OSError as err:
            return SandboxResult(False, "error", "", f"could not start the sandbox: {err}")
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            out, err = proc.communicate()
            return SandboxResult(False, "timeout", _text(out), _text(err) + f"\ntimed out after {timeout_s} s")
        status = "passed" if proc.returncode == 0 else "failed"
        return SandboxResult(proc.returncode == 0, status, _text(out), _text(err))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")[-MAX_OUTPUT_CHARS:]
