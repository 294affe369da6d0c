"""Multi-teacher build: the merge of several teachers' top-k against hand-written references, the join of
score outputs by trace, per-example routing, and score -> build (merged) -> train through the CLI."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ENGINE_FLAGS, assert_trained, run_cli  # tests/ on sys.path (rootdir conftest)

from llmdistill.builder import run_build
from llmdistill.builder.merge import UnknownTeacher, mix_topk, route_weights
from llmdistill.builder.pack import unpack_row
from llmdistill.codec import decode_topk, encode_topk
from llmdistill.config.base import ConfigError
from llmdistill.config.build import BuildConfig
from llmdistill.formats import iter_generations, read_built, shard_name, write_generation_shard
from llmdistill.manifest import read_manifest
from llmdistill.tinyworld.task import generate_problems, reference_completion, write_jsonl

K = 4


# ---------------------------------------------------------------------------------------
# the merge, on hand-written distributions


@pytest.mark.unit
def test_merge_is_the_exact_mixture_when_every_k_covers_the_union():
    rng = np.random.default_rng(0)
    n, vocab, w = 5, 6, np.array([0.3, 0.7])
    dense = rng.dirichlet(np.ones(vocab), size=(2, n))  # (teacher, position, vocab): full distributions
    ids, lps = [], []
    for t in range(2):  # each teacher lists all 6 ids, in its own order
        order = np.stack([rng.permutation(vocab) for _ in range(n)])
        ids.append(order)
        lps.append(np.log(np.take_along_axis(dense[t], order, axis=1)))
    got_ids, got_lps = mix_topk(ids, lps, w, k=vocab)
    expected = w[0] * dense[0] + w[1] * dense[1]
    got = np.zeros((n, vocab))
    np.put_along_axis(got, got_ids, np.exp(got_lps), axis=1)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    np.testing.assert_allclose(np.exp(got_lps).sum(axis=1), 1.0, rtol=1e-6)  # no tail: nothing was unknown
    assert (np.diff(got_lps, axis=1) <= 0).all()
    # and through the built shards' codec, within its error
    dec_ids, dec_lps = decode_topk(encode_topk(got_ids, got_lps, vocab, 12), n, vocab, vocab, 12)
    back = np.zeros((n, vocab))
    np.put_along_axis(back, dec_ids, np.exp(dec_lps), axis=1)
    np.testing.assert_allclose(back, expected, atol=5e-3)


@pytest.mark.unit
def test_merge_keeps_each_teachers_unknown_mass_and_the_dropped_entries_in_the_tail():
    # teacher A lists {1: .5, 2: .3} (unknown .2), teacher B {2: .6, 3: .1} (unknown .3), equal weights:
    # union q = {1: .25, 2: .45, 3: .05}; k = 2 keeps 2 and 1; tail = .5*.2 + .5*.3 + .05 = .30
    ids = [np.array([[1, 2]]), np.array([[2, 3]])]
    lps = [np.log([[0.5, 0.3]]), np.log([[0.6, 0.1]])]
    got_ids, got_lps = mix_topk(ids, lps, np.array([0.5, 0.5]), k=2)
    assert got_ids.tolist() == [[2, 1]]
    np.testing.assert_allclose(np.exp(got_lps), [[0.45, 0.25]], rtol=1e-6)
    assert 1 - np.exp(got_lps).sum() == pytest.approx(0.30)
    # k = 3 keeps the whole union: the tail is exactly the teachers' weighted unknown mass
    _, all_lps = mix_topk(ids, lps, np.array([0.5, 0.5]), k=3)
    assert 1 - np.exp(all_lps).sum() == pytest.approx(0.25)


@pytest.mark.unit
def test_merged_top_k_plus_tail_is_one_on_random_teachers():
    rng = np.random.default_rng(1)
    n, vocab, ks, w = 200, 50, (4, 6, 3), np.array([0.2, 0.5, 0.3])
    ids, lps, tails = [], [], []
    for k in ks:
        p = rng.dirichlet(np.full(vocab, 0.3), size=n)
        top = np.argsort(-p, axis=1)[:, :k]
        ids.append(top)
        lps.append(np.log(np.take_along_axis(p, top, axis=1)))
        tails.append(1 - np.exp(lps[-1]).sum(axis=1))
    got_ids, got_lps = mix_topk(ids, lps, w, k=max(ks))
    # the reference: the union mixture by a plain loop, its k largest kept, the rest dropped into the tail
    for row in range(n):
        union: dict[int, float] = {}
        for t in range(3):
            for i, lp in zip(ids[t][row], lps[t][row], strict=True):
                union[int(i)] = union.get(int(i), 0.0) + w[t] * np.exp(lp)
        kept = sorted(union.items(), key=lambda kv: (-kv[1], kv[0]))[:max(ks)]
        assert got_ids[row].tolist() == [i for i, _ in kept]
        np.testing.assert_allclose(np.exp(got_lps[row]), [p for _, p in kept], rtol=1e-5)
        dropped = sum(union.values()) - sum(p for _, p in kept)
        tail = sum(w[t] * tails[t][row] for t in range(3)) + dropped
        assert np.exp(got_lps[row].astype(np.float64)).sum() + tail == pytest.approx(1.0, abs=1e-6)  # float32 out
    # the codec keeps it: decoded top-k mass within its error of the merged one
    blob = encode_topk(got_ids, got_lps, vocab, 12)
    _, dec = decode_topk(blob, n, max(ks), vocab, 12)
    np.testing.assert_allclose(np.exp(dec).sum(axis=1), np.exp(got_lps).sum(axis=1), atol=5e-3)


@pytest.mark.unit
def test_routing_weights_pick_one_teacher_or_mix():
    got = route_weights(["b", None, "a"], ["a", "b"], [0.25, 0.75])
    np.testing.assert_array_equal(got, [[0, 1], [0.25, 0.75], [1, 0]])
    with pytest.raises(UnknownTeacher) as err:
        route_weights([None, "c"], ["a", "b"], [0.5, 0.5])
    assert err.value.row == 1 and err.value.value == "c"


@pytest.mark.unit
def test_teacher_settings_are_checked_in_one_line(tmp_path):
    base = dict(input_path=str(tmp_path), student_tokenizer="tok")
    with pytest.raises(ConfigError, match="teacher_weights has 1 values for 2 teachers"):
        BuildConfig(**base, teachers=["a=x", "b=y"], teacher_weights=[1.0])
    with pytest.raises(ConfigError, match="must be 'name=path'"):
        BuildConfig(**base, teachers=["a=x", "y"])
    with pytest.raises(ConfigError, match="names .* repeat"):
        BuildConfig(**base, teachers=["a=x", "a=y"])
    with pytest.raises(ConfigError, match="every weight must be > 0"):
        BuildConfig(**base, teachers=["a=x", "b=y"], teacher_weights=[1.0, 0.0])
    with pytest.raises(ConfigError, match="set kd: true"):
        BuildConfig(**base, teachers=["a=x", "b=y"], kd=False)
    with pytest.raises(ConfigError, match="teacher_route_column needs teachers"):
        BuildConfig(**base, teacher_route_column="domain")
    cfg = BuildConfig(student_tokenizer="tok", teachers=["a=x", "b=y"], teacher_weights=[1.0, 3.0])
    assert cfg.input_path == "x" and cfg.weights == [0.25, 0.75] and cfg.teacher_paths == {"a": "x", "b": "y"}


# ---------------------------------------------------------------------------------------
# build: two teachers' score outputs of the same traces, joined by trace, merged per part


def _rows(tok, problems, rng, routes) -> list[dict]:
    rows = []
    for p, route in zip(problems, routes, strict=True):
        prompt_text = tok.apply_chat_template([{"role": "user", "content": p.question}], tokenize=False,
                                              add_generation_prompt=True)
        ids = tok(reference_completion(p), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        top = np.stack([np.r_[t, rng.choice(np.setdiff1d(np.arange(len(tok)), [t]), K - 1, replace=False)] for t in ids])
        lp = np.log(rng.dirichlet(np.ones(K + 1), size=len(ids))[:, :K]).astype(np.float32)
        rows.append({"prompt_id": p.id, "sample_index": 0, "prompt": p.question, "prompt_text": prompt_text,
                     "prompt_token_ids": tok(prompt_text, add_special_tokens=False)["input_ids"],
                     "completion": reference_completion(p), "completion_token_ids": ids, "finish_reason": "scored",
                     "topk_ids": top, "topk_logprobs": lp, "token_logprobs": lp[:, 0], "answer": p.answer,
                     "route": route})
    return rows


@pytest.fixture(scope="module")
def two_teachers(tmp_path_factory, tiny_tokenizer, tiny_tokenizer_dir):
    """Teacher a's output (two shards, input order) and teacher b's (same traces, other top-k, shuffled, three shards)."""
    rng = np.random.default_rng(3)
    problems = generate_problems(12, seed=11, split="train")
    routes = [None] * 8 + ["a", "b", "b", None]
    a = _rows(tiny_tokenizer, problems, rng, routes)
    b = [r | {k: v for k, v in _rows(tiny_tokenizer, [p], rng, [None])[0].items()
              if k in ("topk_ids", "topk_logprobs", "token_logprobs")} for r, p in zip(a, problems, strict=True)]
    b = [b[i] for i in rng.permutation(len(b))]
    root = tmp_path_factory.mktemp("teachers")
    extra = {"answer": pa.string(), "route": pa.string()}
    for name, rows, cuts in (("a", a, [0, 6, 12]), ("b", b, [0, 3, 5, 12])):
        for i, (lo, hi) in enumerate(zip(cuts, cuts[1:], strict=False)):
            write_generation_shard(rows[lo:hi], root / name / shard_name(i), k=K, teacher=str(tiny_tokenizer_dir),
                                   passthrough=extra)
    return root, {r["prompt_id"]: r for r in a}, {r["prompt_id"]: r for r in b}


def _build(root, tmp_path, tok_dir, **overrides) -> BuildConfig:
    values = dict(teachers=[f"a={root / 'a'}", f"b={root / 'b'}"], teacher_weights=[0.25, 0.75],
                  output_dir=str(tmp_path / "built"), student_tokenizer=str(tok_dir), verifier="numeric",
                  decontam_benchmarks=[], max_length=256, codec_bits=12, dedup_completions=False)
    return BuildConfig(**(values | overrides))


@pytest.mark.unit
def test_build_merges_the_teachers_per_trace_and_routes_by_column(two_teachers, tmp_path, tiny_tokenizer_dir):
    root, a, b = two_teachers
    run_build(_build(root, tmp_path, tiny_tokenizer_dir, teacher_route_column="route"))
    table, meta = read_built(tmp_path / "built")
    assert meta["k"] == K and meta["teacher_route_column"] == "route"
    assert [(t["name"], t["weight"]) for t in meta["teachers"]] == [("a", 0.25), ("b", 0.75)]
    manifest = read_manifest(tmp_path / "built")
    assert manifest["built"]["teachers"] == meta["teachers"]
    assert set(manifest["inputs"]) == {"input", "teacher:a", "teacher:b"}
    seen = set()
    for row in table.to_pylist():
        ids, lps = decode_topk(row["topk"], sum(row["loss_mask"]), K, meta["vocab_size"], 12)
        cursor = 0
        for doc, (doc_ids, mask) in zip(row["doc_ids"], unpack_row(row), strict=True):
            pid = doc.rsplit("/", 1)[0]
            n = int(mask.sum())
            route = a[pid]["route"]
            w = {"a": [1.0, 0.0], "b": [0.0, 1.0], None: [0.25, 0.75]}[route]
            ref_ids, ref_lps = mix_topk([a[pid]["topk_ids"], b[pid]["topk_ids"]],
                                        [a[pid]["topk_logprobs"], b[pid]["topk_logprobs"]], np.array(w), K)
            np.testing.assert_array_equal(doc_ids[mask == 1], a[pid]["completion_token_ids"])
            got = dict(zip(map(tuple, np.c_[np.repeat(np.arange(n), K), ids[cursor:cursor + n].ravel()]),
                           np.exp(lps[cursor:cursor + n]).ravel(), strict=True))
            want = dict(zip(map(tuple, np.c_[np.repeat(np.arange(n), K), ref_ids.ravel()]),
                            np.exp(ref_lps).ravel(), strict=True))
            assert got.keys() == want.keys(), pid
            np.testing.assert_allclose([got[key] for key in want], list(want.values()), atol=5e-3)
            if route == "b":  # routed: teacher b's own top-k
                np.testing.assert_array_equal(np.sort(ids[cursor:cursor + n], axis=1), np.sort(b[pid]["topk_ids"], axis=1))
            cursor += n
            seen.add(pid)
    assert seen == set(a)


@pytest.mark.unit
def test_build_refuses_teachers_that_do_not_line_up(two_teachers, tmp_path, tiny_tokenizer_dir):
    root, a, _ = two_teachers
    short = tmp_path / "short"
    short.mkdir()
    table = pq.read_table(root / "b" / shard_name(2))
    meta = pq.read_schema(root / "b" / shard_name(2)).metadata
    pq.write_table(table.slice(1).replace_schema_metadata(meta), short / shard_name(0))
    for i in (0, 1):
        os.link(root / "b" / shard_name(i), short / shard_name(i + 1))
    with pytest.raises(ConfigError, match=r"teacher b \(.*short\) has no row for trace .*/0 .* score every teacher"):
        run_build(_build(root, tmp_path, tiny_tokenizer_dir, teachers=[f"a={root / 'a'}", f"b={short}"]))

    other = tmp_path / "other"
    other.mkdir()
    for i in range(3):
        t = pq.read_table(root / "b" / shard_name(i))
        ids = t.column("completion_token_ids").to_pylist()
        ids = [x[:-2] + [x[-1], x[-2]] for x in ids]  # other completion tokens, same keys and lengths
        t = t.set_column(t.schema.get_field_index("completion_token_ids"), "completion_token_ids",
                         pa.array(ids, pa.list_(pa.int32())))
        pq.write_table(t.replace_schema_metadata(pq.read_schema(root / "b" / shard_name(i)).metadata),
                       other / shard_name(i))
    with pytest.raises(ConfigError, match="teacher b scored other completion tokens than the input for trace"):
        run_build(_build(root, tmp_path, tiny_tokenizer_dir, teachers=[f"a={root / 'a'}", f"b={other}"]))

    with pytest.raises(ConfigError, match=r"route = 'b' names no teacher of \['a', 'c'\]"):
        run_build(_build(root, tmp_path, tiny_tokenizer_dir, teachers=[f"a={root / 'a'}", f"c={root / 'b'}"],
                         teacher_route_column="route"))


# ---------------------------------------------------------------------------------------
# end to end through the CLI: score with two tiny teachers -> build (merged) -> train


def _built_topk(built) -> dict[str, list[np.ndarray]]:
    """Every built document's decoded top-k ids, by prompt id: one [tokens, k] array per document."""
    table, meta = read_built(built)
    docs: dict[str, list[np.ndarray]] = {}
    for row in table.to_pylist():
        ids, _ = decode_topk(row["topk"], sum(row["loss_mask"]), meta["k"], meta["vocab_size"], 12)
        cursor = 0
        for doc, (_, mask) in zip(row["doc_ids"], unpack_row(row), strict=True):
            n = int(mask.sum())
            docs[doc.rsplit("/", 1)[0]] = ids[cursor:cursor + n]
            cursor += n
    return docs


@pytest.mark.integration
def test_score_two_teachers_build_merged_and_routed_and_train(tmp_path, tiny_teacher_dir, tiny_random_teacher_dir,
                                                              tiny_student_dir):
    rows = [{"id": p.id, "prompt": p.question, "completion": reference_completion(p), "answer": p.answer,
             "domain": ("tiny", "random", None)[i % 3]}
            for i, p in enumerate(generate_problems(24, seed=21, split="train"))]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", rows)
    for name, model in (("tiny", tiny_teacher_dir), ("random", tiny_random_teacher_dir)):
        run_cli("score", "--model", str(model), "--dataset", str(pairs), "--id_column", "id",
                "--passthrough_columns", "answer", "domain", "--output_dir", str(tmp_path / f"score-{name}"),
                "--logprobs_top_k", "5" if name == "tiny" else "3", *ENGINE_FLAGS)
    teachers = ["--teachers", f"tiny={tmp_path / 'score-tiny'}", f"random={tmp_path / 'score-random'}"]
    common = ["--student_tokenizer", str(tiny_student_dir), "--workers", "1"]
    run_cli("build", "--config", "configs/build_multiteacher_tiny.yaml", *teachers,
            "--output_dir", str(tmp_path / "built"), *common)
    table, meta = read_built(tmp_path / "built")
    assert meta["k"] == 5 and [(t["name"], t["k"]) for t in meta["teachers"]] == [("tiny", 5), ("random", 3)]
    assert sorted(d.rsplit("/", 1)[0] for r in table.column("doc_ids").to_pylist() for d in r) == sorted(
        r["id"] for r in rows)

    # routed: a trace whose domain names a teacher carries that teacher's top-k alone, the others the mixture
    run_cli("build", "--config", "configs/build_multiteacher_tiny.yaml", *teachers, "--teacher_route_column",
            "domain", "--output_dir", str(tmp_path / "routed"), *common)
    assert read_built(tmp_path / "routed")[1]["teacher_route_column"] == "domain"
    merged, routed = _built_topk(tmp_path / "built"), _built_topk(tmp_path / "routed")
    scored = {name: {r.prompt_id: np.asarray(r.topk_ids) for r in iter_generations(tmp_path / f"score-{name}")}
              for name in ("tiny", "random")}
    domains = {r["id"]: r["domain"] for r in rows}
    assert set(routed) == set(merged) == set(domains)
    for pid, domain in domains.items():
        if domain is None:
            np.testing.assert_array_equal(routed[pid], merged[pid])
        else:
            own = scored[domain][pid]
            np.testing.assert_array_equal(np.sort(routed[pid][:, :own.shape[1]], axis=1), np.sort(own, axis=1))
    assert any(not np.array_equal(routed[p], merged[p]) for p, d in domains.items() if d == "random")

    for built in ("built", "routed"):
        run_cli("train", "--config", "configs/train_tiny_kd.yaml", "--student_model", str(tiny_student_dir),
                "--data_dir", str(tmp_path / built), "--output_dir", str(tmp_path / f"student-{built}"),
                "--max_steps", "3", "--warmup_steps", "0", "--logging_steps", "1")
        assert_trained(tmp_path / f"student-{built}", tiny_student_dir, steps=3)
        assert (tmp_path / f"student-{built}" / "config.json").is_file()
