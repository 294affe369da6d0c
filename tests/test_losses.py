"""llmdistill.losses against dense references, on random tensors (float64 unless stated)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llmdistill.losses import (
    DIVERGENCES,
    TEACHER_PROB_FLOOR,
    Divergence,
    chunked_distill_loss,
    dense_divergence,
    divergence_help,
    sparse_divergence,
    student_support_logprobs,
    teacher_support_logprobs,
)

pytestmark = pytest.mark.unit

N, H, V = 23, 12, 97
DIVERGENCE_CASES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("jsd", 0.0), ("jsd", 1.0)]


def make_batch(seed: int, k: int, n: int = N, vocab: int = V, dtype=torch.float64, teacher_scale: float = 3.0):
    """Student hidden/head/bias (requiring grad), targets, dense teacher logits and their top-k."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, H, generator=g, dtype=dtype).requires_grad_()
    weight = torch.randn(vocab, H, generator=g, dtype=dtype).requires_grad_()
    bias = (0.5 * torch.randn(vocab, generator=g, dtype=dtype)).requires_grad_()
    targets = torch.randint(0, vocab, (n,), generator=g)
    teacher_logits = teacher_scale * torch.randn(n, vocab, generator=g, dtype=dtype)
    top_lp, top_ids = F.log_softmax(teacher_logits, dim=-1).topk(k, dim=-1)
    return hidden, weight, bias, targets, teacher_logits, top_ids, top_lp


def grads_of(loss: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, tensors))


def assert_same(actual, expected, atol=1e-5, rtol=1e-7):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("divergence,beta", DIVERGENCE_CASES)
@pytest.mark.parametrize("temperature", [0.7, 1.0, 2.5])
def test_full_vocab_topk_equals_dense_reference(divergence, beta, temperature):
    hidden, weight, bias, targets, t_logits, ids, lp = make_batch(0, k=V)
    alpha = 0.7
    out = chunked_distill_loss(hidden, weight, targets, ids, lp, alpha=alpha, temperature=temperature,
                               divergence=divergence, beta=beta, chunk_size=5, lm_head_bias=bias)
    logits = hidden @ weight.T + bias
    kd = dense_divergence(logits, t_logits, temperature=temperature, divergence=divergence, beta=beta).sum()
    ce = F.cross_entropy(logits, targets, reduction="sum")
    ref = alpha * temperature**2 * kd + (1 - alpha) * ce

    assert_same(out.loss, ref)
    assert_same(out.kd_sum, kd.detach())
    assert_same(out.ce_sum, ce.detach())
    assert out.n_tokens == N
    for got, want in zip(grads_of(out.loss, hidden, weight, bias), grads_of(ref, hidden, weight, bias), strict=True):
        assert_same(got, want)


@pytest.mark.parametrize("chunk_size", [1, 4, N, 1000])
def test_alpha_zero_is_plain_cross_entropy(chunk_size):
    hidden, weight, bias, targets, *_ = make_batch(1, k=5)
    out = chunked_distill_loss(hidden, weight, targets, None, None, alpha=0.0, chunk_size=chunk_size,
                               lm_head_bias=bias)
    ref = F.cross_entropy(hidden @ weight.T + bias, targets, reduction="sum")
    assert_same(out.loss, ref)
    assert out.kd_sum.item() == 0.0
    for got, want in zip(grads_of(out.loss, hidden, weight, bias), grads_of(ref, hidden, weight, bias), strict=True):
        assert_same(got, want)


def test_alpha_zero_with_teacher_reports_kd_but_trains_on_ce_only():
    hidden, weight, _, targets, _, ids, lp = make_batch(2, k=6)
    out = chunked_distill_loss(hidden, weight, targets, ids, lp, alpha=0.0, temperature=2.0)
    ref = F.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    assert_same(out.loss, ref)
    assert out.kd_sum.item() > 0
    assert_same(grads_of(out.loss, hidden)[0], grads_of(ref, hidden)[0])


@pytest.mark.parametrize("divergence,beta", DIVERGENCE_CASES)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_topk_with_tail_matches_autograd_reference(divergence, beta, temperature):
    """k < V: the fused chunk gradient equals autograd through the (k+1)-point support."""
    hidden, weight, bias, targets, _, ids, lp = make_batch(3, k=8, teacher_scale=1.0)
    tail = 1 - lp.exp().sum(-1)
    assert bool((tail > 0.2).all()), "rows must carry real tail mass for this test to mean something"
    alpha = 0.4
    out = chunked_distill_loss(hidden, weight, targets, ids, lp, alpha=alpha, temperature=temperature,
                               divergence=divergence, beta=beta, chunk_size=6, lm_head_bias=bias)
    logits = hidden @ weight.T + bias
    kd = sparse_divergence(student_support_logprobs(logits, ids), lp, temperature=temperature,
                           divergence=divergence, beta=beta).sum()
    ref = alpha * temperature**2 * kd + (1 - alpha) * F.cross_entropy(logits, targets, reduction="sum")
    assert_same(out.loss, ref)
    for got, want in zip(grads_of(out.loss, hidden, weight, bias), grads_of(ref, hidden, weight, bias), strict=True):
        assert_same(got, want)


@pytest.mark.parametrize("divergence", list(Divergence))
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_kd_is_zero_when_student_is_the_teacher(divergence, temperature):
    """Teacher top-k taken from the student's own distribution: zero divergence and zero KD gradient."""
    hidden, weight, _, targets, *_ = make_batch(4, k=1)
    with torch.no_grad():
        lp, ids = F.log_softmax(hidden @ weight.T, dim=-1).topk(10, dim=-1)
    out = chunked_distill_loss(hidden, weight, targets, ids, lp, alpha=1.0, temperature=temperature,
                               divergence=divergence, chunk_size=7)
    assert abs(out.kd_sum.item()) < 1e-10
    for grad in grads_of(out.loss, hidden, weight):
        assert grad.abs().max().item() < 1e-8


@pytest.mark.parametrize("divergence,beta", DIVERGENCE_CASES)
@pytest.mark.parametrize("k", [1, 5, V])
def test_divergence_is_nonnegative_per_row(divergence, beta, k):
    _, _, _, _, t_logits, ids, lp = make_batch(5, k=k)
    student = torch.randn(N, V, dtype=torch.float64) * 2
    for temperature in (0.5, 1.0, 4.0):
        rows = sparse_divergence(student_support_logprobs(student, ids), lp, temperature=temperature,
                                 divergence=divergence, beta=beta)
        assert rows.shape == (N,)
        assert bool((rows >= -1e-12).all())
        dense = dense_divergence(student, t_logits, temperature=temperature, divergence=divergence, beta=beta)
        assert bool((dense >= -1e-12).all())


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_dense_reference_follows_trl_generalized_jsd(beta):
    gkd = pytest.importorskip("trl.experimental.gkd")
    g = torch.Generator().manual_seed(6)
    student, teacher = torch.randn(2, 3, 5, V, generator=g, dtype=torch.float64)
    ours = dense_divergence(student.reshape(-1, V), teacher.reshape(-1, V), temperature=1.5,
                            divergence="jsd", beta=beta).sum()
    trl = gkd.GKDTrainer.generalized_jsd_loss(student, teacher, beta=beta, temperature=1.5, reduction="sum")
    assert_same(ours, trl)


def test_chunk_size_does_not_change_the_result():
    hidden, weight, _, targets, _, ids, lp = make_batch(7, k=9)
    results = []
    for chunk_size in (1, 3, 10, N, 4 * N):
        out = chunked_distill_loss(hidden, weight, targets, ids, lp, alpha=0.5, temperature=2.0,
                                   chunk_size=chunk_size)
        results.append((out.loss.detach(), *grads_of(out.loss, hidden, weight)))
    for other in results[1:]:
        for got, want in zip(other, results[0], strict=True):
            assert_same(got, want, atol=1e-10)


@pytest.mark.parametrize("trainable", ["hidden", "weight"])
def test_frozen_inputs_get_no_gradient(trainable):
    """A frozen LM head (LoRA) or frozen hidden states: gradients only where requires_grad is set."""
    hidden, weight, _, targets, _, ids, lp = make_batch(8, k=4)
    ref_loss = 0.5 * 4.0 * sparse_divergence(student_support_logprobs(hidden @ weight.T, ids), lp,
                                              temperature=2.0).sum()
    ref_loss = ref_loss + 0.5 * F.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    want = dict(zip(("hidden", "weight"), grads_of(ref_loss, hidden, weight), strict=True))
    hidden = hidden.detach().requires_grad_(trainable == "hidden")
    weight = weight.detach().requires_grad_(trainable == "weight")
    out = chunked_distill_loss(hidden, weight, targets, ids, lp, alpha=0.5, temperature=2.0, chunk_size=4)
    out.loss.backward()
    trained, frozen = (hidden, weight) if trainable == "hidden" else (weight, hidden)
    assert frozen.grad is None
    assert_same(trained.grad, want[trainable])


def test_no_grad_and_upstream_scaling():
    hidden, weight, _, targets, _, ids, lp = make_batch(9, k=4)
    out = chunked_distill_loss(hidden, weight, targets, ids, lp, alpha=0.3, chunk_size=5)
    with torch.no_grad():
        frozen = chunked_distill_loss(hidden, weight, targets, ids, lp, alpha=0.3, chunk_size=5)
    assert not frozen.loss.requires_grad
    assert_same(frozen.loss, out.loss.detach())
    g_h, g_w = grads_of(out.loss, hidden, weight)
    again = chunked_distill_loss(hidden, weight, targets, ids, lp, alpha=0.3, chunk_size=5)
    g3_h, g3_w = grads_of(3.0 * again.loss / 7.0, hidden, weight)
    assert_same(g3_h, g_h * 3.0 / 7.0)
    assert_same(g3_w, g_w * 3.0 / 7.0)


def test_float32_and_bfloat16_track_the_float64_result():
    hidden, weight, _, targets, t_logits, ids, lp = make_batch(10, k=V, teacher_scale=2.0)
    ref = chunked_distill_loss(hidden, weight, targets, ids, lp, alpha=0.5, temperature=2.0)
    ref_gh, ref_gw = grads_of(ref.loss, hidden, weight)
    lp32 = lp.float()
    for dtype, rtol in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):
        h = hidden.detach().to(dtype).requires_grad_()
        w = weight.detach().to(dtype).requires_grad_()
        out = chunked_distill_loss(h, w, targets, ids, lp32, alpha=0.5, temperature=2.0, chunk_size=8)
        g_h, g_w = grads_of(out.loss, h, w)
        assert g_h.dtype == dtype and g_w.dtype == dtype
        assert abs(out.loss.item() - ref.loss.item()) <= rtol * abs(ref.loss.item())
        scale = ref_gh.abs().max().item()
        assert (g_h.double() - ref_gh).abs().max().item() <= 2 * rtol * scale
        assert (g_w.double() - ref_gw).abs().max().item() <= 2 * rtol * ref_gw.abs().max().item()


def _near_complete_teacher(seed: int, n: int, k: int, tail: float) -> torch.Tensor:
    """(n, k) float32 teacher log-probs whose top-k holds all but ``tail`` of the mass (in float64)."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(n, k, generator=g, dtype=torch.float64), dim=-1) * (1.0 - tail)
    return probs.log().float()


def test_teacher_tail_is_computed_in_float64():
    """A ~2e-6 tail from float32 log-probs: a float32 ``1 - sum`` was off by up to 5% (float64: < 1e-6)."""
    lp32 = _near_complete_teacher(20, n=64, k=4, tail=2e-6)  # k * eps(float32) = 4.8e-7: a real tail
    want = teacher_support_logprobs(lp32.double())[:, -1]
    got = teacher_support_logprobs(lp32)[:, -1]
    assert got.dtype == torch.float32 and bool((want.exp() > 1.5e-6).all())
    # log-prob error = relative error of the tail probability
    assert (got.double() - want).abs().max().item() < 1e-5


@pytest.mark.parametrize("divergence,beta,temperature", [("forward_kl", 0.5, 2.0), ("reverse_kl", 0.5, 1.0),
                                                         ("jsd", 0.5, 2.0)])
def test_float32_loss_with_a_tiny_teacher_tail_tracks_float64(divergence, beta, temperature):
    """Loss and gradients in float32 against float64 on the same (float32) inputs: with the tail bucket
    computed in float32 the worst relative errors were 1.3e-5 (forward KL), 2.4e-5 (JSD) and 2.0e-3
    (reverse KL); with it in float64 they are below 5e-7."""
    n, k, vocab, h = 64, 4, 50, 16
    lp32 = _near_complete_teacher(20, n=n, k=k, tail=2e-6)
    g = torch.Generator().manual_seed(21)
    hidden, weight = torch.randn(n, h, generator=g), torch.randn(vocab, h, generator=g)
    ids = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(n)])
    results = {}
    for dtype in (torch.float32, torch.float64):
        hd, wd = hidden.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_()
        out = chunked_distill_loss(hd, wd, torch.zeros(n, dtype=torch.long), ids, lp32, alpha=1.0,
                                   temperature=temperature, divergence=divergence, beta=beta, chunk_size=16)
        results[dtype] = [out.loss.detach().double(), *(x.double() for x in grads_of(out.loss, hd, wd))]
    for got, want in zip(results[torch.float32], results[torch.float64], strict=True):
        assert (got - want).abs().max().item() <= 3e-6 * want.abs().max().item()


def _hand_divergence(z: list[float], ids: list[int], lp: list[float], divergence: str, beta: float,
                     temperature: float) -> float:
    """One row of the KD term in plain Python floats: the k+1 support, the teacher floored at
    TEACHER_PROB_FLOOR (its bucket is empty here), both sides tempered there."""
    def log_softmax(x: list[float]) -> list[float]:
        top = max(x)
        lse = top + math.log(sum(math.exp(v - top) for v in x))
        return [v - lse for v in x]

    logp = log_softmax(z)
    rest = [logp[v] for v in range(len(z)) if v not in ids]
    s = [logp[i] for i in ids] + [math.log(sum(math.exp(v) for v in rest))]
    floor = math.log(TEACHER_PROB_FLOOR)
    t = [max(v, floor) for v in lp] + [floor]
    s_t = log_softmax([v / temperature for v in s])
    t_t = log_softmax([v / temperature for v in t])
    if divergence == "reverse_kl" or beta == 1.0:
        return sum(math.exp(a) * (a - b) for a, b in zip(s_t, t_t, strict=True))
    m = [math.log(beta * math.exp(b) + (1 - beta) * math.exp(a)) for a, b in zip(s_t, t_t, strict=True)]
    return (beta * sum(math.exp(b) * (b - c) for b, c in zip(t_t, m, strict=True))
            + (1 - beta) * sum(math.exp(a) * (a - c) for a, c in zip(s_t, m, strict=True)))


@pytest.mark.parametrize("divergence,beta", [("reverse_kl", 0.5), ("jsd", 1.0), ("jsd", 0.9)])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_points_the_teacher_rules_out_cost_the_same_in_float32_and_float64(divergence, beta, temperature):
    """The student puts mass where the teacher has none (a padded -inf entry, an empty bucket): reverse KL is
    +inf in exact arithmetic; with the teacher floored at TEACHER_PROB_FLOOR it is one finite value, the
    same in float32 and float64 (it used to be set by log(finfo.tiny): -708 in float64, -87 in float32)."""
    z = [[1.0, 0.5, 2.0, -1.0, 0.0, 0.25], [0.5, 1.5, -0.5, 2.0, 1.0, 0.0]]
    ids = [[0, 1, 2], [3, 4, 5]]
    probs = [[0.625, 0.375, 0.0], [0.5, 0.25, 0.25]]  # the top-k holds all the mass: the bucket is empty
    lp32 = torch.tensor(probs).log()
    want = sum(_hand_divergence(z[r], ids[r], lp32[r].tolist(), divergence, beta, temperature) for r in range(2))
    if divergence == "reverse_kl" or beta == 1.0:  # ruled-out points cost ~69 nats per unit of student mass
        assert want > 5.0
    kd = {}
    for dtype in (torch.float32, torch.float64):
        hidden = torch.tensor(z, dtype=dtype).requires_grad_()  # with an identity head, logits = hidden
        out = chunked_distill_loss(hidden, torch.eye(6, dtype=dtype), torch.tensor([0, 3]), torch.tensor(ids),
                                   lp32, alpha=1.0, temperature=temperature, divergence=divergence, beta=beta)
        assert torch.isfinite(grads_of(out.loss, hidden)[0]).all()
        rows = sparse_divergence(student_support_logprobs(torch.tensor(z, dtype=dtype), torch.tensor(ids)), lp32,
                                 temperature=temperature, divergence=divergence, beta=beta)
        assert rows.sum().item() == pytest.approx(out.kd_sum.item(), rel=1e-6)
        kd[dtype] = out.kd_sum.item()
    assert kd[torch.float64] == pytest.approx(want, rel=1e-12)
    assert kd[torch.float32] == pytest.approx(want, rel=1e-5)


def test_divergence_registry_names_every_divergence():
    assert set(DIVERGENCES) == set(Divergence) == {"forward_kl", "reverse_kl", "jsd"}
    help_text = divergence_help()
    assert all(f"{name} (" in help_text for name in DIVERGENCES)
    s, t = (F.log_softmax(torch.randn(3, 5, dtype=torch.float64), dim=-1) for _ in range(2))
    for name, spec in DIVERGENCES.items():
        assert_same(spec.per_row(s, t, 0.3), dense_divergence(s, t, divergence=name, beta=0.3), atol=1e-12)


def test_padded_teacher_entries_and_empty_batch():
    hidden, weight, _, targets, _, ids, lp = make_batch(11, k=6)
    lp = lp.clone()
    lp[:, -2:] = float("-inf")  # a teacher that returned fewer than k candidates
    for divergence in Divergence:
        out = chunked_distill_loss(hidden, weight, targets, ids, lp, alpha=1.0, divergence=divergence)
        assert torch.isfinite(out.loss)
        assert all(torch.isfinite(g).all() for g in grads_of(out.loss, hidden, weight))
    empty = chunked_distill_loss(hidden[:0], weight, targets[:0], ids[:0], lp[:0], alpha=0.5)
    assert empty.loss.item() == 0.0 and empty.n_tokens == 0
    assert grads_of(empty.loss, weight)[0].abs().max().item() == 0.0


def _bad_calls():
    hidden, weight, bias, targets, _, ids, lp = make_batch(12, k=4)
    ok = dict(hidden=hidden, lm_head_weight=weight, target_ids=targets, teacher_ids=ids, teacher_logprobs=lp,
              alpha=0.5)
    return [
        (dict(ok, hidden=hidden[:, :5]), "same H"),
        (dict(ok, hidden=hidden.unsqueeze(0)), "flatten"),
        (dict(ok, target_ids=targets[:-1]), "target_ids must be an integer tensor of shape"),
        (dict(ok, target_ids=targets.double()), "target_ids must be an integer tensor"),
        (dict(ok, target_ids=torch.full_like(targets, -100)), "drop ignored positions"),
        (dict(ok, alpha=1.5), r"alpha=1.5 is outside \[0, 1\]"),
        (dict(ok, alpha=-0.1), r"outside \[0, 1\]"),
        (dict(ok, temperature=0.0), "temperature=0.0 must be > 0"),
        (dict(ok, beta=2.0), "beta=2.0"),
        (dict(ok, chunk_size=0), "chunk_size=0"),
        (dict(ok, divergence="kl"), "divergence='kl': use one of"),
        (dict(ok, teacher_ids=None, teacher_logprobs=None), "alpha=0.5 > 0 needs teacher_ids"),
        (dict(ok, teacher_logprobs=None), "both teacher_ids and teacher_logprobs"),
        (dict(ok, teacher_ids=ids[:, :3]), "teacher_ids"),
        (dict(ok, teacher_logprobs=lp[:, :3]), "shaped like teacher_ids"),
        (dict(ok, teacher_ids=ids + V), "teacher_ids has ids outside"),
        (dict(ok, teacher_ids=ids[:, [0, 0, 1, 2]]), "distinct"),
        (dict(ok, teacher_logprobs=lp + 5.0), "raw logits"),
        (dict(ok, lm_head_bias=bias[:-1]), "lm_head_bias has shape"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_input_validation_messages(case):
    kwargs, message = _bad_calls()[case]
    with pytest.raises(ValueError, match=message):
        chunked_distill_loss(**kwargs)
