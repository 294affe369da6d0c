"""The one prompt formatter, and that every stage that formats a prompt agrees with it.

The shipped configs are run as they are (prompt settings, instruction files, chat templates),
with only the model, tokenizer and data swapped for the tiny world's: generate's input side
(no engine) formats and tokenizes the prompts, a generation shard is written from those
requests, and build must compute the same prompt token ids for the student.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from conftest import ENGINE_FLAGS, run_cli  # tests/ is on sys.path (pytest's rootdir conftest)

from llmdistill.builder import run_build
from llmdistill.builder.pack import unpack_row
from llmdistill.config.base import load_config
from llmdistill.config.build import BuildConfig
from llmdistill.config.generate import GenerateConfig, ScoreConfig
from llmdistill.formats import read_built, shard_name, write_generation_shard
from llmdistill.generate import prepare
from llmdistill.generate.store import write_part_manifest
from llmdistill.prompts import PromptError, PromptFormat, prompt_messages, read_text_or_file, stored_prompt
from llmdistill.tinyworld.task import generate_problems, reference_completion, write_jsonl

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "recipes" / "r1-qwen7b"
INSTRUCTION = RECIPE / "prompts" / "math_instruction.txt"
# (generate or score config, the build config that reads its output)
PIPELINES = [
    ("generate", REPO / "configs" / "generate_tiny.yaml", REPO / "configs" / "build_tiny.yaml"),
    ("score", REPO / "configs" / "score_tiny.yaml", REPO / "configs" / "build_tiny.yaml"),
    ("generate", RECIPE / "generate.yaml", RECIPE / "build.yaml"),
    ("score", RECIPE / "score.yaml", RECIPE / "build.yaml"),
]
K = 4


@pytest.mark.unit
def test_a_file_is_read_exactly_as_it_is(tmp_path):
    assert INSTRUCTION.read_text().endswith("\\boxed{}.\n")
    assert read_text_or_file(str(INSTRUCTION)) == INSTRUCTION.read_text()
    fmt = PromptFormat.from_settings(instruction_template=str(INSTRUCTION))
    user = fmt.messages("What is 2+2?")[-1]["content"]
    assert user == "What is 2+2?\nPlease reason step by step, and put your final answer within \\boxed{}.\n"
    assert read_text_or_file("inline {prompt}") == "inline {prompt}"


@pytest.mark.unit
def test_messages_system_prompt_template_and_errors(tiny_tokenizer):
    fmt = PromptFormat(system_prompt="Be brief.", instruction_template="Q: {prompt}")
    chat = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert fmt.messages(chat) == [{"role": "system", "content": "Be brief."}, chat[0], chat[1],
                                  {"role": "user", "content": "Q: c"}]
    assert chat[2]["content"] == "c"  # the caller's messages are not modified
    assert fmt.messages([{"role": "system", "content": "own"}, {"role": "user", "content": "x"}])[0]["content"] == "own"
    with pytest.raises(PromptError, match="must contain '{prompt}'"):
        PromptFormat(instruction_template="no placeholder")
    with pytest.raises(PromptError, match="rows.jsonl line 3: the prompt is empty"):
        fmt.messages("  ", "rows.jsonl line 3")
    with pytest.raises(PromptError, match="text or a list"):
        fmt.messages(42)  # type: ignore[arg-type]
    text = fmt.render(tiny_tokenizer, "2+2?")
    assert text == tiny_tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q: 2+2?"}],
        tokenize=False, add_generation_prompt=True)
    plain = PromptFormat(system_prompt="S", use_chat_template=False)
    assert plain.render(tiny_tokenizer, "P") == "S\n\nP"


@pytest.mark.unit
def test_stored_prompts_round_trip():
    chat = [{"role": "user", "content": "hi"}]
    assert prompt_messages(stored_prompt(chat)) == chat
    assert prompt_messages(stored_prompt("[not json")) == [{"role": "user", "content": "[not json"}]
    assert PromptFormat.from_dict(PromptFormat("s", "{prompt}!", False).to_dict()) == PromptFormat("s", "{prompt}!", False)


def _input_rows(stage: str, cfg: GenerateConfig | ScoreConfig, problems) -> list[dict]:
    """Input rows in the columns the config reads: prompt (text, or messages ending with the completion)."""
    rows = []
    for p in problems:
        row = {cfg.id_column or "id": p.id, **{c: "x" for c in cfg.passthrough_columns}, "answer": p.answer}
        if stage == "score" and not cfg.completion_column:
            row[cfg.prompt_column] = [{"role": "user", "content": p.question},
                                      {"role": "assistant", "content": reference_completion(p)}]
        else:
            row[cfg.prompt_column] = p.question
            if stage == "score":
                row[cfg.completion_column] = reference_completion(p)
        rows.append(row)
    return rows


def _teacher_output(plan, tokenizer, rng) -> list[dict]:
    """Generation rows as the engine would write them for the plan's requests (reference completions)."""
    rows = []
    for req in plan.pending:
        completion = req.completion or reference_completion(req._problem)  # type: ignore[attr-defined]
        ids = req.completion_token_ids or tokenizer(completion, add_special_tokens=False)["input_ids"]
        ids = list(ids) + ([] if ids[-1] == tokenizer.eos_token_id else [tokenizer.eos_token_id])
        top = np.stack([np.r_[t, rng.choice(len(tokenizer), K - 1, replace=False)] for t in ids]).astype(np.int32)
        lps = np.sort(rng.uniform(-9, -0.1, size=(len(ids), K)), axis=1)[:, ::-1].astype(np.float32)
        rows.append({"prompt_id": req.prompt_id, "sample_index": req.sample_index, "prompt": req.prompt,
                     "prompt_text": req.prompt_text, "prompt_token_ids": req.prompt_token_ids,
                     "completion": completion, "completion_token_ids": ids, "finish_reason": "stop",
                     "topk_ids": top, "topk_logprobs": lps, "token_logprobs": lps[:, 0], **req.passthrough})
    return rows


@pytest.mark.unit
@pytest.mark.parametrize("stage,stage_config,build_config", PIPELINES,
                         ids=[f"{s}:{p.relative_to(REPO)}" for s, p, _ in PIPELINES])
def test_build_computes_the_prompt_ids_generate_stored(stage, stage_config, build_config, tmp_path, monkeypatch,
                                                       tiny_tokenizer, tiny_tokenizer_dir):
    monkeypatch.chdir(REPO)  # the configs name their prompt files relative to the checkout
    problems = generate_problems(6, seed=3)
    cls = ScoreConfig if stage == "score" else GenerateConfig
    base = load_config(cls, stage_config)
    data = write_jsonl(tmp_path / "in.jsonl", _input_rows(stage, base, problems))
    cfg = load_config(cls, stage_config, model=str(tiny_tokenizer_dir), tokenizer=None, dataset=str(data),
                      dataset_config=None, backend="offline", max_model_len=256, logprobs_top_k=K,
                      output_dir=str(tmp_path / "gen"), shard="0/1")
    plan = prepare(cfg, stage)
    by_id = {p.id: p for p in problems}
    for req in plan.pending:
        req._problem = by_id[req.prompt_id]  # type: ignore[attr-defined]
    assert len(plan.pending) == len(problems)
    rows = _teacher_output(plan, tiny_tokenizer, np.random.default_rng(0))
    passthrough = {c: pa.string() for c in cfg.passthrough_columns}
    write_generation_shard(rows, plan.directory / shard_name(0), K, plan.info.teacher, passthrough)
    write_part_manifest(plan.directory, cfg, plan.info, plan.counts, 0.0, complete=True)

    # build with the shipped build config: it fails if a student prompt differs from the teacher's
    built = load_config(BuildConfig, build_config, input_path=str(plan.directory), student_tokenizer=str(tiny_tokenizer_dir),
                        teacher_tokenizer=None, verifier="none", decontam_benchmarks=[], min_completion_tokens=1,
                        allow_prompt_mismatch=False, max_length=512, output_dir=str(tmp_path / "built"))
    stats = run_build(built)
    assert stats["prompt_template_mismatches"] == 0
    table, _ = read_built(tmp_path / "built")
    expected = {(r["prompt_id"], r["sample_index"]): np.r_[r["prompt_token_ids"], r["completion_token_ids"]] for r in rows}
    seen = 0
    for row in table.to_pylist():
        for (ids, _mask), doc_id in zip(unpack_row(row), row["doc_ids"], strict=True):
            pid, sample = doc_id.rsplit("/", 1)
            np.testing.assert_array_equal(ids, expected[(pid, int(sample))])
            seen += 1
    assert seen == stats["packing"]["documents"] > 0


@pytest.mark.integration
def test_recipe_instruction_file_through_generate_build_train(tmp_path, tiny_tokenizer_dir, tiny_random_teacher_dir,
                                                               tiny_student_dir):
    """The recipe's instruction file (trailing newline and all) through a real engine, build and training."""
    problems = generate_problems(8, seed=4)
    data = write_jsonl(tmp_path / "in.jsonl", [{"id": p.id, "problem": p.question, "answer": p.answer} for p in problems])
    run_cli("generate", "--model", str(tiny_random_teacher_dir), "--dataset", str(data),
            "--prompt_column", "problem", "--id_column", "id", "--passthrough_columns", "answer",
            "--instruction_template", str(INSTRUCTION), "--num_samples", "1", "--max_tokens", "12",
            "--logprobs_top_k", "4", *ENGINE_FLAGS, "--output_dir", str(tmp_path / "gen"), cwd=tmp_path)
    # build from another directory: the manifest carries the format as text, not a relative path
    run_cli("build", "--input_path", str(tmp_path / "gen"), "--student_tokenizer", str(tiny_tokenizer_dir),
            "--verifier", "none", "--require_think", "false", "--drop_truncated", "false",
            "--max_length", "256", "--output_dir", str(tmp_path / "built"), cwd=REPO / "configs")
    table, meta = read_built(tmp_path / "built")
    ids, mask = unpack_row(table.to_pylist()[0])[0]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    assert tok.decode(ids[mask == 0]).endswith("within \\boxed{}.\n<|im_end|>\n<|im_start|>assistant\n")
    run_cli("train", "--student_model", str(tiny_student_dir), "--data_dir", str(tmp_path / "built"),
            "--output_dir", str(tmp_path / "train"), "--max_steps", "2", "--per_device_train_batch_size", "1",
            "--save_strategy", "no", "--report_to", "none", "--gradient_checkpointing", "false")
    assert (tmp_path / "train" / "model.safetensors").is_file()
