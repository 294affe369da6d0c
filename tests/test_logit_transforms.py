"""Models whose logits are not their LM head's output (Gemma 2's soft-cap, Granite's and Cohere's scales).

Every model type of :data:`llmdistill.teacher.LOGIT_TRANSFORMS` is built tiny from its transformers
config, with a transform large enough to matter, and the logits, top-k, token log-probs, loss and
gradients llmdistill computes from the head's output are checked against transformers' own forward.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from llmdistill.config.base import UserError
from llmdistill.losses import LogitTransform, chunked_distill_loss, dense_divergence
from llmdistill.onpolicy import token_logprobs
from llmdistill.teacher import LOGIT_TRANSFORMS, logit_transform, topk_logprobs

pytestmark = pytest.mark.unit

VOCAB = 64
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2)
# a transform far from the identity, so that leaving it out shows
SETTINGS = {"softcap": 0.1, "divide": 0.25, "multiply": 3.0}
# model types whose config needs more than SMALL (MiniCPM3 derives logits_scaling from dim_model_base)
EXTRA = {"minicpm3": dict(num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=4,
                          qk_rope_head_dim=4, v_head_dim=8, dim_model_base=8)}


def tiny_model(model_type: str) -> torch.nn.Module:
    field, how = LOGIT_TRANSFORMS[model_type]
    config = AutoConfig.for_model(model_type, **{**SMALL, **EXTRA.get(model_type, {})})
    if model_type not in EXTRA:
        setattr(config, field, SETTINGS[how])
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.mark.parametrize("model_type", sorted(LOGIT_TRANSFORMS))
def test_logits_topk_token_logprobs_and_loss_follow_the_models_own_forward(model_type):
    model = tiny_model(model_type)
    transform = logit_transform(model.config)
    assert not transform.identity
    ids = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(1))
    targets = ids[0, 1:]
    head = model.get_output_embeddings()

    # the model's own logits, and autograd through its forward: the reference
    logits = model(input_ids=ids).logits[0, :-1].float()
    model.zero_grad()
    F.cross_entropy(logits, targets, reduction="sum").backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    logits = logits.detach()
    logp = torch.log_softmax(logits, dim=-1)

    hidden = model.base_model(input_ids=ids).last_hidden_state[0, :-1]
    with torch.no_grad():
        z = head(hidden).float()
        torch.testing.assert_close(transform(z), logits, atol=1e-5, rtol=1e-5)
        assert (z - logits).abs().max() > 0.1 * z.abs().max()  # the head's output alone is not the logits
        top_ids, top_lps, own = topk_logprobs(hidden, head, targets, 5, chunk_size=4, transform=transform)
    torch.testing.assert_close(top_lps, logp.topk(5).values, atol=1e-5, rtol=1e-5)
    assert torch.equal(top_ids, logp.topk(5).indices)
    torch.testing.assert_close(own, logp.gather(1, targets[:, None])[:, 0], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        student = token_logprobs(hidden, head, targets, chunk_size=4, transform=transform)
    torch.testing.assert_close(student, own, atol=1e-5, rtol=1e-5)

    # the chunked loss (CE only) through the transform: its value and every parameter's gradient
    model.zero_grad()
    out = chunked_distill_loss(hidden, head.weight, targets, None, None, alpha=0.0, chunk_size=4,
                               lm_head_bias=head.bias, logit_transform=transform)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(F.cross_entropy(logits, targets, reduction="sum").item(), rel=1e-5)
    for name, grad in expected.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("transform", [LogitTransform(softcap=1.5), LogitTransform(scale=0.3),
                                       LogitTransform(scale=2.0, softcap=4.0)])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_chunked_kd_through_a_transform_equals_the_dense_reference(transform, divergence):
    g = torch.Generator().manual_seed(0)
    n, width, vocab = 17, 8, 41
    hidden = torch.randn(n, width, generator=g, dtype=torch.float64).requires_grad_()
    weight = (2 * torch.randn(vocab, width, generator=g, dtype=torch.float64)).requires_grad_()
    bias = torch.randn(vocab, generator=g, dtype=torch.float64).requires_grad_()
    targets = torch.randint(0, vocab, (n,), generator=g)
    teacher_logits = 3 * torch.randn(n, vocab, generator=g, dtype=torch.float64)
    lp, top = torch.log_softmax(teacher_logits, dim=-1).topk(vocab)  # the whole vocabulary: exact
    out = chunked_distill_loss(hidden, weight, targets, top, lp, alpha=0.6, temperature=1.5, divergence=divergence,
                               chunk_size=5, lm_head_bias=bias, logit_transform=transform)
    logits = transform(hidden @ weight.T + bias)
    ref = 0.6 * 1.5**2 * dense_divergence(logits, teacher_logits, temperature=1.5, divergence=divergence).sum() \
        + 0.4 * F.cross_entropy(logits, targets, reduction="sum")
    torch.testing.assert_close(out.loss, ref)
    for got, want in zip(torch.autograd.grad(out.loss, (hidden, weight, bias)),
                         torch.autograd.grad(ref, (hidden, weight, bias)), strict=True):
        torch.testing.assert_close(got, want)


def test_fields_of_an_unknown_model_type_or_of_another_type_are_refused():
    qwen = AutoConfig.for_model("qwen2", **SMALL)
    assert logit_transform(qwen).identity
    qwen.logits_scaling = 8.0  # Qwen2 ignores it; llmdistill cannot know that for a model type it does not list
    with pytest.raises(UserError, match=r"student: its config \(qwen2\) sets logits_scaling=8.0, which transforms"):
        logit_transform(qwen, "student")
    gemma = AutoConfig.for_model("gemma2", **SMALL)
    assert logit_transform(gemma) == LogitTransform(softcap=gemma.final_logit_softcapping)
    gemma.logit_scale = 2.0  # Cohere's field on a Gemma 2
    with pytest.raises(UserError, match=r"\(gemma2\) sets logit_scale=2.0"):
        logit_transform(gemma)
    gemma = AutoConfig.for_model("gemma2", **SMALL, final_logit_softcapping=None)
    assert logit_transform(gemma).identity
    with pytest.raises(ValueError, match="scale must be finite and > 0"):
        chunked_distill_loss(torch.zeros(1, 2), torch.zeros(3, 2), torch.zeros(1, dtype=torch.long), None, None,
                             alpha=0.0, logit_transform=LogitTransform(scale=0.0))
