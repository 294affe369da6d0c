"""Bad input ends in one line naming the file, row or field and the fix, exit code 2, and no output.

Every case runs the real CLI entry point (:func:`llmdistill.cli.main`) in this process, before
any engine starts or model loads; two cases also run ``python -m llmdistill`` to show that no
traceback reaches the terminal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmdistill.cli import main
from llmdistill.formats import shard_name, write_generation_shard
from llmdistill.tinyworld.task import generate_problems, reference_completion, to_records, write_jsonl

pytestmark = pytest.mark.unit
K = 4


@dataclass
class Case:
    """One bad input: how to make it, the command, and what the message must name."""

    name: str
    stage: str
    make: Callable[[Path, dict], list[str]]  # (tmp dir, fixtures) -> the command's arguments
    needles: tuple[str, ...]


def _prompts(tmp: Path, lines: list[str] | None = None, name: str = "prompts.jsonl") -> Path:
    path = tmp / name
    if lines is None:
        write_jsonl(path, to_records(generate_problems(4, seed=0)))
    else:
        path.write_text("\n".join(lines) + "\n")
    return path


def _gen_args(tmp: Path, fx: dict, *extra: str, dataset: Path | None = None) -> list[str]:
    return ["--model", fx["teacher"], "--dataset", str(dataset or _prompts(tmp)), "--id_column", "id",
            "--output_dir", str(tmp / "out"), *extra]


def _rows(tok, n: int = 3) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for p in generate_problems(n, seed=1):
        ids = tok(reference_completion(p), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        text = tok.apply_chat_template([{"role": "user", "content": p.question}], tokenize=False,
                                       add_generation_prompt=True)
        lps = np.sort(rng.uniform(-9, -0.1, size=(len(ids), K)), axis=1)[:, ::-1].astype(np.float32)
        rows.append({"prompt_id": p.id, "sample_index": 0, "prompt": p.question, "prompt_text": text,
                     "prompt_token_ids": tok(text, add_special_tokens=False)["input_ids"],
                     "completion": reference_completion(p), "completion_token_ids": ids, "finish_reason": "stop",
                     "topk_ids": rng.integers(0, len(tok), size=(len(ids), K)).astype(np.int32), "topk_logprobs": lps,
                     "token_logprobs": lps[:, 0], "answer": p.answer})
    return rows


def _shards(tmp: Path, fx: dict, damage: Callable[[list[dict]], None] | None = None) -> Path:
    """A generation directory of one shard; ``damage`` edits its rows (the writer's own checks bypassed)."""
    rows = _rows(fx["tok"])
    directory = tmp / "gen"
    path = directory / shard_name(0)
    write_generation_shard(rows, path, K, fx["teacher"], {"answer": pa.string()})
    if damage is not None:
        table = pq.read_table(path)
        data = table.to_pylist()
        damage(data)
        pq.write_table(pa.Table.from_pylist(data, schema=table.schema), path)
    return directory


def _build_args(tmp: Path, fx: dict, source: Path | str, *extra: str) -> list[str]:
    return ["--input_path", str(source), "--student_tokenizer", fx["teacher"], "--verifier", "numeric",
            "--max_length", "256", "--output_dir", str(tmp / "out"), *extra]


def _yaml(tmp: Path, text: str) -> str:
    path = tmp / "cfg.yaml"
    path.write_text(text)
    return str(path)


def _train_args(tmp: Path, fx: dict, *extra: str) -> list[str]:
    return ["--student_model", fx["teacher"], "--data_dir", str(tmp), "--output_dir", str(tmp / "out"), *extra]


def _truncated(tmp: Path, fx: dict) -> Path:
    """A generation directory whose shard lost its second half (a kill mid-copy, a full disk)."""
    directory = _shards(tmp, fx)
    path = directory / shard_name(0)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return directory


def _without_topk(tmp: Path, fx: dict) -> Path:
    """A generation directory whose shard has no ``topk_ids`` column (llmdistill metadata kept)."""
    directory = _shards(tmp, fx)
    path = directory / shard_name(0)
    table = pq.read_table(path)
    pq.write_table(table.drop_columns(["topk_ids"]).replace_schema_metadata(table.schema.metadata), path)
    return directory


def _sft(tmp: Path, fx: dict, records: list[dict]) -> list[str]:
    """A plain dataset of text traces (the SFT path): a good row, then ``records``."""
    good = {"prompt": "p", "completion": "c", "answer": "1"} if "prompt" in records[-1] else {
        "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "answer": "1"}
    return _build_args(tmp, fx, write_jsonl(tmp / "d.jsonl", [good, *records]), "--kd", "false")


def _chat(*turns: dict) -> dict:
    return {"messages": list(turns), "answer": "1"}


def _set(row: int, field: str, value) -> Callable[[list[dict]], None]:
    def damage(rows: list[dict]) -> None:
        rows[row][field] = value(rows[row]) if callable(value) else value
    return damage


CASES = [
    # ---- generate ------------------------------------------------------------------------
    Case("generate: dataset missing", "generate",
         lambda t, fx: _gen_args(t, fx, dataset=t / "nope.jsonl"), ("nope.jsonl", "does not exist")),
    Case("generate: malformed JSONL line", "generate",
         lambda t, fx: _gen_args(t, fx, dataset=_prompts(t, ['{"id": "a", "prompt": "x"}', '{"id": "b", "prompt": "y"}',
                                                            '{"id": "c", "prompt"'])),
         ("prompts.jsonl line 3", "not valid JSON")),
    Case("generate: malformed .json file", "generate",
         lambda t, fx: _gen_args(t, fx, dataset=_prompts(t, ['[{"id": "a", "prompt": "x"},', '{"id": "b"'],
                                                        name="prompts.json")),
         ("prompts.json line 3 column 1", "not valid JSON")),
    Case("generate: .json file holding an object, not a list", "generate",
         lambda t, fx: _gen_args(t, fx, dataset=_prompts(t, ['{"rows": [{"id": "a", "prompt": "x"}]}'],
                                                        name="prompts.json")),
         ("prompts.json is a JSON document starting with '{'", "expected a list of row objects", ".jsonl")),
    Case("generate: .json list with text after it", "generate",
         lambda t, fx: _gen_args(t, fx, dataset=_prompts(t, ['[{"id": "a", "prompt": "x"}]', ']'], name="prompts.json")),
         ("prompts.json line 2 column 1", "text after the list of rows")),
    Case("generate: prompt column missing", "generate",
         lambda t, fx: _gen_args(t, fx, dataset=_prompts(t, ['{"id": "a", "question": "x"}'])),
         ("prompts.jsonl line 1", "column 'prompt' is missing", "prompt_column")),
    Case("generate: empty prompt", "generate",
         lambda t, fx: _gen_args(t, fx, dataset=_prompts(t, ['{"id": "a", "prompt": "x"}', '{"id": "b", "prompt": " "}'])),
         ("prompts.jsonl line 2", "the prompt is empty")),
    Case("generate: duplicate ids", "generate",
         lambda t, fx: _gen_args(t, fx, dataset=_prompts(t, ['{"id": "a", "prompt": "x"}', '{"id": "a", "prompt": "y"}'])),
         ("line 2 repeats prompt id 'a'", "id_column")),
    Case("generate: model path missing", "generate",
         lambda t, fx: ["--model", str(t / "no-teacher"), "--dataset", str(_prompts(t)), "--output_dir", str(t / "out")],
         ("model", "no-teacher", "does not exist")),
    Case("generate: instruction template without {prompt}", "generate",
         lambda t, fx: _gen_args(t, fx, "--instruction_template", "Solve it."), ("instruction_template", "{prompt}")),
    Case("generate: unknown flag", "generate",
         lambda t, fx: _gen_args(t, fx, "--temprature", "0.5"), ("unknown key 'temprature'", "did you mean 'temperature'")),
    Case("generate: text for an integer flag", "generate",
         lambda t, fx: _gen_args(t, fx, "--num_samples", "two"), ("--num_samples", "invalid int value: 'two'")),
    Case("generate: float for an integer in YAML", "generate",
         lambda t, fx: ["--config", _yaml(t, "num_samples: 2.5\n"), *_gen_args(t, fx)],
         ("cfg.yaml: num_samples: expected an integer, got 2.5",)),
    Case("generate: unknown YAML key before any range check", "generate",
         lambda t, fx: ["--config", _yaml(t, "logprobs_top_k: 0\nmax_tokenz: 5\n"), *_gen_args(t, fx)],
         ("unknown key 'max_tokenz' in", "cfg.yaml", "did you mean 'max_tokens'")),
    Case("generate: temperature out of range", "generate",
         lambda t, fx: _gen_args(t, fx, "--temperature", "-1"), ("temperature=-1.0 is out of range",)),
    Case("generate: none for an integer that is not optional", "generate",
         lambda t, fx: _gen_args(t, fx, "--num_samples", "none"), ("--num_samples", "invalid int value: 'none'")),
    Case("generate: YAML key read as a boolean", "generate",
         lambda t, fx: ["--config", _yaml(t, "num_samples: 2\nyes: 1\n"), *_gen_args(t, fx)],
         ("cfg.yaml: key True is not a field name", "yes, no, on, off", "write a field name of GenerateConfig")),
    Case("generate: YAML key read as a number", "generate",
         lambda t, fx: ["--config", _yaml(t, "1: x\n"), *_gen_args(t, fx)],
         ("cfg.yaml: key 1 is not a field name (YAML reads this key as int)",)),
    Case("generate: YAML file that is not UTF-8", "generate",
         lambda t, fx: ["--config", str((t / "cfg.yaml").write_bytes(b"system_prompt: caf\xe9\n") and t / "cfg.yaml"),
                        *_gen_args(t, fx)], ("cfg.yaml is not UTF-8 text (byte 18): save it as UTF-8",)),
    # ---- build ---------------------------------------------------------------------------
    Case("build: input missing", "build", lambda t, fx: _build_args(t, fx, t / "no-gen"), ("no-gen", "does not exist")),
    Case("build: empty input directory", "build",
         lambda t, fx: _build_args(t, fx, (t / "empty").mkdir() or t / "empty"), ("empty", "holds no shards")),
    Case("build: truncated shard", "build",
         lambda t, fx: _build_args(t, fx, _truncated(t, fx)),
         ("part-000000.parquet", "truncated or corrupt")),
    Case("build: shard without a top-k column", "build",
         lambda t, fx: _build_args(t, fx, _without_topk(t, fx)),
         ("part-000000.parquet", "lacks column(s) ['topk_ids']")),
    Case("build: top-k row of the wrong length", "build",
         lambda t, fx: _build_args(t, fx, _shards(t, fx, _set(1, "topk_ids", lambda r: r["topk_ids"][:-1]))),
         ("part-000000.parquet row 1", "'topk_ids' has", "expected")),
    Case("build: NaN log-probs", "build",
         lambda t, fx: _build_args(t, fx, _shards(t, fx, _set(2, "topk_logprobs",
                                                               lambda r: [float("nan")] + r["topk_logprobs"][1:]))),
         ("part-000000.parquet row 2", "'topk_logprobs' holds nan")),
    Case("build: null completion", "build",
         lambda t, fx: _build_args(t, fx, _shards(t, fx, _set(0, "completion", None))),
         ("part-000000.parquet row 0", "'completion' is null")),
    Case("build: top-k id outside the vocabulary", "build",
         lambda t, fx: _build_args(t, fx, _shards(t, fx, _set(1, "topk_ids", lambda r: [10**6] + r["topk_ids"][1:]))),
         ("part-000000.parquet row 1", "id 1000000", "vocabulary")),
    Case("build: float for an integer in YAML", "build",
         lambda t, fx: ["--config", _yaml(t, "max_length: 512.7\n"), *_build_args(t, fx, _shards(t, fx))[:-6],
                        "--output_dir", str(t / "out")],
         ("cfg.yaml: max_length: expected an integer, got 512.7",)),
    Case("build: unknown verifier", "build",
         lambda t, fx: _build_args(t, fx, _shards(t, fx), "--verifier", "mathh"), ("verifier='mathh'",)),
    Case("build: reference column missing", "build",
         lambda t, fx: _build_args(t, fx, _shards(t, fx), "--answer_column", "gold"), ("verifier 'numeric' needs", "gold")),
    Case("build: KD from a plain dataset", "build",
         lambda t, fx: _build_args(t, fx, write_jsonl(t / "d.jsonl", [{"prompt": "p", "completion": "c"}])),
         ("plain dataset", "kd: false")),
    Case("build: null completion in a plain dataset", "build",
         lambda t, fx: _sft(t, fx, [{"prompt": "q", "completion": None, "answer": "2"}]),
         ("d.jsonl, row 1", "'completion' is null", "remove the row")),
    Case("build: null prompt in a plain dataset", "build",
         lambda t, fx: _sft(t, fx, [{"prompt": "q", "completion": "c", "answer": "2"},
                                    {"prompt": None, "completion": "c", "answer": "3"}]),
         ("d.jsonl, row 2", "'prompt' is null")),
    Case("build: a number for the completion in a plain dataset", "build",
         lambda t, fx: _sft(t, fx, [{"prompt": "q", "completion": 7, "answer": "2"}]),
         ("d.jsonl, row 1", "'completion' is of type int, not text")),
    Case("build: messages without a user turn", "build",
         lambda t, fx: _sft(t, fx, [_chat({"role": "system", "content": "s"}, {"role": "assistant", "content": "a"})]),
         ("d.jsonl, row 1", "'messages' has no user message before its last assistant message", "add the user turn")),
    Case("build: messages stored as a JSON string", "build",
         lambda t, fx: _build_args(t, fx, write_jsonl(t / "d.jsonl", [{"messages": json.dumps(
             [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]), "answer": "1"}]), "--kd", "false"),
         ("d.jsonl, row 0", "'messages' is a string", "list of")),
    Case("build: a message without content", "build",
         lambda t, fx: _sft(t, fx, [_chat({"role": "user", "text": "q"}, {"role": "assistant", "content": "a"})]),
         ("d.jsonl, row 1", "'messages' message 0 has 'content'", "give every message a text 'role' and 'content'")),
    Case("build: malformed line in a plain dataset", "build",
         lambda t, fx: _build_args(t, fx, _prompts(t, ['{"prompt": "p", "completion": "c"}', '{"prompt": '], "d.jsonl"),
                                   "--kd", "false"),
         ("d.jsonl could not be read as json", "row 1")),
    Case("build: completion token id outside the vocabulary", "build",
         lambda t, fx: _build_args(t, fx, _shards(t, fx, _set(1, "completion_token_ids",
                                                               lambda r: r["completion_token_ids"][:-1] + [10**6]))),
         ("part-000000.parquet row 1", "'completion_token_ids' holds id 1000000", "vocabulary")),
    Case("build: completion token id outside the vocabulary, SFT only (the ids are used as they are)", "build",
         lambda t, fx: _build_args(t, fx, _shards(t, fx, _set(1, "completion_token_ids",
                                                               lambda r: r["completion_token_ids"][:-1] + [10**6])),
                                   "--kd", "false"),
         ("part-000000.parquet row 1", "'completion_token_ids' holds id 1000000", "vocabulary")),
    Case("build: malformed line in the decontamination file", "build",
         lambda t, fx: _build_args(t, fx, _shards(t, fx), "--decontam_extra_file",
                                   str(_prompts(t, ['{"problem": "1+1"}', '{"problem": '], "extra.jsonl"))),
         ("extra.jsonl line 2", "not valid JSON")),
    # ---- train ---------------------------------------------------------------------------
    Case("train: float for an integer in YAML", "train",
         lambda t, fx: ["--config", _yaml(t, "max_steps: 40.5\n"), "--student_model", fx["teacher"],
                        "--data_dir", str(t), "--output_dir", str(t / "out")],
         ("cfg.yaml: max_steps: expected an integer, got 40.5",)),
    Case("train: data_dir without built shards", "train",
         lambda t, fx: ["--student_model", fx["teacher"], "--data_dir", str((t / "nodata").mkdir() or t / "nodata"),
                        "--output_dir", str(t / "out"), "--report_to", "none"],
         ("nodata", "llmdistill build")),
    Case("train: a Liger kernel flag it would ignore", "train",
         lambda t, fx: ["--student_model", fx["teacher"], "--data_dir", str(t), "--output_dir", str(t / "out"),
                        "--use_liger_kernel", "true"], ("use_liger_kernel",)),
    Case("train: fp16 and bf16 both", "train",
         lambda t, fx: _train_args(t, fx, "--bf16", "true", "--fp16", "true"),
         ("the command line: invalid TrainConfig setting: At most one of fp16 and bf16 can be True",)),
    Case("train: a dict setting that is not JSON", "train",
         lambda t, fx: _train_args(t, fx, "--lr_scheduler_kwargs", "{bad"),
         ("the command line: invalid TrainConfig setting: lr_scheduler_kwargs is not valid JSON", "write a JSON object")),
    Case("train: a dict setting in YAML that is not JSON", "train",
         lambda t, fx: ["--config", _yaml(t, "lr_scheduler_kwargs: '{\"min_lr\": }'\n"), *_train_args(t, fx)],
         ("cfg.yaml and the command line: invalid TrainConfig setting: lr_scheduler_kwargs is not valid JSON",)),
    Case("train: negative warmup_steps", "train",
         lambda t, fx: _train_args(t, fx, "--warmup_steps", "-1"),
         ("invalid TrainConfig setting: warmup_steps must be",)),
    Case("train: load_best_model_at_end without evaluation", "train",
         lambda t, fx: _train_args(t, fx, "--load_best_model_at_end", "true"),
         ("invalid TrainConfig setting: --load_best_model_at_end requires the save and eval strategy to match",)),
    Case("train: --no_ of a field that is not true/false", "train",
         lambda t, fx: _train_args(t, fx, "--no_learning_rate"),
         ("unknown key 'no_learning_rate'", "learning_rate is not a true/false field", "--learning_rate VALUE")),
    Case("train: an unknown divergence", "train",
         lambda t, fx: ["--student_model", fx["teacher"], "--data_dir", str(t), "--output_dir", str(t / "out"),
                        "--divergence", "kl"], ("--divergence", "invalid choice: 'kl'")),
    # ---- eval ----------------------------------------------------------------------------
    Case("eval: unknown benchmark", "eval",
         lambda t, fx: ["--models", fx["teacher"], "--benchmarks", "tiny,aime2099", "--output_dir", str(t / "out")],
         ("unknown benchmark 'aime2099'", "valid names")),
    Case("eval: a bad 4th model is found before the first engine starts", "eval",
         lambda t, fx: ["--models", ",".join([fx["teacher"]] * 3 + [str(t / "gone")]), "--benchmarks", "tiny",
                        "--limit", "2", "--output_dir", str(t / "out")], ("models[3]", "gone", "does not exist")),
    Case("eval: pass@k above n", "eval",
         lambda t, fx: ["--models", fx["teacher"], "--benchmarks", "tiny", "--num_samples", "4", "--k_values", "2,8",
                        "--output_dir", str(t / "out")], ("k_values [8]", "4 sample(s)", "tiny")),
    Case("eval: data_path missing", "eval",
         lambda t, fx: ["--models", fx["teacher"], "--benchmarks", "math500", "--data_path", str(t / "m.jsonl"),
                        "--output_dir", str(t / "out")], ("m.jsonl", "does not exist")),
    Case("eval: malformed line in data_path", "eval",
         lambda t, fx: ["--models", fx["teacher"], "--benchmarks", "math500", "--data_path",
                        str(_prompts(t, ['{"problem": "1+1?", "answer": "2"}', '{"problem": '], "m.jsonl")),
                        "--output_dir", str(t / "out")], ("m.jsonl line 2 is not valid JSON", "fix or remove")),
    Case("eval: data_path .json holding a scalar", "eval",
         lambda t, fx: ["--models", fx["teacher"], "--benchmarks", "math500", "--data_path",
                        str(_prompts(t, ["42"], "m.json")), "--output_dir", str(t / "out")],
         ("m.json is a JSON number", "expected a list of row objects")),
    Case("eval: null answer in data_path", "eval",
         lambda t, fx: ["--models", fx["teacher"], "--benchmarks", "math500", "--data_path",
                        str(_prompts(t, ['{"problem": "1+1?", "answer": "2"}', '{"problem": "2+2?", "answer": null}'],
                                     "m.jsonl")), "--output_dir", str(t / "out")],
         ("m.jsonl, row 1: field 'answer' (column 'answer') is null", "fill it in or remove the row")),
    Case("eval: data_path .csv with a ragged row", "eval",
         lambda t, fx: ["--models", fx["teacher"], "--benchmarks", "math500", "--data_path",
                        str(_prompts(t, ["problem,answer", "1+1?,2", "2+2?,4,extra"], "m.csv")),
                        "--output_dir", str(t / "out")], ("m.csv cannot be read as csv", "Expected 2 columns, got 3",
                                                          "write it as .jsonl")),
    Case("eval: data_path .parquet that is not Parquet", "eval",
         lambda t, fx: ["--models", fx["teacher"], "--benchmarks", "math500", "--data_path",
                        str(_prompts(t, ["not parquet"], "m.parquet")), "--output_dir", str(t / "out")],
         ("m.parquet cannot be read as parquet", "fix the file")),
    Case("eval: null id in data_path", "eval",
         lambda t, fx: ["--models", fx["teacher"], "--benchmarks", "math500", "--data_path",
                        str(_prompts(t, ['{"unique_id": "a", "problem": "1+1?", "answer": "2"}',
                                         '{"unique_id": null, "problem": "2+2?", "answer": "4"}'], "m.jsonl")),
                        "--output_dir", str(t / "out")],
         ("m.jsonl, row 1: field 'id' (column 'unique_id') is null", "fill it in or remove the row")),
    Case("eval: two problems with one id in data_path", "eval",
         lambda t, fx: ["--models", fx["teacher"], "--benchmarks", "math500", "--data_path",
                        str(_prompts(t, ['{"unique_id": "a", "problem": "1+1?", "answer": "2"}',
                                         '{"unique_id": "a", "problem": "2+2?", "answer": "4"}'], "m.jsonl")),
                        "--output_dir", str(t / "out")],
         ("m.jsonl, rows 0 and 1: both have id 'a' (column 'unique_id')", "its own id")),
    # ---- demo ----------------------------------------------------------------------------
    Case("demo: seeds that are not integers", "demo",
         lambda t, fx: ["--seeds", "a,b", "--output_dir", str(t / "out")], ("seeds='a,b'", "comma-separated integers")),
]


@pytest.fixture(scope="module")
def fixtures(tiny_random_teacher_dir, tiny_tokenizer):
    return {"teacher": str(tiny_random_teacher_dir), "tok": tiny_tokenizer}


def test_there_are_enough_cases_and_every_stage_has_some():
    assert len(CASES) >= 25
    assert {c.stage for c in CASES} == {"generate", "build", "train", "eval", "demo"}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_clear_line(case, fixtures, tmp_path, capsys):
    args = case.make(tmp_path, fixtures)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([case.stage, *args])
    captured = capsys.readouterr().err
    # third-party import chatter (bitsandbytes' kernel notice) may precede it: llmdistill says one line
    ours = [line for line in captured.splitlines() if line.startswith("llmdistill ")]
    assert exit_info.value.code == 2, captured
    assert len(ours) == 1 and "Traceback" not in captured, captured
    err = ours[0]
    for needle in case.needles:
        assert needle in err, (needle, err)
    assert not (tmp_path / "out").exists(), "a failed stage must leave no output"


@pytest.mark.parametrize("debug", [False, True])
def test_the_terminal_sees_one_line_and_debug_shows_the_traceback(tmp_path, debug):
    args = [sys.executable, "-m", "llmdistill", "build", "--input_path", str(tmp_path / "missing"),
            "--student_tokenizer", "x", "--output_dir", str(tmp_path / "out")]
    env = {**os.environ, "LLMDISTILL_DEBUG": "1" if debug else "0"}
    res = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == (1 if debug else 2)
    if debug:
        assert "Traceback" in res.stderr
    else:
        assert res.stderr.strip().count("\n") == 0 and "Traceback" not in res.stderr, res.stderr
        assert "llmdistill build: error:" in res.stderr


def test_a_shard_with_the_wrong_type_names_the_column(tmp_path, fixtures):
    from llmdistill.formats import SchemaError, read_generation_table

    directory = _shards(tmp_path, fixtures)
    path = directory / shard_name(0)
    table = pq.read_table(path)
    cast = table.set_column(table.schema.get_field_index("topk_logprobs"), "topk_logprobs",
                            table.column("topk_logprobs").cast(pa.list_(pa.float64())))
    pq.write_table(cast.replace_schema_metadata(table.schema.metadata), path)
    with pytest.raises(SchemaError, match=r"part-000000.parquet: column 'topk_logprobs' is list<\w+: double>, expected"):
        read_generation_table(directory)
    assert json.loads(table.schema.metadata[b"llmdistill"])["k"] == K


@pytest.mark.parametrize("bad", [100, 10**6, -5])
def test_a_completion_token_id_outside_the_vocabulary_names_the_row(bad):
    from llmdistill.formats import GENERATION_COLUMNS, SchemaError, check_generation_rows

    ids = [[1, 2], [], [3, bad, 99]]  # k = 2: the top-k ids are all in range
    table = pa.table({"completion_token_ids": pa.array(ids, GENERATION_COLUMNS["completion_token_ids"]),
                      "topk_ids": pa.array([[0] * 4, [], [99] * 6], GENERATION_COLUMNS["topk_ids"])})
    check_generation_rows(Path("s.parquet"), table.slice(0, 2), 2, vocab_size=100)
    check_generation_rows(Path("s.parquet"), table, 2)  # no vocabulary: no range check
    with pytest.raises(SchemaError, match=rf"^s\.parquet row 12: 'completion_token_ids' holds id {bad}, outside the "
                                          r"student's vocabulary of 100: the traces come from another tokenizer"):
        check_generation_rows(Path("s.parquet"), table, 2, vocab_size=100, first_row=10)


def test_a_json_list_is_read_a_row_at_a_time_as_json_reads_it(tmp_path, monkeypatch):
    """Rows of any JSON (strings holding brackets, commas, escapes, characters of several UTF-8 bytes,
    numbers and literals) come out as ``json.loads`` gives them, whatever the size of a read; memory
    holds about one read, not the document; a malformed file is named at json's own line and column."""
    import json
    import random
    import tracemalloc

    from llmdistill.config import base
    from llmdistill.config.base import ConfigError, json_array_objects

    rng = random.Random(0)

    def value(depth: int = 0):
        r = rng.random()
        if depth > 2 or r < 0.3:
            return rng.choice([1, -2.5e-3, 12345678901234567890, True, False, None, 'a,]}["x\\ é 😀', ""])
        if r < 0.6:
            return [value(depth + 1) for _ in range(rng.randrange(3))]
        return {f"k{i}": value(depth + 1) for i in range(rng.randrange(3))}

    path = tmp_path / "rows.json"
    for _ in range(200):
        rows = [{"id": i, "v": value()} for i in range(rng.randrange(0, 6))]
        text = json.dumps(rows, indent=rng.choice([None, 1, 3]), ensure_ascii=rng.random() < 0.5)
        path.write_text(rng.choice(["", " \n "]) + text + rng.choice(["", "\n"]), encoding="utf-8")
        monkeypatch.setattr(base, "JSON_READ_BYTES", rng.choice([1, 2, 3, 7, 64, 1 << 20]))
        assert [r for _, r in json_array_objects(path)] == rows
        assert [r for _, r in json_array_objects(path, limit=2)] == rows[:2]
    for bad in ('[{"a": 1},\n {"b": }]', '[{"a": tru}]', '[{"a": 1}\n{"b": 2}]'):
        path.write_text(bad)
        try:
            json.loads(bad)
        except json.JSONDecodeError as err:
            expected = f"line {err.lineno} column {err.colno} is not valid JSON"
        for size in (1, 4, 1 << 20):
            monkeypatch.setattr(base, "JSON_READ_BYTES", size)
            with pytest.raises(ConfigError, match=expected):
                list(json_array_objects(path))
    path.write_text('[{"a": 1}, 2]')
    with pytest.raises(ConfigError, match="row 1 is a JSON int, expected an object"):
        list(json_array_objects(path))

    # 20 MB of rows, read 1 MB at a time: the first row comes out holding a few MB, not the document
    monkeypatch.setattr(base, "JSON_READ_BYTES", 1 << 20)
    path.write_text(json.dumps([{"id": i, "prompt": "x" * 1000} for i in range(20_000)]))
    tracemalloc.start()
    rows = json_array_objects(path)
    assert next(rows)[1]["id"] == 0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 << 20 and sum(1 for _ in rows) == 19_999

