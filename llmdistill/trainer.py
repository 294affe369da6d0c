"""The distillation trainer: TRL's SFTTrainer with a sparse top-k KD + CE loss.

Only what distillation needs is overridden:

* ``compute_loss`` runs the student backbone, keeps the hidden states that predict a target
  token and hands them with the LM-head weight to :func:`llmdistill.losses.chunked_distill_loss`
  (logits are built chunk by chunk there; the model is never called with labels);
* ``_get_num_items_in_batch`` counts the target tokens of the whole optimizer step (all
  gradient-accumulation micro-batches, all processes), so every token weighs the same whatever
  the packing, accumulation or world size;
* ``log`` adds ``ce_loss``, ``kd_loss``, ``tokens_per_s``, ``real_token_fraction``,
  ``target_fraction``, ``alpha`` and ``temperature``.

The loss runs *inside* the wrapped model's forward (:func:`run_in_forward`): DDP only arms its
gradient all-reduce in its own forward, and FSDP/ZeRO-3 only gather sharded weights there.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from trl import SFTTrainer
from trl.trainer.utils import maybe_gather_lm_head_ctx

from llmdistill.config.train import TrainConfig
from llmdistill.losses import chunked_distill_loss

_STATS = ("ce_sum", "kd_sum", "n_targets", "n_tokens", "capacity")


def schedule_value(kind: str, start: float, end: float, progress: float, warmup_ratio: float = 1.0) -> float:
    """A scheduled scalar at ``progress`` in [0, 1] of the run.

    Args:
        kind: ``constant`` (always ``end``), ``linear_warmup`` (``start`` -> ``end`` over the
            first ``warmup_ratio`` of the run, then ``end``), ``linear`` or ``cosine``
            (``start`` -> ``end`` over the whole run).
        start: value at progress 0.
        end: final value.
        progress: fraction of the optimizer steps done.
        warmup_ratio: length of the warm-up for ``linear_warmup``.
    """
    p = min(max(progress, 0.0), 1.0)
    if kind == "constant":
        return end
    if kind == "linear_warmup":
        frac = 1.0 if warmup_ratio <= 0 else min(p / warmup_ratio, 1.0)
        return start + (end - start) * frac
    if kind == "linear":
        return start + (end - start) * p
    if kind == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * p))
    raise ValueError(f"unknown schedule {kind!r}")


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


class DistillTrainer(SFTTrainer):
    """SFTTrainer whose loss is ``alpha*T^2*D(teacher_T||student_T) + (1-alpha)*CE`` per target token.

    Expects batches from :class:`llmdistill.collate.DistillCollator` and ``args`` a
    :class:`~llmdistill.config.train.TrainConfig`. ``max_length`` is the packed-row capacity
    of the built shards (for the real-token fraction), not ``args.max_length``: the SFTConfig
    options of TRL's data preparation and loss that this trainer replaces are refused by
    TrainConfig (:data:`~llmdistill.config.train.UNSUPPORTED_SFT_FIELDS`).
    """

    def __init__(self, *args: Any, max_length: int, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.max_length = max_length
        # the loss is divided by the token count of the whole optimizer step (see compute_loss)
        self.loss_is_scaled_for_ga = True
        self._stats = torch.zeros(len(_STATS), dtype=torch.float64)
        self._stats_calls = 0
        self._window_start = time.perf_counter()
        self._last_schedule = (self.current_alpha(), self.current_temperature())

    # ---- schedules ----------------------------------------------------------------------
    def _progress(self) -> float:
        return self.state.global_step / max(self.state.max_steps, 1)

    def current_alpha(self) -> float:
        a: TrainConfig = self.args
        return schedule_value(a.alpha_schedule, a.alpha_start, a.alpha, self._progress(), a.alpha_warmup_ratio)

    def current_temperature(self) -> float:
        a: TrainConfig = self.args
        return schedule_value(a.temperature_schedule, a.temperature_start, a.temperature, self._progress())

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
        alpha, temperature = self.current_alpha(), self.current_temperature()
        inner = self.accelerator.unwrap_model(model)
        out = run_in_forward(model, inner, self._distill_forward, inner, inputs, alpha, temperature)
        if num_items_in_batch is None:  # a batch on its own: plain per-token mean
            loss = out.loss / max(int(out.n_tokens), 1)
        else:
            # Each process divides its summed loss by the global token count; DDP/DeepSpeed then
            # *average* gradients over processes, so multiply back by their number.
            loss = out.loss / num_items_in_batch.clamp(min=1) * self.accelerator.num_processes
        if model.training:
            self._record(inputs, out)
            self._last_schedule = (alpha, temperature)
        return (loss, None) if return_outputs else loss

    def _distill_forward(self, inner: nn.Module, inputs: dict[str, torch.Tensor], alpha: float, temperature: float):
        """Backbone -> hidden states of the predicting positions -> chunked loss (runs inside the forward)."""
        causal_lm = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
        hidden = causal_lm.base_model(
            input_ids=inputs["input_ids"], position_ids=inputs["position_ids"], use_cache=False
        ).last_hidden_state[0]  # (L, H)
        target_index = inputs["target_index"]
        head = causal_lm.get_output_embeddings()
        weight, bias = head.weight, head.bias
        if isinstance(weight, DTensor):  # FSDP2 keeps a sharded head outside its module's forward
            weight = weight.full_tensor()
            bias = bias.full_tensor() if bias is not None else None
        with maybe_gather_lm_head_ctx(weight, bias):  # ZeRO-3: gather the partitioned head
            return chunked_distill_loss(
                hidden[target_index - 1],
                weight,
                inputs["input_ids"][0, target_index],
                inputs.get("teacher_ids"),
                inputs.get("teacher_logprobs"),
                alpha=alpha,
                temperature=temperature,
                divergence=self.args.divergence,
                beta=self.args.jsd_beta,
                chunk_size=self.args.loss_chunk_size,
                lm_head_bias=bias,
            )

    # ---- logging ------------------------------------------------------------------------
    def training_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self._stats_calls == 0:  # the first micro-batch of a logging window starts its clock
            self._window_start = time.perf_counter()
        return super().training_step(*args, **kwargs)

    def _record(self, inputs: dict[str, torch.Tensor], out: Any) -> None:
        n_tokens = inputs["input_ids"].shape[1]
        values = (out.ce_sum, out.kd_sum, out.n_tokens, n_tokens, int(inputs["num_rows"]) * self.max_length)
        self._stats += torch.tensor([float(v) for v in values], dtype=torch.float64)
        self._stats_calls += 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # every process calls log at the same steps, so the all-reduce below is matched
        if self.model.training and self._stats_calls and "loss" in logs:
            logs.update(self._window_metrics())
        super().log(logs, start_time)

    def _window_metrics(self) -> dict[str, float]:
        """Metrics of the steps since the last log, summed over processes."""
        stats = self._stats.to(self.accelerator.device)
        if self.accelerator.num_processes > 1:
            stats = self.accelerator.reduce(stats, reduction="sum")
        s = dict(zip(_STATS, stats.tolist(), strict=True))
        elapsed = time.perf_counter() - self._window_start
        self._stats.zero_()
        self._stats_calls = 0
        n = max(s["n_targets"], 1.0)
        return {
            "ce_loss": s["ce_sum"] / n,
            "kd_loss": s["kd_sum"] / n,
            "tokens_per_s": s["n_tokens"] / max(elapsed, 1e-9),
            "real_token_fraction": s["n_tokens"] / max(s["capacity"], 1.0),
            "target_fraction": s["n_targets"] / max(s["n_tokens"], 1.0),
            "alpha": self._last_schedule[0],  # the values the window's last step used
            "temperature": self._last_schedule[1],
        }
