"""``llmdistill train``: the student, the data, the distillation loss and its schedules.

:class:`TrainConfig` extends TRL's :class:`~trl.SFTConfig`, so every Transformers/TRL training
option (optimiser, LR schedule, ``bf16``, gradient checkpointing, ``report_to``,
``push_to_hub``, DeepSpeed/FSDP through ``accelerate launch`` ...) works as TRL users expect.
The fields below add what distillation needs. ``resume_from_checkpoint`` also takes ``latest``
(or ``true``, as YAML and the command line write it): the newest *complete* ``checkpoint-N`` in
``output_dir`` (see :mod:`llmdistill.trainer` for what complete means).

Loss per target token: ``alpha * T**2 * D(teacher_T || student_T) + (1 - alpha) * CE``, see
:func:`llmdistill.losses.chunked_distill_loss`.

Some SFTConfig options belong to TRL's own data preparation and loss, which the distillation
trainer replaces (the shards come tokenized and packed from ``llmdistill build``; the loss is
llmdistill's chunked KD + CE). They are listed in :data:`UNSUPPORTED_SFT_FIELDS`: left at their
SFTConfig default they are harmless, set to anything else they raise a :class:`ConfigError`
saying why and what to use instead, rather than being ignored.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, NewType

import torch
from trl import SFTConfig

from llmdistill.config.base import ConfigError, check_choice, check_range, parse_json_field
from llmdistill.losses import DIVERGENCES as _DIVERGENCE_REGISTRY
from llmdistill.losses import divergence_help

ALPHA_SCHEDULES = ("constant", "linear_warmup")
TEMPERATURE_SCHEDULES = ("constant", "linear", "cosine")
DIVERGENCES = tuple(str(name) for name in _DIVERGENCE_REGISTRY)  # the names llmdistill.losses implements
ATTENTIONS = ("sdpa", "eager", "flash_attention_2")

_BUILT = "the built shards come tokenized and packed from `llmdistill build`"
_NO_PADDING = "the distillation collator concatenates packed rows into one unpadded sequence"
_LOSS_MASK = "the trained tokens are the completion tokens marked by the shards' loss_mask (set by `llmdistill build`)"

#: SFTConfig (and TrainingArguments) fields that the distillation trainer does not honour:
#: name -> (values accepted besides the SFTConfig default, why it is ignored and what to use instead).
UNSUPPORTED_SFT_FIELDS: dict[str, tuple[tuple[Any, ...], str]] = {
    "max_length": ((), "the packed length is fixed by `llmdistill build --max_length` (read from the "
                       "shards)"),
    "packing": ((), f"{_BUILT}; leave packing false"),
    "packing_strategy": ((), f"{_BUILT} (`llmdistill build --overlong drop|split` decides what happens to "
                             "a long trace)"),
    "eval_packing": ((), f"{_BUILT}, and llmdistill train has no eval dataset"),
    "padding_free": ((), f"{_NO_PADDING} already (documents are separated by position_ids); leave it false"),
    "pad_to_multiple_of": ((None, "none", "null", "None"), f"{_NO_PADDING}, so there is nothing to pad"),
    "pad_token": ((), f"{_NO_PADDING}, so there is no pad token"),
    "truncation_mode": ((), "nothing is truncated at train time: `llmdistill build --overlong drop|split` "
                            "handles traces longer than its --max_length"),
    "dataset_text_field": ((), f"{_BUILT}: there is no text column to read"),
    "dataset_num_proc": ((), f"{_BUILT}, so TRL's dataset preparation is skipped"),
    "shuffle_dataset": ((), f"{_BUILT}, so TRL's dataset preparation (and its shuffle) is skipped; the "
                            "trainer already draws packed rows in random order (set data_seed)"),
    "eos_token": ((), f"{_BUILT}, end-of-sequence tokens included: set the student tokenizer's eos token "
                      "before building"),
    "chat_template_path": ((), f"{_BUILT}, prompts rendered with the student tokenizer's chat template: "
                               "change the template before building"),
    "completion_only_loss": ((True,), f"{_LOSS_MASK}; prompt tokens are never trained"),
    "assistant_only_loss": ((), f"{_LOSS_MASK}: the last assistant turn only"),
    "loss_type": (("chunked_nll",), "the loss is alpha*T^2*KD + (1-alpha)*CE: choose it with alpha, "
                                    "temperature and divergence"),
    "label_smoothing_factor": ((), "the CE term is not smoothed; the KD term (alpha > 0) already trains on "
                                   "the teacher's soft targets"),
    "use_liger_kernel": ((), "Liger's fused linear cross-entropy cannot compute the KD term, and "
                             "llmdistill's chunked KD loss already avoids materialising the (tokens x vocab) "
                             "logits; for fused layer kernels on GPU use model_init_kwargs: {use_kernels: true}"),
    "liger_kernel_config": ((), "it only configures use_liger_kernel, which llmdistill train does not use"),
    "router_aux_loss_coef": ((0.0,), "the loss is computed from the student backbone's hidden states and "
                                     "adds no MoE load-balancing loss"),
    "average_tokens_across_devices": ((), "the loss is always divided by the target-token count of the whole "
                                          "optimizer step, over all processes and accumulation steps"),
}
_SFT_DEFAULTS = {f.name: f.default for f in dataclasses.fields(SFTConfig)}


#: The type of ``resume_from_checkpoint``: a checkpoint path, or a word of :func:`normalize_resume`.
#: Any YAML value passes the type check (a bool ``true`` included); ``normalize_resume`` judges it.
CheckpointRef = NewType("CheckpointRef", str)
#: ``resume_from_checkpoint`` after :func:`normalize_resume`: the newest complete checkpoint in output_dir.
RESUME_LATEST = "latest"
_RESUME_LATEST_WORDS = ("latest", "true")
_RESUME_OFF_WORDS = ("", "false", "none", "null")


def normalize_resume(value: Any) -> str | None:
    """``resume_from_checkpoint`` as given (YAML bool, command-line text, path) -> a path, ``latest`` or None.

    ``true``/``latest`` (any case, or the bool True) mean the newest complete checkpoint in
    output_dir; ``false``/``none``/``null``/empty (or False/None) mean no resume; anything else is a
    path (write ``./latest`` for a directory really called ``latest``).

    Raises:
        ConfigError: a value that is neither text nor a bool.
    """
    if value is None or value is False:
        return None
    if value is True:
        return RESUME_LATEST
    if not isinstance(value, str):
        raise ConfigError(f"resume_from_checkpoint={value!r}: expected a checkpoint directory, 'latest' (or true) "
                          "for the newest complete checkpoint in output_dir, or false")
    word = value.strip().lower()
    if word in _RESUME_LATEST_WORDS:
        return RESUME_LATEST
    if word in _RESUME_OFF_WORDS:
        return None
    return value


def _has_accelerator() -> bool:
    accel = getattr(torch, "accelerator", None)
    return bool(accel.is_available()) if accel is not None else torch.cuda.is_available()


@dataclass
class TrainConfig(SFTConfig):
    """Distillation training: TRL's SFTConfig plus the student, the built data and the KD loss."""

    # ---- resume (replaces TrainingArguments' field: it also takes `latest`/true) ----------
    resume_from_checkpoint: CheckpointRef | None = field(
        default=None,
        metadata={"help": "Resume training: `latest` (or true) takes the newest complete checkpoint-N in output_dir "
                          "(training starts from scratch when there is none; incomplete ones, left by a killed run, "
                          "are skipped with a warning); a path resumes from that checkpoint, which must be complete; "
                          "false/null (the default) starts from scratch."},
    )
    # ---- inputs -------------------------------------------------------------------------
    student_model: str = field(
        default="",
        metadata={"help": "Path (or hub id) of the student checkpoint. Its tokenizer must be the one the "
                          "built shards were tokenized with."},
    )
    data_dir: str = field(
        default="",
        metadata={"help": "Directory of built shards written by `llmdistill build`."},
    )
    data_cache_dir: str = field(
        default="",
        metadata={"help": "Where the built shards are converted, once per machine, into the Arrow files that "
                          "training memory-maps (about the size of the data, uncompressed). Empty: "
                          "<data_dir>/.arrow_cache, or $HF_DATASETS_CACHE/llmdistill-built when data_dir is "
                          "read-only. Put it on node-local disk when the nodes share no filesystem."},
    )
    # ---- loss ---------------------------------------------------------------------------
    alpha: float = field(
        default=0.5,
        metadata={"help": "Weight of the KD term: alpha*T^2*D + (1-alpha)*CE. 0 is plain SFT (no top-k "
                          "needed), 1 is pure KD. With alpha_schedule=linear_warmup this is the final value."},
    )
    alpha_schedule: str = field(
        default="constant",
        metadata={"help": f"How alpha moves during training: one of {list(ALPHA_SCHEDULES)}. linear_warmup goes "
                          "from alpha_start to alpha over the first alpha_warmup_ratio of the steps."},
    )
    alpha_start: float = field(
        default=0.0, metadata={"help": "alpha at step 0 when alpha_schedule=linear_warmup."}
    )
    alpha_warmup_ratio: float = field(
        default=0.1, metadata={"help": "Fraction of the training steps over which alpha warms up."}
    )
    temperature: float = field(
        default=1.0,
        metadata={"help": "Distillation temperature T applied to both teacher and student log-probs (the "
                          "stored teacher log-probs are T=1). With a decaying schedule this is the final value."},
    )
    temperature_schedule: str = field(
        default="constant",
        metadata={"help": f"One of {list(TEMPERATURE_SCHEDULES)}: linear/cosine decay from temperature_start "
                          "to temperature over the whole run (high early, lower later)."},
    )
    temperature_start: float = field(
        default=2.0, metadata={"help": "Temperature at step 0 when temperature_schedule is linear or cosine."}
    )
    divergence: str = field(
        default="forward_kl",
        metadata={"help": f"KD divergence on the teacher's top-k support plus a tail bucket: {divergence_help()}.",
                  "choices": list(DIVERGENCES)},
    )
    jsd_beta: float = field(
        default=0.5, metadata={"help": "Mixture weight beta of the generalised JSD (divergence=jsd)."}
    )
    loss_chunk_size: int = field(
        default=1024,
        metadata={"help": "Target tokens per LM-head chunk: the loss never holds more than "
                          "loss_chunk_size x vocab logits at once."},
    )
    # ---- student ------------------------------------------------------------------------
    attention: str = field(
        default="sdpa",
        metadata={"help": f"Attention kernel, one of {list(ATTENTIONS)}. Packed documents are isolated by "
                          "position_ids: sdpa/eager get a block-diagonal mask, flash_attention_2 runs varlen."},
    )
    use_peft: bool = field(default=False, metadata={"help": "Train a LoRA adapter instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = lora_alpha / lora_r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: str = field(
        default="all-linear",
        metadata={"help": "Comma-separated module names for LoRA, or 'all-linear' (every linear layer but "
                          "the LM head)."},
    )
    load_in_4bit: bool = field(
        default=False,
        metadata={"help": "QLoRA: load the frozen base weights in 4-bit NF4 (bitsandbytes); needs use_peft."},
    )
    save_merged: bool = field(
        default=True,
        metadata={"help": "With use_peft: save the adapter merged into the base weights (a plain checkpoint) "
                          "instead of the adapter alone."},
    )

    def __post_init__(self):
        if self.output_dir is None:
            self.output_dir = "runs/train"
        self.resume_from_checkpoint = normalize_resume(self.resume_from_checkpoint)
        self._reject_unsupported_sft_fields()
        # The built shards are already tokenized and packed: TRL must neither re-tokenize them nor
        # drop the columns the distillation collator needs (loss_mask, topk).
        self.dataset_kwargs = {"skip_prepare_dataset": True}
        self.remove_unused_columns = False
        if not _has_accelerator():
            # Without this, torchrun/accelerate processes on a CPU-only host each see a world of one.
            self.use_cpu = True
            if self.bf16 is None:
                self.bf16 = False
        super().__post_init__()
        self._check_loss_fields()
        self._check_student_fields()

    def _reject_unsupported_sft_fields(self) -> None:
        """A ConfigError for an SFTConfig option the distillation trainer would silently ignore."""
        for name, (also_accepted, why) in UNSUPPORTED_SFT_FIELDS.items():
            value = getattr(self, name)
            if value != _SFT_DEFAULTS[name] and value not in also_accepted:
                raise ConfigError(f"{name}={value!r} is not supported by llmdistill train: {why}")
        kwargs = parse_json_field("dataset_kwargs", self.dataset_kwargs)
        if set(kwargs) - {"skip_prepare_dataset"} or not kwargs.get("skip_prepare_dataset", True):
            raise ConfigError(f"dataset_kwargs={kwargs!r} is not supported by llmdistill train: {_BUILT}, so "
                              "TRL's dataset preparation is always skipped (skip_prepare_dataset: true)")

    def _check_loss_fields(self) -> None:
        check_range("alpha", self.alpha, 0.0, 1.0)
        check_choice("alpha_schedule", self.alpha_schedule, ALPHA_SCHEDULES)
        check_range("alpha_start", self.alpha_start, 0.0, 1.0)
        check_range("alpha_warmup_ratio", self.alpha_warmup_ratio, 0.0, 1.0)
        check_choice("temperature_schedule", self.temperature_schedule, TEMPERATURE_SCHEDULES)
        check_range("temperature", self.temperature, 1e-3, None)
        check_range("temperature_start", self.temperature_start, 1e-3, None)
        check_choice("divergence", self.divergence, DIVERGENCES)
        check_range("jsd_beta", self.jsd_beta, 0.0, 1.0)
        check_range("loss_chunk_size", self.loss_chunk_size, 1, None)

    def _check_student_fields(self) -> None:
        check_choice("attention", self.attention, ATTENTIONS)
        check_range("lora_r", self.lora_r, 1, None)
        check_range("lora_alpha", self.lora_alpha, 1, None)
        check_range("lora_dropout", self.lora_dropout, 0.0, 1.0)
        if self.load_in_4bit and not self.use_peft:
            raise ConfigError("load_in_4bit=true (QLoRA) trains a LoRA adapter: set use_peft=true as well")

    @property
    def uses_kd(self) -> bool:
        """Whether any step of the run has a KD term (and so needs the teacher top-k)."""
        if self.alpha_schedule == "linear_warmup":
            return self.alpha > 0 or self.alpha_start > 0
        return self.alpha > 0
