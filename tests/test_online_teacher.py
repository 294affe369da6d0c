"""``llmdistill train`` with an online teacher, feature and attention terms, drop-layer init, loss-adaptive schedules.

References are written out by hand: the offline path (the same teacher's top-k stored by build's
codec), a dense full-vocabulary KD loss, the layer losses of :mod:`tests.test_layer_losses`
applied to plain forwards, and the schedule formula.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import (  # tests/ is on sys.path (pytest's rootdir conftest)
    forbid,
    run_cli,
    with_another_tokenizer,
)
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from llmdistill.codec import decode_topk, encode_topk
from llmdistill.config.base import ConfigError, UserError
from llmdistill.config.train import TrainConfig
from llmdistill.online import PROJECTOR_FILE, CaptureSpec
from llmdistill.tinyworld.kd_data import write_tiny_built
from llmdistill.tinyworld.task import generate_problems
from llmdistill.train import build_trainer
from llmdistill.trainer import LossEMA, current_schedule

ROOT = Path(__file__).resolve().parents[1]
K = 8


@pytest.fixture(scope="module")
def built_kd(tmp_path_factory, tiny_tokenizer, tiny_teacher_dir):
    """48 problems with the trained tiny teacher's top-8, stored through build's codec (12 bits)."""
    return write_tiny_built(tmp_path_factory.mktemp("online_kd"), tiny_tokenizer, generate_problems(48, seed=3),
                            tiny_teacher_dir, k=K, max_length=128)


@pytest.fixture(scope="module")
def built_tokens(tmp_path_factory, tiny_tokenizer):
    """The same problems built with ``kd: false``: tokens only."""
    return write_tiny_built(tmp_path_factory.mktemp("online_sft"), tiny_tokenizer, generate_problems(48, seed=3),
                            None, max_length=128)


def config(tmp_path, data, student="", **overrides) -> TrainConfig:
    values = dict(output_dir=str(tmp_path / "out"), student_model=str(student), data_dir=str(data), alpha=0.7,
                  temperature=2.0, max_steps=3, per_device_train_batch_size=2, learning_rate=3e-3, logging_steps=1,
                  save_strategy="no", gradient_checkpointing=False, report_to="none", seed=0, disable_tqdm=True,
                  teacher_dtype="float32")
    values.update(overrides)
    return TrainConfig(**values)


def loss_and_grads(trainer, batch):
    model = trainer.model
    model.zero_grad()
    n = torch.tensor(float(batch["target_index"].numel()))
    loss = trainer.compute_loss(model, batch, num_items_in_batch=n)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def rows_of(trainer, n=3):
    return [trainer.train_dataset[i] for i in range(n)]


# ---- the online teacher against the offline path ------------------------------------------------


@pytest.mark.unit
def test_online_teacher_equals_the_stored_topk_within_the_codec_error(tmp_path, tiny_student_dir, built_kd,
                                                                      tiny_teacher_dir):
    offline, _ = build_trainer(config(tmp_path / "off", built_kd, tiny_student_dir))
    online, _ = build_trainer(config(tmp_path / "on", built_kd, tiny_student_dir, teacher_model=str(tiny_teacher_dir),
                                     teacher_top_k=K))
    online.model.load_state_dict(offline.model.state_dict())
    for t in (offline, online):
        t.model.eval()
    rows = rows_of(offline)
    stored, fresh = offline.data_collator(rows), online.data_collator(rows)
    assert "teacher_ids" in stored and "teacher_ids" not in fresh  # the online path decodes nothing

    # the teacher's signal: same ids; log-probs equal to the codec's round trip of the online values
    ids, lps, _ = online.teacher.signals(fresh, CaptureSpec())
    np.testing.assert_array_equal(ids.numpy(), stored["teacher_ids"].numpy())
    grouped_ids, grouped_lps, nothing = online.teacher.signals(fresh, CaptureSpec(), padded_groups=True)
    assert nothing is None  # as right-padded groups of the documents (the trainer's way with sdpa): the same signal
    np.testing.assert_array_equal(grouped_ids.numpy(), ids.numpy())
    torch.testing.assert_close(grouped_lps, lps, atol=1e-5, rtol=2e-6)  # a few float32 ulps of log-probs near -20
    n = len(ids)
    v = len(online.processing_class)
    round_trip = decode_topk(encode_topk(ids.numpy(), lps.numpy(), v, 12), n, K, v, 12)[1]
    step = (lps[:, 0] - lps[:, -1]).numpy()[:, None] / 4095
    assert np.all(np.abs(round_trip - stored["teacher_logprobs"].numpy()) <= step + 2e-3)

    # the loss and its gradients
    loss_off, grads_off = loss_and_grads(offline, stored)
    loss_on, grads_on = loss_and_grads(online, fresh)
    assert loss_on.item() == pytest.approx(loss_off.item(), rel=2e-3)
    for name, grad in grads_off.items():
        assert torch.allclose(grads_on[name], grad, rtol=2e-2, atol=2e-4 * grad.abs().max().item()), name
    # against the online path's own signal pushed through the codec, the offline path is exact up to float noise
    coded = dict(stored, teacher_logprobs=torch.from_numpy(round_trip))
    loss_coded, _ = loss_and_grads(offline, coded)
    assert abs(loss_coded.item() - loss_off.item()) <= abs(loss_on.item() - loss_off.item()) + 1e-4


@pytest.mark.unit
def test_full_distribution_equals_a_dense_reference(tmp_path, tiny_student_dir, built_tokens, tiny_teacher_dir):
    trainer, _ = build_trainer(config(tmp_path, built_tokens, tiny_student_dir, teacher_model=str(tiny_teacher_dir),
                                      teacher_top_k=0, alpha=0.6, temperature=1.5))
    trainer.model.eval()
    batch = trainer.data_collator(rows_of(trainer))
    t = batch["target_index"]
    loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=torch.tensor(float(t.numel())))
    teacher = AutoModelForCausalLM.from_pretrained(str(tiny_teacher_dir), dtype=torch.float32)
    with torch.no_grad():
        # use_cache=False: with a cache, transformers does not isolate the packed documents
        fwd = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
        s_logits = trainer.model(**fwd).logits[0, t - 1].double()
        t_logits = teacher(**fwd).logits[0, t - 1].double()
    temp, alpha = 1.5, 0.6
    q = F.softmax(t_logits / temp, dim=-1)
    kl = (q * (F.log_softmax(t_logits / temp, -1) - F.log_softmax(s_logits / temp, -1))).sum(-1)
    ce = F.cross_entropy(s_logits, batch["input_ids"][0, t], reduction="none")
    reference = (alpha * temp**2 * kl + (1 - alpha) * ce).mean()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-4)


@pytest.mark.unit
def test_a_teacher_with_padding_rows_past_the_students_gives_only_the_students_ids(
        tmp_path, tiny_student_dir, built_tokens, tiny_teacher_dir):
    """One tokenizer, a teacher with 8 more LM-head rows (as Qwen2.5 7B+ has over 0.5B-3B), here
    rows that win every top-k: its top-k is the best among the student's ids, with log-probs
    normalised over all of its rows."""
    from llmdistill.teacher import topk_logprobs

    teacher = AutoModelForCausalLM.from_pretrained(str(tiny_teacher_dir), dtype=torch.float32)
    rows = teacher.get_output_embeddings().weight.shape[0]
    teacher.resize_token_embeddings(rows + 8, mean_resizing=False)
    with torch.no_grad():
        head = teacher.get_output_embeddings().weight
        head[rows:] = 50 * head[:rows].abs().max()  # huge logits wherever the hidden state is positive
    padded = tmp_path / "teacher-padded"
    teacher.save_pretrained(str(padded))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_teacher_dir / name).is_file():
            (padded / name).write_bytes((tiny_teacher_dir / name).read_bytes())
    trainer, _ = build_trainer(config(tmp_path, built_tokens, tiny_student_dir, teacher_model=str(padded),
                                      teacher_top_k=4))
    assert trainer.teacher.teacher.vocab == rows
    batch = trainer.data_collator(rows_of(trainer))
    ids, logprobs, _ = trainer.teacher.signals(batch, CaptureSpec())
    assert int(ids.max()) < rows
    t = batch["target_index"]
    with torch.no_grad():
        logits = teacher(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                         use_cache=False).logits[0, t - 1]
    every = torch.log_softmax(logits.double(), dim=-1)
    assert bool((every[:, rows:].exp().sum(-1) > 0.5).any())  # the padding rows hold real mass here
    best = every[:, :rows].topk(4, dim=-1)
    assert torch.equal(ids, best.indices)
    torch.testing.assert_close(logprobs.double(), best.values, atol=1e-4, rtol=0)
    hidden = torch.randn(5, 3)
    lm = torch.nn.Linear(3, 7, bias=False)
    ids, lps, _ = topk_logprobs(hidden, lm, torch.zeros(5, dtype=torch.long), 2, chunk_size=2, vocab=4)
    full = torch.log_softmax(lm(hidden), dim=-1)
    assert torch.equal(ids, full[:, :4].topk(2).indices) and torch.allclose(lps, full[:, :4].topk(2).values)


@pytest.mark.unit
def test_an_online_teacher_of_another_tokenizer_fails_before_a_model_loads(tmp_path, tiny_student_dir, built_tokens,
                                                                          tiny_teacher_dir, monkeypatch):
    import llmdistill.train as train_module

    forbid(monkeypatch, train_module, ("load_student",), "a model loaded before the tokenizer check")
    other = with_another_tokenizer(tiny_teacher_dir, tmp_path / "other-teacher")
    with pytest.raises(UserError, match=f"^teacher_model {other}: its tokenizer differs from the student's"):
        build_trainer(config(tmp_path, built_tokens, tiny_student_dir, teacher_model=str(other)))


@pytest.mark.unit
def test_dry_run_plan_names_the_online_teacher_as_the_signal():
    from llmdistill.plan import make_plan

    shipped = yaml.safe_load((Path(__file__).parents[1] / "configs" / "train_tiny_feature.yaml").read_text())
    online = make_plan("train", TrainConfig(**shipped))
    assert online["teacher signal"].startswith(f"online: {shipped['teacher_model']} ")
    assert online["host RAM per process for data"].endswith("read the tokens)")
    stored = make_plan("train", TrainConfig(**{**shipped, "teacher_model": "", "feature_loss": "none"}))
    assert "teacher signal" not in stored and stored["host RAM per process for data"].endswith("decode the top-k)")


@pytest.mark.unit
def test_kd_on_token_only_shards_needs_a_teacher(tmp_path, tiny_student_dir, built_tokens, tiny_teacher_dir):
    with pytest.raises(ValueError, match="set teacher_model"):
        build_trainer(config(tmp_path, built_tokens, tiny_student_dir))
    trainer, meta = build_trainer(config(tmp_path, built_tokens, tiny_student_dir, teacher_model=str(tiny_teacher_dir)))
    assert meta["kd"] is False and trainer.teacher is not None
    teacher_param = next(trainer.teacher.model.parameters())
    assert not teacher_param.requires_grad and teacher_param.dtype == torch.float32
    assert not trainer.teacher.model.training


# ---- configs that cannot work fail before training ----------------------------------------------


@pytest.mark.unit
def test_config_refusals(tmp_path, tiny_teacher_dir):
    with pytest.raises(ConfigError, match="set teacher_model"):
        config(tmp_path, "d", "s", feature_loss="mse")
    with pytest.raises(ConfigError, match="needs attention: eager"):
        config(tmp_path, "d", "s", teacher_model="t", attention_loss="attention_kl", attention="sdpa")
    with pytest.raises(ConfigError, match="nothing uses it"):
        config(tmp_path, "d", "s", teacher_model="t", alpha=0.0)
    with pytest.raises(ConfigError, match="leave student_model empty"):
        config(tmp_path, "d", "s", teacher_model="t", student_init="drop_layers")
    with pytest.raises(ConfigError, match="'1-2'"):
        config(tmp_path, "d", "s", teacher_model="t", feature_loss="mse", layer_map="1-2")


@pytest.mark.unit
def test_a_top_k_beyond_the_vocabulary_or_transformed_logits_fail_before_a_model_loads(tmp_path, tiny_student_dir, built_tokens,
                                                                           tiny_tokenizer, monkeypatch):
    import llmdistill.train as train_module

    monkeypatch.setattr(train_module, "load_student", lambda *a: pytest.fail("a model loaded"))
    cfg = config(tmp_path, built_tokens, tiny_student_dir, teacher_model=str(tiny_student_dir),
                 teacher_top_k=len(tiny_tokenizer) + 1)
    with pytest.raises(UserError, match=rf"teacher_top_k={len(tiny_tokenizer) + 1} exceeds the vocabulary "
                                        rf"\({len(tiny_tokenizer)} tokens\): lower it, or set 0"):
        build_trainer(cfg)
    # a Qwen2 config with a field that other model types read as a logit transform: transformers' Qwen2
    # ignores it, but llmdistill cannot tell what the model does with it, so it refuses
    import shutil

    from llmdistill.teacher import LOGIT_FIELDS

    for name, value in zip(LOGIT_FIELDS, (30.0, 20.0, 8.0, 0.0625, 2.0), strict=True):
        capped = tmp_path / f"capped-{name}"
        shutil.copytree(tiny_student_dir, capped, dirs_exist_ok=True)
        settings = json.loads((capped / "config.json").read_text())
        (capped / "config.json").write_text(json.dumps({**settings, name: value}))
        for who, overrides in (("student_model", {"student_model": str(capped)}),
                               ("teacher_model", {"teacher_model": str(capped)})):
            cfg = config(tmp_path, built_tokens, tiny_student_dir, **{"teacher_model": str(tiny_student_dir),
                                                                        **overrides})
            with pytest.raises(UserError, match=rf"{who} {capped}: its config \(qwen2\) sets {name}={value}, which "
                                                "transforms the LM head's output"):
                build_trainer(cfg)


@pytest.mark.unit
def test_an_sdpa_model_under_attention_kl_fails_before_training(tmp_path, tiny_student_dir, built_tokens,
                                                                tiny_teacher_dir):
    cfg = config(tmp_path, built_tokens, tiny_student_dir, teacher_model=str(tiny_teacher_dir), attention="eager",
                 attention_loss="attention_kl", model_init_kwargs={"attn_implementation": "sdpa"})
    with pytest.raises(UserError, match="the student runs sdpa attention.*needs attn_implementation: eager"):
        build_trainer(cfg)
    with pytest.raises(UserError, match=r"pair 3:9 is outside"):
        build_trainer(config(tmp_path, built_tokens, tiny_student_dir, teacher_model=str(tiny_teacher_dir),
                             feature_loss="mse", layer_map="1:1,3:9"))


@pytest.mark.unit
def test_capture_keeps_only_the_mapped_layers_and_equals_transformers_outputs(tiny_teacher_dir):
    from llmdistill.online import capture_forward

    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir, attn_implementation="eager").eval()
    blocks = model.config.num_hidden_layers
    ids = torch.randint(0, model.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0))
    positions = torch.cat([torch.arange(12), torch.arange(8)])[None]  # two packed documents
    spec = CaptureSpec(hidden_layers=(0, 2, blocks), attention_layers=(2,), qkv_layers=(1,))
    with torch.no_grad():
        captured = capture_forward(model.base_model, ids, positions, spec)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # removed again
    with torch.no_grad():  # (transformers installs hooks of its own here, to collect every layer's outputs)
        plain = model.base_model(input_ids=ids, position_ids=positions, use_cache=False, output_hidden_states=True,
                                 output_attentions=True)
    assert sorted(captured.hidden) == [0, 2, blocks] and list(captured.attentions) == [2] and list(captured.qkv) == [1]
    for index, h in captured.hidden.items():  # 0 the embeddings, the last one after the final norm
        torch.testing.assert_close(h, plain.hidden_states[index][0], rtol=0, atol=0)
    torch.testing.assert_close(captured.attentions[2], plain.attentions[1][0], rtol=0, atol=0)
    assert captured.qkv[1][0].shape == (20, model.model.layers[0].self_attn.q_proj.out_features)
    sdpa = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir, attn_implementation="sdpa").eval()
    with pytest.raises(UserError, match="sdpa attention does not return"), torch.no_grad():
        capture_forward(sdpa.base_model, ids, positions, CaptureSpec(attention_layers=(1,)))


# ---- layer terms inside the trainer against plain forwards ---------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("kind", ["feature", "attention_kl", "relations"])
def test_layer_terms_in_the_trainer_equal_plain_forwards(tmp_path, tiny_student_dir, built_tokens, tiny_teacher_dir,
                                                         kind):
    from llmdistill.layer_losses import attention_kl_loss, document_mask, hidden_state_loss, relation_kl_loss

    extra = {"feature": dict(feature_loss="cosine", layer_map="uniform"),
             "attention_kl": dict(attention_loss="attention_kl", attention="eager", layer_map="last_k"),
             "relations": dict(attention_loss="relations", relation_heads=2, layer_map="1:2")}[kind]
    trainer, _ = build_trainer(config(tmp_path, built_tokens, tiny_student_dir, teacher_model=str(tiny_teacher_dir),
                                      alpha=0.0, feature_weight=0.5, attention_weight=0.5, **extra))
    trainer.model.eval()
    batch = trainer.data_collator(rows_of(trainer))
    t = batch["target_index"]
    n = t.numel()
    loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=torch.tensor(float(n)))
    with torch.no_grad():
        # use_cache=False: with a cache, transformers does not isolate the packed documents
        fwd = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
        s_out = trainer.model(**fwd, output_hidden_states=True, output_attentions=kind == "attention_kl")
        t_model = trainer.teacher.model
        t_out = t_model(**fwd, output_hidden_states=True, output_attentions=kind == "attention_kl")
        ce = F.cross_entropy(s_out.logits[0, t - 1], batch["input_ids"][0, t], reduction="sum")
        rows = t - 1
        if kind == "feature":  # uniform: student block 1 -> teacher 1, 2 -> 3; widths 64 -> 128 via the projection
            proj = trainer.layers.projector
            term = torch.stack([hidden_state_loss(proj[i](s_out.hidden_states[s][0, rows]),
                                                  t_out.hidden_states[tb][0, rows], "cosine")
                                for i, (s, tb) in enumerate([(1, 1), (2, 3)])]).mean()
        elif kind == "attention_kl":  # last_k with k=1: block 2 <-> block 3
            mask = document_mask(batch["position_ids"][0], rows)
            term = attention_kl_loss(s_out.attentions[1][0][:, rows], t_out.attentions[2][0][:, rows], mask)
        else:
            qkv = {}
            for name, model, block in (("s", trainer.model, 1), ("t", t_model, 2)):
                attn = model.model.layers[block - 1].self_attn
                h = model(**fwd, output_hidden_states=True).hidden_states[block - 1][0]
                h = model.model.layers[block - 1].input_layernorm(h)
                qkv[name] = (attn.q_proj(h), attn.k_proj(h), attn.v_proj(h))
            term = relation_kl_loss(qkv["s"], qkv["t"], rows, document_mask(batch["position_ids"][0], rows), 2)
    assert loss.item() == pytest.approx(((ce + 0.5 * term) / n).item(), rel=1e-4)
    assert term.item() > 1e-3


@pytest.mark.unit
def test_packed_layer_terms_equal_the_documents_run_separately(tmp_path, tiny_student_dir, built_tokens,
                                                               tiny_teacher_dir):
    trainer, _ = build_trainer(config(tmp_path, built_tokens, tiny_student_dir, teacher_model=str(tiny_teacher_dir),
                                      feature_loss="mse", attention_loss="relations", attention="eager"))
    trainer.model.eval()
    batch = trainer.data_collator(rows_of(trainer))
    n = batch["target_index"].numel()
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [batch["input_ids"].shape[1]]
    assert len(starts) > 4
    packed, packed_grads = _loss_grads_n(trainer, batch, n)
    total, total_grads = 0.0, None
    for s, e in zip(starts[:-1], starts[1:], strict=True):
        keep = (batch["target_index"] >= s) & (batch["target_index"] < e)
        doc = {"input_ids": batch["input_ids"][:, s:e], "position_ids": batch["position_ids"][:, s:e],
               "target_index": batch["target_index"][keep] - s, "num_rows": torch.tensor(1)}
        loss, grads = _loss_grads_n(trainer, doc, n)
        total += loss.item()
        total_grads = grads if total_grads is None else {k: total_grads[k] + g for k, g in grads.items()}
    assert packed.item() == pytest.approx(total, rel=1e-5)
    for name, grad in packed_grads.items():
        assert torch.allclose(grad, total_grads[name], atol=1e-6, rtol=1e-4), name


def _loss_grads_n(trainer, batch, n):
    params = list(trainer.model.parameters()) + list(trainer.layers.projector.parameters())
    for p in params:
        p.grad = None
    loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=torch.tensor(float(n)))
    loss.backward()
    named = dict(trainer.model.named_parameters()) | {f"proj.{k}": p for k, p in
                                                      trainer.layers.projector.named_parameters()}
    return loss.detach(), {k: p.grad.clone() for k, p in named.items() if p.grad is not None}


# ---- student init and schedules -----------------------------------------------------------------


@pytest.mark.unit
def test_drop_layers_keeps_every_other_teacher_block(tiny_teacher_dir, tmp_path):
    from llmdistill.train import load_student

    model, _ = load_student(config(tmp_path, "d", teacher_model=str(tiny_teacher_dir), student_init="drop_layers"))
    teacher = AutoModelForCausalLM.from_pretrained(str(tiny_teacher_dir), dtype=torch.float32)
    assert model.config.num_hidden_layers == 2 and len(model.config.layer_types) == 2
    sd, td = model.state_dict(), teacher.state_dict()
    for new, old in ((0, 0), (1, 2)):
        for key in [k for k in sd if k.startswith(f"model.layers.{new}.")]:
            assert torch.equal(sd[key], td[key.replace(f"layers.{new}.", f"layers.{old}.")]), key
    assert torch.equal(sd["lm_head.weight"], td["lm_head.weight"])
    assert [b.self_attn.layer_idx for b in model.model.layers] == [0, 1]


@pytest.mark.unit
def test_loss_adaptive_schedules_follow_the_running_loss(tmp_path):
    cfg = config(tmp_path, "d", "s", alpha=0.9, alpha_start=0.1, alpha_schedule="loss_adaptive",
                 temperature=1.0, temperature_start=3.0, temperature_schedule="loss_adaptive",
                 feature_weight=2.0, feature_weight_start=0.0, feature_weight_schedule="linear_warmup",
                 alpha_warmup_ratio=0.5, adaptive_ema_decay=0.5)
    state = SimpleNamespace(global_step=25, max_steps=100)  # the step-based schedule: halfway through its warm-up
    ema = LossEMA(cfg.adaptive_ema_decay)
    assert current_schedule(cfg, state, ema) == {"alpha": 0.1, "temperature": 3.0, "feature_weight": 1.0,
                                                 "attention_weight": 1.0}
    ema.update(4.0)  # first = 4
    ema.update(2.0)  # 0.5 * 4 + 0.5 * 2 = 3 -> progress 1 - 3/4 = 0.25
    s = current_schedule(cfg, state, ema)
    assert s["alpha"] == pytest.approx(0.1 + 0.8 * 0.25) and s["temperature"] == pytest.approx(3.0 - 2.0 * 0.25)
    ema.update(9.0)  # the loss went up: 6 > 4, progress clamps at 0
    assert current_schedule(cfg, state, ema)["alpha"] == pytest.approx(0.1)
    for _ in range(60):
        ema.update(0.0)
    assert current_schedule(cfg, state, ema)["temperature"] == pytest.approx(1.0, abs=1e-6)
    assert cfg.uses_kd and TrainConfig(output_dir=str(tmp_path), alpha=0.0, alpha_start=0.3,
                                       alpha_schedule="loss_adaptive").uses_kd


# ---- end to end through the CLI -----------------------------------------------------------------


def _run_cli(tmp_path: Path, shipped: str, **changes) -> Path:
    data = yaml.safe_load((ROOT / "configs" / shipped).read_text())
    out = tmp_path / "out"
    data.update(output_dir=str(out), max_steps=4, logging_steps=2, warmup_steps=0, per_device_train_batch_size=2,
                **changes)
    path = tmp_path / shipped
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    run_cli("train", "--config", str(path))
    return out


def _logged(out: Path) -> dict:
    return [h for h in json.loads((out / "log_history.json").read_text()) if "ce_loss" in h][-1]


@pytest.mark.integration
def test_cli_online_teacher_kd_on_token_only_shards(tmp_path, tiny_student_dir, built_tokens, tiny_teacher_dir):
    out = _run_cli(tmp_path, "train_tiny_kd.yaml", student_model=str(tiny_student_dir), data_dir=str(built_tokens),
                   teacher_model=str(tiny_teacher_dir), teacher_top_k=K)
    last = _logged(out)
    assert last["kd_loss"] > 0 and last["step"] == 4
    assert json.loads((out / "manifest.json").read_text())["inputs"]["teacher"]["path"] == str(tiny_teacher_dir)


@pytest.mark.integration
def test_cli_feature_distillation_saves_the_projection_apart(tmp_path, tiny_student_dir, built_tokens,
                                                             tiny_teacher_dir):
    out = _run_cli(tmp_path, "train_tiny_feature.yaml", student_model=str(tiny_student_dir),
                   data_dir=str(built_tokens), teacher_model=str(tiny_teacher_dir))
    last = _logged(out)
    assert last["feature_loss"] > 0 and last["feature_weight"] > 0
    projector = load_file(str(out / PROJECTOR_FILE))
    assert {tuple(w.shape) for w in projector.values()} == {(128, 64)}
    student = AutoModelForCausalLM.from_pretrained(str(out))  # a plain HF checkpoint
    assert [p.name for p in out.glob("*.safetensors")] == ["model.safetensors"]  # vLLM loads every top-level one
    assert not any("proj" in k and "self_attn" not in k and "mlp" not in k for k in student.state_dict())
    init = load_file(str(Path(tiny_student_dir) / "model.safetensors"))
    trained = student.state_dict()
    assert any(not torch.equal(init[k], trained[k]) for k in init)


@pytest.mark.integration
def test_cli_attention_distillation(tmp_path, tiny_student_dir, built_tokens, tiny_teacher_dir):
    out = _run_cli(tmp_path, "train_tiny_attention.yaml", student_model=str(tiny_student_dir),
                   data_dir=str(built_tokens), teacher_model=str(tiny_teacher_dir))
    assert _logged(out)["attention_loss"] > 0
    bad = _run_cli_fails(tmp_path, "train_tiny_attention.yaml", student_model=str(tiny_student_dir),
                         data_dir=str(built_tokens), teacher_model=str(tiny_teacher_dir), attention="sdpa")
    assert bad.count("\n") <= 1 and "needs attention: eager" in bad


def _run_cli_fails(tmp_path: Path, shipped: str, **changes) -> str:
    data = yaml.safe_load((ROOT / "configs" / shipped).read_text())
    data.update(output_dir=str(tmp_path / "bad"), **changes)
    path = tmp_path / f"bad_{shipped}"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    res = subprocess.run([sys.executable, "-m", "llmdistill", "train", "--config", str(path)], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    return res.stderr.strip()


@pytest.mark.integration
def test_checkpoints_hold_the_projection_and_a_resume_continues_it(tmp_path, tiny_student_dir, built_tokens,
                                                                  tiny_teacher_dir):
    fields = dict(teacher_model=str(tiny_teacher_dir), feature_loss="mse", feature_weight=0.5, max_steps=2,
                  save_strategy="steps", save_steps=1, dataloader_num_workers=0)
    first, _ = build_trainer(config(tmp_path, built_tokens, tiny_student_dir, **fields))
    start = {k: v.clone() for k, v in first.layers.projector.state_dict().items()}
    first.train()
    out = Path(first.args.output_dir)
    end = load_file(str(out / "checkpoint-2" / PROJECTOR_FILE))
    assert all(not torch.equal(start[k], end[k]) for k in start)  # trained with the student
    for k, v in first.layers.projector.state_dict().items():
        assert torch.equal(v, end[k])
    resumed, _ = build_trainer(config(tmp_path, built_tokens, tiny_student_dir, **fields,
                                      resume_from_checkpoint=str(out / "checkpoint-1")))
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-1"))
    for k, v in resumed.layers.projector.state_dict().items():
        assert torch.allclose(v, end[k], atol=1e-6), k


@pytest.mark.unit
def test_projection_gradients_are_clipped_on_their_own_norm_and_cleared():
    from llmdistill.online import ProjectorGrads

    projector = torch.nn.Linear(2, 1, bias=False)
    projector.weight.grad = torch.tensor([[3.0, 4.0]])  # norm 5
    callback = ProjectorGrads(projector, average=False)
    callback.on_pre_optimizer_step(SimpleNamespace(max_grad_norm=1.0), None, None)
    torch.testing.assert_close(projector.weight.grad, torch.tensor([[0.6, 0.8]]), rtol=1e-5, atol=1e-6)
    projector.weight.grad = torch.tensor([[0.3, 0.4]])  # under the limit: untouched
    callback.on_pre_optimizer_step(SimpleNamespace(max_grad_norm=1.0), None, None)
    torch.testing.assert_close(projector.weight.grad, torch.tensor([[0.3, 0.4]]))
    callback.on_pre_optimizer_step(SimpleNamespace(max_grad_norm=0.0), None, None)  # clipping off
    torch.testing.assert_close(projector.weight.grad, torch.tensor([[0.3, 0.4]]))
    callback.on_optimizer_step(SimpleNamespace(max_grad_norm=1.0), None, None)
    assert projector.weight.grad is None


@pytest.mark.unit
def test_a_resumed_run_goes_on_from_the_checkpoints_running_loss(tmp_path, tiny_student_dir, built_kd):
    from llmdistill.trainer import LOSS_EMA_FILE

    adaptive = dict(alpha=0.9, alpha_start=0.1, alpha_schedule="loss_adaptive", adaptive_ema_decay=0.5, max_steps=4,
                    save_strategy="steps", save_steps=2)
    whole, _ = build_trainer(config(tmp_path / "a", built_kd, tiny_student_dir, **adaptive))
    whole.train()
    saved = json.loads((tmp_path / "a" / "out" / "checkpoint-2" / LOSS_EMA_FILE).read_text())
    assert saved["value"] is not None and saved["value"] != whole.loss_ema.value

    resumed, _ = build_trainer(config(tmp_path / "a", built_kd, tiny_student_dir, **adaptive,
                                   resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-2")))
    assert resumed.loss_ema.state() == {"first": None, "value": None}
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-2"))
    assert resumed.loss_ema.first == whole.loss_ema.first
    assert resumed.loss_ema.value == pytest.approx(whole.loss_ema.value, rel=1e-5)
