"""Self-distillation: SDFT rewrites (generate's rewrite mode, build's verifier on the original prompt) and the
born-again recipe (the student's own earlier checkpoint as the teacher), each end to end through the CLI."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
import pytest
from conftest import ENGINE_FLAGS, assert_trained, run_cli  # tests/ on sys.path (rootdir conftest)

from llmdistill.builder import run_build
from llmdistill.builder.pack import unpack_row
from llmdistill.builder.tokenize import PromptMismatchError
from llmdistill.config.base import ConfigError
from llmdistill.config.build import BuildConfig
from llmdistill.config.generate import GenerateConfig
from llmdistill.formats import (
    GenerationInfo,
    read_built,
    read_generation_info,
    shard_name,
    write_generation_shard,
)
from llmdistill.generate.inputs import Formatter, InputError, input_columns, prompt_requests
from llmdistill.manifest import read_manifest, write_manifest
from llmdistill.prompts import PromptFormat
from llmdistill.tinyworld.task import generate_problems, reference_completion, write_jsonl

TEMPLATE = "{prompt}\nReference: {reference}"


# ---------------------------------------------------------------------------------------
# SDFT: the rewrite request, and build on the original prompt


def _sdft_config(**overrides) -> GenerateConfig:
    values = dict(model="m", dataset="d.jsonl", id_column="id", rewrite_column="completion", rewrite_template=TEMPLATE)
    return GenerateConfig(**(values | overrides))


@pytest.mark.unit
def test_rewrite_requests_show_the_reference_and_store_the_question(tiny_tokenizer):
    cfg = _sdft_config()
    assert "completion" in input_columns(cfg)
    fmt = Formatter(PromptFormat(system_prompt="Be brief."), tiny_tokenizer)
    rows = [("d.jsonl line 1", {"id": "a", "prompt": "Ann has 2.", "completion": "<think>2</think>\\boxed{2}"}),
            ("d.jsonl line 2", {"id": "b", "prompt": [{"role": "user", "content": "Bob has 3."}],
                                "completion": "<think>3</think>\\boxed{3}"})]
    text, messages = prompt_requests(cfg, fmt, rows)
    assert text.prompt == "Ann has 2."  # what the student will be trained to answer
    assert text.prompt_text == tiny_tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": "Ann has 2.\nReference: <think>2</think>\\boxed{2}"}],
        tokenize=False, add_generation_prompt=True)
    assert json.loads(messages.prompt) == [{"role": "user", "content": "Bob has 3."}]
    assert "Bob has 3.\nReference: <think>3</think>\\boxed{3}" in messages.prompt_text
    # without the mode, the model reads the question alone
    plain = prompt_requests(_sdft_config(rewrite_column=None), fmt, rows[:1])[0]
    assert "Reference" not in plain.prompt_text
    with pytest.raises(InputError, match=r"d.jsonl line 3: the reference answer \(rewrite_column\) is empty"):
        prompt_requests(cfg, fmt, [("d.jsonl line 3", {"id": "c", "prompt": "x", "completion": ""})])
    with pytest.raises(ConfigError, match=r"rewrite_template must contain \{reference\}"):
        _sdft_config(rewrite_template="{prompt} again")


@pytest.mark.unit
def test_build_of_rewrites_keeps_the_verified_ones_on_the_original_prompt(tmp_path, tiny_tokenizer, tiny_tokenizer_dir):
    tok, rng = tiny_tokenizer, np.random.default_rng(0)
    rows, right = [], set()
    for i, p in enumerate(generate_problems(6, seed=13, split="train")):
        shown = tok.apply_chat_template([{"role": "user", "content": TEMPLATE.format(
            prompt=p.question, reference=reference_completion(p))}], tokenize=False, add_generation_prompt=True)
        answer = p.answer if i % 2 == 0 else str(int(p.answer) + 1)  # every other rewrite gets it wrong
        completion = reference_completion(p).replace(f"\\boxed{{{p.answer}}}", f"\\boxed{{{answer}}}")
        ids = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        top = np.c_[ids, rng.integers(0, len(tok), size=(len(ids), 1))]
        rows.append({"prompt_id": p.id, "sample_index": 0, "prompt": p.question, "prompt_text": shown,
                     "prompt_token_ids": tok(shown, add_special_tokens=False)["input_ids"], "completion": completion,
                     "completion_token_ids": ids, "finish_reason": "stop", "topk_ids": top,
                     "topk_logprobs": np.log(np.full((len(ids), 2), 0.4, np.float32)), "answer": p.answer})
        if i % 2 == 0:
            right.add(p.id)
    gen = tmp_path / "gen"
    write_generation_shard(rows, gen / shard_name(0), k=2, teacher=str(tiny_tokenizer_dir),
                           passthrough={"answer": pa.string()})
    info = GenerationInfo(stage="generate", teacher=str(tiny_tokenizer_dir), tokenizer=str(tiny_tokenizer_dir), k=2,
                          vocab_size=len(tok), prompt_format=PromptFormat())
    base = dict(input_path=str(gen), student_tokenizer=str(tiny_tokenizer_dir), verifier="numeric",
                decontam_benchmarks=[], max_length=256, kd=False)
    # an ordinary generation: the student's prompt is not what the model read
    write_manifest(gen, "generate", None, generation=info.to_manifest())
    with pytest.raises(PromptMismatchError):
        run_build(BuildConfig(**base, output_dir=str(tmp_path / "a")))
    # a rewrite generation: the student reads the question; only the verified rewrites are kept
    write_manifest(gen, "generate", None, generation=replace(info, rewrite_template=TEMPLATE).to_manifest())
    assert read_generation_info(gen).rewrite_template == TEMPLATE
    run_build(BuildConfig(**base, output_dir=str(tmp_path / "b")))
    table, meta = read_built(tmp_path / "b")
    by_id = {r["prompt_id"]: r for r in rows}
    kept = set()
    for row in table.to_pylist():
        for doc, (doc_ids, _) in zip(row["doc_ids"], unpack_row(row), strict=True):
            src = by_id[doc.rsplit("/", 1)[0]]
            question = tok.apply_chat_template([{"role": "user", "content": src["prompt"]}], tokenize=False,
                                               add_generation_prompt=True)
            np.testing.assert_array_equal(doc_ids, np.r_[tok(question, add_special_tokens=False)["input_ids"],
                                                         src["completion_token_ids"]])
            kept.add(src["prompt_id"])
    assert kept == right and not meta["kd"]


# ---------------------------------------------------------------------------------------
# end to end through the CLI

TRAIN_FLAGS = ["--max_steps", "3", "--warmup_steps", "0", "--logging_steps", "1"]



def sft_set(path, n: int, seed: int):
    """An SFT set of the tiny world: question, reference answer (its reference trace), answer."""
    return write_jsonl(path, [{"id": p.id, "prompt": p.question, "completion": reference_completion(p),
                               "answer": p.answer} for p in generate_problems(n, seed=seed, split="train")])


@pytest.mark.integration
def test_sdft_rewrites_verified_and_trained(tmp_path, tiny_teacher_dir):
    data = sft_set(tmp_path / "sft.jsonl", 48, seed=31)
    run_cli("generate", "--config", "configs/generate_sdft_tiny.yaml", "--model", str(tiny_teacher_dir),
            "--dataset", str(data), "--output_dir", str(tmp_path / "rewrites"), "--temperature", "0", *ENGINE_FLAGS)
    assert read_generation_info(tmp_path / "rewrites").rewrite_template == "{prompt} {reference}"
    run_cli("build", "--config", "configs/build_sdft_tiny.yaml", "--input_path", str(tmp_path / "rewrites"),
            "--output_dir", str(tmp_path / "built"), "--student_tokenizer", str(tiny_teacher_dir), "--workers", "1")
    fates = feather.read_table(tmp_path / "built" / "traces.arrow").to_pylist()
    kept = [f for f in fates if not f["dropped_by"]]
    assert kept and all(f["correct"] for f in kept)  # only verified rewrites
    assert any(f["correct"] is False for f in fates)  # the tiny model gets most rewrites wrong: they are dropped
    run_cli("train", "--config", "configs/train_sdft_tiny.yaml", "--student_model", str(tiny_teacher_dir),
            "--data_dir", str(tmp_path / "built"), "--output_dir", str(tmp_path / "sdft"), *TRAIN_FLAGS)
    assert_trained(tmp_path / "sdft", tiny_teacher_dir, steps=3)


@pytest.mark.integration
def test_born_again_round_through_the_cli(tmp_path, tiny_student_dir):
    pairs = sft_set(tmp_path / "pairs.jsonl", 24, seed=41)
    score = ["--dataset", str(pairs), "--id_column", "id", "--passthrough_columns", "answer", *ENGINE_FLAGS]
    build = ["--config", "configs/build_selfdistill_tiny.yaml", "--student_tokenizer", str(tiny_student_dir),
             "--workers", "1"]
    # the earlier checkpoint: the student after a few SFT steps on the reference traces (a plain dataset)
    run_cli("build", *build, "--input_path", str(pairs), "--kd", "false", "--output_dir", str(tmp_path / "b0"))
    run_cli("train", "--config", "configs/train_tiny_sft.yaml", "--student_model", str(tiny_student_dir),
            "--data_dir", str(tmp_path / "b0"), "--output_dir", str(tmp_path / "earlier"), *TRAIN_FLAGS)
    # born again: that checkpoint scores the traces and is the teacher of a fresh student (same initial weights)
    run_cli("score", "--model", str(tmp_path / "earlier"), "--output_dir", str(tmp_path / "score-self"), *score)
    assert read_generation_info(tmp_path / "score-self").teacher == str(tmp_path / "earlier")
    run_cli("build", *build, "--input_path", str(tmp_path / "score-self"), "--output_dir", str(tmp_path / "b1"))
    run_cli("train", "--config", "configs/train_selfdistill_tiny.yaml", "--student_model", str(tiny_student_dir),
            "--data_dir", str(tmp_path / "b1"), "--output_dir", str(tmp_path / "born-again"), *TRAIN_FLAGS)
    first, (second, meta) = read_built(tmp_path / "b0")[0], read_built(tmp_path / "b1")
    assert sorted(first.column("doc_ids").to_pylist()) == sorted(second.column("doc_ids").to_pylist())
    assert meta["kd"] and meta["k"] == 20  # the earlier checkpoint's top-20 on every target token
    assert read_manifest(tmp_path / "born-again")["stage"] == "train"
