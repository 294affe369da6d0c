"""Intermediate-layer distillation losses: pure functions on tensors (no files, configs or trainers).

The output-layer objective (KD + CE) is in :mod:`llmdistill.losses`. The terms here compare the
inside of the two networks at pairs of mapped layers (:func:`map_layers`):

* **hidden states** (FitNets, TinyBERT, DistillKit's ``hs_mse``/``hs_cosine``):
  :func:`hidden_state_loss`, MSE or cosine distance between the (projected) student state and the
  teacher state of a layer pair;
* **attention distributions** (TinyBERT, MiniLM v1): :func:`attention_kl_loss`,
  ``KL(teacher || student)`` between the attention probabilities of a layer pair, heads matched by
  averaging groups of heads (:func:`head_groups_mean`) when their counts differ;
* **self-attention relations** (MiniLM v2): :func:`relation_kl_loss`, ``KL(teacher || student)``
  between the query-query, key-key and value-value relations ``softmax(x_i . x_j / sqrt(d))``
  computed on *relation heads*: the projected queries (keys, values) of all attention heads are
  concatenated and re-split into R heads, so the attention-head counts need not match.

**Rows and packing.** Every loss is *summed* over rows, one row per position that predicts a
target token (the rows of the KD loss, so the caller divides all terms by the same target count).
A packed sequence holds several documents, told apart by ``position_ids`` restarting at 0: a row
only ever sees the columns of its own document, up to its own position (:func:`document_mask`).
A packed row therefore gives exactly the sum of the losses of its documents run separately.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

FEATURE_LOSSES = ("mse", "cosine")
LAYER_MAP_KINDS = ("uniform", "last_k")


def map_layers(spec: str, student_layers: int, teacher_layers: int, last_k: int = 1) -> list[tuple[int, int]]:
    """Pairs ``(student_layer, teacher_layer)`` of 1-based block numbers (layer ``l`` is block ``l``'s output).

    Args:
        spec: ``uniform`` (student block ``i`` -> teacher block ``i * T // S``, so the last maps to the
            last), ``last_k`` (the last ``last_k`` blocks of each, in order) or explicit pairs
            ``"s:t,s:t"`` (``0`` is the embedding output; hidden-state losses only).
        student_layers: S, the student's number of blocks.
        teacher_layers: T, the teacher's number of blocks.
        last_k: the k of ``last_k``.

    Raises:
        ValueError: a malformed spec, or a layer outside the models, in one line.
    """
    if spec == "uniform":
        return [(i, i * teacher_layers // student_layers) for i in range(1, student_layers + 1)]
    if spec == "last_k":
        if not 1 <= last_k <= min(student_layers, teacher_layers):
            raise ValueError(f"layer_map_k={last_k}: last_k needs 1 <= k <= min(student {student_layers}, "
                             f"teacher {teacher_layers}) layers")
        return [(student_layers - last_k + i, teacher_layers - last_k + i) for i in range(1, last_k + 1)]
    pairs = []
    for item in spec.split(","):
        try:
            s, t = (int(x) for x in item.split(":"))
        except ValueError:
            raise ValueError(f"layer_map={spec!r}: expected uniform, last_k or pairs like '1:2,2:3' "
                             f"(student:teacher block numbers), got {item.strip()!r}") from None
        if not (0 <= s <= student_layers and 0 <= t <= teacher_layers):
            raise ValueError(f"layer_map={spec!r}: pair {s}:{t} is outside the student's 0..{student_layers} or "
                             f"the teacher's 0..{teacher_layers} blocks")
        pairs.append((s, t))
    return pairs


def document_mask(position_ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(N, L) bool: column ``j`` is visible from row ``rows[n]`` (same document, ``j <= rows[n]``).

    Args:
        position_ids: (L,) int64 positions restarting at 0 at each packed document.
        rows: (N,) int64 flat positions of the rows.
    """
    doc = torch.cumsum(position_ids == 0, dim=0)
    cols = torch.arange(len(position_ids), device=position_ids.device)
    return (doc[rows][:, None] == doc[None, :]) & (cols[None, :] <= rows[:, None])


def hidden_state_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """Summed per-row distance between (already projected) student and teacher hidden states.

    Args:
        student: (N, H) student states mapped to the teacher's width, any float dtype.
        teacher: (N, H) teacher states (no gradient is needed).
        kind: ``mse`` (mean over H of the squared difference) or ``cosine`` (``1 - cos``).

    Returns:
        Scalar float32: the sum over the N rows.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"student states {tuple(student.shape)} and teacher states {tuple(teacher.shape)} differ: "
                         "project the student to the teacher's width first")
    s, t = student.float(), teacher.float()
    if kind == "mse":
        return (s - t).pow(2).mean(dim=-1).sum()
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)).sum()
    raise ValueError(f"feature loss {kind!r}: use one of {list(FEATURE_LOSSES)}")


def head_groups_mean(probs: torch.Tensor, groups: int) -> torch.Tensor:
    """(heads, ...) -> (groups, ...): the mean of each run of ``heads // groups`` consecutive heads."""
    heads = probs.shape[0]
    if heads % groups:
        raise ValueError(f"{heads} heads cannot be split into {groups} groups")
    return probs.reshape(groups, heads // groups, *probs.shape[1:]).mean(dim=1)


def _masked_kl(teacher_logp: torch.Tensor, student_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over the visible columns of ``p_t (log p_t - log p_s)``: (..., N, L) -> (..., N)."""
    p_t = teacher_logp.exp()
    terms = torch.where(mask, p_t * (teacher_logp - student_logp), torch.zeros((), device=p_t.device))
    return terms.sum(dim=-1)


def attention_kl_loss(student_attn: torch.Tensor, teacher_attn: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed ``KL(teacher || student)`` of the attention distributions of the rows, heads matched.

    Both head counts are reduced to their greatest common divisor G by averaging consecutive heads
    (:func:`head_groups_mean`; a mixture of distributions is a distribution): 4 teacher heads against
    2 student heads compares the mean of teacher heads (0, 1) with student head 0 and (2, 3) with 1.
    The KL is averaged over the G groups.

    Args:
        student_attn: (Hs, N, L) student attention probabilities of the N rows (softmax over L).
        teacher_attn: (Ht, N, L) teacher attention probabilities.
        mask: (N, L) bool visible columns (:func:`document_mask`); masked entries hold probability 0.

    Returns:
        Scalar float32: the sum over the N rows.
    """
    groups = math.gcd(student_attn.shape[0], teacher_attn.shape[0])
    s = head_groups_mean(student_attn.float(), groups)
    t = head_groups_mean(teacher_attn.float(), groups)
    tiny = torch.finfo(torch.float32).tiny
    kl = _masked_kl(t.clamp_min(tiny).log(), s.clamp_min(tiny).log(), mask)  # (G, N)
    return kl.mean(dim=0).sum()


def relation_logprobs(x: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor, heads: int) -> torch.Tensor:
    """MiniLM v2 self-attention relation of ``x`` on ``heads`` relation heads: (R, N, L) log-probs.

    Args:
        x: (L, D) projected queries, keys or values of all positions (all attention heads concatenated).
        rows: (N,) flat positions of the rows.
        mask: (N, L) bool visible columns.
        heads: R, must divide D.
    """
    length, width = x.shape
    if width % heads:
        raise ValueError(f"relation_heads={heads} does not divide the projection width {width}")
    d = width // heads
    xh = x.float().reshape(length, heads, d).transpose(0, 1)  # (R, L, d)
    scores = xh[:, rows] @ xh.transpose(1, 2) / math.sqrt(d)  # (R, N, L)
    scores = scores.masked_fill(~mask, torch.finfo(torch.float32).min)  # exp() of it is exactly 0
    return torch.log_softmax(scores, dim=-1)


def relation_kl_loss(student_qkv: tuple[torch.Tensor, ...], teacher_qkv: tuple[torch.Tensor, ...],
                     rows: torch.Tensor, mask: torch.Tensor, heads: int) -> torch.Tensor:
    """Summed MiniLM v2 relation loss: ``KL(teacher || student)`` of the Q-Q, K-K and V-V relations.

    Averaged over the R relation heads and the three relations, summed over the rows.

    Args:
        student_qkv: (q, k, v), each (L, D_s) with D_s divisible by ``heads``.
        teacher_qkv: (q, k, v), each (L, D_t).
        rows: (N,) flat positions of the rows.
        mask: (N, L) bool visible columns (:func:`document_mask`).
        heads: R relation heads.

    Returns:
        Scalar float32.
    """
    total = torch.zeros((), dtype=torch.float32, device=rows.device)
    for s, t in zip(student_qkv, teacher_qkv, strict=True):
        kl = _masked_kl(relation_logprobs(t, rows, mask, heads), relation_logprobs(s, rows, mask, heads), mask)
        total = total + kl.mean(dim=0).sum()
    return total / len(student_qkv)
