"""Run model-written Python in an OS-level sandbox (bubblewrap), with a weak Python-level fallback.

The sandbox (``bwrap``, the Debian package ``bubblewrap``; ``scripts/install.sh`` installs it)
gives each run:

* **Its own namespaces**: user, PID, mount, IPC, UTS, cgroup and network. The program sees only
  its own processes (it cannot signal, trace or even name the evaluator), and its network has
  nothing but its own loopback: no host, no internet, no 127.0.0.1 listener of the host.
* **An unprivileged user**: uid/gid 65534 inside, no capabilities, ``no_new_privs``, no nested
  user namespaces. When the evaluator is root, bwrap would map the sandbox user to host uid 0,
  which the kernel exempts from ``RLIMIT_NPROC``; so a root evaluator makes one user namespace
  per concurrent run slot (:class:`_SlotPool`) in which the sandbox user is a host uid of its
  own (``HOST_UID_BASE + slot``), and the program drops to it before any of its code runs.
  (A process that drops from root this way is not "dumpable": it cannot write its own
  ``/proc/self`` files such as ``comm``; a program that re-executes the interpreter can.)
* **A read-only view of only the interpreter**: the base interpreter binary, its standard
  library and extension modules, and the shared libraries they link (found with ``ldd``),
  nothing else: no home directories, no ``/etc`` beyond ``ld.so.cache``, no shell, no project
  checkout or virtualenv (the program runs with ``-I -S``: standard library only).
* **A private writable temp dir**: a ``tmpfs`` of ``MAX_TMP_BYTES`` at ``/tmp`` (working
  directory, ``HOME`` and ``TMPDIR``: ``WORKDIR``), gone with the run.
* **Limits**: wall clock ``timeout_s``; per-process address space ``memory_mb`` and a watchdog on
  the whole tree's resident memory; ``MAX_PROCESSES`` processes; ``MAX_FILE_BYTES`` per file;
  ``MAX_OPEN_FILES`` descriptors; CPU seconds; no core dumps; a seccomp filter (x86-64) that
  refuses ``ptrace``, ``keyctl``, ``bpf``, ``perf_event_open``, ``userfaultfd``, ``mount``,
  ``setns``, ``unshare`` and their kin.
* **Bounded output**: stdout and stderr are read as they come; the last ``MAX_OUTPUT_CHARS``
  characters of each are kept and the run is killed once either passes ``MAX_OUTPUT_BYTES``.
* **A whole-tree kill**: the program runs under bwrap's init in the new PID namespace; at the
  end (exit, timeout, a limit) that init is killed, which makes the kernel kill every process
  left in the namespace (double-forked daemons included) before ``run_python`` returns.

A run passes only on exit status 0; the ``code`` checker also requires a per-run sentinel
printed after the tests (:func:`llmdistill.checking.checkers.check_code`).

**Fallback.** Where bubblewrap is missing or unusable (checked once per process by
:func:`sandbox_backend`), runs fall back to the old guard, with a loud warning: a subprocess in
its own process group with rlimits, ``unshare --net`` when that works, and a Python preamble
that refuses writes outside the temp dir, process creation and (without ``unshare``) sockets.
That guard is Python-level only: ``ctypes``, ``posix.*``, ``io.FileIO`` and ``importlib.reload(os)``
get around it, and the program can read anything the evaluator can. It is not isolation.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import resource
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from llmdistill.log import get_logger

logger = get_logger(__name__)

MAX_FILE_BYTES = 32 * 1024 * 1024  # RLIMIT_FSIZE: largest file the program may write
MAX_TMP_BYTES = 64 * 1024 * 1024  # size of the private /tmp
MAX_OUTPUT_CHARS = 20_000  # characters of stdout / stderr kept (the tail)
MAX_OUTPUT_BYTES = 8 * 1024 * 1024  # bytes of stdout or stderr after which the run is killed
MAX_PROCESSES = 64  # RLIMIT_NPROC inside the sandbox
MAX_OPEN_FILES = 256  # RLIMIT_NOFILE
SANDBOX_UID = 65534  # the program's uid and gid inside the sandbox ("nobody")
HOST_UID_BASE = 1_610_612_736  # root evaluator: host uid/gid of run slot i is HOST_UID_BASE + i
WORKDIR = "/tmp/llmdistill-sandbox-work"  # the program's working directory inside the sandbox
WATCH_INTERVAL_S = 0.2  # how often the memory watchdog sums the tree's resident memory
NO_ISOLATION_WARNING = ("model-written code is NOT isolated: install bubblewrap (apt-get install bubblewrap); "
                        "falling back to a Python-level guard that sandboxed code can get around")


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one sandboxed run.

    ``status`` is ``passed`` (exit code 0), ``failed`` (non-zero exit: an exception, a failed
    assertion, a memory error, a signal, or killed at the output or memory limit), ``timeout``
    (killed after ``timeout_s``) or ``error`` (the sandbox itself could not run the program).
    Exit code 0 alone does not show that any test ran: the ``code`` checker also requires a
    per-run token printed after the tests (:func:`llmdistill.checking.checkers.check_code`).
    """

    passed: bool
    status: str
    stdout: str
    stderr: str


def run_python(program: str, timeout_s: float = 10, memory_mb: int = 1024) -> SandboxResult:
    """Run a Python program in the sandbox described in the module docstring.

    Args:
        program: the full program text (for HumanEval: prompt + completion + tests + check call).
        timeout_s: wall-clock limit in seconds; the whole process tree is killed when it is reached.
        memory_mb: address-space limit of each process, and resident-memory limit of the tree, in MiB.

    Returns:
        A :class:`SandboxResult`; ``passed`` is true only for exit code 0.
    """
    if sandbox_backend() == "bwrap":
        return run_python_bwrap(program, timeout_s, memory_mb)
    return run_python_guarded(program, timeout_s, memory_mb)


# ---------------------------------------------------------------------------------------
# choosing the backend

_backend_lock = threading.Lock()
_backend: str | None = None


def sandbox_backend() -> str:
    """``"bwrap"`` when bubblewrap runs a probe program here, else ``"guard"`` (warned once).

    Probed once per process.
    """
    global _backend
    with _backend_lock:
        if _backend is None:
            problem = _bwrap_problem()
            if problem is None:
                _backend = "bwrap"
            else:
                _backend = "guard"
                logger.warning("%s (%s)", NO_ISOLATION_WARNING, problem)
        return _backend


@functools.cache
def _bwrap() -> str:
    return shutil.which("bwrap") or "bwrap"


def _bwrap_problem() -> str | None:
    """Why bubblewrap cannot sandbox here, or None when a probe run works."""
    if sys.platform != "linux":
        return "bubblewrap needs Linux"
    if shutil.which("bwrap") is None:
        return "bwrap not found"
    try:
        probe = run_python_bwrap("import os\nprint('ok', os.getuid())\n", timeout_s=30, memory_mb=512)
    except Exception as err:  # any failure to set up means: not usable here
        return f"{type(err).__name__}: {err}"
    if probe.stdout.split() != ["ok", str(SANDBOX_UID)] or not probe.passed:
        return f"probe run {probe.status}: {(probe.stderr or probe.stdout).strip()[-300:]}"
    return None


# ---------------------------------------------------------------------------------------
# bubblewrap: what the interpreter needs


@functools.cache
def _interpreter() -> str:
    """The base interpreter (not the virtualenv's): the venv's files are not mounted."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def _walk(path: str) -> tuple[list[tuple[str, str]], str]:
    """Resolve ``path`` one component at a time: the symlinks passed on the way (each as
    ``(link, target)`` under real directories) and the real path."""
    links: list[tuple[str, str]] = []
    todo = [p for p in path.split("/") if p]
    current = "/"
    hops = 0
    while todo:
        part = todo.pop(0)
        if part == ".":
            continue
        if part == "..":
            current = os.path.dirname(current)
            continue
        candidate = os.path.join(current, part)
        if os.path.islink(candidate):
            hops += 1
            if hops > 40:
                raise OSError(f"too many symlinks resolving {path}")
            target = os.readlink(candidate)
            links.append((candidate, target))
            if target.startswith("/"):
                current = "/"
            todo = [p for p in target.split("/") if p] + todo
        else:
            current = candidate
    return links, current


def _under(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


@functools.cache
def _mount_args() -> tuple[str, ...]:
    """bwrap arguments mounting, read-only, the interpreter, its library path and the shared
    libraries it and its extension modules link; computed once per process."""
    exe = _interpreter()
    listing = subprocess.run([exe, "-I", "-S", "-c", "import json, os, sys\n"
                              "print(json.dumps([p for p in sys.path if os.path.isdir(p)]))"],
                             capture_output=True, text=True, timeout=60, check=True, env={"LANG": "C.UTF-8"})
    path_dirs = [os.path.realpath(p) for p in json.loads(listing.stdout)]
    objects = [exe] + sorted(os.path.join(d, f) for d in path_dirs for f in os.listdir(d) if f.endswith(".so"))
    libraries = _linked_libraries(objects)

    bind_dirs = set(path_dirs)
    links: dict[str, str] = {}
    for lib in libraries:
        chain, real = _walk(lib)
        links.update(chain)
        bind_dirs.add(os.path.dirname(real))
    exe_links, exe_real = _walk(exe)
    links.update(exe_links)
    bind_dirs = {d for d in bind_dirs if not any(d != o and _under(d, o) for o in bind_dirs)}
    bind_files = [exe_real] if not any(_under(exe_real, d) for d in bind_dirs) else []
    if os.path.isfile("/etc/ld.so.cache"):
        bind_files.append("/etc/ld.so.cache")
    links = {link: target for link, target in links.items() if not any(_under(link, d) for d in bind_dirs)}

    parents: set[str] = set()
    for path in [*bind_dirs, *bind_files, *links]:
        parent = os.path.dirname(path)
        while parent != "/":
            parents.add(parent)
            parent = os.path.dirname(parent)
    parents -= bind_dirs
    if any(_under(p, d) for p in parents for d in bind_dirs):
        raise OSError(f"unexpected mount layout: {sorted(parents)} vs {sorted(bind_dirs)}")
    args: list[str] = []
    for parent in sorted(parents, key=lambda p: (p.count("/"), p)):
        args += ["--perms", "0755", "--dir", parent]
    for path in sorted(bind_dirs) + bind_files:
        args += ["--ro-bind", path, path]
    for link, target in sorted(links.items()):
        args += ["--symlink", target, link]
    for directory in path_dirs:  # the base interpreter's own site-packages: not needed (-S), hidden
        packages = os.path.join(directory, "site-packages")
        if os.path.isdir(packages) and any(_under(packages, d) for d in bind_dirs):
            args += ["--perms", "0555", "--size", "4096", "--tmpfs", packages]
    return tuple(args)


def _linked_libraries(objects: list[str]) -> list[str]:
    """The shared libraries (as the loader names them) that ``objects`` link, via ``ldd``; the
    standard library directories when ``ldd`` is not available."""
    if shutil.which("ldd"):
        found = subprocess.run(["ldd", *objects], capture_output=True, text=True, timeout=120)
        paths = set(re.findall(r"(?:=>\s*)?(/\S+)\s+\(0x", found.stdout))
        if paths:
            return sorted(paths)
    return [d for d in ("/lib", "/lib64", "/usr/lib", "/usr/lib64") if os.path.isdir(d)]


# ---------------------------------------------------------------------------------------
# bubblewrap: seccomp, run slots, the bootstrap

# x86-64 system calls the sandbox never needs: key rings, tracing and reading other processes,
# eBPF, perf events, userfaultfd, mounting, namespaces, kernel modules and kexec, file handles.
_SECCOMP_DENY_X86_64 = (
    101, 310, 311,  # ptrace, process_vm_readv, process_vm_writev
    248, 249, 250,  # add_key, request_key, keyctl
    321, 298, 323,  # bpf, perf_event_open, userfaultfd
    165, 166, 155, 161,  # mount, umount2, pivot_root, chroot
    428, 429, 430, 431, 432, 433, 442,  # open_tree, move_mount, fsopen, fsconfig, fsmount, fspick, mount_setattr
    308, 272,  # setns, unshare
    175, 176, 313, 246, 320, 169,  # init/delete/finit_module, kexec_load, kexec_file_load, reboot
    303, 304,  # name_to_handle_at, open_by_handle_at
)


@functools.cache
def _seccomp_program() -> bytes | None:
    """A classic-BPF seccomp filter refusing (EPERM) :data:`_SECCOMP_DENY_X86_64`, or None off x86-64."""
    if os.uname().machine != "x86_64":
        return None
    ld_w_abs, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06
    audit_arch_x86_64, x32_bit = 0xC000003E, 0x40000000
    allow, deny, kill = 0x7FFF0000, 0x00050000 | 1, 0x80000000  # RET_ALLOW, RET_ERRNO|EPERM, RET_KILL_PROCESS
    n = len(_SECCOMP_DENY_X86_64)
    # 0 load arch; 1 x86-64? skip the kill; 2 kill; 3 load nr; 4 x32 -> deny; 5.. one jeq per call; allow; deny
    insns = [(ld_w_abs, 0, 0, 4), (jeq, 1, 0, audit_arch_x86_64), (ret, 0, 0, kill), (ld_w_abs, 0, 0, 0),
             (jge, n + 1, 0, x32_bit)]
    for i, nr in enumerate(_SECCOMP_DENY_X86_64):
        insns.append((jeq, n - i, 0, nr))
    insns += [(ret, 0, 0, allow), (ret, 0, 0, deny)]
    return b"".join(struct.pack("<HBBI", *insn) for insn in insns)


_SLOT_HELPER = r'''
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.unshare(0x10000000) != 0:
    sys.exit(f"unshare(CLONE_NEWUSER) failed: errno {ctypes.get_errno()}")
print("ready", flush=True)
sys.stdin.readline()
try:  # no nested user namespaces (best effort: /proc/sys may be read-only in a container)
    with open("/proc/sys/user/max_user_namespaces", "w") as f:
        f.write("0")
    print("done", flush=True)
except OSError as err:
    print(f"done without limiting user namespaces: {err}", flush=True)
sys.stdin.read()
'''


@dataclass(frozen=True)
class _Slot:
    host_id: int  # host uid and gid of the sandbox user
    userns_fd: int  # the slot's user namespace


class _SlotPool:
    """User namespaces for a root evaluator, one per concurrent run, reused across runs.

    Each maps uid/gid 0 to host 0 (bwrap's setup runs as that root, with capabilities only in
    the namespace) and :data:`SANDBOX_UID` to a host id of the slot's own, not 0, so that
    ``RLIMIT_NPROC`` applies and two concurrent runs do not share a process count. Nested user
    namespaces are disabled in it (``user.max_user_namespaces = 0``) where ``/proc/sys`` is writable.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: list[_Slot] = []
        self._made = 0

    def acquire(self) -> _Slot:
        with self._lock:
            if self._free:
                return self._free.pop()
            index = self._made
            self._made += 1
        return self._make(HOST_UID_BASE + index)

    def release(self, slot: _Slot) -> None:
        with self._lock:
            self._free.append(slot)

    @staticmethod
    def _make(host_id: int) -> _Slot:
        helper = subprocess.Popen([_interpreter(), "-I", "-S", "-c", _SLOT_HELPER], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={"LANG": "C.UTF-8"})
        try:
            if helper.stdout.readline() != "ready\n":
                raise OSError(f"cannot create a user namespace: {helper.communicate(timeout=10)[1].strip()[-300:]}")
            mapping = f"0 0 1\n{SANDBOX_UID} {host_id} 1\n"
            for name in ("uid_map", "gid_map"):
                with open(f"/proc/{helper.pid}/{name}", "w") as fh:
                    fh.write(mapping)
            fd = os.open(f"/proc/{helper.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
            helper.stdin.write("go\n")
            helper.stdin.flush()
            done = helper.stdout.readline()
            if not done.startswith("done"):
                os.close(fd)
                raise OSError(f"cannot set up a user namespace: {helper.communicate(timeout=10)[1].strip()[-300:]}")
            if done != "done\n":
                logger.info("sandbox run slot %d: %s", host_id - HOST_UID_BASE, done.strip())
            return _Slot(host_id, fd)
        finally:
            helper.kill()
            helper.wait()


_slots = _SlotPool()

# Runs first inside the sandbox, as __main__: limits, drop to the sandbox user, signal readiness,
# close inherited descriptors, then run program.py as __main__ (in this module's cleared namespace).
_BOOTSTRAP = r'''
def _boot():
    import builtins, os, resource, sys, _sitebuiltins
    for name, value in {limits!r}:
        resource.setrlimit(getattr(resource, name), (value, value))
    if os.getuid() == 0:
        os.setgroups([])
        os.setresgid({uid}, {uid}, {uid})
        os.setresuid({uid}, {uid}, {uid})
    with open("/proc/self/status") as fh:
        caps = [int(line.split()[1], 16) for line in fh if line.startswith(("CapPrm", "CapEff", "CapAmb"))]
    if os.getuid() != {uid} or os.getgid() != {uid} or any(caps):
        os.write(2, b"sandbox: could not drop privileges\n")
        os._exit(125)
    os.write({ready_fd}, b"1")
    for fd in os.listdir("/proc/self/fd"):  # what was passed to bwrap, whatever its number
        if int(fd) > 2:
            try:
                os.close(int(fd))
            except OSError:
                pass
    builtins.exit = _sitebuiltins.Quitter("exit", "Ctrl-D (i.e. EOF)")
    builtins.quit = _sitebuiltins.Quitter("quit", "Ctrl-D (i.e. EOF)")
    with open("program.py", "rb") as fh:
        code = compile(fh.read(), "program.py", "exec")
    sys.argv[:] = ["program.py"]
    main = sys.modules["__main__"].__dict__
    main.clear()
    main.update(__name__="__main__", __doc__=None, __package__=None, __spec__=None, __loader__=None,
                __file__="program.py", __cached__=None, __builtins__=builtins)
    exec(code, main)
_boot()
'''


def _sandbox_env() -> list[str]:
    env = {"PATH": os.path.dirname(_interpreter()), "HOME": WORKDIR, "TMPDIR": WORKDIR, "LANG": "C.UTF-8",
           "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return [arg for key, value in env.items() for arg in ("--setenv", key, value)]


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def run_python_bwrap(program: str, timeout_s: float = 10, memory_mb: int = 1024) -> SandboxResult:
    """:func:`run_python` under bubblewrap (no fallback: raises when the sandbox cannot be set up)."""
    root = os.geteuid() == 0
    slot = _slots.acquire() if root else None
    fds: list[int] = []
    try:
        program_fd = _memfd("program", program.encode("utf-8", errors="surrogateescape") + b"\n")
        fds.append(program_fd)
        info_r, info_w = os.pipe()
        ready_r, ready_w = os.pipe()
        fds += [info_r, info_w, ready_r, ready_w]
        memory = memory_mb * 1024 * 1024
        limits = [("RLIMIT_AS", memory), ("RLIMIT_NPROC", MAX_PROCESSES), ("RLIMIT_FSIZE", MAX_FILE_BYTES),
                  ("RLIMIT_CORE", 0), ("RLIMIT_NOFILE", MAX_OPEN_FILES), ("RLIMIT_CPU", math.ceil(timeout_s) + 1)]
        bootstrap = _BOOTSTRAP.replace("{limits!r}", repr(limits)).replace("{uid}", str(SANDBOX_UID)).replace(
            "{ready_fd}", str(ready_w))
        if slot is not None:
            isolation = ["--userns", str(slot.userns_fd), "--unshare-pid", "--unshare-net", "--unshare-ipc",
                         "--unshare-uts", "--unshare-cgroup-try", "--cap-drop", "ALL", "--cap-add", "CAP_SETUID",
                         "--cap-add", "CAP_SETGID"]
            fds_to_pass = [slot.userns_fd]
        else:
            isolation = ["--unshare-all", "--unshare-user", "--disable-userns", "--uid", str(SANDBOX_UID),
                         "--gid", str(SANDBOX_UID)]
            fds_to_pass = []
        seccomp = _seccomp_program()
        if seccomp is not None:
            seccomp_fd = _memfd("seccomp", seccomp)
            fds.append(seccomp_fd)
            isolation += ["--seccomp", str(seccomp_fd)]
            fds_to_pass.append(seccomp_fd)
        command = [
            _bwrap(), *isolation, "--die-with-parent", "--new-session", "--hostname", "sandbox", "--clearenv",
            *_sandbox_env(), *_mount_args(), "--dev", "/dev", "--proc", "/proc",
            "--perms", "01777", "--size", str(MAX_TMP_BYTES), "--tmpfs", "/tmp",
            "--perms", "01777", "--size", str(16 * 1024 * 1024), "--tmpfs", "/dev/shm",
            "--perms", "01777", "--dir", WORKDIR, "--perms", "0444", "--file", str(program_fd), f"{WORKDIR}/program.py",
            "--chdir", WORKDIR, "--info-fd", str(info_w),
            "--", _interpreter(), "-I", "-S", "-B", "-c", bootstrap,
        ]
        try:
            proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, start_new_session=True,
                                    pass_fds=[program_fd, info_w, ready_w, *fds_to_pass])
        except OSError as err:
            return SandboxResult(False, "error", "", f"could not start the sandbox: {err}")
        for fd in (info_w, ready_w):
            os.close(fd)
            fds.remove(fd)
        return _supervise(proc, timeout_s, memory_mb, info_fd=info_r, ready_fd=ready_r)
    finally:
        for fd in fds:
            os.close(fd)
        if slot is not None:
            _slots.release(slot)


# ---------------------------------------------------------------------------------------
# supervising a run: bounded output, timeout, memory watchdog, whole-tree kill


class _Tail:
    """The last ``MAX_OUTPUT_CHARS`` characters' worth of a stream, and how many bytes it had."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.total = 0

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        self.data += chunk
        keep = 4 * MAX_OUTPUT_CHARS  # enough bytes for MAX_OUTPUT_CHARS characters of UTF-8
        if len(self.data) > 2 * keep:
            del self.data[:-keep]

    def text(self) -> str:
        return bytes(self.data).decode("utf-8", errors="replace")[-MAX_OUTPUT_CHARS:]


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants, from ``/proc/<pid>/task/<tid>/children``."""
    found, stack = [], [pid]
    while stack:
        current = stack.pop()
        found.append(current)
        try:
            for tid in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{tid}/children") as fh:
                    stack.extend(int(child) for child in fh.read().split())
        except (OSError, ValueError):
            pass
    return found


def _tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and its descendants."""
    page = os.sysconf("SC_PAGE_SIZE")
    total = 0
    for member in _tree(pid):
        try:
            with open(f"/proc/{member}/statm") as fh:
                total += int(fh.read().split()[1]) * page
        except (OSError, ValueError, IndexError):
            pass
    return total


class _Namespace:
    """bwrap's init in the new PID namespace, held by a pidfd: killing it kills the namespace."""

    def __init__(self, bwrap_pid: int, info: bytes) -> None:
        self.pidfd: int | None = None
        try:
            child = int(json.loads(info.decode())["child-pid"])
            pidfd = os.pidfd_open(child)
        except (ValueError, KeyError, OSError, AttributeError):
            return
        try:  # make sure the pid was not reused between bwrap writing it and pidfd_open
            with open(f"/proc/{child}/stat") as fh:
                parent = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            parent = -1
        if parent == bwrap_pid:
            self.pidfd = pidfd
        else:
            os.close(pidfd)

    def kill_and_wait(self, timeout_s: float = 10) -> None:
        """SIGKILL the init; the kernel then kills every process in the namespace. The pidfd turns
        readable once the init has exited, which is after every other member was reaped."""
        if self.pidfd is None:
            return
        try:
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass
        with selectors.DefaultSelector() as sel:
            sel.register(self.pidfd, selectors.EVENT_READ)
            sel.select(timeout_s)
        os.close(self.pidfd)
        self.pidfd = None


def _supervise(proc: subprocess.Popen, timeout_s: float, memory_mb: int, *, info_fd: int | None = None,
               ready_fd: int | None = None, kill_tree: Callable[[], None] | None = None) -> SandboxResult:
    """Read the run's output as it comes (bounded), enforce the time and memory limits, kill the
    whole tree at the end, and build the result.

    ``info_fd``/``ready_fd`` (bwrap): bwrap's info pipe (the namespace's init) and the pipe the
    bootstrap writes to once the program is about to run (without it, the sandbox failed).
    ``kill_tree`` (fallback): kills what the run left.
    """
    out, err = _Tail(), _Tail()
    info = bytearray()
    ready = ready_fd is None
    namespace: _Namespace | None = None
    reason: str | None = None
    started = time.monotonic()
    deadline = started + timeout_s
    next_watch = started + WATCH_INTERVAL_S
    exit_grace: float | None = None
    with selectors.DefaultSelector() as sel:
        for fd, name in ((proc.stdout.fileno(), "out"), (proc.stderr.fileno(), "err"), (info_fd, "info"),
                         (ready_fd, "ready")):
            if fd is not None:
                sel.register(fd, selectors.EVENT_READ, name)
        while sel.get_map():
            now = time.monotonic()
            if now >= deadline:
                reason = "timeout"
                break
            if exit_grace is not None and now >= exit_grace:
                break  # the main process is gone but something still holds the pipes
            for key, _ in sel.select(min(deadline, next_watch, exit_grace or deadline) - now):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fd)
                    if key.data == "info":
                        namespace = _Namespace(proc.pid, bytes(info))
                    continue
                if key.data == "out":
                    out.add(chunk)
                elif key.data == "err":
                    err.add(chunk)
                elif key.data == "info":
                    info += chunk[: 4096 - len(info)]
                else:
                    ready = True
            if out.total > MAX_OUTPUT_BYTES or err.total > MAX_OUTPUT_BYTES:
                reason = "output"
                break
            if time.monotonic() >= next_watch:
                next_watch = time.monotonic() + WATCH_INTERVAL_S
                if _tree_rss(proc.pid) > memory_mb * 1024 * 1024:
                    reason = "memory"
                    break
            if exit_grace is None and proc.poll() is not None:
                exit_grace = time.monotonic() + 1.0
    # the end, whatever happened: kill everything the run left, then reap
    if namespace is None and info_fd is not None and info:
        namespace = _Namespace(proc.pid, bytes(info))
    if namespace is not None:
        namespace.kill_and_wait()
    if kill_tree is not None:
        kill_tree()
    if proc.poll() is None:
        proc.kill()
    _drain(proc, out, err)
    proc.wait()
    stdout, stderr = out.text(), err.text()
    if reason == "timeout":
        return SandboxResult(False, "timeout", stdout, stderr + f"\ntimed out after {timeout_s} s")
    if reason == "output":
        return SandboxResult(False, "failed", stdout, stderr + f"\nsandbox: killed: output passed {MAX_OUTPUT_BYTES} bytes")
    if reason == "memory":
        return SandboxResult(False, "failed", stdout, stderr + f"\nsandbox: killed: resident memory passed {memory_mb} MiB")
    if not ready:
        return SandboxResult(False, "error", stdout, f"the sandbox could not run the program: {stderr.strip()}")
    code = proc.returncode
    return SandboxResult(code == 0, "passed" if code == 0 else "failed", stdout, stderr)


def _drain(proc: subprocess.Popen, out: _Tail, err: _Tail, timeout_s: float = 2.0) -> None:
    """Read what is left in the pipes after the kill (bounded in time and size), then close them."""
    deadline = time.monotonic() + timeout_s
    with selectors.DefaultSelector() as sel:
        for stream, tail in ((proc.stdout, out), (proc.stderr, err)):
            sel.register(stream.fileno(), selectors.EVENT_READ, tail)
        while sel.get_map() and time.monotonic() < deadline:
            for key, _ in sel.select(deadline - time.monotonic()):
                chunk = os.read(key.fd, 65536)
                if not chunk or key.data.total > 2 * MAX_OUTPUT_BYTES:
                    sel.unregister(key.fd)
                else:
                    key.data.add(chunk)
    proc.stdout.close()
    proc.stderr.close()


# ---------------------------------------------------------------------------------------
# the fallback: a Python-level guard (NOT isolation)

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


@functools.cache
def network_namespace_available() -> bool:
    """Whether ``unshare --net`` can run a program here (checked once per process; fallback only)."""
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
    """Runs in the child between fork and exec (fallback only)."""
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


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_python_guarded(program: str, timeout_s: float = 10, memory_mb: int = 1024) -> SandboxResult:
    """The fallback: :func:`run_python` with only the Python-level guard (see the module docstring).

    Output is still read incrementally and capped, and the process group is killed at the end.
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
        return _supervise(proc, timeout_s, memory_mb, kill_tree=functools.partial(_kill_group, proc.pid))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
