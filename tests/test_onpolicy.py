"""``llmdistill onpolicy``: the loss against a dense reference, the teacher's grades against a plain
forward, the rollout engine against the trainer after a weight sync, and an exact resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmdistill.config.base import ConfigError
from llmdistill.config.onpolicy import OnPolicyConfig
from llmdistill.onpolicy import PromptStream, load_student, onpolicy_loss, pack, score
from llmdistill.tinyworld.task import generate_problems, to_records, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("op") / "prompts.jsonl", to_records(generate_problems(40, seed=7)))


def config(prompts: Path, student: Path, teacher: Path, out: Path, **overrides) -> OnPolicyConfig:
    values = dict(dataset=str(prompts), student_model=str(student), teacher_model=str(teacher), output_dir=str(out),
                  prompts_per_step=4, max_new_tokens=24, max_steps=3, learning_rate=1e-3, logprobs_top_k=8,
                  logging_steps=1, max_model_len=256, seed=0)
    return OnPolicyConfig(**{**values, **overrides})


# ---- pure pieces -----------------------------------------------------------------------------


@pytest.mark.unit
def test_the_prompt_stream_is_a_seeded_order_that_a_resume_finds_again():
    stream = PromptStream([{"i": i} for i in range(10)], seed=3)
    steps = [stream.batch(s, 4) for s in range(5)]  # 20 positions: two epochs
    assert sorted(steps[0] + steps[1] + steps[2][:2]) == list(range(10))  # each prompt once per epoch
    assert steps == [PromptStream([{"i": i} for i in range(10)], seed=3).batch(s, 4) for s in range(5)]
    assert steps[0] != PromptStream(stream.records, seed=4).batch(0, 4)


@pytest.mark.unit
def test_pack_marks_exactly_the_completion_tokens_as_targets():
    batch = pack([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 5, 6, 4, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3]]
    assert batch["target_index"].tolist() == [3, 4, 6, 7, 8]
    assert batch["target_ids"].tolist() == [5, 6, 7, 8, 9] and batch["seq_of_target"].tolist() == [0, 0, 1, 1, 1]


@pytest.mark.unit
def test_config_needs_its_inputs_and_names_multi_teacher_routing():
    base = dict(dataset="p.jsonl", student_model="s", teacher_model="t")
    assert OnPolicyConfig(**base).teachers == {"default": "t"}
    assert OnPolicyConfig(**{**base, "teacher_model": "math=a,code=b", "teacher_column": "domain"}).teachers == \
        {"math": "a", "code": "b"}
    with pytest.raises(ConfigError, match="teacher_column"):
        OnPolicyConfig(**{**base, "teacher_model": "math=a,code=b"})
    with pytest.raises(ConfigError, match="offline_data_dir"):
        OnPolicyConfig(**base, on_policy_fraction=0.5)


def _dense_reference(student, batch, teacher_logits, objective):
    """Per-token mean loss from full-vocabulary logits, float64, by the textbook formulas."""
    hidden = student.base_model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                use_cache=False).last_hidden_state[0]  # packed: each sample attends to itself only
    logits = student.get_output_embeddings()(hidden[batch["target_index"] - 1]).double()
    s = torch.log_softmax(logits, -1)
    t = torch.log_softmax(teacher_logits.double(), -1)
    if objective == "reverse_kl":
        return (s.exp() * (s - t)).sum(-1).mean()
    lp = s.gather(-1, batch["target_ids"][:, None])[:, 0]
    advantage = (t.gather(-1, batch["target_ids"][:, None])[:, 0] - lp).detach()
    return -(advantage * lp).mean()


@pytest.mark.unit
@pytest.mark.parametrize("objective", ["reverse_kl", "sampled_reverse_kl"])
def test_loss_and_gradients_equal_a_dense_reference(objective, tiny_student_dir):
    """With k = the whole vocabulary the top-k support is exact: the sparse loss is the dense one."""
    torch.manual_seed(0)
    student, _ = load_student(str(tiny_student_dir))
    student.double()
    vocab = student.config.vocab_size
    batch = pack([[1, 5, 9], [3, 4]], [[11, 12, 13, 2], [20, 21]])
    teacher_logits = torch.randn(len(batch["target_ids"]), vocab, dtype=torch.float64) * 3
    t = torch.log_softmax(teacher_logits, -1)
    top = t.topk(vocab, -1)
    graded = {**batch, "teacher_ids": top.indices, "teacher_logprobs": top.values,
              "teacher_token_logprobs": t.gather(-1, batch["target_ids"][:, None])[:, 0]}
    cfg = OnPolicyConfig(dataset="p", student_model="s", teacher_model="t", objective=objective, loss_chunk_size=3)
    loss, _ = onpolicy_loss(student, graded, cfg)
    grads = torch.autograd.grad(loss, list(student.parameters()))
    ref = _dense_reference(student, batch, teacher_logits, objective)
    ref_grads = torch.autograd.grad(ref, list(student.parameters()))
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-9, abs=1e-12)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-7, atol=1e-10)


# ---- with real models and engines --------------------------------------------------------------


@pytest.mark.integration
def test_the_teachers_grades_equal_a_plain_forward_and_sync_makes_the_engine_the_trainer(
        prompts, tiny_student_dir, tiny_random_teacher_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from llmdistill.onpolicy import TransformersTeacher, VllmRollout, load_prompts, rollout
    from llmdistill.prompts import PromptFormat

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    cfg = config(prompts, tiny_student_dir, tiny_random_teacher_dir, tmp_path / "o")
    student, tok = load_student(str(tiny_student_dir))
    engine = VllmRollout(str(tiny_student_dir), cfg)
    try:
        stream = PromptStream(load_prompts(cfg), cfg.seed)
        rollouts = rollout(engine, stream, 0, PromptFormat(), tok, cfg)
        graded = score({"default": TransformersTeacher(str(tiny_random_teacher_dir), "float32")}, rollouts, cfg)
        # every target's grade equals the teacher's own forward of that sample alone
        teacher = AutoModelForCausalLM.from_pretrained(str(tiny_random_teacher_dir), dtype=torch.float32).eval()
        offset = 0
        for p, c in zip(rollouts.prompt_ids, rollouts.completion_ids, strict=True):
            with torch.no_grad():
                logp = torch.log_softmax(teacher(torch.tensor([p + c])).logits[0, len(p) - 1:-1], -1)
            top = logp.topk(cfg.logprobs_top_k, -1)
            rows = slice(offset, offset + len(c))
            torch.testing.assert_close(graded["teacher_logprobs"][rows], top.values, rtol=0, atol=1e-5)
            assert graded["teacher_ids"][rows].tolist() == top.indices.tolist()
            offset += len(c)

        # one optimizer step, then a sync: the engine's log-probs of its own samples are the trainer's
        loss, _ = onpolicy_loss(student, graded, cfg)
        loss.backward()
        torch.optim.SGD(student.parameters(), lr=0.5).step()
        engine.sync(student)
        from vllm import SamplingParams

        out = engine.llm.generate([{"prompt_token_ids": rollouts.prompt_ids[0]}],
                                  SamplingParams(max_tokens=12, logprobs=0, temperature=1.0), use_tqdm=False)[0]
        ids = list(out.outputs[0].token_ids)
        engine_lp = torch.tensor([d[t].logprob for d, t in zip(out.outputs[0].logprobs, ids, strict=True)])
        with torch.no_grad():
            p = rollouts.prompt_ids[0]
            logp = torch.log_softmax(student(torch.tensor([p + ids])).logits[0, len(p) - 1:-1], -1)
        torch.testing.assert_close(engine_lp, logp[torch.arange(len(ids)), torch.tensor(ids)], rtol=0, atol=1e-4)
    finally:
        engine.close()


KILLED_RUN = """
import os, signal, sys
import llmdistill.onpolicy as op
from llmdistill.config.base import load_config
from llmdistill.config.onpolicy import OnPolicyConfig
real = op.save_checkpoint
def save_then_die(*args, **kwargs):
    path = real(*args, **kwargs)
    if path.name == "checkpoint-2":
        os.kill(os.getpid(), signal.SIGKILL)
    return path
op.save_checkpoint = save_then_die
op.run_onpolicy(OnPolicyConfig(**__import__("json").loads(sys.argv[1])))
"""


@pytest.mark.integration
def test_a_killed_run_resumes_with_the_prompt_stream_at_the_right_place(
        prompts, tiny_student_dir, tiny_random_teacher_dir, tmp_path):
    """transformers rollouts (the torch RNG is checkpointed): the resumed run ends bit-identical."""
    from llmdistill.onpolicy import run_onpolicy

    common = dict(rollout_backend="transformers", max_steps=4, save_steps=2, max_new_tokens=16)
    whole = config(prompts, tiny_student_dir, tiny_random_teacher_dir, tmp_path / "whole", **common)
    run_onpolicy(whole)
    killed = config(prompts, tiny_student_dir, tiny_random_teacher_dir, tmp_path / "killed", **common)
    script = tmp_path / "kill.py"
    script.write_text(textwrap.dedent(KILLED_RUN))
    args = json.dumps({k: getattr(killed, k) for k in ("dataset", "student_model", "teacher_model", "output_dir",
                                                        "prompts_per_step", "max_new_tokens", "max_steps",
                                                        "learning_rate", "logprobs_top_k", "logging_steps",
                                                        "max_model_len", "seed", "rollout_backend", "save_steps")})
    res = subprocess.run([sys.executable, str(script), args], capture_output=True, text=True, timeout=600)
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    assert (tmp_path / "killed" / "checkpoint-2" / "state.json").is_file()
    manifest = run_onpolicy(OnPolicyConfig(**{**killed.__dict__, "resume_from_checkpoint": "latest"}))
    a = load_file(str(tmp_path / "whole" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert manifest["counts"]["optimizer_steps"] == 4


@pytest.mark.integration
def test_the_cli_runs_and_records_the_compute(prompts, tiny_student_dir, tiny_random_teacher_dir, tmp_path):
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    out = tmp_path / "cli"
    res = subprocess.run([sys.executable, "-m", "llmdistill", "onpolicy", "--dataset", str(prompts),
                          "--student_model", str(tiny_student_dir), "--teacher_model", str(tiny_random_teacher_dir),
                          "--output_dir", str(out), "--max_steps", "2", "--prompts_per_step", "4",
                          "--max_new_tokens", "16", "--max_model_len", "256", "--logging_steps", "1"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    counts, seconds = manifest["counts"], manifest["compute"]["seconds"]
    assert counts["optimizer_steps"] == 2 and counts["rollout_tokens"] > 0
    assert counts["teacher_tokens_scored"] > counts["trained_tokens"] == counts["rollout_tokens"]
    assert set(seconds) == {"rollout", "scoring", "training", "sync"} and all(v > 0 for v in seconds.values())
    history = json.loads((out / "log_history.json").read_text())
    assert [h["step"] for h in history] == [1, 2] and "reverse_kl" in history[0]
