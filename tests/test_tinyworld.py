"""The tiny world: task family, tokenizer, model factories and the bootstrapped teacher."""

from __future__ import annotations

import collections
import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmdistill.checking.checkers import Reference, Verdict, check
from llmdistill.manifest import read_manifest
from llmdistill.tinyworld.bootstrap import _build_cached, student_init, teacher_accuracy
from llmdistill.tinyworld.models import MODEL_SIZES, make_model, num_params
from llmdistill.tinyworld.recipe import EVAL_PROBLEMS, greedy_accuracy, heldout_eval_problems
from llmdistill.tinyworld.task import (
    Problem,
    generate_problems,
    reference_completion,
    split_of,
    to_records,
    write_jsonl,
)
from llmdistill.tinyworld.tokenizer import build_tokenizer

_EQUATION = re.compile(r"^(\d+)([-+*/])(\d+)=(\d+)$")


# Task ---------------------------------------------------------------------------------------

@pytest.mark.unit
def test_same_seed_same_problems_and_prefix_stable():
    a = generate_problems(200, seed=3)
    assert a == generate_problems(200, seed=3)
    assert generate_problems(50, seed=3) == a[:50]
    assert a != generate_problems(200, seed=4)


@pytest.mark.unit
def test_splits_are_disjoint_and_labelled_by_hash():
    train = generate_problems(3000, seed=0, split="train")
    heldout = generate_problems(500, seed=0, split="heldout")
    assert not {p.question for p in train} & {p.question for p in heldout}
    assert all(split_of(p.question) == "train" for p in train)
    assert all(split_of(p.question) == "heldout" for p in heldout)
    assert len({p.question for p in train}) == len(train)
    assert len({p.id for p in train}) == len(train)


@pytest.mark.unit
def test_difficulty_is_step_count_and_mix_is_balanced():
    problems = generate_problems(3000, seed=1)
    counts = collections.Counter(p.difficulty for p in problems)
    assert set(counts) == {1, 2, 3}
    assert min(counts.values()) > 900
    assert all(len(p.steps) == p.difficulty for p in problems)
    assert {p.difficulty for p in generate_problems(100, seed=1, difficulties=(2,))} == {2}
    with pytest.raises(ValueError, match="difficulties"):
        generate_problems(10, seed=1, difficulties=(4,))


@pytest.mark.unit
def test_steps_chain_and_evaluate_to_the_answer():
    ops = collections.Counter()
    for p in generate_problems(2000, seed=2):
        value = None
        for eq in p.steps:
            a, op, b, c = _EQUATION.match(eq).groups()
            assert value is None or int(a) == value  # each step starts from the previous result
            expected = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b), "/": int(a) // int(b)}[op]
            assert int(c) == expected and 0 <= expected < 200
            if op == "/":
                assert int(a) % 2 == 0
            ops[op] += 1
            value = int(c)
        assert str(value) == p.answer
        assert f" {_EQUATION.match(p.steps[0]).group(1)} " in p.question  # the start value is stated
    assert set(ops) == {"+", "-", "*", "/"}


@pytest.mark.unit
def test_questions_are_varied():
    problems = generate_problems(1000, seed=0)
    openers = {p.question.split(" ")[0] for p in problems}
    assert len(openers) >= 10  # names and "There"
    assert len({p.question.rsplit(".", 1)[-1] for p in problems}) >= 4


@pytest.mark.unit
def test_reference_completion_format():
    p = Problem(id="x", question="q", answer="60", steps=("23+7=30", "30*2=60"), difficulty=2)
    assert reference_completion(p) == "<think>23+7=30 30*2=60</think>\\boxed{60}"


@pytest.mark.unit
def test_checker_accepts_references_and_rejects_wrong_or_malformed():
    """The tiny world is checked like any benchmark: the shared ``numeric`` checker."""

    def numeric(completion: str, answer: str):
        return check("numeric", completion, Reference(answer=answer))

    for p in generate_problems(300, seed=5):
        assert numeric(reference_completion(p), p.answer).correct
        assert not numeric(reference_completion(p), str(int(p.answer) + 1)).correct
    assert numeric("<think>1+1=2</think>\\boxed{3} then \\boxed{ 2 }", "2") == Verdict("2", True)
    assert numeric("\\boxed{2}<think>1+1=2</think>", "2").extracted is None  # no box after the trace
    assert numeric("<think>\\boxed{2}", "2").extracted is None  # the think block never closed
    assert numeric("<think>1+1=2</think>the answer is 2", "2").extracted is None  # the box is the format
    assert not numeric("<think>1+1=2</think>\\boxed{two}", "2").correct
    assert not numeric("<think>1+1=2</think>\\boxed{}", "2").correct
    assert numeric("<think>1+1=2</think>\\boxed{02}", "2").correct


@pytest.mark.unit
def test_records_and_jsonl(tmp_path):
    problems = generate_problems(5, seed=0, split="heldout")
    records = to_records(problems)
    assert records[0] == {"id": problems[0].id, "prompt": problems[0].question,
                          "answer": problems[0].answer, "difficulty": problems[0].difficulty}
    path = write_jsonl(tmp_path / "sub" / "prompts.jsonl", records)
    assert [json.loads(line) for line in path.read_text().splitlines()] == records
    assert [p.name for p in path.parent.iterdir()] == ["prompts.jsonl"]  # no temp file left


# Tokenizer ----------------------------------------------------------------------------------

@pytest.mark.unit
def test_tokenizer_round_trip_and_special_tokens(tiny_tokenizer):
    tok = tiny_tokenizer
    assert 380 <= len(tok) <= 512
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.bos_token is None
    for p in generate_problems(50, seed=0):
        for text in (p.question, reference_completion(p)):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert tok.decode(ids, skip_special_tokens=True) == text
    for tag in ("<think>", "</think>"):
        assert len(tok(tag, add_special_tokens=False)["input_ids"]) == 1
    ids = tok("<think>1+1=2</think>\\boxed{2}<|im_end|>", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == "<think>1+1=2</think>\\boxed{2}"


@pytest.mark.unit
def test_digits_are_single_tokens(tiny_tokenizer):
    ids = tiny_tokenizer("12345 67890", add_special_tokens=False)["input_ids"]
    pieces = [tiny_tokenizer.decode([i]) for i in ids]
    assert [p.strip() for p in pieces if p.strip()] == list("1234567890")


@pytest.mark.unit
def test_chat_template_is_chatml(tiny_tokenizer):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                {"role": "assistant", "content": "A"}]
    text = tiny_tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
    prompt = tiny_tokenizer.apply_chat_template(messages[1:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.unit
def test_tokenizer_build_is_deterministic(tmp_path, tiny_tokenizer_dir):
    build_tokenizer(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (tiny_tokenizer_dir / name).read_bytes()
    reloaded = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    assert reloaded.chat_template is not None and reloaded.eos_token == "<|im_end|>"


# Models -------------------------------------------------------------------------------------

@pytest.mark.unit
def test_model_sizes_and_head_dim(tiny_tokenizer):
    teacher = make_model("teacher", tiny_tokenizer)
    student = make_model("student", tiny_tokenizer)
    assert num_params(teacher) / num_params(student) >= 4
    assert 500_000 <= num_params(teacher) <= 900_000
    for size in MODEL_SIZES:
        cfg = make_model(size, tiny_tokenizer).config
        assert cfg.hidden_size // cfg.num_attention_heads >= 32  # vLLM CPU attention needs it
        assert not cfg.tie_word_embeddings and cfg.eos_token_id == tiny_tokenizer.eos_token_id
    with pytest.raises(ValueError, match="size"):
        make_model("huge", tiny_tokenizer)


@pytest.mark.unit
def test_make_model_seeded_and_leaves_global_rng(tiny_tokenizer):
    state = torch.random.get_rng_state()
    a, b = make_model("student", tiny_tokenizer, seed=1), make_model("student", tiny_tokenizer, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    c = make_model("student", tiny_tokenizer, seed=2)
    w = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(a.state_dict()[w], b.state_dict()[w])
    assert not torch.equal(a.state_dict()[w], c.state_dict()[w])


@pytest.mark.unit
def test_saved_checkpoint_reloads_with_generation_config(tiny_random_teacher_dir, tiny_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_random_teacher_dir))
    reference = make_model("teacher", tiny_tokenizer, seed=0)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert model.generation_config.eos_token_id == tiny_tokenizer.eos_token_id
    gen = json.loads((tiny_random_teacher_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tiny_tokenizer.eos_token_id


# Cache --------------------------------------------------------------------------------------

@pytest.mark.unit
def test_cache_build_is_atomic(tmp_path):
    target = tmp_path / "tiny-teacher-x"

    def crash(out):
        (out / "model.safetensors").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _build_cached(target, crash)
    assert not target.exists() and not [p for p in tmp_path.iterdir() if p.is_dir()]

    calls = []

    def build(out):
        calls.append(out)
        (out / "manifest.json").write_text("{}")

    assert _build_cached(target, build) == target and (target / "manifest.json").is_file()
    assert _build_cached(target, build) == target and len(calls) == 1  # cached: not rebuilt


# Bootstrapped teacher (minutes on the first run, then cached) --------------------------------

@pytest.fixture(scope="module")
def heldout():
    problems = heldout_eval_problems()
    assert len(problems) == EVAL_PROBLEMS and {p.difficulty for p in problems} == {1, 2, 3}
    return problems


@pytest.fixture(scope="module")
def teacher_measured(tiny_teacher_dir, heldout):
    return greedy_accuracy(tiny_teacher_dir, heldout)


@pytest.mark.integration
def test_bootstrapped_teacher_is_accurate(teacher_measured):
    assert teacher_measured >= 0.90


@pytest.mark.integration
def test_bootstrap_is_reproducible_from_manifest(tiny_teacher_dir, teacher_measured):
    manifest = read_manifest(tiny_teacher_dir)
    assert manifest["seed"] == 0 and manifest["counts"]["heldout_problems"] == EVAL_PROBLEMS
    assert teacher_accuracy(tiny_teacher_dir) == teacher_measured


@pytest.mark.integration
def test_teacher_stops_at_eos_with_a_well_formed_trace(tiny_teacher_dir, heldout):
    tok = AutoTokenizer.from_pretrained(str(tiny_teacher_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_teacher_dir)).eval()
    prompt = tok.apply_chat_template([{"role": "user", "content": heldout[0].question}],
                                     tokenize=False, add_generation_prompt=True)
    enc = tok(prompt, add_special_tokens=False, return_tensors="pt")
    out = model.generate(**enc, do_sample=False, max_new_tokens=64)[0, enc["input_ids"].shape[1]:]
    assert out[-1].item() == tok.eos_token_id and len(out) < 64
    text = tok.decode(out, skip_special_tokens=True)
    assert re.fullmatch(r"<think>[0-9+\-*/= ]+</think>\\boxed\{\d+\}", text), text


@pytest.mark.integration
def test_untrained_student_scores_near_zero(heldout):
    student = student_init(seed=0)
    assert student_init(seed=0) == student
    assert read_manifest(student)["counts"]["params"] < 200_000
    assert greedy_accuracy(student, heldout[:200]) <= 0.05


@pytest.mark.unit
def test_the_shipped_teacher_is_the_one_this_code_trains():
    """Edit the task, tokenizer, models, recipe or prompt format, and this fails until
    `python scripts/ship_teacher.py` ships the teacher the new code trains."""
    from llmdistill.tinyworld.bootstrap import SHIPPED, _cache_key
    from llmdistill.tinyworld.recipe import TeacherTrainSettings
    from llmdistill.tinyworld.tokenizer import build_tokenizer

    name = f"tiny-teacher-{_cache_key('teacher', 0, TeacherTrainSettings())}"
    shipped = sorted(p.name for p in SHIPPED.glob("tiny-teacher-*"))
    assert shipped == [name], f"shipped {shipped}, this code trains {name}: run scripts/ship_teacher.py"
    tok = AutoTokenizer.from_pretrained(str(SHIPPED / name))
    from llmdistill.formats import tokenizer_fingerprint

    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(build_tokenizer())
    assert read_manifest(SHIPPED / name)["heldout_accuracy"] >= 0.9


@pytest.mark.slow
def test_re_bootstrapping_reproduces_the_shipped_teachers_accuracy(tmp_path, monkeypatch):
    """Minutes of training: the teacher this machine trains scores within 1 point of the shipped one
    (on the CPU model that shipped it, the same weights; another CPU rounds differently, and the
    README gives the spread across CPUs)."""
    from llmdistill.tinyworld.bootstrap import SHIPPED, bootstrap_teacher

    monkeypatch.setenv("LLMDISTILL_CACHE", str(tmp_path))
    trained = bootstrap_teacher(0, use_shipped=False)
    shipped = SHIPPED / trained.name
    assert abs(teacher_accuracy(trained) - teacher_accuracy(shipped)) <= 0.01 + 1e-9  # 5 of 500 is 1 point, not 1.0000001
