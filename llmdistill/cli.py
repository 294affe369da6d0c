"""``llmdistill {synthesize,generate,score,build,train,onpolicy,eval,demo}``: one subcommand per stage.

Each subcommand is a config dataclass plus a ``run(config)`` function, both imported only
when that subcommand runs (so ``llmdistill --help`` does not import torch or vLLM).
"""

from __future__ import annotations

import importlib
import os
import sys

from llmdistill.config.base import ConfigError, UserError

# subcommand -> (config class, runner, one-line description)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "synthesize": ("llmdistill.config.synthesize:SynthesizeConfig", "llmdistill.synthesis:run_synthesize",
                   "teacher writes the prompts: magpie or seeded queries, filtered, with agreed answers"),
    "generate": ("llmdistill.config.generate:GenerateConfig", "llmdistill.generate:run_generate",
                 "teacher writes reasoning traces with top-k log-probs (vLLM)"),
    "score": ("llmdistill.config.generate:ScoreConfig", "llmdistill.generate:run_score",
              "teacher re-scores existing traces: top-k log-probs by one prefill pass"),
    "build": ("llmdistill.config.build:BuildConfig", "llmdistill.builder:run_build",
              "verify, filter, dedup, decontaminate, tokenize, align and pack traces"),
    "train": ("llmdistill.config.train:TrainConfig", "llmdistill.train:run_train",
              "train a student with sparse top-k KD + SFT (TRL, accelerate, DeepSpeed)"),
    "onpolicy": ("llmdistill.config.onpolicy:OnPolicyConfig", "llmdistill.onpolicy:run_onpolicy",
                 "on-policy distillation: the student samples, the teacher grades every token"),
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
    lines += [f"  {name:<10} {desc}" for name, (_, _, desc) in COMMANDS.items()]
    lines += ["", "`llmdistill <command> --help` lists every field of that command's config;",
              "`--dry_run` prints the plan and a resource estimate without loading anything;",
              "`--debug` (or LLMDISTILL_DEBUG=1) shows the traceback of an error instead of one line."]
    return "\n".join(lines)


TRUE, FALSE = ("1", "true", "yes"), ("0", "false", "no")


def pop_flag(args: list[str], name: str) -> tuple[bool, list[str]]:
    """Take a boolean flag out of the arguments: ``--name``, ``--name true`` and ``--name=true`` all work.

    ``--dry_run`` (every stage has one, :mod:`llmdistill.plan`) and ``--debug`` are not config fields.
    """
    flag, value, rest, i = f"--{name}", False, [], 0
    while i < len(args):
        key, eq, text = args[i].partition("=")
        if key != flag:
            rest.append(args[i])
            i += 1
            continue
        if not eq and i + 1 < len(args) and args[i + 1].lower() in TRUE + FALSE:
            text, i = args[i + 1], i + 1
        elif not eq:
            text = "true"
        if text.lower() not in TRUE + FALSE:
            raise ConfigError(f"{flag} takes true or false, got {text!r}")
        value = text.lower() in TRUE
        i += 1
    return value, rest


def one_line(err: BaseException) -> str:
    """An error's message on one line (an OSError keeps its path)."""
    return " ".join(str(err).split()) or type(err).__name__


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    from llmdistill.config.base import parse_config
    from llmdistill.log import setup_logging

    setup_logging()
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
    debug = os.environ.get("LLMDISTILL_DEBUG", "").lower() in TRUE
    try:
        flag, rest = pop_flag(rest, "debug")
        debug = debug or flag
        dry_run, rest = pop_flag(rest, "dry_run")
        config = parse_config(resolve(config_ref), rest, prog=f"llmdistill {command}")
        if dry_run:
            from llmdistill.plan import print_plan

            print_plan(command, config)
            return
        resolve(runner_ref)(config)
    except (UserError, OSError) as err:
        # the user's data, config or environment: one line naming what and where, no traceback
        if debug:
            raise
        sys.stderr.write(f"llmdistill {command}: error: {one_line(err)}\n")
        raise SystemExit(2) from None
