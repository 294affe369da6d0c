"""`make bench`: run every benchmark script and write their numbers to one JSON file.

Each ``scripts/bench_<name>.py`` exposes ``run() -> dict`` with measured values and the
issue's targets (keys starting with ``target_``). This script runs them one after another
(they are never timed against each other), prints one table, and writes one JSON file.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import time
import traceback
from pathlib import Path

from rich.console import Console
from rich.table import Table

from llmdistill.manifest import describe_machine, machine

HERE = Path(__file__).resolve().parent


def load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", default="runs/bench/bench.json")
    parser.add_argument("--only", default=None, help="comma-separated bench names (e.g. losses,build)")
    args = parser.parse_args()

    scripts = sorted(HERE.glob("bench_*.py"))
    if args.only:
        wanted = set(args.only.split(","))
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in wanted]
    results: dict[str, dict] = {}
    failed = False
    for script in scripts:
        name = script.stem.removeprefix("bench_")
        t0 = time.time()
        try:
            results[name] = load(script).run()
        except Exception as err:  # a broken benchmark is reported, the others still run
            traceback.print_exc()
            results[name] = {"error": f"{type(err).__name__}: {err}"}
            failed = True
        results[name]["bench_wall_s"] = round(time.time() - t0, 1)

    table = Table(title="llmdistill benchmarks")
    for col in ("bench", "metric", "value"):
        table.add_column(col)
    for name, numbers in results.items():
        for key, value in numbers.items():
            table.add_row(name, key, f"{value:.4g}" if isinstance(value, float) else str(value))
    Console().print(table)
    Console().print(f"machine: {describe_machine(machine())}")

    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": machine(), "python": platform.python_version(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    Console().print(f"wrote {out}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
