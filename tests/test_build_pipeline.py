"""End-to-end ``llmdistill build`` on synthetic generation shards made with the tiny tokenizer (no vLLM)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest
from conftest import forbid

from llmdistill import formats
from llmdistill.builder import pipeline, run_build
from llmdistill.builder.pack import unpack_row
from llmdistill.builder.pipeline import EmptyBuildError
from llmdistill.builder.tokenize import TokenizerMismatchError
from llmdistill.codec import decode_topk
from llmdistill.config.base import ConfigError
from llmdistill.config.build import BuildConfig
from llmdistill.formats import (
    GenerationInfo,
    SchemaError,
    read_built,
    shard_name,
    tokenizer_fingerprint,
    write_generation_shard,
)
from llmdistill.manifest import read_manifest, write_manifest
from llmdistill.prompts import PromptFormat
from llmdistill.tinyworld.task import generate_problems, reference_completion

pytestmark = pytest.mark.unit
K = 4


def trace_row(tok, pid: str, sample: int, question: str, completion: str, answer: str, rng, finish="stop") -> dict:
    """One generation row as the generate stage writes it: teacher ids, EOS, random top-k."""
    prompt_text = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                          add_generation_prompt=True)
    ids = tok(completion, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if finish == "stop" else [])
    n = len(ids)
    topk_ids = np.stack([np.r_[t, rng.choice(np.setdiff1d(np.arange(len(tok)), [t]), K - 1, replace=False)] for t in ids])
    topk_lp = np.sort(rng.uniform(-12, -0.01, size=(n, K)), axis=1)[:, ::-1].astype(np.float32)
    return {"prompt_id": pid, "sample_index": sample, "prompt": question, "prompt_text": prompt_text,
            "prompt_token_ids": tok(prompt_text, add_special_tokens=False)["input_ids"], "completion": completion,
            "completion_token_ids": ids, "finish_reason": finish, "topk_ids": topk_ids, "topk_logprobs": topk_lp,
            "token_logprobs": topk_lp[:, 0], "answer": answer}


@pytest.fixture(scope="module")
def generation(tmp_path_factory, tiny_tokenizer, tiny_tokenizer_dir):
    """A generation dir with planted bad traces; returns (dir, rows, expected fate per (pid, sample))."""
    from llmdistill.benchmarks import load_benchmark_problems

    rng = np.random.default_rng(0)
    tok = tiny_tokenizer
    problems = generate_problems(30, seed=5, split="train")
    rows, fate = [], {}

    def add(pid, sample, question, completion, answer, why, finish="stop"):
        rows.append(trace_row(tok, pid, sample, question, completion, answer, rng, finish))
        fate[(pid, sample)] = why

    for p in problems[:20]:
        gold = reference_completion(p)
        add(p.id, 0, p.question, gold, p.answer, "")
        add(p.id, 1, p.question, gold.replace(f"\\boxed{{{p.answer}}}", "\\boxed{999}"), p.answer, "incorrect")
    p = problems[20]
    add(p.id, 0, p.question, reference_completion(p)[:-4], p.answer, "truncated", finish="length")
    add(p.id, 1, p.question, reference_completion(p).replace("</think>", ""), p.answer, "malformed")
    add(p.id, 2, p.question, reference_completion(p), p.answer, "")
    add(p.id, 3, p.question, reference_completion(p), p.answer, "duplicate_completion")
    q = problems[21]  # the same question under another id: a duplicate prompt
    add("copy-of-" + p.id, 0, p.question + " ", reference_completion(p).replace("</think>", " </think>"),
        p.answer, "duplicate_prompt")
    heldout = load_benchmark_problems("tiny")[3]
    add("leak", 0, heldout, f"<think>x</think>\\boxed{{{q.answer}}}", q.answer, "contaminated")
    directory = tmp_path_factory.mktemp("gen")
    half = len(rows) // 2
    for i, chunk in enumerate((rows[:half], rows[half:])):
        write_generation_shard(chunk, directory / shard_name(i), k=K, teacher=str(tiny_tokenizer_dir),
                               passthrough={"answer": pa.string()})
    return directory, rows, fate


def config(generation, tmp_path, tokenizer_dir, **overrides) -> BuildConfig:
    values = dict(input_path=str(generation[0]), output_dir=str(tmp_path / "built"), student_tokenizer=str(tokenizer_dir),
                  verifier="exact", decontam_benchmarks=["tiny"], decontam_ngram=32, max_length=128, codec_bits=12)
    return BuildConfig(**(values | overrides))


def test_end_to_end_build_drops_the_planted_traces_and_packs_the_rest_exactly(generation, tmp_path, tiny_tokenizer_dir,
                                                                               tiny_tokenizer):
    directory, rows, fate = generation
    stats = run_build(config(generation, tmp_path, tiny_tokenizer_dir))
    out = tmp_path / "built"
    table, meta = read_built(out)
    assert meta["kd"] and meta["k"] == K and meta["codec_bits"] == 12
    assert meta["tokenizer_fingerprint"] == tokenizer_fingerprint(tiny_tokenizer)

    # every input trace met the fate planted for it, step by step
    fates = feather.read_table(out / "traces.arrow").to_pylist()
    assert {(f["prompt_id"], f["sample_index"]): f["dropped_by"] for f in fates} == fate
    assert stats["contamination_hits"] == {"tiny": 1}
    assert [s["remaining"] for s in stats["steps"]][0] == len(rows)

    # unpacking reproduces prompt(teacher ids) + completion(teacher ids), mask on the completion only,
    # and the decoded top-k rows are the teacher's rows of the same tokens
    by_doc = {f"{r['prompt_id']}/{r['sample_index']}": r for r in rows}
    seen = []
    for row in table.to_pylist():
        assert len(row["input_ids"]) <= 128
        n_targets = sum(row["loss_mask"])
        ids, lps = decode_topk(row["topk"], n_targets, K, meta["vocab_size"], meta["codec_bits"])
        cursor = 0
        for doc_id, (doc_ids, mask) in zip(row["doc_ids"], unpack_row(row), strict=True):
            src = by_doc[doc_id]
            np.testing.assert_array_equal(doc_ids, np.r_[src["prompt_token_ids"], src["completion_token_ids"]])
            np.testing.assert_array_equal(mask, np.r_[np.zeros(len(src["prompt_token_ids"])),
                                                      np.ones(len(src["completion_token_ids"]))])
            n = len(src["completion_token_ids"])
            np.testing.assert_array_equal(ids[cursor:cursor + n], src["topk_ids"])
            np.testing.assert_allclose(lps[cursor:cursor + n], src["topk_logprobs"], atol=0.01)
            # the teacher's sampled token is its own top-1 here: each row lines up with the token it predicts
            np.testing.assert_array_equal(ids[cursor:cursor + n, 0], doc_ids[mask == 1])
            cursor += n
            seen.append(doc_id)
        assert cursor == n_targets
    assert sorted(seen) == sorted(f"{p}/{s}" for (p, s), why in fate.items() if not why)

    manifest = read_manifest(out)
    assert manifest["stage"] == "build" and manifest["counts"]["rows"] == table.num_rows
    assert (out / "REPORT.md").read_text().startswith("# Build report")
    assert (out / "lengths.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((out / "stats.json").read_text())
    assert saved["packing"]["efficiency"] == pytest.approx(stats["packing"]["efficiency"])
    assert 0 < saved["teacher_signal"]["bytes_per_token"] < 4 * K * 2


def test_sft_only_build_and_samples_per_prompt(generation, tmp_path, tiny_tokenizer_dir):
    stats = run_build(config(generation, tmp_path, tiny_tokenizer_dir, kd=False, keep_incorrect=True,
                             dedup_completions=False, max_samples_per_prompt=1))
    table, meta = read_built(tmp_path / "built")
    assert not meta["kd"] and all(t is None for t in table.column("topk").to_pylist())
    docs = [d for ids in table.column("doc_ids").to_pylist() for d in ids]
    assert len({d.split("/")[0] for d in docs}) == len(docs)  # one sample per prompt
    assert stats["steps"][-2]["step"] == "samples_per_prompt"


def test_tokenizer_mismatch_names_both_ways_forward(generation, tmp_path, tiny_tokenizer, tiny_tokenizer_dir):
    other = tmp_path / "other_tokenizer"
    tiny_tokenizer.save_pretrained(str(other))
    data = json.loads((other / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # same names, sizes and tokens; two ids swapped
    (other / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(TokenizerMismatchError) as err:
        with pytest.MonkeyPatch.context() as mp:  # found in the setup, before any phase reads a row
            forbid(mp, pipeline, ("start_ray", "prompt_fates"), "the mismatch was found after the setup")
            run_build(config(generation, tmp_path, other))
    assert "llmdistill score" in str(err.value) and "kd: false" in str(err.value)
    assert not (tmp_path / "built").exists()
    # SFT-only works: the completions are re-tokenised by the student
    stats = run_build(config(generation, tmp_path, other, kd=False))
    assert stats["packing"]["documents"] > 0


def test_ids_outside_the_vocabulary_are_found_from_the_footers_before_any_work(generation, tmp_path,
                                                                               tiny_tokenizer_dir, monkeypatch):
    """A row group whose statistics are out of range is read and its bad row named, in the setup; the
    other row groups are not read. NaN is not in Parquet statistics: the rows' own check finds it later."""
    table = pq.read_table(generation[0] / shard_name(0))
    bad = tmp_path / "bad_gen"
    bad.mkdir()
    ids = table.column("topk_ids").to_pylist()
    ids[17] = ids[17][:-1] + [10**6]
    pq.write_table(table.set_column(table.schema.get_field_index("topk_ids"), table.schema.field("topk_ids"),
                                    pa.array(ids, table.schema.field("topk_ids").type)),
                   bad / shard_name(0), row_group_size=5)
    assert pq.ParquetFile(bad / shard_name(0)).metadata.num_row_groups > 4
    forbid(monkeypatch, pipeline, ("start_ray", "prompt_fates"), "the bad id was found after the setup")
    read = []
    real = formats.iter_generation_batches

    def reads(path, columns, row_groups=None, batch_rows=None):
        read.append(row_groups)
        return real(path, columns, row_groups, batch_rows)

    monkeypatch.setattr(formats, "iter_generation_batches", reads)
    with pytest.raises(SchemaError, match=r"part-000000.parquet row 17: 'topk_ids' holds id 1000000, outside"):
        run_build(config((bad,), tmp_path, tiny_tokenizer_dir))
    assert read == [[3]] and not (tmp_path / "built").exists()
    # an SFT-only build never reads the top-k: it does not check it either
    monkeypatch.undo()
    assert run_build(config((bad,), tmp_path, tiny_tokenizer_dir, kd=False))["packing"]["documents"] > 0


def test_incompatible_schema_version_is_a_clear_error(generation, tmp_path, tiny_tokenizer_dir):
    old = tmp_path / "old_gen"
    old.mkdir()
    src = sorted(Path(generation[0]).glob("*.parquet"))[0]
    table = pq.read_table(src)
    meta = json.loads(table.schema.metadata[b"llmdistill"])
    meta["schema_version"] = 0
    pq.write_table(table.replace_schema_metadata({b"llmdistill": json.dumps(meta).encode()}), old / shard_name(0))
    with pytest.raises(SchemaError, match="schema version 0.*regenerate"):
        run_build(config((old,), tmp_path, tiny_tokenizer_dir, input_format="generation"))
    assert not (tmp_path / "built").exists()


def test_missing_reference_answers_fail_before_any_work(generation, tmp_path, tiny_tokenizer_dir):
    with pytest.raises(ConfigError, match="'solution' column"):
        run_build(config(generation, tmp_path, tiny_tokenizer_dir, answer_column="solution"))
    gaps = tmp_path / "gaps"
    rows = [dict(r) for r in generation[1][:3]]
    rows[1]["answer"] = None
    write_generation_shard(rows, gaps / shard_name(0), k=K, teacher=str(tiny_tokenizer_dir), passthrough={"answer": pa.string()})
    with pytest.raises(ConfigError, match=f"row 1, prompt_id {rows[1]['prompt_id']}"):
        run_build(config((gaps,), tmp_path, tiny_tokenizer_dir))
    assert not (tmp_path / "built").exists()


def test_empty_result_is_an_error_with_counts_and_leaves_nothing(generation, tmp_path, tiny_tokenizer_dir):
    # prompt-level steps run first, on the light columns
    with pytest.raises(EmptyBuildError, match=r"after step 'length'.*input \d+, duplicate_prompt \d+, contaminated \d+, "
                                              r"truncated \d+, malformed \d+, length 0"):
        run_build(config(generation, tmp_path, tiny_tokenizer_dir, max_completion_tokens=2))
    assert list(tmp_path.iterdir()) == []


def test_plain_dataset_with_messages_is_the_sft_path(tmp_path, tiny_tokenizer_dir):
    path = tmp_path / "traces.jsonl"
    records = [{"messages": [{"role": "user", "content": p.question},
                             {"role": "assistant", "content": reference_completion(p)}], "answer": p.answer}
               for p in generate_problems(12, seed=9)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    base = dict(input_path=str(path), output_dir=str(tmp_path / "built"), student_tokenizer=str(tiny_tokenizer_dir),
                verifier="numeric", decontam_benchmarks=[], max_length=256)
    with pytest.raises(ConfigError, match="kd: false"):
        run_build(BuildConfig(**base))
    stats = run_build(BuildConfig(**base, kd=False))
    assert stats["steps"][-1]["remaining"] == 12 and stats["input_kind"] == "dataset"
    table, _ = read_built(tmp_path / "built")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    row = table.to_pylist()[0]
    ids, mask = unpack_row(row)[0]
    assert ids[-1] == tok.eos_token_id and mask[-1] == 1  # the student learns to stop
    assert tok.decode(ids[mask == 1]).endswith("<|im_end|>")


def _plain_dataset(tmp_path: Path, records: list[dict]) -> BuildConfig:
    path = tmp_path / "traces.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return BuildConfig(input_path=str(path), student_tokenizer="unused", kd=False)


def test_a_plain_dataset_is_written_batch_by_batch_with_the_same_rows(tmp_path, monkeypatch):
    import datasets

    from llmdistill.builder import traces
    from llmdistill.prompts import prompt_hash

    def chat(question: str, answer: str) -> list[dict]:
        return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]

    cfg = _plain_dataset(tmp_path, [
        {"messages": chat("q", "a0"), "answer": "1"},
        {"prompt": "p", "completion": "c1", "answer": "2"},
        {"prompt": "p", "completion": "c2", "answer": None},
        {"messages": chat("q", "a3"), "answer": "4"},  # the same prompt as row 0, in the next batch
        {"id": "x", "prompt": "p", "completion": "c4", "answer": "5"},
        {"id": "x", "prompt": "other", "completion": "c5", "answer": "6"},
        {"prompt": "p", "completion": "c6", "answer": "7"},
    ])
    q = json.dumps([{"role": "user", "content": "q"}])
    expected = [(prompt_hash(q), 0, q, "a0", "1"), (prompt_hash("p"), 0, "p", "c1", "2"),
                (prompt_hash("p"), 1, "p", "c2", None), (prompt_hash(q), 1, q, "a3", "4"), ("x", 0, "p", "c4", "5"),
                ("x", 1, "other", "c5", "6"), (prompt_hash("p"), 2, "p", "c6", "7")]
    expected = [dict(zip(["prompt_id", "sample_index", "prompt", "completion", "answer"], e, strict=True),
                     finish_reason="stop") for e in expected]

    def no_whole_dataset(self, *args, **kwargs):
        raise AssertionError("the whole dataset was loaded into Python objects")

    monkeypatch.setattr(datasets.Dataset, "to_list", no_whole_dataset)
    monkeypatch.setattr(datasets.Dataset, "to_pandas", no_whole_dataset)
    processes = []
    real_map = datasets.Dataset.map

    def counted_map(self, *args, num_proc=None, **kwargs):
        processes.append(num_proc)
        return real_map(self, *args, num_proc=num_proc, **kwargs)

    monkeypatch.setattr(datasets.Dataset, "map", counted_map)
    whole = traces.open_dataset(cfg, tmp_path / "whole")
    monkeypatch.setattr(traces, "DATASET_ROWS_PER_GROUP", 3)
    batched = traces.open_dataset(replace(cfg, workers=2), tmp_path / "batched")
    assert processes == [None, 2]  # records split in 2 processes: the same rows, in order
    for inp, groups in ((whole, [7]), (batched, [3, 3, 1])):
        (shard,) = inp.shards
        assert [g.num_rows for g in shard.row_groups] == groups
        assert inp.columns == {"prompt_id", "sample_index", "prompt", "completion", "finish_reason", "answer"}
        assert pq.read_table(shard.path).to_pylist() == expected
        assert sorted(p.name for p in shard.path.parent.iterdir()) == [shard_name(0)]  # no temporary file left


@pytest.mark.parametrize("records, needles", [
    ([{"prompt": "p", "completion": "c"}] * 4 + [{"prompt": "p", "completion": None}],
     ["row 4: 'completion' is null", "remove the row"]),
    ([{"prompt": "p", "completion": "c"}] * 3 + [{"prompt": None, "completion": "c"}],
     ["row 3: 'prompt' is null"]),
    ([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}] * 4
     + [{"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]}],
     ["row 4: 'messages' has no user message before its last assistant message", "add the user turn"]),
])
def test_a_bad_row_after_the_first_batch_is_named_and_nothing_is_written(tmp_path, monkeypatch, records, needles):
    from llmdistill.builder import traces

    monkeypatch.setattr(traces, "DATASET_ROWS_PER_GROUP", 2)
    cfg = _plain_dataset(tmp_path, records)
    with pytest.raises(ConfigError) as err:
        traces.open_dataset(cfg, tmp_path / "input")
    assert str(err.value).startswith(f"{cfg.input_path}, row ")
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))
    assert list((tmp_path / "input").iterdir()) == []  # the partly written file is removed


def test_student_prompt_follows_the_generation_prompt_format(tmp_path, tiny_tokenizer, tiny_tokenizer_dir):
    rng = np.random.default_rng(0)
    p = generate_problems(1, seed=11)[0]
    system, template = "Answer briefly.", "Q: {prompt}"
    row = trace_row(tiny_tokenizer, p.id, 0, p.question, reference_completion(p), p.answer, rng)
    messages = [{"role": "system", "content": system}, {"role": "user", "content": template.format(prompt=p.question)}]
    row["prompt_text"] = tiny_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    row["prompt_token_ids"] = tiny_tokenizer(row["prompt_text"], add_special_tokens=False)["input_ids"]
    gen = tmp_path / "gen"
    write_generation_shard([row], gen / shard_name(0), k=K, teacher=str(tiny_tokenizer_dir), passthrough={"answer": pa.string()})
    base = dict(input_path=str(gen), student_tokenizer=str(tiny_tokenizer_dir), verifier="exact",
                decontam_benchmarks=[], max_length=256)
    # without the generation's format, the student's prompt differs: an error naming the trace
    with pytest.raises(ValueError, match=f"prompt_id {p.id}, sample 0"):
        run_build(BuildConfig(**base, output_dir=str(tmp_path / "a")))
    # the format recorded in the generation manifest is picked up
    info = GenerationInfo(stage="generate", teacher=str(tiny_tokenizer_dir), tokenizer=str(tiny_tokenizer_dir), k=K,
                          vocab_size=len(tiny_tokenizer), prompt_format=PromptFormat(system, template))
    write_manifest(gen, "generate", None, generation=info.to_manifest())
    run_build(BuildConfig(**base, output_dir=str(tmp_path / "b")))
    table, _ = read_built(tmp_path / "b")
    np.testing.assert_array_equal(unpack_row(table.to_pylist()[0])[0][0],
                                  np.r_[row["prompt_token_ids"], row["completion_token_ids"]])
    # or mismatches are allowed and counted
    stats = run_build(BuildConfig(**base, output_dir=str(tmp_path / "c"), system_prompt="Other.",
                                  allow_prompt_mismatch=True))
    assert stats["prompt_template_mismatches"] == 1


def test_existing_output_is_kept_unless_overwrite(generation, tmp_path, tiny_tokenizer_dir):
    cfg = config(generation, tmp_path, tiny_tokenizer_dir, kd=False)
    first = run_build(cfg)
    with pytest.raises(ConfigError, match="overwrite"):
        run_build(cfg)
    again = run_build(config(generation, tmp_path, tiny_tokenizer_dir, kd=False, overwrite=True))
    assert again["steps"] == first["steps"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["built"]  # no staging directory left behind
