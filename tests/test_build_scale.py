"""Build at scale: no global concatenation of list columns, the same rows with 1 and 2 workers,
bounded shards, dedup across parts, and a SIGKILLed build that resumes to the same output.

The builds run on a real local Ray (started once per test process, as ``llmdistill build`` does);
the killed build runs in a child process attached to that Ray through ``ray_address``.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest

from llmdistill.builder import run_build
from llmdistill.builder.traces import Ragged, plan_parts, select_rows
from llmdistill.codec import decode_topk
from llmdistill.config.build import BuildConfig
from llmdistill.formats import (
    GENERATION_COLUMNS,
    iter_generation_batches,
    read_built,
    read_generation_footer,
    shard_name,
)
from llmdistill.tinyworld.task import generate_problems, reference_completion

pytestmark = pytest.mark.unit
K = 4


# ---------------------------------------------------------------------------------------
# synthetic generation shards: several files, several row groups, prompts split across files


def _list(lengths: list[int], values: np.ndarray) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(np.r_[0, np.cumsum(lengths)].astype(np.int32)), pa.array(values))


def write_generation(directory: Path, tok, tok_dir: Path, n_prompts: int = 18, samples: int = 4, files: int = 5,
                     rows_per_group: int = 7, filler: int = 60, seed: int = 0) -> list[dict]:
    """Traces with planted duplicates: sample 3 repeats sample 2 (exact, often in the next file), and
    sample 1 of every third prompt is sample 0 with one word changed (near); prompt 1's sample 0 is
    prompt 0's sample 0 (a wrong answer for prompt 1, and a duplicate only for the global scope)."""
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(300)]
    rows = []
    for j, p in enumerate(generate_problems(n_prompts, seed=seed + 3, split="train")):
        base = reference_completion(p)
        texts = []
        for s in range(samples):
            fill = " ".join(rng.choice(words, size=filler))
            texts.append(base.replace("<think>", f"<think>{fill} try {s} "))
        texts[3] = texts[2]
        if j % 3 == 0:
            texts[1] = texts[0].replace(" try 0 ", " try x ")
        prompt_text = tok.apply_chat_template([{"role": "user", "content": p.question}], tokenize=False,
                                              add_generation_prompt=True)
        for s, text in enumerate(texts):
            rows.append({"prompt_id": p.id, "sample_index": s, "prompt": p.question, "prompt_text": prompt_text,
                         "prompt_token_ids": tok(prompt_text, add_special_tokens=False)["input_ids"],
                         "completion": text, "answer": p.answer,
                         "completion_token_ids": tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]})
    if n_prompts > 1:
        rows[4]["completion"] = rows[0]["completion"]  # prompt 1, sample 0: prompt 0's text exactly
    meta = {b"llmdistill": json.dumps({"schema": "llmdistill.generation", "schema_version": 1, "k": K,
                                       "teacher": str(tok_dir)}).encode()}
    schema = pa.schema(list(GENERATION_COLUMNS.items()) + [("answer", pa.string())], metadata=meta)
    bounds = np.linspace(0, len(rows), files + 1).astype(int)
    for f in range(files):
        with pq.ParquetWriter(directory / shard_name(f), schema) as writer:
            for lo in range(bounds[f], bounds[f + 1], rows_per_group):
                chunk = rows[lo:min(lo + rows_per_group, bounds[f + 1])]
                writer.write_table(_table(chunk, schema, len(tok), rng))
    return rows


def _table(rows: list[dict], schema: pa.Schema, vocab: int, rng: np.random.Generator) -> pa.Table:
    lengths = [len(r["completion_token_ids"]) for r in rows]
    n = sum(lengths)
    ids = np.concatenate([r["completion_token_ids"] for r in rows]).astype(np.int32)
    topk = rng.integers(0, vocab, size=(n, K), dtype=np.int32)
    topk[:, 0] = ids
    lps = np.sort(rng.uniform(-9, -0.05, size=(n, K)), axis=1)[:, ::-1].astype(np.float32)
    for r, (a, b) in zip(rows, zip(np.r_[0, np.cumsum(lengths)][:-1], np.cumsum(lengths), strict=True), strict=True):
        r["topk_ids"], r["topk_logprobs"] = topk[a:b], lps[a:b]
    columns = {name: pa.array([r[name] for r in rows], type=schema.field(name).type)
               for name in ("prompt_id", "sample_index", "prompt", "prompt_text", "prompt_token_ids", "completion",
                            "answer")}
    columns |= {"completion_token_ids": _list(lengths, ids), "finish_reason": pa.array(["stop"] * len(rows)),
                "topk_ids": _list([x * K for x in lengths], topk.reshape(-1)),
                "topk_logprobs": _list([x * K for x in lengths], lps.reshape(-1)),
                "token_logprobs": _list(lengths, lps[:, 0].copy()), "teacher": pa.array(["t"] * len(rows))}
    return pa.table({name: columns[name] for name in schema.names}, schema=schema)


@pytest.fixture(scope="module")
def generation(tmp_path_factory, tiny_tokenizer, tiny_tokenizer_dir):
    directory = tmp_path_factory.mktemp("gen_scale")
    return directory, write_generation(directory, tiny_tokenizer, tiny_tokenizer_dir)


def config(directory: Path, out: Path, tokenizer_dir: Path, **overrides) -> BuildConfig:
    values = dict(input_path=str(directory), output_dir=str(out), student_tokenizer=str(tokenizer_dir),
                  verifier="numeric", decontam_benchmarks=[], max_length=1024, max_shard_mb=1, max_row_group_mb=1,
                  rows_per_shard=4)
    return BuildConfig(**(values | overrides))


def digests(out: Path) -> dict[str, str]:
    """The bytes of every built shard and of ``traces.arrow``."""
    files = sorted(out.glob("part-*.parquet")) + [out / "traces.arrow"]
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


# ---------------------------------------------------------------------------------------
# no global concatenation


def test_list_columns_beyond_2_31_values_are_read_batch_by_batch():
    """A list column of 2.4e9 values in all (list<null>: no memory) goes through the row selection
    of the packing phase; joining its chunks, as the old build did, overflows Arrow's int32 offsets."""
    n = 800_000_000
    chunk = pa.ListArray.from_arrays(pa.array([0, n - 7, n], pa.int32()), pa.nulls(n))
    table = pa.table({"topk_ids": pa.chunked_array([chunk] * 3)})
    assert sum(len(c.values) for c in table.column(0).chunks) > 2**31
    with pytest.raises(pa.ArrowInvalid, match="offset overflow"):
        table.column("topk_ids").combine_chunks()
    with pytest.raises(ValueError, match="batch by batch"):
        Ragged.from_arrow(table.column("topk_ids"))
    batches = ((2 * i, b) for i, b in enumerate(table.to_batches()))
    keep = np.array([True, True, False, False, False, True])
    seen = [(first, rows.tolist(), pc.list_value_length(b.column(0)).to_pylist())
            for first, rows, b in select_rows(batches, keep)]
    assert seen == [(0, [0, 1], [n - 7, 7]), (2, [], []), (4, [5], [7])]


def test_shards_are_read_a_bounded_batch_at_a_time_and_cut_into_parts(generation):
    directory, rows = generation
    path = directory / shard_name(0)
    shard = read_generation_footer(path)
    assert len(shard.row_groups) > 1 and shard.k == K
    batches = list(iter_generation_batches(path, ["prompt_id"], batch_rows=3))
    assert all(b.num_rows <= 3 for _, b in batches)
    assert [first for first, _ in batches] == list(range(0, shard.num_rows, 3))
    assert [r for _, b in batches for r in b.column(0).to_pylist()] == [r["prompt_id"] for r in rows[:shard.num_rows]]
    whole = list(iter_generation_batches(path, ["prompt_id"], row_groups=[0, 1], batch_rows=100))
    assert [(first, b.num_rows) for first, b in whole] == [(0, shard.row_groups[0].num_rows + shard.row_groups[1].num_rows)]
    from llmdistill.builder.traces import BuildInput

    shards = tuple(read_generation_footer(p) for p in sorted(directory.glob("part-*.parquet")))
    parts = plan_parts(BuildInput("generation", shards, K, None, frozenset()), part_mb=1)
    assert [p.offset for p in parts] == list(np.cumsum([0] + [p.num_rows for p in parts[:-1]]))
    assert sum(p.num_rows for p in parts) == len(rows) and len(parts) == len(shards)


# ---------------------------------------------------------------------------------------
# determinism, bounded shards, dedup across parts, Ray on one machine


def test_one_and_two_workers_write_the_same_bounded_shards(generation, tmp_path, tiny_tokenizer_dir, monkeypatch):
    from llmdistill.builder import cluster

    directory, rows = generation
    one = run_build(config(directory, tmp_path / "one", tiny_tokenizer_dir, workers=1))
    two = run_build(config(directory, tmp_path / "two", tiny_tokenizer_dir, workers=2))
    assert digests(tmp_path / "one") == digests(tmp_path / "two")
    assert one["steps"] == two["steps"]
    # a build of many parts per worker runs on actors instead of tasks: the same bytes
    monkeypatch.setattr(cluster, "ACTOR_PARTS_PER_WORKER", 2)
    assert cluster.uses_actors(5, cluster.Runtime("local", 2, 2)) and not cluster.uses_actors(3, cluster.Runtime(
        "local", 2, 2))
    actors = run_build(config(directory, tmp_path / "actors", tiny_tokenizer_dir, workers=2))
    assert digests(tmp_path / "actors") == digests(tmp_path / "one") and actors["steps"] == one["steps"]

    # the local Ray of this machine, the parts run in its worker processes
    assert two["run"]["runtime"] == {"address": "local", "cpus": os.cpu_count(), "workers": 2}
    assert one["run"]["runtime"]["workers"] == 1 and one["run"]["parts"] == 5
    pids = {t["worker"].rsplit(":", 1)[1] for t in two["run"]["timings"]}
    assert pids and "" not in pids and str(os.getpid()) not in pids  # every part ran in a worker

    # bounded shards: several, each of at most 4 rows, row groups small
    shards = sorted((tmp_path / "two").glob("part-*.parquet"))
    assert len(shards) == two["shards"]["count"] > 1
    for shard in shards:
        footer = pq.ParquetFile(shard).metadata
        assert footer.num_rows <= 4 and all(footer.row_group(i).total_byte_size < 1 << 20
                                             for i in range(footer.num_row_groups))
    table, meta = read_built(tmp_path / "two")
    assert table.num_rows == two["packing"]["rows"] and two["packing"]["efficiency"] > 0.8

    # the planted duplicates went, also where two samples of a prompt lie in different files
    fates = {(f["prompt_id"], f["sample_index"]): f["dropped_by"]
             for f in feather.read_table(tmp_path / "two" / "traces.arrow").to_pylist()}
    pids = list(dict.fromkeys(r["prompt_id"] for r in rows))
    for j, pid in enumerate(pids):
        assert fates[pid, 3] == "duplicate_completion", pid
        assert fates[pid, 1] == ("duplicate_completion" if j % 3 == 0 else ""), pid
        assert fates[pid, 0] == ("incorrect" if j == 1 else "") and fates[pid, 2] == ""
    split = [pid for pid in pids if len({i // (len(rows) // 5 + 1) for i, r in enumerate(rows)
                                        if r["prompt_id"] == pid}) > 1]
    assert split, "the fixture must split some prompts across files"

    # the teacher's top-k coverage: the mean probability mass inside the top-k of every kept target
    kept = {f"{r['prompt_id']}/{r['sample_index']}" for r in rows if not fates[r["prompt_id"], r["sample_index"]]}
    mass = np.concatenate([np.exp(r["topk_logprobs"].astype(np.float64)).sum(axis=1) for r in rows
                           if f"{r['prompt_id']}/{r['sample_index']}" in kept])
    coverage = two["teacher_topk_coverage"]
    assert coverage["tokens"] == len(mass) == two["packing"]["target_tokens"]
    assert coverage["mean"] == pytest.approx(mass.mean(), abs=1e-4)
    assert coverage["p50"] == pytest.approx(np.median(mass), abs=2e-3)
    assert coverage["p5"] == pytest.approx(np.quantile(mass, 0.05), abs=2e-3)
    row = table.to_pylist()[0]
    ids, _ = decode_topk(row["topk"], sum(row["loss_mask"]), K, meta["vocab_size"], meta["codec_bits"])
    np.testing.assert_array_equal(ids[:, 0], np.asarray(row["input_ids"])[np.asarray(row["loss_mask"]) == 1])


def test_global_scope_finds_a_completion_repeated_by_another_prompt(generation, tmp_path, tiny_tokenizer_dir):
    directory, rows = generation
    first, second = list(dict.fromkeys(r["prompt_id"] for r in rows))[:2]
    for scope, fate in (("global", "duplicate_completion"), ("prompt", "")):
        out = tmp_path / scope
        run_build(config(directory, out, tiny_tokenizer_dir, dedup_completion_scope=scope, kd=False,
                         keep_incorrect=True))
        fates = {(f["prompt_id"], f["sample_index"]): f["dropped_by"]
                 for f in feather.read_table(out / "traces.arrow").to_pylist()}
        assert fates[first, 0] == "" and fates[second, 0] == fate, scope
        assert fates[second, 3] == "duplicate_completion", scope


# ---------------------------------------------------------------------------------------
# resume after SIGKILL


KILLED_BUILD = """
import json, os, signal, sys
import llmdistill.builder.pipeline as pipeline
from llmdistill.builder.shards import part_shards
from llmdistill.config.build import BuildConfig

real = pipeline.map_parts
def map_parts(fn, tasks, context, runtime):
    done = 0
    for result in real(fn, tasks, context, runtime):
        yield result
        done += fn is part_shards
        if done == int(sys.argv[2]):  # the driver dies with parts done and others not started or half-written
            os.kill(os.getpid(), signal.SIGKILL)
pipeline.map_parts = map_parts
pipeline.run_build(BuildConfig(**json.loads(sys.argv[1])))
"""


def test_a_killed_build_resumes_to_the_same_output_without_redoing_finished_parts(generation, tmp_path,
                                                                                  tiny_tokenizer_dir):
    import ray

    from llmdistill.builder.cluster import start_ray

    directory, _ = generation
    reference = run_build(config(directory, tmp_path / "ref", tiny_tokenizer_dir))
    start_ray(None, None)
    out = tmp_path / "out"
    values = dict(input_path=str(directory), output_dir=str(out), student_tokenizer=str(tiny_tokenizer_dir),
                  verifier="numeric", decontam_benchmarks=[], max_length=1024, max_shard_mb=1, max_row_group_mb=1,
                  rows_per_shard=4, workers=1, ray_address=ray.get_runtime_context().gcs_address)
    script = tmp_path / "killed.py"
    script.write_text(textwrap.dedent(KILLED_BUILD))
    res = subprocess.run([sys.executable, str(script), json.dumps(values), "2"], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    assert not out.exists(), "no part of a killed build may be visible"
    staging = [p for p in tmp_path.glob(".out.tmp-build*")]
    assert len(staging) == 1
    finished = sorted(p.parent.name for p in staging[0].glob("_work/shards/*/done.json"))
    assert len(finished) >= 2

    values.pop("ray_address")
    resumed = run_build(BuildConfig(**values))
    assert digests(out) == digests(tmp_path / "ref")
    assert resumed["steps"] == reference["steps"]
    assert resumed["run"]["resumed_verdicts"] == resumed["run"]["parts"]  # phase B had finished everywhere
    assert resumed["run"]["resumed"] == len(finished)  # finished parts were not packed again
    assert [t["resumed"] for t in resumed["run"]["timings"]].count(False) == resumed["run"]["parts"] - len(finished)
    assert not list(tmp_path.glob(".out.*")), "the staging directory is gone once the output is in place"


# ---------------------------------------------------------------------------------------
# the resumable staging directory, and the dry-run estimate


def test_resumable_staging_survives_crashes_not_user_errors_and_stale_keys_go(tmp_path):
    from llmdistill.config.base import ConfigError
    from llmdistill.outputs import resumable_output

    out = tmp_path / "built"
    with pytest.raises(RuntimeError), resumable_output(out, "buildaaa", overwrite=False) as staging:
        (staging / "part").write_text("finished work")
        raise RuntimeError("a crash: the work is kept for the next run")
    with pytest.raises(ConfigError), resumable_output(out, "buildaaa", overwrite=False) as staging:
        assert (staging / "part").read_text() == "finished work"
        with pytest.raises(ConfigError, match="another run is writing"), resumable_output(out, "buildaaa", False):
            pass
        raise ConfigError("bad input: a re-run would fail the same way")
    assert not list(tmp_path.iterdir())
    with pytest.raises(RuntimeError), resumable_output(out, "buildbbb", overwrite=False):
        raise RuntimeError
    with resumable_output(out, "buildccc", overwrite=False) as staging:  # another key: the old one is stale
        (staging / "x").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["built"] and (out / "x").read_text() == "new"


def test_dry_run_estimates_ram_disk_and_time_at_r1_scale(tmp_path):
    from llmdistill.config.base import load_config
    from llmdistill.formats import GenerationInfo
    from llmdistill.manifest import write_manifest
    from llmdistill.plan import make_plan
    from llmdistill.prompts import PromptFormat

    info = GenerationInfo("score", "teacher", "teacher", 20, 151_936, PromptFormat())
    write_manifest(tmp_path, "score", None, counts={"rows": 3_200_000, "completion_tokens": 32_000_000_000},
                   generation=info.to_manifest())
    recipe = Path(__file__).resolve().parents[1] / "configs" / "recipes" / "r1-qwen7b" / "build.yaml"
    cfg = load_config(BuildConfig, recipe, input_path=str(tmp_path), workers=256)
    plan = make_plan("build", cfg)
    assert "3,200,000 traces, 3.2e+10 completion tokens" in plan["input (upper bound: all kept)"]
    assert plan["peak RAM per worker"].endswith("(a pack window of 2e+06 tokens)")
    for key in ("peak RAM per worker", "peak RAM of the driver", "disk: built shards"):
        assert float(plan[key].split(" GB")[0].replace(",", "")) > 0, key
    duration, unit = plan["wall time"].split(" on 256 CPU(s)")[0].split()
    assert float(duration.replace(",", "")) > 0 and unit in ("min", "h")
    assert "scripts/bench_build.py" in plan["rates measured"]


# ---------------------------------------------------------------------------------------
# phase A: prompts on the workers, the driver holds no text


def _prompt_generation(directory: Path, tok_dir: Path, extra: Path) -> list[dict]:
    """60 prompts of 300 random words, 4 samples each over 5 files (prompts split across files), with
    planted duplicates: an exact one (case and punctuation aside), a near one (one word changed), a
    contaminated prompt and an exact copy of it (a duplicate, so not counted as contaminated). In the
    last file, p45 has the text of p44: a prompt is judged on its first text."""
    rng = np.random.default_rng(7)
    vocab = [f"v{i}" for i in range(2000)]
    texts = [" ".join(rng.choice(vocab, size=300)) for _ in range(60)]
    texts[17] = texts[3].upper().replace(" ", ", ")
    words = texts[5].split()
    words[150] = "changed"
    texts[29] = " ".join(words)
    words = texts[8].split()
    for i in range(10, 300, 36):  # 9 words changed: Jaccard 0.83 of 3-word shingles, below 0.9 but an LSH candidate
        words[i] = f"other{i}"
    texts[33] = " ".join(words)
    extra.write_text("some benchmark problem\n" + " ".join(texts[40].split()[100:140]) + "\n")
    texts[52] = texts[40] + "!"
    rows = [{"prompt_id": f"p{j:02d}", "sample_index": s, "prompt": text, "prompt_text": text, "prompt_token_ids": [1],
             "completion": "x", "answer": "1", "completion_token_ids": [1, 2]}
            for j, text in enumerate(texts) for s in range(4)]
    order = rng.permutation(len(rows))  # samples of a prompt land in different files, in any order
    rows = [rows[i] for i in sorted(order[:200])] + [rows[i] for i in sorted(order[200:])]
    later = [i for i, r in enumerate(rows) if r["prompt_id"] == "p45" and i >= 192]  # p45 in the last file
    assert later and later[0] > min(i for i, r in enumerate(rows) if r["prompt_id"] == "p45")
    for i in later:
        rows[i] = rows[i] | {"prompt": texts[44], "prompt_text": texts[44]}
    meta = {b"llmdistill": json.dumps({"schema": "llmdistill.generation", "schema_version": 1, "k": K,
                                       "teacher": str(tok_dir)}).encode()}
    schema = pa.schema(list(GENERATION_COLUMNS.items()) + [("answer", pa.string())], metadata=meta)
    bounds = np.linspace(0, len(rows), 6).astype(int)
    for f in range(5):
        with pq.ParquetWriter(directory / shard_name(f), schema) as writer:
            for lo in range(bounds[f], bounds[f + 1], 11):
                writer.write_table(_table(rows[lo:min(lo + 11, bounds[f + 1])], schema, 50, rng))
    return rows


def test_prompt_phase_runs_on_the_workers_and_matches_the_in_memory_reference(tmp_path, tiny_tokenizer_dir,
                                                                              monkeypatch):
    from llmdistill.builder import cluster, prompt_level
    from llmdistill.builder.decontam import NgramIndex, contaminated, read_problem_file
    from llmdistill.builder.dedup import duplicates, jaccard
    from llmdistill.builder.traces import find_input, open_generation
    from llmdistill.prompts import prompt_problem

    gen, extra = tmp_path / "gen", tmp_path / "extra.txt"
    gen.mkdir()
    rows = _prompt_generation(gen, tiny_tokenizer_dir, extra)
    cfg = config(gen, tmp_path / "out", tiny_tokenizer_dir, decontam_extra_file=str(extra), decontam_ngram=8)
    assert find_input(cfg) == "generation"
    parts = plan_parts(open_generation(cfg, ["prompt_id", "prompt", "sample_index"]), part_mb=1)
    assert len(parts) == 5

    # the reference: the old driver-side computation, on every distinct prompt's text in memory
    first_text = dict((r["prompt_id"], r["prompt"]) for r in reversed(rows))
    ids = list(dict.fromkeys(r["prompt_id"] for r in rows))
    problems = [prompt_problem(first_text[i]) for i in ids]
    dup = duplicates(problems, near=True, threshold=cfg.dedup_threshold, ngram=cfg.dedup_ngram,
                     num_perm=cfg.minhash_num_perm, seed=cfg.seed)
    index = NgramIndex(8)
    index.add("file:extra.txt", read_problem_file(extra))
    found, counter = contaminated([p for p, d in zip(problems, dup, strict=True) if not d], index)
    expected = np.where(dup, prompt_level.DUPLICATE, prompt_level.KEPT)
    expected[np.flatnonzero(~dup)[[bool(f) for f in found]]] = prompt_level.CONTAMINATED
    assert {ids[i] for i in np.flatnonzero(dup)} == {"p17", "p29", "p52"} and dict(counter) == {"file:extra.txt": 1}
    part_of_row = np.repeat(np.arange(len(parts)), [p.num_rows for p in parts])
    split = {pid for pid in ids if len({part_of_row[i] for i, r in enumerate(rows) if r["prompt_id"] == pid}) > 1}
    assert "p45" in split

    # the driver never reads the prompts' text: the parts are read in the Ray workers
    def no_text_here(*args, **kwargs):
        raise AssertionError("the driver read a part")

    monkeypatch.setattr(prompt_level, "read_part", no_text_here)
    candidates = []
    real_pairs = prompt_level.dedup._bucket_pair_batches

    def spy(*args, **kwargs):
        candidates.append(np.concatenate(list(real_pairs(*args, **kwargs))))
        yield candidates[-1]

    monkeypatch.setattr(prompt_level.dedup, "_bucket_pair_batches", spy)
    got = {}
    for workers in (1, 2):
        runtime = cluster.start_ray(workers, None)
        work = tmp_path / f"work{workers}"
        got[workers] = prompt_level.prompt_fates(cfg, parts, runtime, str(work))
        p = got[workers]
        assert p.ids.to_pylist() == ids
        assert p.ids.take(pa.array(p.codes)).to_pylist() == [r["prompt_id"] for r in rows]
        assert p.sample_index.tolist() == [r["sample_index"] for r in rows]
        assert p.fate.tolist() == expected.tolist()
        assert {ids[i] for i in np.flatnonzero(p.split)} == split
        assert p.hits == {"file:extra.txt": 1}
    # p33 shares an LSH bucket with p08 but not 90% of its shingles: the confirmation on the shingles kept it
    assert jaccard(first_text["p08"], first_text["p33"], cfg.dedup_ngram) < cfg.dedup_threshold - 0.05
    assert all([ids.index("p08"), ids.index("p33")] in c.tolist() for c in candidates) and len(candidates) == 2

    # a re-run (a killed build's) reuses the parts' files: no part runs again, the same result
    ran = []
    real = cluster.map_parts

    def counting(fn, tasks, ctx, runtime):
        ran.extend(tasks)
        return real(fn, tasks, ctx, runtime)

    monkeypatch.setattr(prompt_level, "map_parts", counting)
    again = prompt_level.prompt_fates(cfg, parts, runtime, str(tmp_path / "work2"))
    assert ran == [] and again.fate.tolist() == got[2].fate.tolist() and again.codes.tolist() == got[2].codes.tolist()


def test_an_input_without_rows_has_no_prompts_and_starts_no_work(tmp_path, tiny_tokenizer_dir):
    from llmdistill.builder import prompt_level

    cfg = config(tmp_path, tmp_path / "out", tiny_tokenizer_dir, decontam_extra_file=str(tmp_path / "missing.txt"))
    none = prompt_level.prompt_fates(cfg, [], None, str(tmp_path / "work"))  # no Ray, no benchmark read
    assert len(none.ids) == 0 and none.codes.tolist() == [] and none.fate.tolist() == [] and none.hits == {}
