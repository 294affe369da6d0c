"""Distillation losses: pure functions on tensors (no files, configs or trainers).

The training objective per target token is::

    loss = alpha * T**2 * D(teacher_T || student_T) + (1 - alpha) * CE

summed over target rows (the caller divides by the global number of target tokens).

**The support.** The teacher is stored sparsely: for each row, its top-k token ids and their raw
(T=1) log-probs. Everything the teacher put outside those k ids is one *tail bucket* of mass
``1 - sum_i exp(lp_t[i])``. Both distributions are coarse-grained onto the same k+1 points — the k
teacher ids plus the bucket — and the divergence is taken there. For the student this is exact: its
log-prob of each id comes from a log-softmax over the full vocabulary, and its bucket is the summed
probability of every other token (a direct sum, so no ``1 - x`` cancellation).

**Temperature.** The teacher's distribution at temperature T is unknown beyond its top-k: tempering
needs every tail probability (``sum_v p_v**(1/T)``), not just their sum. We therefore temper the
coarse-grained (k+1)-point distributions, identically on both sides::

    t_T = log_softmax(t / T)   over [lp_t[1..k], log tail_t]
    s_T = log_softmax(s / T)   over [log p_s(id_1..k), log tail_s]

i.e. the bucket is tempered as if it were one token. This is exact at T=1, and exact for any T when
k covers the vocabulary (the bucket is empty). For T > 1 it gives the tail less weight than true
per-token tempering would (``tail**(1/T) <= sum_v p_v**(1/T)``), and more for T < 1. Because both
sides go through the same map, D is zero exactly when the student matches the teacher on the k+1
points, for every T — a student that equals the teacher is always a minimiser (up to terms of order
:data:`TEACHER_PROB_FLOOR` on points the teacher rules out, see below).

**Divergences** on the k+1 points, with q = exp(t_T) (teacher) and p = exp(s_T) (student); each is an
entry of :data:`DIVERGENCES`, the one registry of names that the configs take their choices from:

* ``forward_kl``: ``KL(q || p) = sum q (log q - log p)`` — mode-covering, the usual KD.
* ``reverse_kl``: ``KL(p || q) = sum p (log p - log q)`` — mode-seeking.
* ``jsd``: the generalised Jensen-Shannon divergence of GKD (Agarwal et al., 2023) with TRL's
  ``generalized_jsd_loss`` convention: ``m = beta * q + (1 - beta) * p`` and
  ``JSD_beta = beta * KL(q || m) + (1 - beta) * KL(p || m)``. As in TRL, ``beta = 0`` is defined as
  forward KL and ``beta = 1`` as reverse KL. Note JSD_beta itself tends to 0 at both ends (it scales
  like ``beta * KL(q || p)`` near 0), so these two endpoints are a switch, not a continuous limit.

**Numerics.** The teacher's bucket ``1 - sum_i exp(lp_t[i])`` is a difference of numbers close to 1,
so it is computed in float64 whatever the dtype of the inputs and only then cast (in float32 a tail of
~1e-6 came out 1-60% wrong). A teacher tail smaller than ``k * eps`` of its log-prob dtype (at most
1e-4) is rounding noise of the stored values, and is set to zero.

**Points the teacher rules out.** A teacher probability of zero (an empty bucket, a padded ``-inf``
top-k entry) makes reverse KL ``+inf`` in exact arithmetic. Every teacher probability on the k+1 points
is therefore floored at :data:`TEACHER_PROB_FLOOR` (``1e-30``), in log space and identically in float32
and float64: ``log q = max(log q, log 1e-30)``, before tempering. A student mass ``p`` on such a point
then costs a finite, dtype-independent ``p (log p - log 1e-30)`` at T=1 (about ``69 p`` nats, against
O(1) for ordinary mismatches): reverse KL pushes mass off the point hard, with a bounded gradient.
JSD with ``beta < 1`` is finite anyway (``m >= (1 - beta) p``) and forward KL gives such a point
weight ``<= 1e-30``, so for them the floor changes nothing measurable. The student's side is exact:
its k log-probs come from a log-softmax, and its bucket gets only the dtype's smallest normal number
(``finfo.tiny``) added, which matters only when the bucket is empty (k = V).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from enum import StrEnum
from typing import NamedTuple

import torch
import torch.nn.functional as F

#: Smallest probability the teacher is taken to give any of the k+1 points (see the module docstring,
#: "Points the teacher rules out"). Applied as ``max(log q, log(TEACHER_PROB_FLOOR))`` with the same
#: value in float32 and float64, so a loss does not depend on the dtype it is computed in. Why 1e-30:
#: it is a normal float32 number eight decades above ``finfo(float32).tiny`` (1.2e-38), so
#: ``exp(log 1e-30)`` and its tempered powers (T >= 1) are the same normal number in both dtypes, with
#: no subnormals that a GPU may flush to zero; it lies 14 decades below float64's epsilon, so it never
#: shifts a normaliser of order 1 in either dtype; and at T=1 it makes a ruled-out point cost
#: ``-log(1e-30) = 69`` nats per unit of student mass, far above an ordinary per-token divergence yet
#: with a bounded gradient. Teacher log-probs below ``log(1e-30) = -69.08`` (the codec stores down to
#: -1000) are raised to it; they carry less than 1e-30 of mass, which forward KL and JSD cannot see.
TEACHER_PROB_FLOOR = 1e-30
_LOG_TEACHER_FLOOR = math.log(TEACHER_PROB_FLOOR)


class Divergence(StrEnum):
    """The divergence names of :data:`DIVERGENCES` (see the module docstring for the formulas)."""

    FORWARD_KL = "forward_kl"
    REVERSE_KL = "reverse_kl"
    JSD = "jsd"


class DistillLossOutput(NamedTuple):
    """What :func:`chunked_distill_loss` returns.

    Attributes:
        loss: Scalar to back-propagate: ``alpha * T**2 * kd_sum + (1 - alpha) * ce_sum``, summed (not
            averaged) over rows.
        ce_sum: Detached scalar, the summed cross-entropy (T=1) of the target tokens.
        kd_sum: Detached scalar, the summed divergence D (without ``alpha`` and ``T**2``); 0 when no
            teacher tensors were given.
        n_tokens: Number of rows N that were summed.
    """

    loss: torch.Tensor
    ce_sum: torch.Tensor
    kd_sum: torch.Tensor
    n_tokens: int


# ----------------------------------------------------------------------------------------------
# The (k+1)-point support
# ----------------------------------------------------------------------------------------------


class LogitTransform(NamedTuple):
    """What a model does to its LM head's output ``z`` before the softmax::

        logits = softcap * tanh(scale * z / softcap)     (scale * z without a soft-cap)

    Gemma 2 soft-caps (``final_logit_softcapping``); Granite divides by ``logits_scaling`` and Cohere
    multiplies by ``logit_scale`` (:func:`llmdistill.teacher.logit_transform` reads it off a model's
    config). ``LogitTransform()`` is the identity, the case of most models.
    """

    scale: float = 1.0
    softcap: float | None = None

    @property
    def identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        """The logits of head outputs ``z`` (out of place, differentiable)."""
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    def apply_(self, z: torch.Tensor, with_slope: bool) -> torch.Tensor | None:
        """Turn head outputs ``z`` into logits in place. With ``with_slope`` and a soft-cap, also
        returns the slope ``dlogits/dz`` (one more (n, V) buffer); otherwise None (the slope is
        then the constant ``scale``)."""
        if self.scale != 1.0:
            z.mul_(self.scale)
        if self.softcap is None:
            return None
        z.div_(self.softcap).tanh_()
        slope = z.square().neg_().add_(1.0).mul_(self.scale) if with_slope else None  # s * (1 - tanh^2)
        z.mul_(self.softcap)
        return slope


#: The identity: the logits are the head's output (most models).
NO_TRANSFORM = LogitTransform()


def _tiny(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).tiny


def teacher_support_logprobs(teacher_logprobs: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The teacher's T=1 log-probs on the k ids plus the tail bucket.

    Args:
        teacher_logprobs: (n, k) raw (T=1) top-k log-probs, any floating dtype; ``-inf`` entries
            are allowed.
        dtype: Floating dtype of the result (default: that of ``teacher_logprobs``).

    Returns:
        (n, k+1) log-probs: the k entries, then ``log(tail)`` with ``tail = 1 - sum exp(teacher_logprobs)``
        computed in float64 (whatever the input dtype) and zeroed when below ``min(k * eps, 1e-4)`` (the
        rounding noise of k stored probabilities of the input dtype; capped so that a bfloat16 teacher
        does not lose a real tail). All k+1 entries are floored at ``log(TEACHER_PROB_FLOOR)``, the same
        value for every dtype, so none is ``-inf``.
    """
    dtype = dtype or teacher_logprobs.dtype
    k = teacher_logprobs.shape[-1]
    noise = min(k * torch.finfo(teacher_logprobs.dtype).eps, 1e-4)
    lp64 = teacher_logprobs.to(torch.float64)
    tail = -torch.expm1(torch.logsumexp(lp64, dim=-1).clamp(max=0.0))
    tail = torch.where(tail > noise, tail, torch.zeros_like(tail))
    log_tail = torch.log(tail).clamp(min=_LOG_TEACHER_FLOOR).to(dtype)  # log(0) = -inf -> the floor
    top = teacher_logprobs.to(dtype).clamp(min=_LOG_TEACHER_FLOOR)
    return torch.cat([top, log_tail.unsqueeze(-1)], dim=-1)


def student_support_logprobs(student_logits: torch.Tensor, teacher_ids: torch.Tensor) -> torch.Tensor:
    """The student's T=1 log-probs on the teacher's k ids plus the tail bucket (autograd-friendly).

    This materialises softmax over the vocabulary for the given rows; the chunked loss computes the
    same quantity inside its fused pass.

    Args:
        student_logits: (n, V) logits at T=1.
        teacher_ids: (n, k) int64 distinct token ids per row.

    Returns:
        (n, k+1) log-probs: ``log_softmax(logits)[ids]`` then ``log(sum of the other probs + tiny)``.
    """
    logp = F.log_softmax(student_logits, dim=-1)
    top = logp.gather(-1, teacher_ids)
    tail = logp.exp().scatter(-1, teacher_ids, 0.0).sum(-1)
    return torch.cat([top, torch.log(tail + _tiny(logp.dtype)).unsqueeze(-1)], dim=-1)


def sparse_divergence(
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    temperature: float = 1.0,
    divergence: Divergence | str = Divergence.FORWARD_KL,
    beta: float = 0.5,
) -> torch.Tensor:
    """Per-row divergence on the "top-k + tail bucket" support, both sides tempered there.

    Args:
        student_logprobs: (n, k+1) student T=1 log-probs on the teacher ids then the bucket, as made by
            :func:`student_support_logprobs`. Differentiable.
        teacher_logprobs: (n, k) raw (T=1) teacher top-k log-probs (the bucket is derived from them, and
            all k+1 points are floored at :data:`TEACHER_PROB_FLOOR`; see :func:`teacher_support_logprobs`).
        temperature: T > 0, applied to both sides on the k+1 points.
        divergence: A name of :data:`DIVERGENCES` (``forward_kl``, ``reverse_kl`` or ``jsd``).
        beta: JSD mixture weight in [0, 1] (TRL convention; 0 = forward KL, 1 = reverse KL).

    Returns:
        (n,) divergence per row, >= 0 (up to rounding), in the dtype of ``student_logprobs``.
    """
    t = teacher_support_logprobs(teacher_logprobs, dtype=student_logprobs.dtype)
    s_t = F.log_softmax(student_logprobs / temperature, dim=-1)
    t_t = F.log_softmax(t / temperature, dim=-1)
    return DIVERGENCES[Divergence(divergence)].per_row(s_t, t_t, beta)


# ----------------------------------------------------------------------------------------------
# The divergence registry: one entry per name, read by the configs for their choices and help
# ----------------------------------------------------------------------------------------------


def _forward_kl(s: torch.Tensor, t: torch.Tensor, beta: float) -> torch.Tensor:
    return (t.exp() * (t - s)).sum(-1)


def _reverse_kl(s: torch.Tensor, t: torch.Tensor, beta: float) -> torch.Tensor:
    return (s.exp() * (s - t)).sum(-1)


def _jsd(s: torch.Tensor, t: torch.Tensor, beta: float) -> torch.Tensor:
    if beta == 0.0:  # TRL's convention: the endpoints are forward and reverse KL (a switch, not a limit)
        return _forward_kl(s, t, beta)
    if beta == 1.0:
        return _reverse_kl(s, t, beta)
    m = torch.logaddexp(t + math.log(beta), s + math.log1p(-beta))
    return beta * (t.exp() * (t - m)).sum(-1) + (1.0 - beta) * (s.exp() * (s - m)).sum(-1)


class DivergenceSpec(NamedTuple):
    """One entry of :data:`DIVERGENCES`.

    Attributes:
        per_row: ``per_row(s, t, beta) -> (n,)``: D between the student's and the teacher's
            normalised, finite log-probs ``s`` and ``t``, both (n, m), over their last axis.
        help: One line for help texts.
    """

    per_row: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    help: str


#: Every divergence the KD term can use, by name: the single list the training and demo configs
#: accept (their choices and help texts are derived from it).
DIVERGENCES: dict[Divergence, DivergenceSpec] = {
    Divergence.FORWARD_KL: DivergenceSpec(_forward_kl, "KL(teacher || student), mode-covering, the usual KD"),
    Divergence.REVERSE_KL: DivergenceSpec(_reverse_kl, "KL(student || teacher), mode-seeking"),
    Divergence.JSD: DivergenceSpec(_jsd, "generalised Jensen-Shannon of GKD, mixture weight jsd_beta"),
}


def divergence_help() -> str:
    """``name (what it is) | ...`` for help texts."""
    return " | ".join(f"{name} ({spec.help})" for name, spec in DIVERGENCES.items())


def dense_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    divergence: Divergence | str = Divergence.FORWARD_KL,
    beta: float = 0.5,
) -> torch.Tensor:
    """Reference: per-row divergence between full tempered distributions (written like TRL's GKD loss).

    Materialises (n, V) tensors: for tests and benchmarks, not for training.

    Args:
        student_logits: (n, V) student logits at T=1.
        teacher_logits: (n, V) teacher logits (or log-probs) at T=1.
        temperature: T > 0; both sides use ``log_softmax(logits / T)``.
        divergence: ``forward_kl``, ``reverse_kl`` or ``jsd`` (written out here, independently of
            :data:`DIVERGENCES`).
        beta: JSD mixture weight (0 = forward KL, 1 = reverse KL).

    Returns:
        (n,) divergence per row.
    """
    div = Divergence(divergence)
    s = F.log_softmax(student_logits / temperature, dim=-1)
    t = F.log_softmax(teacher_logits / temperature, dim=-1)
    if div is Divergence.FORWARD_KL or (div is Divergence.JSD and beta == 0.0):
        return F.kl_div(s, t, reduction="none", log_target=True).sum(-1)
    if div is Divergence.REVERSE_KL or (div is Divergence.JSD and beta == 1.0):
        return F.kl_div(t, s, reduction="none", log_target=True).sum(-1)
    if div is not Divergence.JSD:
        raise NotImplementedError(f"dense_divergence has no reference for divergence {div.value!r}")
    b = torch.tensor(beta, dtype=s.dtype)
    m = torch.logsumexp(torch.stack([s + torch.log1p(-b), t + torch.log(b)]), dim=0)
    kl_teacher = F.kl_div(m, t, reduction="none", log_target=True).sum(-1)
    kl_student = F.kl_div(m, s, reduction="none", log_target=True).sum(-1)
    return beta * kl_teacher + (1.0 - beta) * kl_student


# ----------------------------------------------------------------------------------------------
# One chunk: loss terms and d(loss)/d(logits), in place on the chunk's logits buffer
# ----------------------------------------------------------------------------------------------


class _KDSpec(NamedTuple):
    alpha: float
    temperature: float
    divergence: Divergence
    beta: float
    transform: LogitTransform = NO_TRANSFORM


def _softmax_(logits: torch.Tensor) -> torch.Tensor:
    """Turn (n, V) logits into probabilities in place (one buffer, no temporaries); returns the lse (n,)."""
    row_max = logits.amax(dim=-1, keepdim=True)
    logits.sub_(row_max).exp_()
    total = logits.sum(dim=-1, keepdim=True)
    logits.div_(total)
    return (row_max + total.log()).squeeze(-1)


def _chunk_terms(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    teacher_ids: torch.Tensor | None,
    teacher_logprobs: torch.Tensor | None,
    spec: _KDSpec,
    want_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """CE and KD sums of one chunk, and d(loss)/d(logits) written over ``logits``.

    The KD part only needs the student's k+1 support log-probs ``s``; its gradient ``g = dL/ds`` comes
    from autograd on those small (n, k+1) tensors and is mapped back to the vocabulary analytically:
    with p the softmax, P the bucket mass and ``G = sum_i g_i + g_tail * P / (P + tiny)``,
    ``dL/dz_v = g_i - p_v * G`` for ``v = id_i`` and ``p_v * (g_tail / (P + tiny) - G)`` otherwise.
    CE adds ``(1 - alpha) * (p - onehot(target))``.

    Args:
        logits: (n, V) float logits at T=1; overwritten (probabilities, then the gradient).
        target_ids: (n,) int64 next tokens.
        teacher_ids: (n, k) int64 teacher top-k ids, or None (no KD).
        teacher_logprobs: (n, k) teacher T=1 log-probs, or None.
        spec: alpha, temperature, divergence, beta.
        want_grad: Whether to compute the gradient w.r.t. the logits.

    Returns:
        (ce_sum, kd_sum, grad_logits or None); grad_logits aliases ``logits``.
    """
    ce_coef = 1.0 - spec.alpha
    rows = torch.arange(logits.shape[0], device=logits.device)
    target_logit = logits[rows, target_ids]
    top_logits = logits.gather(1, teacher_ids) if teacher_ids is not None else None
    lse = _softmax_(logits)
    probs = logits
    ce_sum = (lse - target_logit).sum()
    kd_sum = torch.zeros((), dtype=logits.dtype, device=logits.device)
    if teacher_ids is None:
        if want_grad:
            probs.mul_(ce_coef)
            probs[rows, target_ids] -= ce_coef
        return ce_sum, kd_sum, probs if want_grad else None

    p_top = probs.gather(1, teacher_ids)
    probs.scatter_(1, teacher_ids, 0.0)  # probs now holds the tail (non-top-k) probabilities only
    p_tail = probs.sum(dim=-1)
    tail_denom = p_tail + _tiny(logits.dtype)
    support = torch.cat([top_logits - lse.unsqueeze(1), tail_denom.log().unsqueeze(1)], dim=1)
    with torch.enable_grad():
        support.requires_grad_(want_grad)
        kd = sparse_divergence(support, teacher_logprobs, temperature=spec.temperature,
                               divergence=spec.divergence, beta=spec.beta).sum()
        if want_grad:
            (g,) = torch.autograd.grad(kd * (spec.alpha * spec.temperature**2), support)
    if not want_grad:
        return ce_sum, kd.detach(), None

    g_top, g_tail = g[:, :-1], g[:, -1]
    big_g = g_top.sum(dim=1) + g_tail * p_tail / tail_denom
    probs.mul_((ce_coef + g_tail / tail_denom - big_g).unsqueeze(1))
    probs.scatter_(1, teacher_ids, (ce_coef - big_g).unsqueeze(1) * p_top + g_top)
    probs[rows, target_ids] -= ce_coef
    return ce_sum, kd.detach(), probs


# ----------------------------------------------------------------------------------------------
# The chunked loop and its autograd wrapper
# ----------------------------------------------------------------------------------------------


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(n, H) x (V, H) -> (n, V) float32 (float64 if the weight is) logits of one chunk."""
    logits = hidden.to(weight.dtype) @ weight.t()
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    if bias is not None:
        logits += bias
    return logits


def _run_chunks(hidden, weight, bias, target_ids, teacher_ids, teacher_logprobs, spec, chunk_size, grads):
    """Loop over row chunks; ``grads`` = (want_hidden, want_weight, want_bias).

    Returns:
        (ce_sum, kd_sum, grad_hidden | None, grad_weight | None, grad_bias | None), gradients of
        ``alpha*T^2*kd_sum + (1-alpha)*ce_sum``; weight and bias gradients accumulate in float32
        (float64 for a float64 weight).
    """
    want_h, want_w, want_b = grads
    want_grad = any(grads)
    acc_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    grad_h = torch.empty_like(hidden) if want_h else None
    grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if want_w else None
    grad_b = torch.zeros(weight.shape[0], dtype=acc_dtype, device=weight.device) if want_b else None
    ce_total = torch.zeros((), dtype=acc_dtype, device=hidden.device)
    kd_total = torch.zeros((), dtype=acc_dtype, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        h = hidden[rows]
        logits = _chunk_logits(h, weight, bias)
        slope = None if spec.transform.identity else spec.transform.apply_(logits, with_slope=want_grad)
        ce, kd, grad_logits = _chunk_terms(
            logits, target_ids[rows],
            None if teacher_ids is None else teacher_ids[rows],
            None if teacher_logprobs is None else teacher_logprobs[rows],
            spec, want_grad,
        )
        ce_total += ce
        kd_total += kd
        if want_grad and not spec.transform.identity:  # chain rule through the transform, to the head's output
            if slope is not None:
                grad_logits.mul_(slope)
            else:
                grad_logits.mul_(spec.transform.scale)
        if want_h:
            grad_h[rows] = grad_logits.to(weight.dtype) @ weight
        if want_w:
            grad_w.addmm_(grad_logits.t(), h.to(acc_dtype))
        if want_b:
            grad_b += grad_logits.sum(dim=0)
        del logits, grad_logits, slope  # free this chunk's (n, V) buffer before the next matmul allocates one
    return ce_total, kd_total, grad_h, grad_w, grad_b


class _ChunkedDistillFunction(torch.autograd.Function):
    """Computes the loss and its input gradients chunk by chunk in forward (as Liger's fused linear
    cross-entropy does), so the backward pass only rescales stored gradients and no chunk's (n, V)
    logits outlive their chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target_ids, teacher_ids, teacher_logprobs, spec, chunk_size):
        grads = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        ce, kd, grad_h, grad_w, grad_b = _run_chunks(
            hidden, weight, bias, target_ids, teacher_ids, teacher_logprobs, spec, chunk_size, grads
        )
        ctx.saved_grads = (grad_h, grad_w, grad_b)
        ctx.param_dtypes = (weight.dtype, None if bias is None else bias.dtype)
        loss = spec.alpha * spec.temperature**2 * kd + (1.0 - spec.alpha) * ce
        ctx.mark_non_differentiable(ce, kd)
        return loss, ce, kd

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kd):
        grad_h, grad_w, grad_b = ctx.saved_grads
        ctx.saved_grads = None  # hand the buffers over to autograd without an extra reference
        w_dtype, b_dtype = ctx.param_dtypes
        scaled = []
        for grad, dtype in ((grad_h, None), (grad_w, w_dtype), (grad_b, b_dtype)):
            if grad is not None:
                if not torch.equal(grad_loss, torch.ones_like(grad_loss)):
                    grad = grad.mul_(grad_loss.to(grad.dtype))
                grad = grad if dtype is None else grad.to(dtype)
            scaled.append(grad)
        return (*scaled, None, None, None, None, None)


# ----------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------


def chunked_distill_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    target_ids: torch.Tensor,
    teacher_ids: torch.Tensor | None,
    teacher_logprobs: torch.Tensor | None,
    *,
    alpha: float,
    temperature: float = 1.0,
    divergence: Divergence | str = Divergence.FORWARD_KL,
    beta: float = 0.5,
    chunk_size: int = 1024,
    lm_head_bias: torch.Tensor | None = None,
    logit_transform: LogitTransform = NO_TRANSFORM,
) -> DistillLossOutput:
    """Summed ``alpha * T**2 * D + (1 - alpha) * CE`` through the LM head, without (N, V) logits.

    Rows are processed ``chunk_size`` at a time: one matmul per chunk gives float32 logits, from which
    come the T=1 cross-entropy and the student's log-probs on the teacher's top-k + tail bucket (see the
    module docstring for D, the temperature and the bucket). When gradients are needed, they are
    computed for ``hidden``, ``lm_head_weight`` and ``lm_head_bias`` during the same pass, so peak
    memory is one chunk of logits plus the gradients themselves. A frozen head (LoRA) costs nothing
    extra; a trainable (tied) one gets a float32 gradient accumulator.

    Args:
        hidden: (N, H) final hidden states of the rows that predict a target (already shifted and
            masked), any floating dtype.
        lm_head_weight: (V, H) output projection (tied or not).
        target_ids: (N,) int64 ground-truth next tokens, all in [0, V).
        teacher_ids: (N, k) int64 teacher top-k ids, distinct per row; None for plain CE.
        teacher_logprobs: (N, k) float teacher raw (T=1) log-probs of ``teacher_ids``; None for plain CE.
        alpha: KD weight in [0, 1]; 0 is plain CE (teacher tensors optional: if given, kd_sum is still
            reported).
        temperature: T > 0 for the KD term (CE is always at T=1).
        divergence: A name of :data:`DIVERGENCES` (``forward_kl``, ``reverse_kl`` or ``jsd``). Teacher
            probabilities are floored at :data:`TEACHER_PROB_FLOOR`, so reverse KL stays finite (and the
            same in float32 and float64) where the teacher gives a point zero mass.
        beta: JSD mixture weight in [0, 1].
        chunk_size: Rows per chunk; peak extra memory is about ``chunk_size * V * 4`` bytes.
        lm_head_bias: Optional (V,) bias of the LM head.
        logit_transform: What the model does to the head's output before its softmax (a Gemma 2
            soft-cap, a Granite or Cohere scale; :class:`LogitTransform`). Student log-probs, CE and
            gradients are those of the transformed logits; a soft-cap costs one more chunk-sized buffer.

    Returns:
        :class:`DistillLossOutput` with the summed loss, detached ``ce_sum`` / ``kd_sum`` and ``n_tokens``.

    Raises:
        ValueError: On shapes that disagree, ids out of range, alpha/temperature/beta out of range,
            or missing teacher tensors when alpha > 0.
    """
    div = _check_inputs(hidden, lm_head_weight, lm_head_bias, target_ids, teacher_ids, teacher_logprobs,
                        alpha, temperature, divergence, beta, chunk_size)
    if not (math.isfinite(logit_transform.scale) and logit_transform.scale > 0) or not (
            logit_transform.softcap is None or logit_transform.softcap > 0):
        raise ValueError(f"logit_transform={logit_transform}: scale must be finite and > 0, softcap > 0 or None")
    spec = _KDSpec(float(alpha), float(temperature), div, float(beta), logit_transform)
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, lm_head_weight, lm_head_bias)
    ):
        loss, ce, kd = _ChunkedDistillFunction.apply(
            hidden, lm_head_weight, lm_head_bias, target_ids, teacher_ids, teacher_logprobs, spec, chunk_size
        )
    else:
        ce, kd, *_ = _run_chunks(hidden, lm_head_weight, lm_head_bias, target_ids, teacher_ids,
                                 teacher_logprobs, spec, chunk_size, (False, False, False))
        loss = spec.alpha * spec.temperature**2 * kd + (1.0 - spec.alpha) * ce
    return DistillLossOutput(loss=loss, ce_sum=ce.detach(), kd_sum=kd.detach(), n_tokens=hidden.shape[0])


def _check_inputs(hidden, weight, bias, target_ids, teacher_ids, teacher_logprobs,
                  alpha, temperature, divergence, beta, chunk_size) -> Divergence:
    """Validate :func:`chunked_distill_loss` arguments; returns the parsed divergence."""
    try:
        div = Divergence(divergence)
    except ValueError:
        raise ValueError(f"divergence={divergence!r}: use one of {[str(d) for d in DIVERGENCES]}") from None
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} is outside [0, 1]: the loss is alpha*T^2*KD + (1-alpha)*CE")
    if not temperature > 0.0:
        raise ValueError(f"temperature={temperature} must be > 0")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta={beta} is outside [0, 1] (JSD mixture weight)")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and lm_head_weight {tuple(weight.shape)} must be "
                         "(N, H) and (V, H) with the same H; flatten (batch, seq, H) to (N, H) first")
    n, vocab = hidden.shape[0], weight.shape[0]
    if bias is not None and tuple(bias.shape) != (vocab,):
        raise ValueError(f"lm_head_bias has shape {tuple(bias.shape)}, expected ({vocab},)")
    _check_ids("target_ids", target_ids, (n,), vocab)
    if (teacher_ids is None) != (teacher_logprobs is None):
        raise ValueError("pass both teacher_ids and teacher_logprobs, or neither")
    if teacher_ids is None:
        if alpha > 0.0:
            raise ValueError(f"alpha={alpha} > 0 needs teacher_ids and teacher_logprobs (the teacher's "
                             "top-k); pass them, or set alpha=0 for plain cross-entropy")
        return div
    if teacher_ids.dim() != 2 or not 1 <= teacher_ids.shape[1] <= vocab:
        raise ValueError(f"teacher_ids has shape {tuple(teacher_ids.shape)}, expected (N={n}, k) with "
                         f"1 <= k <= V={vocab}")
    _check_ids("teacher_ids", teacher_ids, (n, teacher_ids.shape[1]), vocab)
    if teacher_logprobs.shape != teacher_ids.shape or not teacher_logprobs.is_floating_point():
        raise ValueError(f"teacher_logprobs must be a float tensor shaped like teacher_ids "
                         f"{tuple(teacher_ids.shape)}, got {teacher_logprobs.dtype} {tuple(teacher_logprobs.shape)}")
    if n and bool((teacher_logprobs.isnan() | (teacher_logprobs > 1e-3)).any()):
        raise ValueError("teacher_logprobs must be log-probabilities (<= 0, no NaN); raw logits were given?")
    if n and bool((teacher_ids.sort(dim=1).values.diff(dim=1) == 0).any()):
        raise ValueError("teacher_ids repeat a token id within a row: top-k ids must be distinct")
    return div


def _check_ids(name: str, ids: torch.Tensor, shape: tuple[int, ...], vocab: int) -> None:
    if tuple(ids.shape) != shape or ids.is_floating_point() or ids.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor of shape {shape}, got {ids.dtype} "
                         f"{tuple(ids.shape)}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(f"{name} has ids outside [0, {vocab}) (min {int(ids.min())}, max {int(ids.max())}); "
                         "drop ignored positions (-100) before calling the loss")
