"""Outputs appear only whole: a SIGKILL at any point of a build over an existing output leaves it intact.

Each kill is real: a child process runs the real ``run_build`` (or ``staged_output``) with one
step of the swap replaced by ``os.kill(os.getpid(), SIGKILL)``, then this process checks what is
on disk and runs the stage again.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llmdistill.outputs import clean_stale, exchange, staged_output
from llmdistill.tinyworld.task import generate_problems, reference_completion, to_records, write_jsonl

pytestmark = pytest.mark.unit


def tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(f"{p.relative_to(path)}\0".encode() + p.read_bytes())
    return h.hexdigest()


def traces(path: Path, n: int, seed: int) -> Path:
    problems = generate_problems(n, seed=seed)
    records = [{**r, "completion": reference_completion(p)} for r, p in zip(to_records(problems), problems, strict=True)]
    return write_jsonl(path, records)


BUILD = """
import os, signal, sys
import llmdistill.outputs as outputs
from llmdistill.builder import run_build
from llmdistill.config.build import BuildConfig

point = sys.argv[1]
if point == "staging-written":  # everything is written into the staging dir, nothing swapped yet
    real_swap = outputs.swap_in
    outputs.swap_in = lambda staging, output: os.kill(os.getpid(), signal.SIGKILL)
elif point == "between-renames":  # a filesystem without renameat2: old output renamed away, new not yet in
    outputs.exchange = lambda a, b: False
    real_replace = os.replace
    def replace(src, dst):
        real_replace(src, dst)
        if ".old-" in str(dst):
            os.kill(os.getpid(), signal.SIGKILL)
    outputs.os.replace = replace
run_build(BuildConfig(input_path=sys.argv[2], student_tokenizer=sys.argv[3], kd=False, verifier="numeric",
                      max_length=256, output_dir=sys.argv[4], overwrite=True))
"""


@pytest.mark.parametrize("point", ["staging-written", "between-renames"])
def test_a_build_killed_while_replacing_its_output_leaves_the_old_one(point, tmp_path, tiny_tokenizer_dir):
    from llmdistill.builder import run_build
    from llmdistill.config.build import BuildConfig

    out = tmp_path / "built"

    def config(data: Path) -> BuildConfig:
        return BuildConfig(input_path=str(data), student_tokenizer=str(tiny_tokenizer_dir), kd=False,
                           verifier="numeric", max_length=256, output_dir=str(out), overwrite=True)

    old_data, new_data = traces(tmp_path / "old.jsonl", 12, 0), traces(tmp_path / "new.jsonl", 20, 1)
    run_build(config(old_data))
    old = tree_digest(out)
    script = tmp_path / "kill.py"
    script.write_text(textwrap.dedent(BUILD))
    res = subprocess.run([sys.executable, str(script), point, str(new_data), str(tiny_tokenizer_dir), str(out)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == -9, res.stderr[-2000:]
    leftovers = sorted(p.name for p in tmp_path.glob(".built.*"))
    if point == "staging-written":
        assert tree_digest(out) == old, "the old output must be whole after the kill"
        assert leftovers and leftovers[0].startswith(".built.tmp-")
    else:
        assert not out.exists() and [n for n in leftovers if n.startswith(".built.old-")]
    # the next run restores or cleans up, then replaces the output with the new build
    stats = run_build(config(new_data))
    assert not list(tmp_path.glob(".built.*")), "nothing a killed run left may stay"
    assert stats["steps"][0]["remaining"] == 20 and tree_digest(out) != old


def test_the_next_run_restores_an_output_a_kill_left_renamed_away(tmp_path):
    out = tmp_path / "eval"
    old = tmp_path / ".eval.old-999999999"  # a pid that does not exist: its run is gone
    old.mkdir()
    (old / "results.json").write_text("{}")
    clean_stale(out)
    assert (out / "results.json").read_text() == "{}" and not old.exists()


def test_a_running_writers_staging_dir_is_left_alone(tmp_path):
    out = tmp_path / "x"
    mine = tmp_path / f".x.tmp-{os.getppid()}"  # the pytest runner's parent: alive
    mine.mkdir()
    clean_stale(out)
    assert mine.exists()


def test_exchange_swaps_two_directories_atomically(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "f").write_text("A")
    (b / "f").write_text("B")
    if not exchange(a, b):
        pytest.skip("this filesystem has no renameat2 exchange (the two-rename fallback is tested above)")
    assert (a / "f").read_text() == "B" and (b / "f").read_text() == "A"


def test_a_failed_body_leaves_the_old_output_and_no_staging(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep").write_text("old")
    with pytest.raises(RuntimeError), staged_output(out, overwrite=True) as staging:
        (staging / "keep").write_text("new")
        raise RuntimeError("the stage failed")
    assert (out / "keep").read_text() == "old" and not list(tmp_path.glob(".o.*"))
