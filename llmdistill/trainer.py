"""The distillation trainer: TRL's SFTTrainer with a sparse top-k KD + CE loss.

Only what distillation needs is overridden:

* ``compute_loss`` runs the student backbone, keeps the hidden states that predict a target
  token and hands them with the LM-head weight to :func:`llmdistill.losses.chunked_distill_loss`
  (logits are built chunk by chunk there; the model is never called with labels);
* ``_get_num_items_in_batch`` counts the target tokens of the whole optimizer step (all
  gradient-accumulation micro-batches, all processes), so every token weighs the same whatever
  the packing, accumulation or world size;
* ``get_batch_samples`` times the wait for the step's batches;
* ``log`` adds ``ce_loss``, ``kd_loss``, ``tokens_per_s``, ``real_token_fraction``,
  ``target_fraction``, ``alpha`` and ``temperature`` (with layer terms also ``feature_loss``,
  ``attention_loss`` and their weights), and the cost of the run beside them:
  ``data_wait_s`` (seconds per optimizer step spent waiting for data), ``data_wait_fraction``,
  ``peak_rss_gib`` and, on GPUs, ``peak_accelerator_gib`` (see :meth:`DistillTrainer._window_metrics`),
  ``logged_at`` (Unix seconds: when the run reached the step) and ``elapsed_s`` (the run's wall
  seconds at the step, the processes before a resume included: :class:`~llmdistill.checkpoints.RunClock`;
  the demo's accuracy-against-time curves place checkpoints by it).

With an online teacher (``teacher_model``) the teacher's top-k comes from its forward over the same
batch, and the feature/attention terms compare its layers with the student's (:mod:`llmdistill.online`).
Schedules are step-based or follow the running loss (:func:`current_schedule`).

The loss runs *inside* the wrapped model's forward (:func:`run_in_forward`): DDP only arms its
gradient all-reduce in its own forward, and FSDP/ZeRO-3 only gather sharded weights there.

Checkpoints and the final model are written whole and a full disk is one clear error: see
:mod:`llmdistill.checkpoints`, which ``_save_checkpoint`` and ``save_model`` call.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import resource
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import SFTTrainer
from trl.trainer.utils import maybe_gather_lm_head_ctx

from llmdistill.checkpoints import (
    RUN_RECORD_FILE,
    TOKENS_FILE,
    TRAINER_STATE,
    RunClock,
    clean_stale,
    complete_checkpoints,
    dir_bytes,
    free_bytes,
    human_bytes,
    is_disk_full,
    latest_complete_checkpoint,
    publish_checkpoint,
    resolve_resume,
    seal_checkpoint,
    seal_model,
    set_aside_and_delete,
    swap_in_model,
)
from llmdistill.compute import run_record
from llmdistill.config.base import UserError
from llmdistill.config.train import TrainConfig
from llmdistill.log import get_logger
from llmdistill.losses import chunked_distill_loss
from llmdistill.online import (
    Captured,
    CaptureSpec,
    LayerDistiller,
    OnlineTeacher,
    ProjectorGrads,
    capture_forward,
)
from llmdistill.teacher import logit_transform, predicting_hidden

logger = get_logger(__name__)

_STATS = ("ce_sum", "kd_sum", "feature_sum", "attention_sum", "n_targets", "n_tokens", "capacity")
GIB = 1024**3


def peak_rss_bytes() -> int:
    """This process's peak resident set size in bytes: Linux's ``VmHWM``, else ``ru_maxrss``.

    ``VmHWM`` belongs to this address space; ``ru_maxrss`` would also carry the peak of the process
    that started this one (it survives fork and exec). Both count the pages of the memory-mapped
    data this process touched: page cache, shared by the machine's processes and evictable.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def schedule_value(kind: str, start: float, end: float, progress: float, warmup_ratio: float = 1.0) -> float:
    """A scheduled scalar at ``progress`` in [0, 1] of the run.

    Args:
        kind: ``constant`` (always ``end``), ``linear_warmup`` (``start`` -> ``end`` over the
            first ``warmup_ratio`` of the run, then ``end``), ``linear`` or ``cosine``
            (``start`` -> ``end`` over the whole run), ``loss_adaptive`` (linear in a progress
            measured on the running loss, :meth:`LossEMA.progress`).
        start: value at progress 0.
        end: final value.
        progress: fraction of the optimizer steps done (of the loss's fall for ``loss_adaptive``).
        warmup_ratio: length of the warm-up for ``linear_warmup``.
    """
    p = min(max(progress, 0.0), 1.0)
    if kind == "constant":
        return end
    if kind == "linear_warmup":
        frac = 1.0 if warmup_ratio <= 0 else min(p / warmup_ratio, 1.0)
        return start + (end - start) * frac
    if kind in ("linear", "loss_adaptive"):
        return start + (end - start) * p
    if kind == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * p))
    raise ValueError(f"unknown schedule {kind!r}")


LOSS_EMA_FILE = "loss_ema.json"  # in each checkpoint: the running loss of loss_adaptive schedules
LAYOUT_FILE = "batch_layout.json"  # in each checkpoint: how the run's optimizer steps were made of rows (batch_layout)


def batch_layout(args: Any) -> dict[str, int]:
    """Processes, rows per device and micro-batches per optimizer step: what places a resumed run in the data.

    transformers resumes by skipping ``global_step x gradient_accumulation_steps`` batches of each
    process's shard of the epoch, which is where the checkpoint stopped only with the same layout.
    """
    return {"world_size": int(args.world_size), "gradient_accumulation_steps": int(args.gradient_accumulation_steps),
            "per_device_train_batch_size": int(args.per_device_train_batch_size)}


class LossEMA:
    """The running per-token loss of the run, for ``loss_adaptive`` schedules.

    ``value = decay * value + (1 - decay) * loss`` per update; the first update sets it (and ``first``).
    """

    def __init__(self, decay: float):
        self.decay = decay
        self.first: float | None = None
        self.value: float | None = None

    def update(self, loss: float) -> None:
        if self.value is None:
            self.first = self.value = loss
        else:
            self.value = self.decay * self.value + (1.0 - self.decay) * loss

    def state(self) -> dict[str, float | None]:
        """What a checkpoint keeps (:data:`LOSS_EMA_FILE`), so a resumed run goes on from the same value."""
        return {"first": self.first, "value": self.value}

    def load(self, state: dict[str, float | None]) -> None:
        self.first, self.value = state["first"], state["value"]

    def progress(self) -> float:
        """How far the loss has fallen: ``clamp(1 - value / first, 0, 1)`` (0 before any update)."""
        if self.value is None or not self.first or self.first <= 0:
            return 0.0
        return min(max(1.0 - self.value / self.first, 0.0), 1.0)


def current_schedule(args: TrainConfig, state: Any, loss_ema: LossEMA) -> dict[str, float]:
    """alpha, temperature and the layer-term weights at this point of the run.

    Args:
        args: the run's config (schedules, start and end values).
        state: the trainer state (``global_step``, ``max_steps``) for step-based schedules.
        loss_ema: the running loss for ``loss_adaptive`` schedules.
    """
    step_progress = state.global_step / max(state.max_steps, 1)

    def value(kind: str, start: float, end: float, warmup: float = 1.0) -> float:
        return schedule_value(kind, start, end, loss_ema.progress() if kind == "loss_adaptive" else step_progress,
                              warmup)

    a = args
    return {
        "alpha": value(a.alpha_schedule, a.alpha_start, a.alpha, a.alpha_warmup_ratio),
        "temperature": value(a.temperature_schedule, a.temperature_start, a.temperature),
        "feature_weight": value(a.feature_weight_schedule, a.feature_weight_start, a.feature_weight,
                                a.alpha_warmup_ratio),
        "attention_weight": value(a.attention_weight_schedule, a.attention_weight_start, a.attention_weight,
                                  a.alpha_warmup_ratio),
    }


class StepLoss(NamedTuple):
    """The summed loss of a micro-batch and its terms (sums over its target tokens)."""

    loss: torch.Tensor
    ce_sum: torch.Tensor
    kd_sum: torch.Tensor
    feature_sum: torch.Tensor
    attention_sum: torch.Tensor
    n_tokens: int


def run_in_forward(wrapper: nn.Module, inner: nn.Module, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``fn(*args, **kwargs)`` from inside ``wrapper``'s forward.

    ``inner.forward`` is swapped for ``fn`` for the duration of one call of ``wrapper``, so
    the hooks of DDP/FSDP/DeepSpeed around ``inner`` fire as for a normal forward. ``wrapper``
    may be ``inner`` itself (one process, no wrapper).
    """
    original = inner.forward

    def redirected(*_a: Any, **_kw: Any) -> Any:
        inner.forward = original  # fn may call the real forward
        return fn(*_a, **_kw)

    inner.forward = redirected
    try:
        return wrapper(*args, **kwargs)
    finally:
        inner.forward = original


# ---- checkpoints that appear only whole ----------------------------------------------------

#: Written last into a checkpoint, before it is renamed into place: ``{"step": N, "files": {path: bytes}}``.
class DistillTrainer(SFTTrainer):
    """SFTTrainer whose loss is ``alpha*T^2*D(teacher_T||student_T) + (1-alpha)*CE`` per target token.

    Expects batches from :class:`llmdistill.collate.DistillCollator` and ``args`` a
    :class:`~llmdistill.config.train.TrainConfig`. ``max_length`` is the packed-row capacity
    of the built shards (for the real-token fraction), not ``args.max_length``: the SFTConfig
    options of TRL's data preparation and loss that this trainer replaces are refused by
    TrainConfig (:data:`~llmdistill.config.train.UNSUPPORTED_SFT_FIELDS`). ``teacher`` is the
    online teacher (None: the batches carry stored top-k) and ``layers`` the feature/attention
    terms (they need the online teacher).
    """

    def __init__(self, *args: Any, max_length: int, teacher: OnlineTeacher | None = None,
                 layers: LayerDistiller | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.max_length = max_length
        self.teacher, self.layers = teacher, layers
        self._place_teacher_and_projector()
        self._padded_groups = self._documents_as_padded_groups()
        # the loss is divided by the token count of the whole optimizer step (see compute_loss)
        self.loss_is_scaled_for_ga = True
        self._stats = torch.zeros(len(_STATS), dtype=torch.float64)
        self._stats_calls = 0
        self._tokens_counted = 0.0  # target tokens of all processes up to the last count (trained_tokens)
        self._tokens_since = 0.0  # this process's since then
        self._window_start: float | None = None  # the first batch fetch of a logging window starts its clock
        self._data_wait = 0.0  # seconds spent waiting for batches in the window
        self._window_steps = 0
        self.loss_ema = LossEMA(self.args.adaptive_ema_decay)
        self._last_schedule = current_schedule(self.args, self.state, self.loss_ema)
        self._staging_root: Path | None = None  # set while a checkpoint is written (see _get_output_dir)
        self._owner_pid = self._main_process_pid()  # names the staging directories, the same on every rank
        if self.args.should_save:
            clean_stale(self.args.output_dir)
            # what each checkpoint records of the run: the model the student started from, the machine
            student = getattr(self.args, "student_source", None) if getattr(self.args, "student_init",
                                                                             "pretrained") == "pretrained" else None
            self._run_record = run_record(student)

    # ---- online teacher and feature projection -------------------------------------------
    def _place_teacher_and_projector(self) -> None:
        """The teacher on the student's device (ZeRO-3: partitioned for inference); the projection beside it."""
        if self.teacher is not None:
            from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

            if self.is_deepspeed_enabled and is_deepspeed_zero3_enabled():
                from trl.models.utils import prepare_deepspeed

                self.teacher.teacher.model = prepare_deepspeed(self.teacher.teacher.model, self.accelerator)
            else:
                self.teacher.teacher.model.to(self.accelerator.device)
        projector = self.layers.projector if self.layers is not None else None
        if projector is None:
            return
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise UserError("feature_loss with a student narrower than the teacher trains a projection outside the "
                            "sharded model, which DeepSpeed/FSDP do not see: train with DDP or one process, or "
                            "with a student as wide as the teacher")
        projector.to(self.accelerator.device)
        self.add_callback(ProjectorGrads(projector, average=self.accelerator.num_processes > 1))

    def _documents_as_padded_groups(self) -> bool:
        """Whether the student's forward runs a batch's documents as right-padded groups
        (:func:`~llmdistill.teacher.predicting_hidden`) instead of one packed sequence.

        With ``sdpa`` or ``eager`` attention a packed sequence of L tokens attends under an (L x L)
        block-diagonal mask: every document pays for the whole row's square (on the demo's 2,900-token
        batches of ~85-token documents, ~90% of a CPU step). As padded groups each document pays its
        own square. ``flash_attention_2`` runs packed sequences varlen and keeps them; so do students
        whose parameters are sharded (FSDP, ZeRO-3), where every process must make the same number of
        forward calls a step and the number of groups depends on the batch.
        """
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        attention = getattr(self.accelerator.unwrap_model(self.model).config, "_attn_implementation", "sdpa")
        sharded = self.is_fsdp_enabled or (self.is_deepspeed_enabled and is_deepspeed_zero3_enabled())
        return attention in ("sdpa", "eager") and not sharded

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The student's optimizer, plus the feature projection as one more parameter group (no weight decay)."""
        optimizer = super().create_optimizer(model)
        if self.layers is not None and self.layers.projector is not None:
            optimizer.add_param_group({"params": list(self.layers.projector.parameters()), "weight_decay": 0.0})
        return optimizer

    # ---- loss ---------------------------------------------------------------------------
    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | None:
        """Target tokens in the optimizer step: all accumulation micro-batches, summed over processes."""
        if not batch_samples:
            return None
        count = sum(int(b["target_index"].numel()) for b in batch_samples)
        count = torch.tensor(count, dtype=torch.float32, device=device)
        if self.accelerator.num_processes > 1:
            count = self.accelerator.reduce(count, reduction="sum")
        return count

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        schedule = current_schedule(self.args, self.state, self.loss_ema)
        inner = self.accelerator.unwrap_model(model)
        out = run_in_forward(model, inner, self._distill_forward, inner, inputs, schedule)
        if num_items_in_batch is None:  # a batch on its own: plain per-token mean
            loss = out.loss / max(int(out.n_tokens), 1)
        else:
            # Each process divides its summed loss by the global token count; DDP/DeepSpeed then
            # *average* gradients over processes, so multiply back by their number.
            loss = out.loss / num_items_in_batch.clamp(min=1) * self.accelerator.num_processes
        if model.training:
            self._record(inputs, out)
            self._follow_loss(out)
            self._last_schedule = schedule
        return (loss, None) if return_outputs else loss

    def _follow_loss(self, out: StepLoss) -> None:
        """Feed the running loss of ``loss_adaptive`` schedules (averaged over processes: they all move alike)."""
        a: TrainConfig = self.args
        kinds = (a.alpha_schedule, a.temperature_schedule, a.feature_weight_schedule, a.attention_weight_schedule)
        if "loss_adaptive" not in kinds:
            return
        summed = out.ce_sum if a.adaptive_loss == "ce" else out.kd_sum
        stats = torch.tensor([float(summed), float(out.n_tokens)], dtype=torch.float64, device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            stats = self.accelerator.reduce(stats, reduction="sum")
        if stats[1] > 0:
            self.loss_ema.update(float(stats[0] / stats[1]))

    def _distill_forward(self, inner: nn.Module, inputs: dict[str, torch.Tensor],
                         schedule: dict[str, float]) -> StepLoss:
        """Backbone -> hidden states of the predicting positions -> chunked loss (+ layer terms); runs inside the forward."""
        causal_lm = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
        spec = self.layers.spec(0) if self.layers is not None else None
        student: Captured | None = None
        target_index = inputs["target_index"]
        if spec is None and self._padded_groups:
            hidden, _ = predicting_hidden(causal_lm, inputs, max_tokens=inputs["input_ids"].shape[1])
        elif spec is None:
            hidden = causal_lm.base_model(
                input_ids=inputs["input_ids"], position_ids=inputs["position_ids"], use_cache=False
            ).last_hidden_state[0][target_index - 1]
        else:
            student = capture_forward(causal_lm.base_model, inputs["input_ids"], inputs["position_ids"], spec)
            hidden = student.last[target_index - 1]
        teacher_ids, teacher_logprobs, teacher = inputs.get("teacher_ids"), inputs.get("teacher_logprobs"), None
        if self.teacher is not None:
            teacher_spec = self.layers.spec(1) if self.layers is not None else CaptureSpec()
            teacher_ids, teacher_logprobs, teacher = self.teacher.signals(inputs, teacher_spec, self._padded_groups)
        head = causal_lm.get_output_embeddings()
        weight, bias = head.weight, head.bias
        if isinstance(weight, DTensor):  # FSDP2 keeps a sharded head outside its module's forward
            weight = weight.full_tensor()
            bias = bias.full_tensor() if bias is not None else None
        with maybe_gather_lm_head_ctx(weight, bias):  # ZeRO-3: gather the partitioned head
            out = chunked_distill_loss(
                hidden,
                weight,
                inputs["input_ids"][0, target_index],
                teacher_ids,
                teacher_logprobs,
                alpha=schedule["alpha"],
                temperature=schedule["temperature"],
                divergence=self.args.divergence,
                beta=self.args.jsd_beta,
                chunk_size=self.args.loss_chunk_size,
                lm_head_bias=bias,
                logit_transform=logit_transform(causal_lm.config),
            )
        loss, zero = out.loss, torch.zeros((), device=hidden.device)
        feature = attention = zero
        if self.layers is not None and student is not None and teacher is not None:
            feature, attention = self.layers.terms(student, teacher, target_index, inputs["position_ids"][0])
            loss = loss + schedule["feature_weight"] * feature + schedule["attention_weight"] * attention
        return StepLoss(loss, out.ce_sum, out.kd_sum, feature.detach(), attention.detach(), out.n_tokens)

    # ---- logging ------------------------------------------------------------------------
    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device) -> tuple[list, Any]:
        """The micro-batches of one optimizer step; the time spent waiting for them counts as data loading."""
        start = time.perf_counter()
        if self._window_start is None:
            self._window_start = start
        batches = list(itertools.islice(epoch_iterator, num_batches))
        self._data_wait += time.perf_counter() - start
        self._window_steps += 1
        return batches, self._get_num_items_in_batch(batches, device)

    def _record(self, inputs: dict[str, torch.Tensor], out: Any) -> None:
        n_tokens = inputs["input_ids"].shape[1]
        values = (out.ce_sum, out.kd_sum, out.feature_sum, out.attention_sum, out.n_tokens, n_tokens,
                  int(inputs["num_rows"]) * self.max_length)
        self._stats += torch.tensor([float(v) for v in values], dtype=torch.float64)
        self._stats_calls += 1
        self._tokens_since += float(out.n_tokens)

    @property
    def clock(self) -> RunClock | None:
        """The run's :class:`~llmdistill.checkpoints.RunClock` among the callbacks (with
        ``restore_callback_states_from_checkpoint`` transformers swaps in its own on a resume)."""
        return next((c for c in self.callback_handler.callbacks if isinstance(c, RunClock)), None)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # every process calls log at the same steps, so the all-reduce below is matched
        if self.model.training and self._stats_calls and "loss" in logs:
            logs.update(self._window_metrics())
            logs["logged_at"] = round(time.time(), 3)
            if self.clock is not None:  # the run's seconds so far, resumes included
                logs["elapsed_s"] = round(self.clock.elapsed, 3)
        super().log(logs, start_time)

    def _window_metrics(self) -> dict[str, float]:
        """Metrics of the steps since the last log: token counts summed over processes, costs of the slowest.

        ``tokens_per_s`` and ``data_wait_fraction`` are over the window's wall time, from the first
        batch fetch; ``data_wait_s`` is the mean wait per optimizer step for the batches (the
        DataLoader's workers decode the top-k ahead of the step: with them the wait is near 0);
        ``peak_rss_gib`` is the largest peak RSS of a process (:func:`peak_rss_bytes`) and
        ``peak_accelerator_gib`` the largest peak of allocated accelerator memory.
        """
        elapsed = time.perf_counter() - (self._window_start or time.perf_counter())
        stats = self._stats.to(self.accelerator.device)
        costs = torch.tensor([self._data_wait / max(self._window_steps, 1), self._data_wait / max(elapsed, 1e-9),
                              peak_rss_bytes() / GIB, self._peak_accelerator_bytes() / GIB],
                             dtype=torch.float64, device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            stats = self.accelerator.reduce(stats, reduction="sum")
            torch.distributed.all_reduce(costs, op=torch.distributed.ReduceOp.MAX)
        s = dict(zip(_STATS, stats.tolist(), strict=True))
        data_wait_s, data_wait_fraction, peak_rss_gib, peak_accelerator_gib = costs.tolist()
        self._stats.zero_()
        self._stats_calls = 0
        self._window_start, self._data_wait, self._window_steps = None, 0.0, 0
        n = max(s["n_targets"], 1.0)
        metrics = {
            "ce_loss": s["ce_sum"] / n,
            "kd_loss": s["kd_sum"] / n,
            "tokens_per_s": s["n_tokens"] / max(elapsed, 1e-9),
            "real_token_fraction": s["n_tokens"] / max(s["capacity"], 1.0),
            "target_fraction": s["n_targets"] / max(s["n_tokens"], 1.0),
            "alpha": self._last_schedule["alpha"],  # the values the window's last step used
            "temperature": self._last_schedule["temperature"],
            "data_wait_s": data_wait_s,
            "data_wait_fraction": data_wait_fraction,
            "peak_rss_gib": peak_rss_gib,
            "trained_tokens": self.trained_tokens(),  # running total, kept across a resume
        }
        if self.accelerator.device.type != "cpu":
            metrics["peak_accelerator_gib"] = peak_accelerator_gib
        if self.layers is not None:
            for term in (t for t, kind in (("feature", self.layers.feature), ("attention", self.layers.attention))
                         if kind != "none"):
                metrics[f"{term}_loss"] = s[f"{term}_sum"] / n
                metrics[f"{term}_weight"] = self._last_schedule[f"{term}_weight"]
        return metrics

    def trained_tokens(self) -> float:
        """Target tokens trained on so far, summed over the processes and over the runs before a resume
        (each checkpoint keeps the count: :data:`TOKENS_FILE`). A collective: every process calls it at
        the same point (a log, a checkpoint, the end of the run)."""
        since = torch.tensor([self._tokens_since], dtype=torch.float64, device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            since = self.accelerator.reduce(since, reduction="sum")
        self._tokens_counted += float(since.item())
        self._tokens_since = 0.0
        return self._tokens_counted

    def _peak_accelerator_bytes(self) -> int:
        device = self.accelerator.device
        return 0 if device.type == "cpu" else int(torch.accelerator.max_memory_allocated(device))

    # ---- checkpoints and the final model, written whole ---------------------------------
    def _main_process_pid(self) -> int:
        pid = [os.getpid()]
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(pid)
        return int(pid[0])

    def train(self, resume_from_checkpoint: str | bool | None = None, trial: Any = None,
              ignore_keys_for_eval: list[str] | None = None, **kwargs: Any):
        """Trainer.train; ``resume_from_checkpoint`` ``latest``/True takes the newest *complete* checkpoint.

        Raises:
            ConfigError: an explicit checkpoint path that is not complete (:func:`resolve_resume`).
        """
        resume = resolve_resume(resume_from_checkpoint, self.args.output_dir)
        if resume is not None:
            self._load_own_state(resume)
        return super().train(resume_from_checkpoint=resume, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval,
                             **kwargs)

    def _load_own_state(self, checkpoint: str) -> None:
        """What llmdistill adds to a checkpoint: the feature projection and the running loss of
        ``loss_adaptive`` schedules. Loaded here, before transformers loads the rest, for every
        backend: transformers' ``_load_from_checkpoint`` is skipped for DeepSpeed and FSDP."""
        if self.layers is not None:
            self.layers.load(checkpoint)
        ema = Path(checkpoint) / LOSS_EMA_FILE
        if ema.is_file():  # checkpoints older than loss_adaptive schedules have none: the average restarts
            self.loss_ema.load(json.loads(ema.read_text()))
        tokens, state = Path(checkpoint) / TOKENS_FILE, Path(checkpoint) / TRAINER_STATE
        if tokens.is_file():
            self._tokens_counted = float(json.loads(tokens.read_text())["trained_tokens"])
        elif state.is_file():  # an older checkpoint: its last logged count
            history = json.loads(state.read_text()).get("log_history", [])
            self._tokens_counted = next((float(h["trained_tokens"]) for h in reversed(history)
                                         if "trained_tokens" in h), 0.0)

    def _get_output_dir(self, trial: Any) -> str:
        # while _save_checkpoint runs, transformers writes `<this>/checkpoint-N`: the staging directory
        staging = getattr(self, "_staging_root", None)
        return str(staging) if staging is not None else super()._get_output_dir(trial)

    def _all_succeeded(self, ok: bool) -> bool:
        """Whether every process got here with ``ok`` (a barrier, so ranks fail together)."""
        if self.accelerator.num_processes <= 1:
            return ok
        flag = torch.tensor([1.0 if ok else 0.0], device=self.accelerator.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item() > 0)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """transformers' checkpoint save into a staging directory, sealed and renamed to ``checkpoint-N``."""
        run_dir = Path(super()._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging_root = run_dir / f".{name}.tmp-{self._owner_pid}"
        staged, final = staging_root / name, run_dir / name
        last_good = latest_complete_checkpoint(run_dir, warn=False) if self.args.should_save else None
        needed = self._checkpoint_bytes(last_good)
        error: BaseException | None = None
        self._staging_root = staging_root
        tokens = self.trained_tokens()  # every process saves at this step: the count's reduce is matched
        try:
            super()._save_checkpoint(model, trial)
            if self.args.should_save:
                (staged / LOSS_EMA_FILE).write_text(json.dumps(self.loss_ema.state()))
                (staged / TOKENS_FILE).write_text(json.dumps({"trained_tokens": tokens}))
                (staged / RUN_RECORD_FILE).write_text(json.dumps(self._run_record))
                (staged / LAYOUT_FILE).write_text(json.dumps(batch_layout(self.args)))
                if self.layers is not None:
                    self.layers.save(staged)  # the projection beside the weights and the optimizer that trains it
        except Exception as err:
            error = err
        finally:
            self._staging_root = None
        if not self._all_succeeded(error is None) and error is None:
            error = RuntimeError(f"another process failed to save {name}")
        if error is None and self.args.should_save:
            try:
                self._repoint_best_checkpoint(staging_root, run_dir, staged)
                seal_checkpoint(staged, self.state.global_step)
                publish_checkpoint(staged, final, self._owner_pid)
            except Exception as err:
                error = err
        if error is not None:
            intact = (f"the last good checkpoint {last_good} is intact" if last_good is not None
                      else "there is no earlier complete checkpoint")
            self._raise_save_error(error, f"train: saving {name}", staging_root, needed, intact)
        if self.args.should_save:
            shutil.rmtree(staging_root, ignore_errors=True)
            self._rotate_complete_checkpoints(run_dir, final)

    def _repoint_best_checkpoint(self, staging_root: Path, run_dir: Path, staged: Path) -> None:
        """transformers recorded the best checkpoint under the staging directory: point at its final name."""
        best = self.state.best_model_checkpoint
        if best and Path(best).parent == staging_root:
            self.state.best_model_checkpoint = str(run_dir / Path(best).name)
            self.state.save_to_json(str(staged / TRAINER_STATE))

    def _rotate_complete_checkpoints(self, run_dir: Path, newest: Path) -> None:
        """``save_total_limit`` over complete checkpoints only, keeping ``newest`` and the best one."""
        limit = self.args.save_total_limit
        if not limit or limit <= 0:
            return
        protected = {newest.resolve()}
        if self.state.best_model_checkpoint:
            protected.add(Path(self.state.best_model_checkpoint).resolve())
        complete = complete_checkpoints(run_dir, warn=False)
        excess = len(complete) - max(limit, sum(p.resolve() in protected for p in complete))
        for path in complete:
            if excess <= 0:
                break
            if path.resolve() not in protected:
                logger.info("deleting %s (save_total_limit=%d)", path, limit)
                set_aside_and_delete(path, self._owner_pid)
                excess -= 1

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Trainer.save_model; into ``args.output_dir`` (the final model) it is staged and swapped in whole."""
        target = output_dir if output_dir is not None else self.args.output_dir
        if getattr(self, "_staging_root", None) is not None or os.path.abspath(target) != os.path.abspath(self.args.output_dir):
            super().save_model(output_dir, _internal_call)
            return
        self.save_whole(lambda staging: super(DistillTrainer, self).save_model(str(staging), _internal_call=True))
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def save_whole(self, write: Callable[[Path], None], what: str = "train: saving the final model") -> None:
        """Run ``write(staging)`` on every process, then swap what it wrote into ``args.output_dir``.

        The old model in ``output_dir`` stays until the new one is complete and fsync'd; a full
        disk raises a UserError and leaves it untouched.
        """
        out = Path(self.args.output_dir)
        staging = out / f".model.tmp-{self._owner_pid}"
        sharded = self.is_deepspeed_enabled or self.is_fsdp_enabled  # every rank writes a part
        last_good = latest_complete_checkpoint(out, warn=False) if self.args.should_save else None
        if self.args.should_save:
            out.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(staging, ignore_errors=True)
        if sharded:
            self.accelerator.wait_for_everyone()
        try:
            write(staging)
            if sharded:
                self.accelerator.wait_for_everyone()
            if self.args.should_save:
                staging.mkdir(exist_ok=True)
                seal_model(staging, out)
        except Exception as err:
            intact = f"the previous model in {out} is untouched" + (
                f" and the last good checkpoint {last_good} is intact" if last_good is not None else "")
            self._raise_save_error(err, what, staging, self._param_bytes()[0], intact)
        if self.args.should_save:
            swap_in_model(staging, out)

    def _raise_save_error(self, err: BaseException, what: str, partial: Path, needed: int, intact: str) -> None:
        """Remove the partial copy; a full disk becomes a UserError saying what, where, how much and what is left."""
        full = is_disk_full(err, partial, needed)
        if self.args.should_save:
            shutil.rmtree(partial, ignore_errors=True)
        if not full:
            raise err
        free = free_bytes(partial.parent)
        raise UserError(
            f"{what}: no space left on the disk writing {partial}: it needs about {human_bytes(needed)} ({needed} bytes), "
            f"{human_bytes(free)} ({free} bytes) are free; the partial copy was removed and {intact}. Free some space "
            "(or lower save_total_limit), then rerun with resume_from_checkpoint: latest"
        ) from err

    def _param_bytes(self) -> tuple[int, int]:
        """(bytes of the model's parameters, bytes of fp32 Adam moments for the trainable ones)."""
        total = trainable = 0
        for p in self.accelerator.unwrap_model(self.model).parameters():
            numel = int(getattr(p, "ds_numel", p.numel()))  # ZeRO-3 keeps only a shard locally
            total += numel * p.element_size()
            trainable += 2 * numel * 4 if p.requires_grad else 0
        return total, trainable

    def _checkpoint_bytes(self, last_good: Path | None) -> int:
        """The size of the last complete checkpoint, or else weights plus optimizer moments."""
        if last_good is not None:
            return dir_bytes(last_good)
        weights, moments = self._param_bytes()
        return weights + (0 if self.args.save_only_model else moments)
