"""Config of ``llmdistill demo``: the R1 recipe in miniature on a CPU."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from llmdistill.config.base import ConfigError, check_range

STAGE_FILES = {"generate": "generate_tiny.yaml", "build": "build_tiny.yaml", "train_sft": "train_tiny_sft.yaml",
               "train_kd": "train_tiny_kd.yaml", "train_warm": "train_tiny_warm.yaml", "onpolicy": "onpolicy_tiny.yaml",
               "eval": "eval_tiny.yaml", "eval_curve": "eval_tiny.yaml"}


@dataclass
class DemoConfig:
    """The whole pipeline on the tiny world: teacher bootstrap → generate → build → train (SFT-only
    and KD students from the same initial weights, same data, same steps) → on-policy distillation
    (warm-started from a short SFT run) → eval of all five arms.

    Every stage runs its shipped config (``configs_dir``/``*_tiny.yaml``), with only paths and
    seeds overridden: the demo's settings live in those files, nowhere else.
    """

    output_dir: str = field(default="runs/demo", metadata={"help": "Where the report, the stage outputs and their manifests go."})
    configs_dir: str = field(default="configs", metadata={
        "help": "Directory of the stage configs the demo runs: " + ", ".join(STAGE_FILES.values()) + "."})
    seed: int = field(default=0, metadata={"help": "Seed of the student initialisation, the prompts, sampling and data order."})
    seeds: str | None = field(
        default=None,
        metadata={"help": "Comma-separated seeds (e.g. '0,1,2'): run the generate→eval pipeline once per seed "
                          "(the teacher is shared) and report mean and spread of every number."},
    )
    teacher_seed: int = field(default=0, metadata={"help": "Seed of the cached teacher bootstrap."})
    num_prompts: int = field(default=2400, metadata={"help": "Fresh training prompts (tiny-world train split) the teacher answers."})
    reuse: bool = field(default=True, metadata={"help": "Skip a stage whose output exists with the same config (resume)."})
    workers: int = field(default=0, metadata={
        "help": "Training arms run at once (SFT, KD, and the warm start followed by on-policy), each in its own "
                "process on one thread; 0: as many as physical CPU cores, at most 3. Every stage runs with "
                "OMP_NUM_THREADS=1 (unless set in the environment), so a seed's accuracies do not depend on the "
                "core count or on how many arms share the machine (its wall seconds do: the report says how "
                "many arms ran at once)."})

    def __post_init__(self) -> None:
        check_range("num_prompts", self.num_prompts, 1)
        check_range("workers", self.workers, 0)
        missing = [name for name in dict.fromkeys(STAGE_FILES.values()) if not (Path(self.configs_dir) / name).is_file()]
        if missing:
            raise ConfigError(f"configs_dir {self.configs_dir} lacks {', '.join(missing)}: point it at the project's "
                              "configs/ (or a copy of it)")
        if self.seeds is not None:
            try:
                parsed = [int(s) for s in self.seeds.split(",") if s.strip()]
            except ValueError as err:
                raise ConfigError(f"seeds={self.seeds!r} must be comma-separated integers, e.g. '0,1,2'") from err
            if not parsed:
                raise ConfigError("seeds is empty: give e.g. '0,1,2' or leave it unset")

    @property
    def seed_list(self) -> list[int]:
        return [int(s) for s in self.seeds.split(",") if s.strip()] if self.seeds else [self.seed]

    @property
    def worker_count(self) -> int:
        """Training arms run at once: :attr:`workers`, or the physical CPU cores this process may use (two
        hyperthreads of one core would slow each other's arm), at most the 3 arms."""
        import psutil

        usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return self.workers or max(1, min(3, usable, psutil.cpu_count(logical=False) or usable))

    def stage_file(self, stage: str) -> Path:
        """The shipped config of a demo stage (a key of :data:`STAGE_FILES`)."""
        return Path(self.configs_dir) / STAGE_FILES[stage]
