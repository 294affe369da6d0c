"""``llmdistill synthesize``: filters, decontamination, stable ids, resume, and synthesize -> generate -> build -> train.

Unit tests drive the stage with a scripted engine (same ``stream`` interface as generate's engines)
on the tiny tokenizer, so the counts each filter reports are known exactly. The integration test
runs the real question-writing teacher on vLLM, then the other stages on its output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ENGINE_FLAGS, run_cli  # tests/ is on sys.path (pytest's rootdir conftest)

from llmdistill.builder.decontam import NgramIndex
from llmdistill.config.base import ConfigError, load_config
from llmdistill.config.synthesize import SynthesizeConfig
from llmdistill.generate.engines import Completion
from llmdistill.prompts import prompt_hash
from llmdistill.synthesis import filters
from llmdistill.synthesis.prompts import QueryPrompts, few_shot_examples, user_turn_prefix
from llmdistill.tinyworld.task import generate_problems

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
HELDOUT = generate_problems(3, seed=0, split="heldout")  # the first problems of the `tiny` benchmark
TRAIN = generate_problems(12, seed=77, split="train")


# ---------------------------------------------------------------------------------------
# Filters, one by one


@pytest.mark.unit
def test_well_formed_query_needs_an_ended_non_empty_turn_without_special_tokens():
    special = ["<|im_start|>", "<|im_end|>"]
    assert filters.well_formed_query("Ann has 3 coins. How many now?", "stop", special)
    assert not filters.well_formed_query("Ann has 3 coins. How", "length", special)
    assert not filters.well_formed_query("  \n", "stop", special)
    assert not filters.well_formed_query("Ann has 3 coins.<|im_start|>assistant", "stop", special)
    assert not filters.well_formed_query("Ann has 3.</think>\\boxed{3}", "stop", special)
    assert not filters.well_formed_query("Ann has \ufffd coins?", "stop", special)
    assert not filters.well_formed_query("Ann has\u0004 coins?", "stop", special)
    assert filters.well_formed_query("Ann has 3 coins.\n\tHow many now?", "stop", special)


@pytest.mark.unit
def test_language_check_counts_letters_by_script():
    assert filters.script_fraction("Ann has 23 coins", "latin") == 1.0
    assert filters.script_fraction("Ann привет", "latin") == pytest.approx(3 / 9)
    assert filters.script_fraction("123 + 4", "cyrillic") == 1.0  # no letters: nothing to judge
    mask = filters.language_mask(["Ann has coins", "Анна has coins", "数学 problem"], "latin", 0.9)
    assert mask.tolist() == [True, False, False]
    assert filters.language_mask(["数学"], "any", 0.9).tolist() == [True]


@pytest.mark.unit
def test_length_check_uses_build_length_mask():
    assert filters.query_length_mask([3, 4, 50], 4).tolist() == [False, True, True]


@pytest.mark.unit
def test_exact_and_near_duplicates_keep_the_first():
    long = "Ann has 23 coins and she keeps them in a small wooden box under her bed every single night"
    texts = [long, long.upper() + "!", long + " too", "Ben has 5 pens. How many now?"]
    assert filters.unique_mask(texts, near=False, threshold=0.8, ngram=3, num_perm=128).tolist() == [
        True, False, True, True]
    assert filters.unique_mask(texts, near=True, threshold=0.8, ngram=3, num_perm=128).tolist() == [
        True, False, False, True]


@pytest.mark.unit
def test_decontamination_catches_a_heldout_problem():
    index = NgramIndex(32)
    index.add("tiny", [p.question for p in HELDOUT])
    texts = [TRAIN[0].question, HELDOUT[1].question, "  " + HELDOUT[2].question.upper()]
    keep, hits = filters.clean_mask(texts, index)
    assert keep.tolist() == [True, False, False]
    assert hits == {"tiny": 2}


@pytest.mark.unit
def test_majority_vote_reads_answers_with_the_shared_checker():
    answers = ["<think>3*2=6</think>\\boxed{6}", "<think>x</think>\\boxed{6.0}", "<think>y</think>\\boxed{7}",
               "<think>3*2=6</think>\\boxed{6}"]
    assert filters.voted_answer("numeric", answers, ["stop", "stop", "stop", "length"]) == ("6", 0.5)
    assert filters.voted_answer("numeric", answers[:2], ["stop", "stop"]) == ("6", 1.0)
    assert filters.voted_answer("numeric", ["no answer", "<think>a</think>"], ["stop", "stop"]) == (None, 0.0)


# ---------------------------------------------------------------------------------------
# Prompts the teacher completes


@pytest.mark.unit
def test_magpie_prefix_is_the_template_up_to_the_user_message(tiny_tokenizer):
    assert user_turn_prefix(tiny_tokenizer) == "<|im_start|>user\n"
    assert user_turn_prefix(tiny_tokenizer, "Be brief.") == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"


@pytest.mark.unit
def test_seeded_and_evolve_prompts_are_chat_turns_with_fixed_examples(tiny_tokenizer):
    prompts = QueryPrompts(tiny_tokenizer, None, "Examples:\n{examples}\nWrite one.", "Harder: {question}", None)
    seeds = ["q1", "q2", "q3", "q4"]
    shown = few_shot_examples(seeds, 2, slot=5, seed=0)
    assert shown == few_shot_examples(seeds, 2, slot=5, seed=0) and len(set(shown)) == 2
    assert prompts.seeded(["q1", "q2"]) == ("<|im_start|>user\nExamples:\n1. q1\n2. q2\nWrite one.<|im_end|>\n"
                                           "<|im_start|>assistant\n")
    assert prompts.evolve("q1") == "<|im_start|>user\nHarder: q1<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.unit
def test_config_errors_name_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="seed_file"):
        SynthesizeConfig(model="m", mode="seeded")
    with pytest.raises(ConfigError, match=r"evolve_template must contain '\{question\}'"):
        SynthesizeConfig(model="m", evolve_template="make it harder")
    with pytest.raises(ConfigError, match="gives no answer to vote on"):
        SynthesizeConfig(model="m", checker="code")
    assert SynthesizeConfig(model="m", mode="seeded", seed_file="s.txt").sampling == (0.8, 0.95)


# ---------------------------------------------------------------------------------------
# The stage on a scripted engine


class ScriptedEngine:
    """generate's engine interface on canned text: query slot -> question, question -> its reference answer.

    ``fail_after`` raises after that many completions (a killed run); ``served`` counts them.
    """

    def __init__(self, tokenizer, questions: dict[str, str], fail_after: int | None = None):
        self.tokenizer, self.questions, self.fail_after, self.served = tokenizer, questions, fail_after, 0
        self.phases = []

    def resample(self, cfg):
        self.phases.append((cfg.temperature, cfg.top_p, cfg.max_tokens))

    def _text(self, work) -> str:
        text = work.request.prompt_text
        if text.endswith("<|im_start|>user\n"):
            return self.questions[work.request.prompt_id]
        if "Harder: " in text:
            return text.split("Harder: ")[1].split("<|im_end|>")[0] + " Then it doubles. How many now?"
        question = text.split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
        from llmdistill.tinyworld.questions import parse_question

        parsed = parse_question(question)
        wrong = work.sample_index % 2 and "Ivy" in question  # Ivy's questions: the teacher disagrees with itself
        return f"<think>x</think>\\boxed{{{parsed.answer + (1 if wrong else 0) if parsed else 'none'}}}"

    def stream(self, work):
        for item in work:
            if self.fail_after is not None and self.served >= self.fail_after:
                raise RuntimeError("killed")
            self.served += 1
            ids = np.asarray(self.tokenizer(self._text(item), add_special_tokens=False)["input_ids"]
                             + [self.tokenizer.eos_token_id], dtype=np.int32)
            empty = np.zeros((len(ids), 0))
            yield item, Completion(ids, "stop", empty.astype(np.int32), empty.astype(np.float32),
                                   np.zeros(len(ids), np.float32))
            yield None


def scripted_questions() -> dict[str, str]:
    """Slot -> question: 6 fresh ones, an exact and a near duplicate, a held-out problem, a foreign-script
    one, a too-short one, and one the teacher disagrees on."""
    base = [p.question for p in TRAIN[:6]]
    return dict(enumerate([*base, base[0], base[1].replace("?", " ?"), HELDOUT[0].question,
                           "Анна имеет 3 монеты. Сколько?", "Hi?", "Ivy has 20 beads. She loses 4. How many now?"]))


def run_scripted(monkeypatch, tiny_tokenizer, out: Path, engine: ScriptedEngine, **overrides):
    from llmdistill.synthesis import stage

    engines = []

    def make_engine(cfg, scoring):
        engines.append(cfg)
        return engine

    monkeypatch.setattr(stage, "make_engine", make_engine)
    model = out.parent / "model"
    if not model.exists():
        tiny_tokenizer.save_pretrained(str(model))
    settings = dict(model=str(model), num_queries=12, checker="numeric", num_answers=2, min_agreement=0.75,
                    min_query_tokens=4, decontam_benchmarks=["tiny"], decontam_ngram=32, output_dir=str(out),
                    flush_every=2)
    cfg = load_config(SynthesizeConfig, **{**settings, **overrides})
    engine.questions = {str(k): v for k, v in scripted_questions().items()}
    return stage.run_synthesize(cfg), engines


def read_prompts(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.unit
def test_stage_counts_every_filter_and_writes_generate_input(monkeypatch, tiny_tokenizer, tmp_path):
    engine = ScriptedEngine(tiny_tokenizer, {})
    manifest, engines = run_scripted(monkeypatch, tiny_tokenizer, tmp_path / "out", engine)
    counts = manifest["counts"]
    assert {k: v for k, v in counts.items() if k.startswith("dropped_")} == {
        "dropped_malformed": 0, "dropped_length": 1, "dropped_language": 1, "dropped_duplicate": 2,
        "dropped_contaminated": 1, "dropped_unsolvable": 1}
    assert counts["written"] == 12 and counts["kept"] == 6 and counts["contaminated_by"] == {"tiny": 1}
    rows = read_prompts(tmp_path / "out" / "prompts.jsonl")
    assert [r["prompt"] for r in rows] == [p.question for p in TRAIN[:6]]
    assert [r["answer"] for r in rows] == [p.answer for p in TRAIN[:6]]  # the agreed answer is the reference
    assert HELDOUT[0].question not in {r["prompt"] for r in rows}
    assert engine.served == 12 + 2 * 7  # 12 queries, then 2 answers to each of the 7 that passed the cheap filters
    assert engines[0].temperature == 1.0 and engines[0].logprobs_top_k == 0  # magpie: T = 1, no log-probs
    assert len(engines) == 1 and [p[:2] for p in engine.phases] == [(1.0, 1.0), (0.6, 0.95)]  # queries, answers
    assert "| contaminated | 1 | 8.3% |" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.unit
def test_ids_are_content_hashes_that_generate_computes_too(monkeypatch, tiny_tokenizer, tmp_path):
    from llmdistill.config.generate import GenerateConfig
    from llmdistill.generate.inputs import row_prompt_id

    run_scripted(monkeypatch, tiny_tokenizer, tmp_path / "a", ScriptedEngine(tiny_tokenizer, {}))
    run_scripted(monkeypatch, tiny_tokenizer, tmp_path / "b", ScriptedEngine(tiny_tokenizer, {}))
    a, b = read_prompts(tmp_path / "a" / "prompts.jsonl"), read_prompts(tmp_path / "b" / "prompts.jsonl")
    assert a == b
    assert prompt_hash("Ann has 3 coins. Then it doubles. How many now?") == "f59a5ac5ce8810a3"
    gen = GenerateConfig(dataset=str(tmp_path / "a" / "prompts.jsonl"), model="m")  # no id column: hash of the prompt
    assert [r["id"] for r in a] == [row_prompt_id(gen, r, "row") for r in a] == [prompt_hash(r["prompt"]) for r in a]


@pytest.mark.unit
def test_resume_after_a_kill_does_only_what_is_missing(monkeypatch, tiny_tokenizer, tmp_path):
    with pytest.raises(RuntimeError, match="killed"):
        run_scripted(monkeypatch, tiny_tokenizer, tmp_path / "out", ScriptedEngine(tiny_tokenizer, {}, fail_after=15))
    written = len((tmp_path / "out" / "queries.jsonl").read_text().splitlines())
    answered = len((tmp_path / "out" / "answers.jsonl").read_text().splitlines())
    assert (written, answered) == (12, 2)  # flushed 2 at a time: the 3rd answer was in flight when killed
    engine = ScriptedEngine(tiny_tokenizer, {})
    manifest, _ = run_scripted(monkeypatch, tiny_tokenizer, tmp_path / "out", engine)
    assert engine.served == 2 * 7 - 2
    fresh, _ = run_scripted(monkeypatch, tiny_tokenizer, tmp_path / "fresh", ScriptedEngine(tiny_tokenizer, {}))
    assert read_prompts(tmp_path / "out" / "prompts.jsonl") == read_prompts(tmp_path / "fresh" / "prompts.jsonl")
    assert manifest["counts"] == fresh["counts"]
    with pytest.raises(ConfigError, match="num_answers: 2 -> 3"):
        run_scripted(monkeypatch, tiny_tokenizer, tmp_path / "out", ScriptedEngine(tiny_tokenizer, {}), num_answers=3)


@pytest.mark.unit
def test_evolve_steps_rewrite_each_query(monkeypatch, tiny_tokenizer, tmp_path):
    engine = ScriptedEngine(tiny_tokenizer, {})
    manifest, _ = run_scripted(monkeypatch, tiny_tokenizer, tmp_path / "out", engine, evolve_steps=1,
                               evolve_template="Harder: {question}", num_queries=2)
    rows = read_prompts(tmp_path / "out" / "prompts.jsonl")
    assert [r["prompt"] for r in rows] == [TRAIN[i].question + " Then it doubles. How many now?" for i in range(2)]
    assert manifest["counts"]["written"] == 2 and engine.served == 2 + 2 + 2 * 2


@pytest.mark.unit
def test_shards_split_the_queries_and_merge_drops_duplicates_across_parts(monkeypatch, tiny_tokenizer, tmp_path):
    from llmdistill.synthesis import run_synthesize

    out = tmp_path / "out"
    for part in ("0/2", "1/2"):
        run_scripted(monkeypatch, tiny_tokenizer, out, ScriptedEngine(tiny_tokenizer, {}), shard=part)
    merged = run_synthesize(SynthesizeConfig(output_dir=str(out), merge=True))
    rows = read_prompts(out / "prompts.jsonl")
    assert merged["counts"]["written"] == 12 and merged["parts"] == 2
    assert sorted(r["prompt"] for r in rows) == sorted(p.question for p in TRAIN[:6])


@pytest.mark.unit
def test_recipe_dry_run_prints_the_plan():
    res = subprocess.run([PY, "-m", "llmdistill", "synthesize", "--config",
                          str(ROOT / "configs" / "recipes" / "r1-qwen7b" / "synthesize.yaml"), "--dry_run"],
                         capture_output=True, text=True, cwd=ROOT, env={**os.environ, "COLUMNS": "200"})
    assert res.returncode == 0, res.stderr[-3000:]
    for needle in ("magpie", "200000", "800000", "held by 2 external vLLM server(s)", "gpqa_diamond"):
        assert needle in res.stdout, needle
    assert not (ROOT / "runs" / "r1-qwen7b").exists(), "a dry run must write nothing"


# ---------------------------------------------------------------------------------------
# The tiny world writes its own questions; synthesize -> generate -> build -> train


@pytest.mark.unit
def test_the_shipped_question_writer_is_the_one_this_code_trains():
    from llmdistill.tinyworld import bootstrap
    from llmdistill.tinyworld.questions import WRITER_SETTINGS, _writer_key, question_writer

    name = f"tiny-question-writer-{_writer_key(bootstrap.bootstrap_teacher(0), 0, WRITER_SETTINGS)}"
    shipped = sorted(p.name for p in bootstrap.SHIPPED.glob("tiny-question-writer-*"))
    assert shipped == [name], f"shipped {shipped}, this code trains {name}: run scripts/ship_teacher.py"
    assert question_writer(0) == bootstrap.SHIPPED / name


@pytest.fixture(scope="module")
def question_writer_dir():
    """The question-writing teacher (shipped for seed 0; else fine-tuned from the teacher on first use, minutes)."""
    from llmdistill.tinyworld.questions import question_writer

    return question_writer(seed=0)


@pytest.mark.unit
def test_parse_question_reads_back_every_task_question():
    from llmdistill.tinyworld.questions import parse_question

    problems = generate_problems(300, seed=3, split="train")
    parsed = [parse_question(p.question) for p in problems]
    assert [(str(q.answer), q.difficulty) for q in parsed] == [(p.answer, p.difficulty) for p in problems]
    assert parse_question("Ann has 3 coins. Then it doubles. How many now?").ops == ("double",)
    assert parse_question("Ann has 3 coins. Ben gets 2 more. How many now?") is None  # two names
    assert parse_question("Ann has 3 coins. She gives away 9. How many now?") is None  # below zero
    assert parse_question("Ann has 3 coins. How many now?") is None  # no step


@pytest.mark.integration
def test_question_writer_writes_questions_and_keeps_its_accuracy(question_writer_dir):
    """Measured on the checkpoint, not read from its manifest: its held-out greedy accuracy, and the
    share of questions sampled at T = 1 that are strictly valid (one name, one object, values the task
    allows; the shipped teacher writes none), each as the manifest recorded it up to another CPU's
    rounding (the manifest may come from another machine: greedy answers may flip where two ids nearly
    tie, and sampled questions may diverge, whose validity over 256 then differs by ~0.04 s.d.)."""
    from llmdistill.manifest import read_manifest
    from llmdistill.tinyworld.questions import VALIDITY_SAMPLES, parse_question, sample_questions
    from llmdistill.tinyworld.recipe import greedy_accuracy, heldout_eval_problems

    manifest = read_manifest(question_writer_dir)
    accuracy = greedy_accuracy(question_writer_dir, heldout_eval_problems())
    questions = sample_questions(question_writer_dir, VALIDITY_SAMPLES, seed=0)
    validity = sum(parse_question(q) is not None for q in questions) / len(questions)
    assert accuracy >= 0.9 and abs(accuracy - manifest["heldout_accuracy"]) <= 0.02, accuracy
    assert validity >= 0.15 and abs(validity - manifest["question_validity"]) <= 0.12, validity
    assert manifest["inputs"]["teacher"]


@pytest.mark.integration
def test_synthesize_generate_build_train(question_writer_dir, tiny_teacher_dir, tiny_student_dir, tmp_path):
    from llmdistill.manifest import read_manifest
    from llmdistill.tinyworld.questions import parse_question

    syn, gen, built, trained = (tmp_path / d for d in ("synthesize", "generate", "build", "train"))
    run_cli("synthesize", "--config", "configs/synthesize_tiny.yaml", "--model", str(question_writer_dir),
            "--num_queries", "48", "--num_answers", "2", "--min_agreement", "1.0", "--output_dir", str(syn),
            *ENGINE_FLAGS)
    counts = read_manifest(syn)["counts"]
    dropped = sum(v for k, v in counts.items() if k.startswith("dropped_"))
    assert counts["written"] == 48 and dropped + counts["kept"] == 48 and counts["kept"] >= 8
    rows = read_prompts(syn / "prompts.jsonl")
    assert len(rows) == counts["kept"]
    assert sum(parse_question(r["prompt"], strict=False) is not None for r in rows) >= 0.5 * len(rows)

    run_cli("generate", "--config", "configs/generate_tiny.yaml", "--model", str(tiny_teacher_dir),
            "--dataset", str(syn / "prompts.jsonl"), "--passthrough_columns", "answer", "--output_dir", str(gen),
            *ENGINE_FLAGS)
    assert read_manifest(gen)["counts"]["rows"] == len(rows)
    run_cli("build", "--config", "configs/build_tiny.yaml", "--input_path", str(gen), "--student_tokenizer",
            str(tiny_student_dir), "--output_dir", str(built))
    assert read_manifest(built)["counts"]["rows"] > 0
    run_cli("train", "--config", "configs/train_tiny_kd.yaml", "--student_model", str(tiny_student_dir),
            "--data_dir", str(built), "--output_dir", str(trained), "--max_steps", "3", "--warmup_steps", "0",
            "--logging_steps", "1")
    assert read_manifest(trained)["counts"]["global_steps"] == 3
