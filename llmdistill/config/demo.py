"""Config of ``llmdistill demo``: the R1 recipe in miniature on a CPU."""

from __future__ import annotations

from dataclasses import dataclass, field

from llmdistill.config.base import ConfigError, check_choice, check_range


@dataclass
class DemoConfig:
    """The whole pipeline on the tiny world: teacher bootstrap → generate → build → train
    (SFT-only and KD students from the same initial weights, same data, same steps) → eval."""

    output_dir: str = field(default="runs/demo", metadata={"help": "Where the report, the stage outputs and their manifests go."})
    seed: int = field(default=0, metadata={"help": "Seed of the student initialisation, the prompts, sampling and data order."})
    seeds: str | None = field(
        default=None,
        metadata={"help": "Comma-separated seeds (e.g. '0,1,2'): run the generate→eval pipeline once per seed "
                          "(the teacher is shared) and report mean and spread of every number."},
    )
    teacher_seed: int = field(default=0, metadata={"help": "Seed of the cached teacher bootstrap."})
    # generate
    num_prompts: int = field(default=2400, metadata={"help": "Fresh training prompts (tiny-world train split) the teacher answers."})
    num_samples: int = field(default=1, metadata={
        "help": "Teacher samples per prompt (rejection sampling keeps the correct ones). 1: the tiny teacher is nearly "
                "deterministic, so of 4 samples per prompt 3 were duplicates that dedup dropped; the budget goes to "
                "more prompts instead."})
    gen_temperature: float = field(default=1.0, metadata={"help": "Teacher sampling temperature."})
    gen_top_p: float = field(default=1.0, metadata={"help": "Teacher nucleus sampling top-p."})
    logprobs_top_k: int = field(default=20, metadata={"help": "Teacher top-k log-probs stored per generated token."})
    max_new_tokens: int = field(default=96, metadata={"help": "Token budget of a teacher trace."})
    # build
    max_samples_per_prompt: int = field(default=4, metadata={"help": "Correct samples kept per prompt."})
    pack_length: int = field(default=512, metadata={"help": "Length of packed training sequences (tokens)."})
    # train
    max_steps: int = field(default=1800, metadata={
        "help": "Optimizer steps of each student (equal for SFT and KD). 1800: the tiny student learns column "
                "addition between ~900 and ~1500 steps; stopping at 900 compares students in mid-transition."})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Packed sequences per step."})
    learning_rate: float = field(default=3e-3, metadata={"help": "Peak learning rate of the students."})
    kd_alpha: float = field(default=0.7, metadata={"help": "KD weight of the KD student (the SFT student has 0)."})
    kd_temperature: float = field(default=2.0, metadata={
        "help": "Distillation temperature of the KD student. 2: at T = 1 the tiny teacher is nearly one-hot (mean top-1 "
                "p 0.998), so KD carries little beyond the text; T = 2 (top-1 0.977) won on 3 of 3 seeds, while at "
                "T >= 3 the student stalled before learning addition in 3 of 7 runs (README, 'What make demo does')."})
    divergence: str = field(default="forward_kl", metadata={"help": "forward_kl | reverse_kl | jsd."})
    # eval
    eval_problems: int = field(default=500, metadata={"help": "Held-out tiny-world problems for evaluation."})
    eval_num_samples: int = field(default=4, metadata={"help": "Samples per held-out problem (pass@1 is their mean)."})
    eval_temperature: float = field(default=0.6, metadata={"help": "Eval sampling temperature (R1 protocol: 0.6)."})
    eval_top_p: float = field(default=0.95, metadata={"help": "Eval nucleus top-p (R1 protocol: 0.95)."})
    reuse: bool = field(default=True, metadata={"help": "Skip a stage whose output exists with the same config (resume)."})

    def __post_init__(self) -> None:
        for name in ("num_prompts", "num_samples", "logprobs_top_k", "max_new_tokens", "max_samples_per_prompt",
                     "pack_length", "max_steps", "per_device_train_batch_size", "eval_problems", "eval_num_samples"):
            check_range(name, getattr(self, name), 1)
        check_range("gen_temperature", self.gen_temperature, 0.0)
        check_range("eval_temperature", self.eval_temperature, 0.0)
        check_range("gen_top_p", self.gen_top_p, 0.0, 1.0)
        check_range("eval_top_p", self.eval_top_p, 0.0, 1.0)
        check_range("kd_alpha", self.kd_alpha, 0.0, 1.0)
        check_range("kd_temperature", self.kd_temperature, 0.05)
        check_range("learning_rate", self.learning_rate, 0.0)
        check_choice("divergence", self.divergence, ("forward_kl", "reverse_kl", "jsd"))
        if self.kd_alpha == 0:
            raise ConfigError("kd_alpha=0 makes the KD student an SFT student: use kd_alpha > 0")
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
