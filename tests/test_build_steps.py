"""Unit tests of the build steps: codec, verifiers, filters, dedup, decontamination, packing."""

from __future__ import annotations

import json
import random

import numpy as np
import pyarrow as pa
import pytest

from llmdistill.builder import dedup, filters
from llmdistill.builder.decide import _pass_rate_mask
from llmdistill.builder.decontam import NgramIndex, build_index, contaminated
from llmdistill.builder.dedup import SHUFFLE_BLOCK_BYTES, shuffle_blocks
from llmdistill.builder.pack import (
    best_fit_decreasing,
    pack_row,
    packing_efficiency,
    split_overlong,
    unpack_row,
)
from llmdistill.builder.rows import check_reference_column
from llmdistill.builder.tokenize import Document
from llmdistill.builder.verify import check_references, verify_all
from llmdistill.builder.workfiles import arrow_metadata, arrow_writer, read_arrow, write_arrow_atomic
from llmdistill.checking.checkers import CHECKERS
from llmdistill.codec import decode_topk, encode_topk, encoded_size
from llmdistill.config.base import ConfigError
from llmdistill.config.build import VERIFIER_NAMES, BuildConfig, VerifyConfig

pytestmark = pytest.mark.unit


def teacher_topk(n: int, k: int, vocab: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of softmaxes of random logits at several temperatures (log-probs down to ~-30)."""
    ids = np.stack([rng.choice(vocab, size=k, replace=False) for _ in range(n)])
    scale = rng.choice([0.5, 2.0, 6.0], size=(n, 1))
    logits = np.sort(rng.normal(size=(n, k)) * scale, axis=1)[:, ::-1] + rng.uniform(0, 4, size=(n, 1))
    lp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True) + rng.uniform(1, 1e4, size=(n, 1)))
    return ids, lp.astype(np.float32)


# ---------------------------------------------------------------------------------------
# codec


def test_codec_round_trip_ids_exact_and_logprob_error_small():
    rng = np.random.default_rng(0)
    vocab, k, n = 151_936, 20, 500
    ids, lp = teacher_topk(n, k, vocab, rng)
    blob = encode_topk(ids, lp, vocab, bits=12)
    assert len(blob) == encoded_size(n, k, vocab, 12) and len(blob) / n <= 80
    got_ids, got_lp = decode_topk(blob, n, k, vocab, bits=12)
    assert got_ids.dtype == np.int64 and got_lp.dtype == np.float32
    np.testing.assert_array_equal(got_ids, ids)
    err = np.abs(got_lp - lp)
    assert err.mean() <= 0.01
    # the bound of the scheme: half a quantisation step plus float16 rounding of the top-1
    step = (lp[:, :1] - lp[:, -1:]) / 4095
    assert (err <= step / 2 + np.abs(lp[:, :1]) * 2**-11 + 1e-5).all()


def test_codec_sorts_rows_and_checks_sizes():
    ids = np.array([[5, 9, 2]])
    lp = np.array([[-3.0, -0.1, -np.inf]], dtype=np.float32)
    got_ids, got_lp = decode_topk(encode_topk(ids, lp, 10, 8), 1, 3, 10, 8)
    np.testing.assert_array_equal(got_ids, [[9, 5, 2]])
    assert got_lp[0, 0] == pytest.approx(-0.1, abs=1e-3) and got_lp[0, 2] < -900  # -inf clamped to the floor
    with pytest.raises(ValueError, match="expected"):
        decode_topk(encode_topk(ids, lp, 10, 8), 2, 3, 10, 8)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        encode_topk(np.array([[10, 1, 2]]), lp, 10, 8)


def test_codec_empty_and_k1():
    ids, lp = decode_topk(encode_topk(np.zeros((0, 4), int), np.zeros((0, 4), np.float32), 100, 10), 0, 4, 100, 10)
    assert ids.shape == (0, 4)
    ids, lp = decode_topk(encode_topk(np.array([[7]]), np.array([[-0.5]], np.float32), 100, 10), 1, 1, 100, 10)
    assert ids[0, 0] == 7 and lp[0, 0] == pytest.approx(-0.5, abs=1e-3)


# ---------------------------------------------------------------------------------------
# verify


def verify(verifier: str, completion: str, reference: str | None) -> bool:
    """Build's verdict on one completion, through its entry point."""
    cfg = VerifyConfig(verifier=verifier, code_timeout_s=2.0, code_memory_mb=512)
    return bool(verify_all([completion], [reference], cfg)[0])


def test_every_verifier_name_is_a_checker():
    assert VERIFIER_NAMES == tuple(CHECKERS)
    # each name reaches its own checker: the verdicts on a right and on a wrong boxed answer ("none" keeps all)
    right = {name: verify(name, "<think>x</think>\\boxed{1}", "1") for name in VERIFIER_NAMES}
    wrong = {name: verify(name, "<think>x</think>\\boxed{2}", "1") for name in VERIFIER_NAMES}
    assert right == {"math": True, "numeric": True, "exact": True, "choice": False, "code": False, "none": True}
    assert wrong == {"math": False, "numeric": False, "exact": False, "choice": False, "code": False, "none": True}
    assert verify("choice", "<think>x</think>\\boxed{B}", "B") and not verify("choice", "<think>x</think>\\boxed{C}", "B")
    # the input column each verifier reads, as the build looks it up (answer_column / tests_column)
    columns = frozenset({"answer", "tests", "solution", "unit_tests"})
    assert {name: check_reference_column(BuildConfig(input_path="x", student_tokenizer="x", verifier=name), columns,
                                         "generation") for name in VERIFIER_NAMES} == {
        "math": "answer", "numeric": "answer", "exact": "answer", "choice": "answer", "code": "tests", "none": None}
    assert [check_reference_column(BuildConfig(input_path="x", student_tokenizer="x", verifier=name,
                                               answer_column="solution", tests_column="unit_tests"), columns,
                                   "generation") for name in ("exact", "code")] == ["solution", "unit_tests"]
    with pytest.raises(ConfigError, match="verifier"):
        VerifyConfig(verifier="fuzzy")._check_verify()


def test_math_verify_accepts_equal_values_where_string_match_fails():
    completion = "<think>one half</think>The answer is $\\boxed{\\frac{1}{2}}$."
    assert verify("math", completion, "0.5")
    assert not verify("exact", completion, "0.5")
    assert not verify("math", completion.replace("frac{1}{2}", "frac{1}{3}"), "0.5")
    assert not verify("math", "<think>\\boxed{0.5} unfinished", "0.5")  # no answer after </think>
    # a bare LaTeX reference is parsed inside $...$: 2\sqrt{3} is not 2
    assert verify("math", "<think>.</think>\\boxed{2\\sqrt{3}}", "2\\sqrt{3}")
    assert not verify("math", "<think>.</think>\\boxed{2}", "2\\sqrt{3}")


def test_exact_and_numeric_use_the_answer_after_think():
    assert verify("exact", "<think>23+7=30</think>\\boxed{30}", "30")
    assert not verify("exact", "<think>\\boxed{30}</think>\\boxed{31}", "30")
    assert verify("numeric", "<think>.</think>\\boxed{30.0}", "30")
    assert not verify("exact", "<think>.</think>\\boxed{30.0}", "30")
    assert not verify("numeric", "<think>.</think>\\boxed{abc}", "30")
    assert not verify("numeric", "<think>.</think>\\boxed{100000000001}", "100000000000")  # exact, no tolerance


def test_code_verifier_runs_tests_in_sandbox():
    tests = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"
    good = "<think>easy</think>\n```python\ndef add(a, b):\n    return a + b\n```"
    assert verify("code", good, tests)
    assert not verify("code", good.replace("a + b", "a - b"), tests)
    assert not verify("code", good.replace("return a + b", "while True: pass"), tests)  # timeout
    early_exit = good.replace("a + b\n", "a + b\nimport sys\nsys.exit(0)\n")
    assert not verify("code", early_exit, tests)  # exits with status 0 before the tests ran
    assert not verify("code", "<think>no code</think>done", tests)


def test_missing_reference_column_fails_up_front():
    cfg = VerifyConfig(verifier="code")
    with pytest.raises(ConfigError, match="'tests' column"):
        check_references(["prompt", "completion"], None, cfg, "tests", ["p0"])
    with pytest.raises(ConfigError, match="prompt_id p1"):
        check_references(["tests"], ["assert True", ""], cfg, "tests", ["p0", "p1"])
    check_references(["prompt"], None, VerifyConfig(verifier="none"), "answer", ["p0"])


# ---------------------------------------------------------------------------------------
# filters


def test_malformed_and_truncated_traces_are_dropped():
    cases = {
        "<think>a</think>\\boxed{1}": True,
        "<think>a</think>": False,  # empty answer
        "<think>a</think>   \n": False,
        "no think at all \\boxed{1}": False,
        "<think>a \\boxed{1}": False,  # never closed
        "</think>b<think>a\\boxed{1}": False,  # closed before opened
        "<think>a</think><think>b</think>\\boxed{1}": False,  # two blocks
    }
    np.testing.assert_array_equal(filters.well_formed_mask(list(cases)), list(cases.values()))
    np.testing.assert_array_equal(filters.not_truncated(["stop", "length", "scored"]), [True, False, True])
    np.testing.assert_array_equal(filters.length_mask(np.array([0, 5, 50]), 1, 10), [False, True, False])


def test_pass_rate_window_and_cap_per_prompt():
    pids = ["a", "a", "a", "a", "b", "b", "c", "c"]
    codes = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    correct = np.array([1, 1, 1, 0, 1, 1, 0, 0], dtype=bool)
    everyone = np.ones(8, dtype=bool)
    # rates a 0.75, b 1.0, c 0.0: the window [0.2, 0.9] keeps a, its bounds are inclusive
    np.testing.assert_array_equal(_pass_rate_mask(codes, correct, everyone, 0.2, 0.9), [1, 1, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(_pass_rate_mask(codes, correct, everyone, 0.0, 0.75), [1, 1, 1, 1, 0, 0, 1, 1])
    # only the traces still alive (their prompt not dropped earlier) count: without its failure, a solves 3/3
    alive = np.array([1, 1, 1, 0, 1, 1, 1, 1], dtype=bool)
    np.testing.assert_array_equal(_pass_rate_mask(codes, correct, alive, 0.2, 0.9), [0, 0, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(_pass_rate_mask(codes, correct, alive, 0.9, 1.0), [1, 1, 1, 1, 1, 1, 0, 0])
    keep = filters.cap_per_prompt(pids, [3, 0, 2, 1, 0, 1, 0, 1], 2)
    np.testing.assert_array_equal(keep, [0, 1, 0, 1, 1, 1, 1, 1])
    # only the samples still alive count towards the cap (prompt codes work as ids)
    alive = np.array([1, 0, 1, 1, 1, 1, 0, 1], dtype=bool)
    keep = filters.cap_per_prompt(np.array([0, 0, 0, 0, 1, 1, 2, 2]), [3, 0, 2, 1, 0, 1, 0, 1], 2, alive)
    np.testing.assert_array_equal(keep, [0, 0, 1, 1, 1, 1, 0, 1])


# ---------------------------------------------------------------------------------------
# dedup


def _variant(words: list[str], rng: np.random.Generator, n_changes: int) -> str:
    words = list(words)
    for i in rng.choice(len(words), size=n_changes, replace=False):
        words[i] = f"zz{rng.integers(1_000_000)}"
    return " ".join(words)


def test_planted_near_duplicates_are_caught_and_distinct_texts_kept():
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(5000)]
    bases = [[str(w) for w in rng.choice(vocab, size=200)] for _ in range(300)]
    texts = [" ".join(b) for b in bases]
    planted = {}
    for j in range(0, 300, 3):  # one changed word in 200 changes <= 3 of ~198 3-gram shingles: J >= 0.97
        text = _variant(bases[j], rng, 1).upper() + " !!"  # case and punctuation do not matter
        planted[len(texts)] = j
        texts.append(text)
    for j in range(1, 300, 3):  # 3 changed words: J ~ 0.91-0.92, still >= 0.9
        text = _variant(bases[j], rng, 3)
        if dedup.jaccard(text, texts[j], 3) >= 0.9:
            planted[len(texts)] = j
            texts.append(text)
    for j in range(2, 300, 30):  # 30 changed words: J ~ 0.6, not a duplicate
        texts.append(_variant(bases[j], rng, 30))
    texts.append(texts[5])  # an exact duplicate
    dup = dedup.duplicates(texts, near=True, threshold=0.9, ngram=3, num_perm=128)
    expected = np.zeros(len(texts), dtype=bool)
    expected[list(planted)] = True
    expected[-1] = True
    np.testing.assert_array_equal(dup, expected)
    assert not dedup.duplicates(texts, near=False, threshold=0.9, ngram=3, num_perm=128)[list(planted)].any()


def test_minhash_estimates_jaccard_without_bias():
    rng = np.random.default_rng(1)
    base = [f"w{i}" for i in rng.integers(0, 10**6, size=120)]
    texts, exact = [" ".join(base)], []
    for changes in (5, 15, 30) * 20:
        texts.append(_variant(base, rng, changes))
        exact.append(dedup.jaccard(texts[0], texts[-1], 3))
    words, offsets = dedup.word_ids(texts)
    hashes, starts = dedup.shingle_hashes(words, offsets, 3)
    sig = dedup.minhash_signatures(hashes, starts, num_perm=256)
    estimate = (sig[1:] == sig[0]).mean(axis=1)
    err = estimate - np.asarray(exact)
    assert abs(err.mean()) < 0.02 and np.abs(err).max() < 0.15


def test_signatures_and_band_keys_agree_across_calls():
    rng = np.random.default_rng(2)
    base = [f"w{i}" for i in rng.integers(0, 10**6, size=150)]
    texts = [" ".join(base), _variant(base, rng, 1), _variant(base, rng, 40)]
    sig = dedup.signatures(texts, 3, 128)
    np.testing.assert_array_equal(sig[1:2], dedup.signatures(texts[1:2], 3, 128))  # word ids are hashes, not counters
    bands, rows = dedup.lsh_params(0.9, 128)
    keys = dedup.band_keys(sig, bands, rows)
    assert (keys[0] == keys[1]).any() and not (keys[0] == keys[2]).any()
    assert dedup.text_hashes(["A b!"])[0] == dedup.text_hashes(["a  B"])[0]


def test_candidates_across_parts_are_confirmed_on_shingles_or_signatures(tmp_path):
    """Two keys files (two parts): a near copy (J 0.96) is confirmed both ways; a pair at J 0.85 is
    confirmed neither on exact shingles nor on its 128-permutation MinHash estimate; one at J 0.886 is
    dropped on the shingles, and on the signatures goes the side of 0.9 its estimate falls."""
    import pyarrow as pa

    rng = random.Random(3)
    base = [f"w{rng.randrange(10**6)}" for _ in range(300)]

    def changed(every: int) -> str:
        words = list(base)
        for i in range(5, 300, every):
            words[i] = f"x{i}"
        return " ".join(words)

    texts = [" ".join(base), changed(150), changed(40), changed(50)]
    jac = [dedup.jaccard(texts[0], t, 3) for t in texts[1:]]
    assert jac[0] > 0.95 and 0.85 < jac[1] < 0.86 and 0.88 < jac[2] < 0.89, jac
    words, offsets = dedup.word_ids(texts)
    hashes, starts = dedup.shingle_hashes(words, offsets, 3)
    sig = dedup.minhash_signatures(hashes, starts, 128)
    ends = np.append(starts[1:], len(hashes))
    tasks = []
    for part, (rows, index) in enumerate((([0, 2], [0, 2]), ([1, 5], [1, 3]))):  # texts 0, 2 | 1, 3 (rows 1, 5)
        take = [0, 2] if part == 0 else [1, 3]
        table = pa.table({
            "row": pa.array(rows, pa.int64()), "hash": pa.array(np.zeros(2, np.uint64)),
            "sig": pa.FixedSizeListArray.from_arrays(pa.array(sig[take].reshape(-1)), 128),
            "shingles": pa.LargeListArray.from_arrays(
                pa.array(np.r_[0, np.cumsum([ends[t] - starts[t] for t in take])], pa.int64()),
                pa.array(np.concatenate([hashes[starts[t]:ends[t]] for t in take]))),
        })
        path = tmp_path / f"keys{part}.arrow"
        write_arrow_atomic(table, path)
        tasks.append({"path": str(path), "rows": np.array(rows), "index": np.array(index)})
    candidates = np.array([[0, 1], [0, 2], [0, 3], [0, 1]])  # as the shuffle gives them: repeated across bands
    stored = dedup.StoredKeys(tasks)
    exact = dedup.confirm_candidates(candidates, stored, 0.9, 128, exact=True)
    np.testing.assert_array_equal(exact, [[0, 1]])
    estimate = (sig[0] == sig[1:]).mean(axis=1)
    by_signature = dedup.confirm_candidates(candidates, stored, 0.9, 128, exact=False)
    np.testing.assert_array_equal(by_signature, [[0, 1 + i] for i in np.flatnonzero(estimate >= 0.9)])
    assert estimate[0] >= 0.9 and estimate[1] < 0.9
    assert dedup.confirm_candidates(np.zeros((0, 2), np.int64), stored, 0.9, 128, exact=True).shape == (0, 2)
    dedup.PAIRS_AT_ONCE, at_once = 1, dedup.PAIRS_AT_ONCE  # a pair at a time: the same pairs
    try:
        np.testing.assert_array_equal(dedup.confirm_candidates(candidates, stored, 0.9, 128, exact=True), exact)
        np.testing.assert_array_equal(dedup.confirm_candidates(candidates, stored, 0.9, 128, exact=False), by_signature)
    finally:
        dedup.PAIRS_AT_ONCE = at_once


def test_near_duplicates_of_one_prompt_are_found_when_another_prompt_heads_their_buckets():
    # y1 and y2 (prompt 1) differ from x (prompt 0) by one word each, from each other by two:
    # x comes first in every bucket they share, yet y2 is a duplicate of y1 within prompt 1
    rng = random.Random(1)
    x = [f"w{rng.randrange(10**6)}" for _ in range(300)]
    y1, y2 = list(x), list(x)
    y1[100], y2[200] = "alpha", "beta"
    texts = [" ".join(x), " ".join(y1), " ".join(y2)]
    assert dedup.jaccard(texts[1], texts[2], 3) == pytest.approx(0.961, abs=1e-3)
    near = dict(near=True, threshold=0.9, ngram=3, num_perm=128)
    np.testing.assert_array_equal(dedup.duplicates(texts, **near), [False, True, True])
    np.testing.assert_array_equal(dedup.duplicates(texts, **near, groups=np.array([0, 1, 1])), [False, False, True])
    np.testing.assert_array_equal(dedup.duplicates(texts, **near, groups=np.array([0, 1, 2])), [False, False, False])
    np.testing.assert_array_equal(dedup.duplicates(texts, **near, groups=np.array([1, 0, 1])), [False, False, True])


def test_shuffle_blocks_bound_the_bytes_of_a_block():
    bands, rows = dedup.lsh_params(0.9, 128)
    near, exact = bands * (16 + 4 * 128), 16
    # small inputs: one block per 50k traces, up to two per CPU, as before the size bound
    for n, cpus in ((0, 8), (1, 8), (1_000, 1), (10_000, 8)):
        for per_trace in (near, exact):
            assert shuffle_blocks(n, per_trace, cpus) == max(1, min(cpus * 2, n // 50_000 + 1)), (n, per_trace)
    assert shuffle_blocks(120_000, exact, 8) == 3 and shuffle_blocks(10**6, exact, 2) == 4
    # growing inputs: the blocks grow with them, none above the target size on average
    for n in (10**5, 10**6, 10**7, 10**8):
        for per_trace in (near, exact):
            blocks = shuffle_blocks(n, per_trace, 8)
            assert n * per_trace / blocks <= SHUFFLE_BLOCK_BYTES, (n, per_trace)
            assert blocks == min(16, n // 50_000 + 1) or n * per_trace / (blocks - 1) > SHUFFLE_BLOCK_BYTES
    assert shuffle_blocks(10**7, near, 8) == 473  # 10M traces of 6.3 kB: 473 blocks of < 128 MB, not 16 of 4 GB


def test_short_texts_and_normalisation():
    assert dedup.normalize("  Hello,   WORLD!! 1+1=2 ") == "hello world 1 1 2"
    dup = dedup.duplicates(["a b", "A, b!", "a c", ""], near=True, threshold=0.9, ngram=3, num_perm=64)
    np.testing.assert_array_equal(dup, [False, True, False, False])


# ---------------------------------------------------------------------------------------
# decontamination


def test_planted_benchmark_problems_are_caught_with_the_right_benchmark(tmp_path):
    from llmdistill.benchmarks import load_benchmark_problems
    from llmdistill.tinyworld.task import generate_problems

    heldout = load_benchmark_problems("tiny")
    extra = tmp_path / "extra.jsonl"
    extra.write_text(json.dumps({"problem": "What is the sum of the first one hundred odd numbers in base ten?"}) + "\n"
                     + json.dumps({"problem": "Solve 3x = 12"}) + "\n")
    cfg = BuildConfig(input_path="x", student_tokenizer="x", decontam_benchmarks=["tiny"],
                      decontam_extra_file=str(extra), decontam_ngram=32)
    index = build_index(cfg, {})
    train = [p.question for p in generate_problems(200, seed=3, split="train")]
    prompts = train + [
        heldout[7],  # verbatim
        "Please solve: " + heldout[11].upper() + " Show your work.",  # embedded, other case
        "what is the SUM of the first one hundred odd numbers in base ten",  # punctuation differs
        "Find x. Solve 3x = 12 quickly.",  # a short problem inside a prompt
    ]
    found, hits = contaminated(prompts, index)
    assert not any(found[:200])  # disjoint tiny-world splits: no false positive with whole-problem matching
    assert found[200:] == [{"tiny"}, {"tiny"}, {"file:extra.jsonl"}, {"file:extra.jsonl"}]
    assert hits == {"tiny": 2, "file:extra.jsonl": 2}


def test_ngram_overlap_and_short_prompts():
    index = NgramIndex(4)
    index.add("bench", ["alpha beta gamma delta epsilon zeta", "tiny one"])
    assert index.hits("xx gamma delta epsilon zeta yy") == {"bench"}  # shares a 4-gram
    assert index.hits("xx gamma delta yy zeta") == set()
    assert index.hits("beta gamma") == {"bench"}  # a short prompt inside a problem
    assert index.hits("this is tiny one indeed") == {"bench"}  # a short problem inside a prompt


def test_unknown_benchmark_is_a_config_error():
    cfg = BuildConfig(input_path="x", student_tokenizer="x", decontam_benchmarks=["nope"])
    with pytest.raises(ConfigError, match="nope"):
        build_index(cfg, {})


# ---------------------------------------------------------------------------------------
# packing


def _docs(lengths: list[int], rng: np.random.Generator) -> list[Document]:
    docs = []
    for i, n in enumerate(lengths):
        p = int(rng.integers(1, n))
        mask = np.r_[np.zeros(p, np.int8), np.ones(n - p, np.int8)]
        docs.append(Document(f"d{i}/0", rng.integers(0, 400, n).astype(np.int32), mask, i, np.arange(n - p)))
    return docs


def test_best_fit_decreasing_fills_bins_and_packed_rows_unpack_exactly():
    rng = np.random.default_rng(0)
    docs = _docs(rng.integers(20, 200, size=400).tolist(), rng)
    bins = best_fit_decreasing([len(d) for d in docs], 512)
    assert sorted(i for b in bins for i in b) == list(range(400))
    assert all(sum(len(docs[i]) for i in b) <= 512 for b in bins)
    total = sum(len(d) for d in docs)
    assert len(bins) <= -(-total // 512) + 1  # at most one bin above the lower bound
    assert packing_efficiency(total, len(bins), 512) > 0.98
    for b in bins:
        row = pack_row([docs[i] for i in b])
        assert len(row["input_ids"]) == len(row["position_ids"]) == len(row["loss_mask"]) <= 512
        for (ids, mask), i in zip(unpack_row(row), b, strict=True):
            np.testing.assert_array_equal(ids, docs[i].input_ids)
            np.testing.assert_array_equal(mask, docs[i].loss_mask)
        starts = np.flatnonzero(row["position_ids"] == 0)
        np.testing.assert_array_equal(starts, np.cumsum([0, *row["seq_lengths"][:-1]]))


def test_packing_long_tailed_lengths_respects_capacity():
    rng = np.random.default_rng(1)
    lengths = np.minimum(rng.lognormal(6.5, 1.0, size=3000).astype(int) + 1, 8192)
    bins = best_fit_decreasing(lengths, 8192)
    assert sorted(i for b in bins for i in b) == list(range(3000))
    assert max(lengths[b].sum() for b in bins) <= 8192
    assert packing_efficiency(int(lengths.sum()), len(bins), 8192) > 0.98
    with pytest.raises(ValueError, match="item sizes"):
        best_fit_decreasing([10, 9000], 8192)


def test_topk_coverage_summary_from_a_merged_histogram():
    from llmdistill.builder.report import coverage_summary

    mass = np.random.default_rng(0).beta(8, 2, size=20_000)
    counts = np.bincount((mass * 1000).astype(int), minlength=1000)
    half = np.bincount((mass[:7000] * 1000).astype(int), minlength=1000)
    summary = coverage_summary(half + (counts - half), float(mass.sum()))
    assert summary["tokens"] == 20_000 and summary["mean"] == pytest.approx(mass.mean(), abs=1e-4)
    assert summary["p5"] == pytest.approx(np.quantile(mass, 0.05), abs=2e-3)
    assert summary["p50"] == pytest.approx(np.median(mass), abs=2e-3)


def test_overlong_documents_are_dropped_or_split_and_counted():
    rng = np.random.default_rng(0)
    docs = _docs([30, 100, 250], rng)
    kept, dropped, split = split_overlong(docs, 64, "drop")
    assert [d.doc_id for d in kept] == ["d0/0"] and (dropped, split) == (2, 0)
    kept, dropped, split = split_overlong(docs, 64, "split")
    assert (dropped, split) == (0, 2)
    long = docs[2]
    pieces = [d for d in kept if d.doc_id.startswith("d2/0#")]
    np.testing.assert_array_equal(np.concatenate([d.input_ids for d in pieces]), long.input_ids[-sum(map(len, pieces)):])
    for d in kept:
        assert len(d) <= 64 and len(d.target_rows) == d.loss_mask.sum()
    # every kept target keeps its own teacher row: position p of the original -> row p - prompt_length
    prompt_len = int((long.loss_mask == 0).sum())
    offset = len(long) - sum(map(len, pieces))
    for d in pieces:
        pos = offset + np.flatnonzero(d.loss_mask)
        np.testing.assert_array_equal(d.target_rows, pos - prompt_len)
        offset += len(d)


def test_config_range_checks():
    with pytest.raises(ConfigError, match="min_pass_rate"):
        BuildConfig(input_path="x", student_tokenizer="t", min_pass_rate=0.9, max_pass_rate=0.5)
    with pytest.raises(ConfigError, match="overlong"):
        BuildConfig(input_path="x", student_tokenizer="t", overlong="truncate")
    with pytest.raises(ConfigError, match="input_path"):
        BuildConfig(student_tokenizer="t")


def test_completion_dedup_can_be_scoped_to_each_prompt():
    texts = ["<think>2+3=5</think>\\boxed{5}"] * 3 + ["<think>2+3=5</think> \\boxed{5}."]
    groups = np.array([0, 1, 0, 1])
    np.testing.assert_array_equal(dedup.duplicates(texts, True, 0.9, 3, 64, groups=groups), [0, 0, 1, 1])
    np.testing.assert_array_equal(dedup.duplicates(texts, True, 0.9, 3, 64), [0, 1, 1, 1])


def test_shipped_tokenizer_is_the_drivers_in_a_fresh_process(tiny_tokenizer_dir, tmp_path):
    """A build worker's tokenizer (unpickled from the driver's) encodes, renders and fingerprints
    exactly as ``load_tokenizer`` does, and unpickling it does not import torch."""
    import pickle
    import subprocess
    import sys

    from llmdistill.builder.tokenize import ShippedTokenizer, load_tokenizer
    from llmdistill.formats import tokenizer_fingerprint

    tokenizer = load_tokenizer(str(tiny_tokenizer_dir), "student")
    texts = ["12+345=", "<think>7 plus 8 is 15</think> \\boxed{15}", ""]
    messages = [{"role": "user", "content": "What is 12+345?"}]
    expected = {"ids": tokenizer(texts, add_special_tokens=False)["input_ids"],
                "chat": tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                "fingerprint": tokenizer_fingerprint(tokenizer), "eos": tokenizer.eos_token_id, "torch": False}
    (tmp_path / "shipped.pkl").write_bytes(pickle.dumps(ShippedTokenizer(tokenizer)))
    script = (
        "import json, pickle, sys\n"
        f"shipped = pickle.loads(open({str(tmp_path / 'shipped.pkl')!r}, 'rb').read())\n"
        "tok = shipped.get()\n"
        "assert shipped.get() is tok\n"
        "from llmdistill.formats import tokenizer_fingerprint\n"
        f"print(json.dumps({{'ids': tok({texts!r}, add_special_tokens=False)['input_ids'],\n"
        f"  'chat': tok.apply_chat_template({messages!r}, tokenize=False, add_generation_prompt=True),\n"
        "  'fingerprint': tokenizer_fingerprint(tok), 'eos': tok.eos_token_id, 'torch': 'torch' in sys.modules}))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == expected


def test_work_files_appear_whole_or_not_at_all(tmp_path):
    """A work file is read back as written (memory-mapped, with its metadata), and a writer that
    fails midway leaves neither the file nor its temporary behind, so its absence still means
    "not done" to a resumed build."""
    table = pa.table({"a": pa.array([1, 2, 3], pa.int64())}).replace_schema_metadata({"result": "{}"})
    path = tmp_path / "sub" / "part.arrow"
    write_arrow_atomic(table, path)
    assert read_arrow(path).equals(table) and arrow_metadata(path) == {b"result": b"{}"}
    failed = tmp_path / "failed.arrow"
    with pytest.raises(RuntimeError, match="midway"), arrow_writer(failed, table.schema) as writer:
        writer.write_table(table)
        raise RuntimeError("midway")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]


def test_a_killed_runs_temporary_traces_file_is_not_carried_into_the_output(tmp_path):
    """A build killed while writing traces.arrow leaves its temporary file in the staging directory
    that the resumed run completes and moves into place: that run removes it before writing its own."""
    from llmdistill.builder.pipeline import _write_fates

    stale = tmp_path / ".traces.arrow.tmp-12345"
    stale.write_bytes(b"half a file")
    _write_fates(tmp_path, [], None, None, None, None)  # no parts: an empty table
    assert sorted(p.name for p in tmp_path.iterdir()) == ["traces.arrow"]
    assert read_arrow(tmp_path / "traces.arrow").num_rows == 0
