"""Intermediate-layer losses (:mod:`llmdistill.layer_losses`) against references written with loops."""

from __future__ import annotations

import math

import pytest
import torch

from llmdistill.layer_losses import (
    attention_kl_loss,
    document_mask,
    hidden_state_loss,
    map_layers,
    relation_kl_loss,
)

POSITIONS = [0, 1, 2, 0, 1, 2, 3, 0, 1]  # three packed documents: 3, 4 and 2 tokens


def _pos() -> torch.Tensor:
    return torch.tensor(POSITIONS)


def _visible(pos: list[int], i: int) -> list[int]:
    """Columns row i may see: its own document, up to itself."""
    start = i - pos[i]
    return list(range(start, i + 1))


def _causal_softmax(scores: torch.Tensor, pos: list[int]) -> torch.Tensor:
    """(H, L, L) attention probabilities within each document, by hand."""
    out = torch.zeros_like(scores)
    for h in range(scores.shape[0]):
        for i in range(scores.shape[1]):
            cols = _visible(pos, i)
            out[h, i, cols] = torch.softmax(scores[h, i, cols], dim=0)
    return out


@pytest.mark.unit
def test_layer_maps():
    assert map_layers("uniform", 2, 3) == [(1, 1), (2, 3)]
    assert map_layers("uniform", 3, 6) == [(1, 2), (2, 4), (3, 6)]
    assert map_layers("last_k", 2, 3, last_k=2) == [(1, 2), (2, 3)]
    assert map_layers("0:0, 2:3", 2, 3) == [(0, 0), (2, 3)]
    with pytest.raises(ValueError, match="pair 3:1 is outside"):
        map_layers("3:1", 2, 3)
    with pytest.raises(ValueError, match="got '1'"):
        map_layers("1", 2, 3)
    with pytest.raises(ValueError, match="layer_map_k=3"):
        map_layers("last_k", 2, 3, last_k=3)


@pytest.mark.unit
def test_document_mask_is_causal_within_each_document():
    rows = torch.tensor([1, 3, 5, 8])
    mask = document_mask(_pos(), rows)
    for n, i in enumerate(rows.tolist()):
        assert mask[n].nonzero().flatten().tolist() == _visible(POSITIONS, i)


@pytest.mark.unit
def test_hidden_state_losses_match_loops():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    mse = sum(sum((s[n, d] - t[n, d]) ** 2 for d in range(7)) / 7 for n in range(5))
    assert hidden_state_loss(s, t, "mse").item() == pytest.approx(float(mse), rel=1e-6)
    cos = 0.0
    for n in range(5):
        dot = sum(float(s[n, d] * t[n, d]) for d in range(7))
        cos += 1 - dot / (math.sqrt(sum(float(x) ** 2 for x in s[n])) * math.sqrt(sum(float(x) ** 2 for x in t[n])))
    assert hidden_state_loss(s, t, "cosine").item() == pytest.approx(cos, rel=1e-5)
    assert hidden_state_loss(t, t, "cosine").item() == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError, match="project the student"):
        hidden_state_loss(s[:, :3], t, "mse")


@pytest.mark.unit
def test_attention_kl_averages_teacher_heads_in_groups():
    g = torch.Generator().manual_seed(1)
    length = len(POSITIONS)
    student = _causal_softmax(torch.randn(2, length, length, generator=g), POSITIONS)
    teacher = _causal_softmax(torch.randn(4, length, length, generator=g), POSITIONS)
    rows = torch.tensor([2, 4, 6, 8])
    got = attention_kl_loss(student[:, rows], teacher[:, rows], document_mask(_pos(), rows))
    want = 0.0
    for i in rows.tolist():
        for h in range(2):  # student head h <-> mean of teacher heads 2h, 2h+1
            for j in _visible(POSITIONS, i):
                q = (float(teacher[2 * h, i, j]) + float(teacher[2 * h + 1, i, j])) / 2
                want += q * (math.log(q) - math.log(float(student[h, i, j]))) / 2
    assert got.item() == pytest.approx(want, rel=1e-5)
    assert attention_kl_loss(teacher[:, rows], teacher[:, rows], document_mask(_pos(), rows)).item() == \
        pytest.approx(0.0, abs=1e-6)


@pytest.mark.unit
def test_attention_kl_with_coprime_head_counts_compares_head_means():
    g = torch.Generator().manual_seed(2)
    length = len(POSITIONS)
    student = _causal_softmax(torch.randn(2, length, length, generator=g), POSITIONS)
    teacher = _causal_softmax(torch.randn(3, length, length, generator=g), POSITIONS)
    rows = torch.tensor([6])
    got = attention_kl_loss(student[:, rows], teacher[:, rows], document_mask(_pos(), rows))
    q = teacher[:, 6].mean(0)
    p = student[:, 6].mean(0)
    cols = _visible(POSITIONS, 6)
    want = sum(float(q[j]) * (math.log(float(q[j])) - math.log(float(p[j]))) for j in cols)
    assert got.item() == pytest.approx(want, rel=1e-5)


def _relation_reference(sq, tq, rows, heads):
    """MiniLM v2 relation KL by loops: per relation, per relation head, per row, per visible column."""
    total = 0.0
    for s, t in zip(sq, tq, strict=True):
        per_relation = 0.0
        for r in range(heads):
            ds, dt = s.shape[1] // heads, t.shape[1] // heads
            for i in rows:
                cols = _visible(POSITIONS, i)

                def dist(x, d, i=i, cols=cols, r=r):
                    part = x[:, r * d:(r + 1) * d]
                    scores = torch.tensor([float(part[i] @ part[j]) / math.sqrt(d) for j in cols])
                    return torch.softmax(scores.double(), 0)

                q, p = dist(t, dt), dist(s, ds)
                per_relation += float((q * (q.log() - p.log())).sum()) / heads
        total += per_relation
    return total / 3


@pytest.mark.unit
def test_relation_kl_matches_loops_with_different_widths():
    g = torch.Generator().manual_seed(3)
    length = len(POSITIONS)
    student = tuple(torch.randn(length, 4, generator=g) for _ in range(3))  # D_s = 4
    teacher = tuple(torch.randn(length, 12, generator=g) for _ in range(3))  # D_t = 12: heads need not match
    rows = torch.tensor([1, 2, 5, 6, 8])
    got = relation_kl_loss(student, teacher, rows, document_mask(_pos(), rows), heads=2)
    assert got.item() == pytest.approx(_relation_reference(student, teacher, rows.tolist(), 2), rel=1e-5)
    with pytest.raises(ValueError, match="relation_heads=3 does not divide"):
        relation_kl_loss(student, teacher, rows, document_mask(_pos(), rows), heads=3)


@pytest.mark.unit
def test_packed_rows_equal_documents_run_separately():
    """Attention and relation terms of a packed sequence = the sum over its documents alone (and gradients)."""
    g = torch.Generator().manual_seed(4)
    length = len(POSITIONS)
    scores = torch.randn(2, length, length, generator=g, requires_grad=True)
    teacher = _causal_softmax(torch.randn(2, length, length, generator=g), POSITIONS)
    xs = torch.randn(length, 4, generator=g, requires_grad=True)
    xt = torch.randn(length, 6, generator=g)
    rows = torch.tensor([1, 2, 4, 5, 6, 8])

    def terms(pos, scores, teacher, xs, xt, rows):
        probs = torch.softmax(scores.masked_fill(~document_mask(pos, torch.arange(len(pos))), -1e9), -1)
        mask = document_mask(pos, rows)
        return (attention_kl_loss(probs[:, rows], teacher[:, rows], mask)
                + relation_kl_loss((xs,) * 3, (xt,) * 3, rows, mask, heads=2))

    packed = terms(_pos(), scores, teacher, xs, xt, rows)
    grads = torch.autograd.grad(packed, (scores, xs))
    separate = torch.zeros(())
    for a, b in ((0, 3), (3, 7), (7, 9)):
        keep = rows[(rows >= a) & (rows < b)] - a
        separate = separate + terms(_pos()[a:b], scores[:, a:b, a:b], teacher[:, a:b, a:b], xs[a:b], xt[a:b], keep)
    separate_grads = torch.autograd.grad(separate, (scores, xs))
    assert packed.item() == pytest.approx(separate.item(), rel=1e-6)
    for got, want in zip(grads, separate_grads, strict=True):
        assert torch.allclose(got, want, atol=1e-7)
    leaky = terms(torch.arange(length), scores, teacher, xs, xt, rows)  # one running document: context leaks
    assert abs(leaky.item() - packed.item()) > 1e-3
