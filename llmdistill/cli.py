"""``llmdistill {generate,score,build,train,eval,demo}``: one subcommand per stage.

Each subcommand is a config dataclass plus a ``run(config)`` function, both imported only
when that subcommand runs (so ``llmdistill --help`` does not import torch or vLLM).
"""

from __future__ import annotations

import dataclasses
import importlib
import sys

from llmdistill.config.base import ConfigError

# subcommand -> (config class, runner, one-line description)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "generate": ("llmdistill.config.generate:GenerateConfig", "llmdistill.generate:run_generate",
                 "teacher writes reasoning traces with top-k log-probs (vLLM)"),
    "score": ("llmdistill.config.generate:ScoreConfig", "llmdistill.generate:run_score",
              "teacher re-scores existing traces: top-k log-probs by one prefill pass"),
    "build": ("llmdistill.config.build:BuildConfig", "llmdistill.builder:run_build",
              "verify, filter, dedup, decontaminate, tokenize, align and pack traces"),
    "train": ("llmdistill.config.train:TrainConfig", "llmdistill.train:run_train",
              "train a student with sparse top-k KD + SFT (TRL, accelerate, DeepSpeed)"),
    "eval": ("llmdistill.config.eval:EvalConfig", "llmdistill.eval.harness:run_eval",
             "benchmark models: pass@1, pass@k, maj@k, side-by-side report"),
    "demo": ("llmdistill.config.demo:DemoConfig", "llmdistill.demo:run_demo",
             "the whole R1 recipe in miniature on a CPU"),
}


def resolve(ref: str):
    """Import ``module:attribute``."""
    module, attr = ref.split(":")
    return getattr(importlib.import_module(module), attr)


def _usage() -> str:
    lines = ["usage: llmdistill <command> [--config FILE.yaml] [--field value ...]", "", "commands:"]
    lines += [f"  {name:<9} {desc}" for name, (_, _, desc) in COMMANDS.items()]
    lines += ["", "`llmdistill <command> --help` lists every field of that command's config;",
              "`--dry_run` prints the plan and a resource estimate without loading anything."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    from llmdistill.config.base import parse_config

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(_usage() + "\n")
        return
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(command, COMMANDS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        sys.stderr.write(f"llmdistill: unknown command '{command}'.{hint}\n\n{_usage()}\n")
        raise SystemExit(2)
    config_ref, runner_ref, _ = COMMANDS[command]
    config_cls = resolve(config_ref)
    dry_run = False
    if "--dry_run" in rest and "dry_run" not in {f.name for f in dataclasses.fields(config_cls)}:
        # Stages without their own dry-run: print the plan from llmdistill.plan instead of running.
        i = rest.index("--dry_run")
        value = rest[i + 1] if i + 1 < len(rest) and not rest[i + 1].startswith("--") else "true"
        dry_run = value.lower() in ("1", "true", "yes")
        del rest[i : i + (2 if i + 1 < len(rest) and not rest[i + 1].startswith("--") else 1)]
    try:
        config = parse_config(config_cls, rest, prog=f"llmdistill {command}")
    except ConfigError as err:
        sys.stderr.write(f"llmdistill {command}: {err}\n")
        raise SystemExit(2) from None
    if dry_run:
        from llmdistill.plan import print_plan

        print_plan(command, config)
        return
    resolve(runner_ref)(config)
