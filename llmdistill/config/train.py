"""``llmdistill train``: the student, the data, the distillation loss and its schedules.

:class:`TrainConfig` extends TRL's :class:`~trl.SFTConfig`, so every Transformers/TRL training
option (optimiser, LR schedule, ``bf16``, gradient checkpointing, ``report_to``,
``push_to_hub``, DeepSpeed/FSDP through ``accelerate launch`` ...) works as TRL users expect.
The fields below add what distillation needs. ``resume_from_checkpoint`` also takes ``latest``
(or ``true``, as YAML and the command line write it): the newest *complete* ``checkpoint-N`` in
``output_dir`` (see :mod:`llmdistill.trainer` for what complete means).

Loss per target token: ``alpha * T**2 * D(teacher_T || student_T) + (1 - alpha) * CE``, see
:func:`llmdistill.losses.chunked_distill_loss`, plus ``feature_weight * F + attention_weight * A``
when intermediate layers are distilled (:mod:`llmdistill.layer_losses`). The teacher's signal comes
from the built shards (its stored top-k) or, with ``teacher_model``, from the teacher itself,
running beside the student (:mod:`llmdistill.online`).

Some SFTConfig options belong to TRL's own data preparation and loss, which the distillation
trainer replaces (the shards come tokenized and packed from ``llmdistill build``; the loss is
llmdistill's chunked KD + CE). They are listed in :data:`UNSUPPORTED_SFT_FIELDS`: left at their
SFTConfig default they are harmless, set to anything else they raise a :class:`ConfigError`
saying why and what to use instead, rather than being ignored.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from trl import SFTConfig

from llmdistill.config.base import (
    CheckpointRef,
    ConfigError,
    check_choice,
    check_range,
    normalize_resume,
    parse_json_field,
)
from llmdistill.config.lora import LoraSettings
from llmdistill.layer_losses import FEATURE_LOSSES as _LAYER_FEATURE_LOSSES
from llmdistill.layer_losses import map_layers
from llmdistill.losses import DIVERGENCES as _DIVERGENCE_REGISTRY
from llmdistill.losses import divergence_help

ALPHA_SCHEDULES = ("constant", "linear_warmup", "loss_adaptive")
TEMPERATURE_SCHEDULES = ("constant", "linear", "cosine", "loss_adaptive")
WEIGHT_SCHEDULES = ALPHA_SCHEDULES  # the weights of the feature and attention terms move like alpha
ADAPTIVE_LOSSES = ("ce", "kd")
TEACHER_DTYPES = ("auto", "float32", "bfloat16", "float16")
STUDENT_INITS = ("pretrained", "drop_layers")
FEATURE_LOSSES = ("none", *_LAYER_FEATURE_LOSSES)
ATTENTION_LOSSES = ("none", "attention_kl", "relations")
_ADAPTIVE_HELP = ("loss_adaptive moves from the _start value to the final one as the running loss falls: "
                  "value = start + (end - start) * clamp(1 - ema / ema_first, 0, 1), where ema is the "
                  "exponential moving average (adaptive_ema_decay) of the per-token loss named by adaptive_loss "
                  "and ema_first its first value")
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
    "enable_jit_checkpoint": ((), "llmdistill train always stops on SIGTERM with a checkpoint, after the step "
                                  "under way and at the same step on every process (transformers' JIT "
                                  "checkpoint saves from each process on its own)"),
}
_SFT_DEFAULTS = {f.name: f.default for f in dataclasses.fields(SFTConfig)}


def _has_accelerator() -> bool:
    accel = getattr(torch, "accelerator", None)
    return bool(accel.is_available()) if accel is not None else torch.cuda.is_available()


@dataclass
class TrainConfig(SFTConfig, LoraSettings):
    """Distillation training: TRL's SFTConfig plus the student, the built data and the KD loss (and LoRA:
    :class:`~llmdistill.config.lora.LoraSettings`)."""

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
                          "from alpha_start to alpha over the first alpha_warmup_ratio of the steps; "
                          f"{_ADAPTIVE_HELP}."},
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
                          f"to temperature over the whole run (high early, lower later); {_ADAPTIVE_HELP}."},
    )
    temperature_start: float = field(
        default=2.0, metadata={"help": "Temperature at step 0 when temperature_schedule is linear, cosine or "
                                       "loss_adaptive."}
    )
    adaptive_loss: str = field(
        default="ce",
        metadata={"help": f"The running loss that loss_adaptive schedules follow: one of {list(ADAPTIVE_LOSSES)} "
                          "(per target token, averaged over processes). Each checkpoint keeps it, so a resumed "
                          "run goes on from the same value."},
    )
    adaptive_ema_decay: float = field(
        default=0.9, metadata={"help": "Decay of the moving average of the loss for loss_adaptive schedules, "
                                       "per micro-batch: ema = decay * ema + (1 - decay) * loss."}
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
    # ---- online teacher -----------------------------------------------------------------
    teacher_model: str = field(
        default="",
        metadata={"help": "Online distillation: path (or hub id) of a teacher loaded beside the student, frozen, "
                          "in teacher_dtype, on the student's device (under DeepSpeed ZeRO-3 it is partitioned "
                          "over the processes for inference, like the student). Each batch it gives the KD term "
                          "its top-k (teacher_top_k) and the feature/attention terms its hidden states; built "
                          "shards without top-k (kd: false) then suffice. Its tokenizer must be the student's. "
                          "Empty: the stored top-k of the built shards is the teacher."},
    )
    teacher_dtype: str = field(
        default="auto", metadata={"help": f"Dtype of the online teacher's weights, one of {list(TEACHER_DTYPES)} "
                                          "(auto: the checkpoint's own)."}
    )
    teacher_top_k: int = field(
        default=20,
        metadata={"help": "Top-k of the online teacher per target token, plus the tail bucket, as stored top-k "
                          "is used. 0: its full distribution (a (target tokens x vocab) float32 tensor per "
                          "micro-batch: for small vocabularies only)."},
    )
    # ---- intermediate layers ------------------------------------------------------------
    layer_map: str = field(
        default="uniform",
        metadata={"help": "Which student block is compared with which teacher block, for the feature and "
                          "attention terms: uniform (student block i <-> teacher block i*T//S), last_k (the last "
                          "layer_map_k blocks of each) or explicit pairs 'student:teacher,...' of 1-based block "
                          "numbers (0 is the embedding output, hidden states only)."},
    )
    layer_map_k: int = field(default=1, metadata={"help": "k of layer_map: last_k."})
    feature_loss: str = field(
        default="none",
        metadata={"help": f"Hidden-state distillation, one of {list(FEATURE_LOSSES)}: mse or cosine distance "
                          "between the student's and the teacher's hidden states of each mapped pair, at the "
                          "positions that predict target tokens, averaged over pairs. A student narrower than "
                          "the teacher goes through a learned linear projection per pair, trained with the "
                          "student and saved apart from it (feature_projector/projector.safetensors). Needs teacher_model."},
    )
    feature_weight: float = field(
        default=1.0, metadata={"help": "Weight of the feature term (the final value of its schedule)."}
    )
    feature_weight_schedule: str = field(
        default="constant", metadata={"help": f"How feature_weight moves, one of {list(WEIGHT_SCHEDULES)}, as "
                                              "alpha_schedule (warm-up over alpha_warmup_ratio)."}
    )
    feature_weight_start: float = field(
        default=0.0, metadata={"help": "feature_weight at the start of a linear_warmup/loss_adaptive schedule."}
    )
    attention_loss: str = field(
        default="none",
        metadata={"help": f"Attention distillation, one of {list(ATTENTION_LOSSES)}: attention_kl is "
                          "KL(teacher || student) of the attention probabilities of each mapped pair (needs "
                          "attention: eager; heads averaged in groups when their counts differ); relations is "
                          "MiniLM v2's query-query, key-key and value-value relation KL on relation_heads heads "
                          "(any attention kernel, any head counts). Needs teacher_model."},
    )
    attention_weight: float = field(
        default=1.0, metadata={"help": "Weight of the attention term (the final value of its schedule)."}
    )
    attention_weight_schedule: str = field(
        default="constant", metadata={"help": f"How attention_weight moves, one of {list(WEIGHT_SCHEDULES)}."}
    )
    attention_weight_start: float = field(
        default=0.0, metadata={"help": "attention_weight at the start of a linear_warmup/loss_adaptive schedule."}
    )
    relation_heads: int = field(
        default=0,
        metadata={"help": "MiniLM v2 relation heads: the q/k/v projections of both models are re-split into this "
                          "many heads (it must divide each projection's width). 0: the student's attention heads."},
    )
    # ---- student ------------------------------------------------------------------------
    student_init: str = field(
        default="pretrained",
        metadata={"help": f"One of {list(STUDENT_INITS)}: pretrained loads student_model; drop_layers builds the "
                          "student from teacher_model with every other block (0, 2, 4, ...), as DistilBERT did "
                          "(leave student_model empty: the tokenizer is the teacher's)."},
    )
    attention: str = field(
        default="sdpa",
        metadata={"help": f"Attention kernel, one of {list(ATTENTIONS)}. Packed documents are isolated by "
                          "position_ids: flash_attention_2 runs them varlen; with sdpa/eager they run as "
                          "right-padded groups of whole documents (a student sharded by FSDP/ZeRO-3: one packed "
                          "sequence under a block-diagonal mask)."},
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
        self._check_teacher_fields()

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
        check_choice("adaptive_loss", self.adaptive_loss, ADAPTIVE_LOSSES)
        check_range("adaptive_ema_decay", self.adaptive_ema_decay, 0.0, 1.0)
        if self.adaptive_ema_decay == 1.0:
            raise ConfigError("adaptive_ema_decay=1.0 never moves the average: loss_adaptive schedules would stay at "
                              "their _start values; use a decay below 1 (e.g. 0.9)")

    def _check_student_fields(self) -> None:
        check_choice("attention", self.attention, ATTENTIONS)
        self.check_lora()
        if self.load_in_4bit and not self.use_peft:
            raise ConfigError("load_in_4bit=true (QLoRA) trains a LoRA adapter: set use_peft=true as well")
        check_choice("student_init", self.student_init, STUDENT_INITS)
        if self.student_init == "drop_layers" and (self.student_model or not self.teacher_model):
            raise ConfigError("student_init=drop_layers builds the student from teacher_model: set teacher_model "
                              "and leave student_model empty")

    def _check_teacher_fields(self) -> None:
        check_choice("teacher_dtype", self.teacher_dtype, TEACHER_DTYPES)
        check_range("teacher_top_k", self.teacher_top_k, 0, None)
        check_choice("feature_loss", self.feature_loss, FEATURE_LOSSES)
        check_choice("attention_loss", self.attention_loss, ATTENTION_LOSSES)
        for name in ("feature", "attention"):
            check_range(f"{name}_weight", getattr(self, f"{name}_weight"), 0.0, None)
            check_range(f"{name}_weight_start", getattr(self, f"{name}_weight_start"), 0.0, None)
            check_choice(f"{name}_weight_schedule", getattr(self, f"{name}_weight_schedule"), WEIGHT_SCHEDULES)
        check_range("layer_map_k", self.layer_map_k, 1, None)
        check_range("relation_heads", self.relation_heads, 0, None)
        if self.layer_map not in ("uniform", "last_k"):
            try:  # the syntax now; the layer numbers once the models load
                map_layers(self.layer_map, 10**6, 10**6)
            except ValueError as err:
                raise ConfigError(str(err)) from None
        uses_layers = self.feature_loss != "none" or self.attention_loss != "none"
        if uses_layers and not self.teacher_model:
            raise ConfigError(f"feature_loss={self.feature_loss!r}, attention_loss={self.attention_loss!r} compare "
                              "the teacher's layers with the student's: set teacher_model (the online teacher)")
        if self.attention_loss == "attention_kl" and self.attention != "eager":
            raise ConfigError(f"attention_loss=attention_kl needs attention: eager (attention={self.attention!r} "
                              "never materialises the attention probabilities); or use attention_loss: relations")
        if self.teacher_model and not (self.uses_kd or uses_layers or self.student_init == "drop_layers"):
            raise ConfigError("teacher_model is set but nothing uses it: set alpha > 0, a feature_loss or an "
                              "attention_loss, or leave teacher_model empty")

    @property
    def uses_kd(self) -> bool:
        """Whether any step of the run has a KD term (and so needs the teacher's top-k, stored or online)."""
        if self.alpha_schedule in ("linear_warmup", "loss_adaptive"):
            return self.alpha > 0 or self.alpha_start > 0
        return self.alpha > 0

    @property
    def student_source(self) -> str:
        """The checkpoint the student's weights and tokenizer come from."""
        return self.teacher_model if self.student_init == "drop_layers" else self.student_model
