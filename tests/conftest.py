"""Session-wide test setup: offline env vars and the tiny world's tokenizer and models.

Everything is made on the spot (nothing is downloaded). The bootstrapped teacher is cached
under ``$LLMDISTILL_CACHE`` (default ``~/.cache/llmdistill``): minutes the first time, instant after.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LLMDISTILL_NO_PROGRESS", "1")

import pytest  # noqa: E402

from llmdistill.tinyworld.models import make_model, save_model  # noqa: E402
from llmdistill.tinyworld.tokenizer import build_tokenizer  # noqa: E402


def with_another_tokenizer(model_dir: Path, out: Path) -> Path:
    """A copy of ``model_dir`` whose tokenizer has one token more: the same weights, another vocabulary."""
    import shutil

    from transformers import AutoTokenizer

    shutil.copytree(model_dir, out)
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(str(out))
    return out


def forbid(monkeypatch, module, names: tuple[str, ...], why: str) -> None:
    """Replace ``module``'s ``names`` with functions that fail the test with ``why`` if called."""
    def forbidden(*args, **kwargs):
        raise AssertionError(why)

    for name in names:
        monkeypatch.setattr(module, name, forbidden)


def assert_trained(out: Path, start: Path, steps: int) -> None:
    """``train`` wrote to ``out`` a student of ``steps`` optimizer steps whose weights moved from ``start``'s."""
    from safetensors.torch import load_file

    from llmdistill.manifest import read_manifest

    manifest = read_manifest(out)
    assert manifest["stage"] == "train" and manifest["counts"]["global_steps"] == steps, manifest["counts"]
    before, after = load_file(str(start / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert before.keys() == after.keys() and any(not before[k].equal(after[k]) for k in before)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The tiny-world tokenizer (byte-level BPE, ChatML template, eos ``<|im_end|>``)."""
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory, tiny_tokenizer):
    """A directory holding the saved tiny-world tokenizer."""
    path = tmp_path_factory.mktemp("tiny_tokenizer")
    tiny_tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_random_teacher_dir(tmp_path_factory, tiny_tokenizer):
    """A teacher-size random-init checkpoint (with tokenizer); untrained, so it writes noise."""
    return save_model(make_model("teacher", tiny_tokenizer, seed=0), tiny_tokenizer,
                      tmp_path_factory.mktemp("tiny_random_teacher"))


@pytest.fixture(scope="session")
def tiny_student_dir(tmp_path_factory, tiny_tokenizer):
    """A student-size random-init checkpoint (with tokenizer)."""
    return save_model(make_model("student", tiny_tokenizer, seed=0), tiny_tokenizer,
                      tmp_path_factory.mktemp("tiny_student"))


@pytest.fixture(scope="session")
def tiny_teacher_dir():
    """The bootstrapped teacher (>= 90% greedy accuracy), from the cache or trained now (minutes)."""
    from llmdistill.tinyworld.bootstrap import bootstrap_teacher

    return bootstrap_teacher(seed=0)


@pytest.fixture
def synthetic_servers():
    """Start synthetic OpenAI-compatible servers that answer in vLLM's format
    (:class:`llmdistill.generate.synthetic_server.SyntheticServer`, keyword arguments passed on);
    all are stopped at the end of the test."""
    from llmdistill.generate.synthetic_server import SyntheticServer, scored_body

    scored_body([1, 2], 1)  # import vLLM's protocol classes now, not in a server's first reply
    started = []

    def start(**kwargs):
        started.append(SyntheticServer(**kwargs).start())
        return started[-1]

    yield start
    for server in started:
        server.stop()


def accelerate_launch(*args: str, launcher: str = "ddp_cpu", processes: int = 2) -> list[str]:
    """The command that runs ``args`` (``-m llmdistill ...`` or a script) in ``processes`` CPU processes through
    ``accelerate launch`` with the project's ``configs/accelerate/<launcher>.yaml`` (DDP: gloo here), on a free port."""
    import socket
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / f"{launcher}.yaml"
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes",
            str(processes), "--main_process_port", str(port), *args]


#: the tests' vLLM engines: the engine core in the process that creates it (a faster start, and a SIGKILL
#: kills all of it), a 1 GiB KV cache; fp32, eager, one worker
ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "LLMDISTILL_NO_PROGRESS": "1"}
ENGINE_FLAGS = ["--dtype", "float32", "--enforce_eager", "true", "--max_model_len", "256",
                "--distributed_executor_backend", "uni"]


def run_cli(command: str, *args: str, cwd: Path | None = None) -> None:
    """``llmdistill <command> <args>`` run by the console entry point in this process, with :data:`ENGINE_ENV`,
    from ``cwd`` (default: the repository's root, where relative ``configs/`` paths resolve): the CLI's own
    parsing, config files and stage runner, without the ~15 s of imports a fresh interpreter pays per stage
    on the slower CPU of this machine kind. A non-zero exit fails the test. (What only a separate process
    shows, signals and the exit code a shell sees, is tested with subprocesses.)"""
    from llmdistill.cli import main

    with pytest.MonkeyPatch.context() as patch:
        for key, value in ENGINE_ENV.items():
            patch.setenv(key, value)
        patch.chdir(cwd if cwd is not None else Path(__file__).resolve().parents[1])
        try:
            main([command, *args])
        except SystemExit as done:
            assert not done.code, f"llmdistill {command} exited with {done.code} (its stderr is captured above)"
