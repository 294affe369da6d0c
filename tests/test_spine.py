"""The config/CLI spine: help texts, YAML loading of every shipped config, unknown keys, manifests."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import run_cli  # tests/ is on sys.path (pytest's rootdir conftest)

from llmdistill.cli import COMMANDS, resolve
from llmdistill.config.base import ConfigError, load_config, parse_config, read_yaml, save_config
from llmdistill.manifest import describe_machine, fingerprint, machine, read_manifest, write_manifest

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def stage_of(path: Path) -> str:
    """Which subcommand reads a shipped YAML: its file name starts with the stage name."""
    stem = path.stem
    for stage in COMMANDS:
        if stem == stage or stem.startswith(stage + "_") or stem.startswith(stage + "-"):
            return stage
    raise AssertionError(f"{path}: name it <stage>_*.yaml with a stage in {list(COMMANDS)}")


def shipped_configs() -> list[Path]:
    return sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "accelerate" not in p.parts)


@dataclass
class Toy:
    learning_rate: float = field(default=1e-3, metadata={"help": "step size"})
    num_samples: int = field(default=4, metadata={"help": "samples per prompt"})


@pytest.mark.unit
def test_every_command_resolves():
    for name, (config_ref, runner_ref, _) in COMMANDS.items():
        assert callable(resolve(runner_ref)), name
        assert isinstance(resolve(config_ref), type), name


@pytest.mark.unit
@pytest.mark.parametrize("path", shipped_configs(), ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_yaml_loads_through_its_config(path):
    cls = resolve(COMMANDS[stage_of(path)][0])
    cfg = load_config(cls, path)
    assert isinstance(cfg, cls)
    # every key written in the file survives into the config
    for key, value in read_yaml(path, cls).items():
        if isinstance(value, (int, float, str, bool)):
            got = getattr(cfg, key)
            got = got[0] if isinstance(got, list) and len(got) == 1 else got
            if key == "report_to" and value == "none":  # transformers stores report_to: none as []
                got = got or "none"
            assert got == value or getattr(got, "value", None) == value, key


@pytest.mark.unit
def test_some_configs_are_shipped():
    stages = {stage_of(p) for p in shipped_configs()}
    assert {"generate", "score", "build", "train", "eval", "demo"} <= stages


@pytest.mark.unit
def test_unknown_yaml_key_names_closest(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lerning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'lerning_rate' in .*bad\.yaml; did you mean 'learning_rate'\?"):
        read_yaml(bad, Toy)


@pytest.mark.unit
def test_cli_override_beats_yaml_and_unknown_flag_fails(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("learning_rate: 0.1\nnum_samples: 8\n")
    cfg = parse_config(Toy, ["--config", str(good), "--num_samples", "2"])
    assert (cfg.learning_rate, cfg.num_samples) == (0.1, 2)
    with pytest.raises(ConfigError, match="unknown key 'num_sample' in the command line; did you mean 'num_samples'"):
        parse_config(Toy, ["--num_sample", "2"])


@pytest.mark.unit
def test_save_config_round_trips(tmp_path):
    cfg = Toy(learning_rate=0.5, num_samples=3)
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(Toy, tmp_path / "c.yaml") == cfg


@dataclass
class Switches:
    """A config with each kind of field the command line treats specially, and a check of its own."""

    enabled: bool = field(default=True, metadata={"help": "on unless --no_enabled"})
    strict: bool = field(default=False, metadata={"help": "off by default"})
    auto: bool | None = field(default=None, metadata={"help": "None decides later"})
    limit: int | None = field(default=8, metadata={"help": "optional integer"})
    column: str | None = field(default="c", metadata={"help": "optional text"})
    name: str = field(default="x", metadata={"help": "plain text"})
    report: None | str | list[str] = field(default="all", metadata={"help": "'none' is a word of its own here"})
    kwargs: dict | str | None = field(default=None, metadata={"help": "JSON object"})

    def __post_init__(self):  # as transformers' and TRL's checks do: plain ValueErrors, JSON decoded in place
        if self.limit is not None and self.limit <= 0:  # a TypeError for a limit given as text
            raise ValueError("limit must be positive,\n  or leave it out for no limit")
        if self.name == "user":
            raise ConfigError("name 'user' is taken")
        if isinstance(self.kwargs, str):
            self.kwargs = json.loads(self.kwargs)


@pytest.mark.unit
def test_no_flag_sets_a_true_false_field_false(tmp_path):
    assert (parse_config(Switches, []).enabled, parse_config(Switches, ["--no_enabled"]).enabled) == (True, False)
    assert parse_config(Switches, ["--no-enabled"]).enabled is False
    yaml_on = tmp_path / "on.yaml"
    yaml_on.write_text("strict: true\nauto: true\n")
    on = parse_config(Switches, ["--config", str(yaml_on)])
    assert (on.strict, on.auto) == (True, True)
    cfg = parse_config(Switches, ["--config", str(yaml_on), "--no_strict", "--no-auto"])  # a false default has it too
    assert (cfg.strict, cfg.auto, cfg.enabled) == (False, False, True)
    for flag, name in (("--no_limit", "limit"), ("--no-name", "name")):
        with pytest.raises(ConfigError, match=rf"^unknown key '{flag[2:]}' in the command line: {name} is not a "
                                              rf"true/false field, so it has no --no_{name}; set it with --{name} VALUE$"):
            parse_config(Switches, [flag])
    with pytest.raises(ConfigError, match=r"^unknown key 'no_enabld' in the command line; did you mean 'enabled'\?$"):
        parse_config(Switches, ["--no_enabld"])


@pytest.mark.unit
def test_no_gradient_checkpointing_advertised_by_help_turns_it_off(capsys):
    from llmdistill.config.train import TrainConfig

    args = ["--student_model", "org/student", "--data_dir", "runs/d", "--output_dir", "runs/o"]
    with pytest.raises(SystemExit):
        parse_config(TrainConfig, ["--help"])
    assert "[--no_gradient_checkpointing]" in capsys.readouterr().out
    assert parse_config(TrainConfig, args).gradient_checkpointing is True
    assert parse_config(TrainConfig, [*args, "--no_gradient_checkpointing"]).gradient_checkpointing is False
    assert parse_config(TrainConfig, [*args, "--no-gradient-checkpointing"]).gradient_checkpointing is False
    with pytest.raises(ConfigError, match="learning_rate is not a true/false field"):
        parse_config(TrainConfig, [*args, "--no_learning_rate"])


@pytest.mark.unit
@pytest.mark.parametrize("word", ["none", "None", "NULL"])
def test_none_on_the_command_line_is_null_for_an_optional_field_only(tmp_path, word):
    cfg = parse_config(Switches, ["--limit", word, "--column", word, "--auto", word, "--name", word, "--report", word])
    assert (cfg.limit, cfg.column, cfg.auto) == (None, None, None)
    assert (cfg.name, cfg.report) == (word, word)  # plain text, and a union whose text 'none' means something
    assert parse_config(Switches, [f"--limit={word}"]).limit is None
    text = tmp_path / "t.yaml"
    text.write_text(f"column: '{word}'\n")  # text in YAML stays text, as load_config reads it (YAML's null is null or ~)
    assert parse_config(Switches, ["--config", str(text)]).column == load_config(Switches, text).column == word
    assert parse_config(Switches, ["--config", str(text), "--column", word]).column is None
    with pytest.raises(ConfigError, match=r"^the command line: argument --limit: invalid int value: 'nan'"):
        parse_config(Switches, ["--limit", "nan"])


@pytest.mark.unit
def test_score_columns_and_context_take_none_from_the_command_line(tmp_path):
    from llmdistill.config.generate import ScoreConfig

    saved = tmp_path / "score.yaml"
    saved.write_text("model: org/teacher\ndataset: org/traces\nmax_model_len: 4096\n")
    cfg = parse_config(ScoreConfig, ["--config", str(saved)])
    assert (cfg.max_model_len, cfg.completion_column, cfg.prompt_column) == (4096, "completion", "prompt")
    cfg = parse_config(ScoreConfig, ["--config", str(saved), "--max_model_len", "none", "--completion_column", "none",
                                     "--prompt_column", "none"])
    assert (cfg.max_model_len, cfg.completion_column, cfg.prompt_column) == (None, None, "none")


@pytest.mark.unit
@pytest.mark.parametrize(("text", "message"), [
    ("1: x\n", "key 1 is not a field name (YAML reads this key as int)"),
    ("limit: 3\nyes: 1\n", "key True is not a field name (YAML reads an unquoted yes, no, on, off, true or false as a boolean)"),
    ("~: 1\n", "key None is not a field name (YAML reads an empty key, null or ~ as null)"),
], ids=["int", "yes", "null"])
def test_a_yaml_key_that_is_not_text_is_named(tmp_path, text, message):
    path = tmp_path / "keys.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        read_yaml(path, Switches)
    assert str(info.value) == f"{path}: {message}: write a field name of Switches; run with --help to list them"


@pytest.mark.unit
def test_a_yaml_file_that_is_not_utf8_names_the_byte(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("limit: 3\nname: café\n".encode("latin-1"))  # é is byte 18
    with pytest.raises(ConfigError) as info:
        read_yaml(path, Switches)
    assert str(info.value) == f"{path} is not UTF-8 text (byte 18): save it as UTF-8"
    path.write_bytes("\ufefflimit: 3\nname: café\n".encode("utf-8"))  # UTF-8 with a byte-order mark reads
    assert read_yaml(path, Switches) == {"limit": 3, "name": "café"}


@pytest.mark.unit
def test_a_check_of_the_dataclass_is_one_config_error_naming_where(tmp_path):
    saved = tmp_path / "s.yaml"
    saved.write_text("limit: 0\n")
    cases = [
        (lambda: parse_config(Switches, ["--config", str(saved)]),
         f"{saved}: invalid Switches setting: limit must be positive, or leave it out for no limit"),
        (lambda: parse_config(Switches, ["--config", str(saved), "--name", "y"]),
         f"{saved} and the command line: invalid Switches setting: limit must be positive, or leave it out for no limit"),
        (lambda: parse_config(Switches, ["--kwargs", "{bad"]),
         "the command line: invalid Switches setting: kwargs is not valid JSON (Expecting property name enclosed in "
         "double quotes at character 1): write a JSON object, e.g. '{\"key\": 1}'"),
        (lambda: load_config(Switches, limit=0),
         "the keyword overrides: invalid Switches setting: limit must be positive, or leave it out for no limit"),
        (lambda: load_config(Switches, saved, name="z"),
         f"{saved} and the keyword overrides: invalid Switches setting: limit must be positive, or leave it out for no limit"),
        (lambda: load_config(Switches, limit="3"),  # a TypeError of the check: text compared with 0
         "the keyword overrides: invalid Switches setting: '<=' not supported between instances of 'str' and 'int'"),
        (lambda: parse_config(Switches, ["--name", "user"]), "name 'user' is taken"),  # a ConfigError stays as it is
    ]
    for make, message in cases:
        with pytest.raises(ConfigError) as info:
            make()
        assert str(info.value) == message and info.value.__cause__ is None
    assert parse_config(Switches, ["--kwargs", '{"a": 1}']).kwargs == {"a": 1}


@pytest.mark.unit
def test_manifest_records_config_counts_and_fingerprints(tmp_path):
    data = tmp_path / "in.txt"
    data.write_text("hello")
    write_manifest(tmp_path / "out", "build", Toy(), inputs={"data": data}, counts={"rows": 3}, started=0.0)
    man = read_manifest(tmp_path / "out")
    assert man["stage"] == "build" and man["counts"] == {"rows": 3}
    assert man["config"] == {"learning_rate": 1e-3, "num_samples": 4}
    assert man["inputs"]["data"]["fingerprint"] == fingerprint(data) != "missing"
    assert "torch" in man["versions"]
    assert man["machine"] == machine() and man["machine"]["cpus"] >= 1
    data.write_text("changed")
    assert fingerprint(data) != man["inputs"]["data"]["fingerprint"]


ZEN3_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC 7B13
flags\t\t: fpu vme sse sse2 avx avx2 fma

processor\t: 1
model name\t: another block, not read
"""


@pytest.mark.unit
def test_the_machine_names_the_cpu_its_vector_unit_and_memory():
    """The fields figures depend on, read from /proc texts: an AVX2-only EPYC and an AVX-512 one differ."""
    meminfo = "MemTotal:       24536192 kB\nMemFree:        1000 kB\n"
    zen3 = machine(ZEN3_CPUINFO, meminfo)
    assert {k: zen3[k] for k in ("cpu", "cpu_family", "cpu_model", "vector", "memory_gib")} == \
        {"cpu": "AMD EPYC 7B13", "cpu_family": "25", "cpu_model": "1", "vector": "AVX2", "memory_gib": 23.4}
    assert machine(ZEN3_CPUINFO.replace("avx2", "avx2 avx512f avx512bw"), meminfo)["vector"] == "AVX-512"
    assert machine(ZEN3_CPUINFO.replace("avx2", "avx2 avx512f amx_bf16 amx_tile"), meminfo)["vector"] == "AVX-512 + AMX"
    assert machine(ZEN3_CPUINFO.replace(" avx avx2", ""), meminfo)["vector"] == "no AVX2"
    assert describe_machine({**zen3, "cpus": 2, "gpus": []}) == "AMD EPYC 7B13 (family 25, model 1), AVX2, 2 CPUs, 23.4 GiB"
    assert describe_machine({**zen3, "cpus": 8, "gpus": ["NVIDIA H100 80GB HBM3"] * 8}).endswith(
        "8 CPUs, 23.4 GiB, 8 x NVIDIA H100 80GB HBM3")


@pytest.mark.unit
def test_gpus_are_named_through_nvml_without_a_cuda_context(monkeypatch):
    """NVML (vLLM's dependency) names the GPUs; without it, and with no CUDA context here, none are named."""
    import types

    from llmdistill.manifest import _gpu_names

    calls: list[str] = []
    fake = types.SimpleNamespace(
        nvmlInit=lambda: calls.append("init"), nvmlShutdown=lambda: calls.append("shutdown"),
        nvmlDeviceGetCount=lambda: 2, nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetName=lambda handle: [b"NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"][handle])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert _gpu_names() == ["NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"] and calls == ["init", "shutdown"]
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed: the import fails
    monkeypatch.delitem(sys.modules, "torch", raising=False)  # and a process without torch is not made to import it
    assert _gpu_names() == [] and "torch" not in sys.modules


@pytest.mark.unit
def test_cli_help_lists_commands_and_fields(capsys):
    out = subprocess.run([PY, "-m", "llmdistill", "--help"], capture_output=True, text=True, check=True).stdout
    for name in COMMANDS:
        assert name in out
    for name in COMMANDS:  # each stage's help from the entry point in this process (a fresh interpreter adds nothing)
        capsys.readouterr()
        run_cli(name, "--help")
        shown = capsys.readouterr().out
        assert "--config" in shown and "--output_dir" in shown, name


@pytest.mark.unit
def test_cli_unknown_key_exits_2_with_hint(tmp_path):
    bad = tmp_path / "build_bad.yaml"
    bad.write_text("outptu_dir: x\n")
    res = subprocess.run([PY, "-m", "llmdistill", "build", "--config", str(bad)], capture_output=True, text=True)
    assert res.returncode == 2
    assert "unknown key 'outptu_dir'" in res.stderr and "did you mean 'output_dir'" in res.stderr
    res = subprocess.run([PY, "-m", "llmdistill", "biuld"], capture_output=True, text=True)
    assert res.returncode == 2 and "did you mean 'build'" in res.stderr.lower()


@pytest.mark.unit
def test_library_import_has_no_heavy_side_effects():
    code = "import sys, llmdistill, llmdistill.cli; print(json.dumps(sorted(m for m in ('torch','vllm','transformers') if m in sys.modules)))"
    out = subprocess.run([PY, "-c", "import json;" + code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == []


@pytest.mark.unit
def test_importing_llmdistill_configures_no_logging():
    code = ("import json, logging, llmdistill.log, llmdistill.formats, llmdistill.builder.pipeline, "
            "llmdistill.generate.stage; log = logging.getLogger('llmdistill'); "
            "print(json.dumps([repr(h) for h in log.handlers] + [log.level, log.propagate]))")
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == [logging.NOTSET, True]


@pytest.mark.unit
@pytest.mark.parametrize(("env", "level"), [({}, logging.INFO), ({"RANK": "1"}, logging.WARNING)], ids=["rank0", "rank1"])
def test_setup_logging_is_rank_aware_and_idempotent(env, level):
    code = ("import json, logging; from llmdistill.log import setup_logging, get_logger; "
            "first = setup_logging(); second = setup_logging(); "
            "get_logger('llmdistill.demo').info('info-line'); get_logger('llmdistill.demo').warning('warning-line'); "
            "print(json.dumps([first is second, len(first.handlers), first.level, first.propagate]))")
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "SLURM_PROCID")}
    res = subprocess.run([PY, "-c", code], capture_output=True, text=True, check=True,
                         env={**clean, **env, "COLUMNS": "200"})
    assert json.loads(res.stdout.splitlines()[-1]) == [True, 1, level, False]
    assert "warning-line" in res.stdout + res.stderr
    assert ("info-line" in res.stdout + res.stderr) == (level == logging.INFO)


RECIPE = ROOT / "configs" / "recipes" / "r1-qwen7b"


@pytest.mark.unit
@pytest.mark.parametrize("stage", ["generate", "score", "build", "train", "eval"])
def test_recipe_dry_run_prints_plan_and_estimate(stage):
    res = subprocess.run([PY, "-m", "llmdistill", stage, "--config", str(RECIPE / f"{stage}.yaml"), "--dry_run"],
                         capture_output=True, text=True, cwd=ROOT, env={**__import__("os").environ, "COLUMNS": "200"})
    assert res.returncode == 0, res.stderr[-3000:]
    text = res.stdout + res.stderr
    expected = {
        "generate": ["GPUs", "32768", "teacher log-prob disk per 1k prompts", "host RAM per job (upper bound)",
                     "11.5 GiB"],
        "score": ["GPUs per job", "4", "disk per completion token"],
        "build": ["math", "32768", "bytes per target token"],
        "train": ["student parameters", "ZeRO-3", "forward_kl"],
        "eval": ["30 problems x 64 samples", "500 problems x 4 samples",
                 "198 problems x 8 samples", "token budget"],
    }[stage]
    for needle in expected:
        assert needle in text, (needle, text[-3000:])
    assert not (ROOT / "runs" / "r1-qwen7b").exists(), "a dry run must write nothing"


@pytest.mark.unit
def test_the_recipe_student_context_holds_every_stage_that_runs_it():
    """The student is prepared with the README's --max_position_embeddings; vLLM refuses a
    max_model_len above a model's positions, so eval and on-policy must fit in it, and so must the
    packed training rows. The eval job asks for the GPUs its engine uses."""
    import re

    import yaml

    positions = int(re.search(r"prepare_student\.py[^`]*--max_position_embeddings (\d+)",
                              (ROOT / "README.md").read_text()).group(1))
    recipe = {stage: yaml.safe_load((RECIPE / f"{stage}.yaml").read_text()) for stage in ("eval", "onpolicy", "build")}
    assert recipe["eval"]["max_model_len"] <= positions
    assert recipe["onpolicy"]["max_model_len"] <= positions
    assert recipe["build"]["max_length"] <= positions
    gpus = int(re.search(r"#SBATCH --gpus-per-node=(\d+)", (RECIPE / "slurm" / "eval.sbatch").read_text()).group(1))
    assert gpus == recipe["eval"].get("tensor_parallel_size", 1)


@pytest.mark.unit
@pytest.mark.parametrize("script", sorted((RECIPE / "slurm").glob("*.sbatch")), ids=lambda p: p.name)
def test_recipe_slurm_scripts_parse_and_call_llmdistill(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "#SBATCH" in text
    assert "llmdistill" in text or "vllm.entrypoints.openai.api_server" in text
    for ref in __import__("re").findall(r"configs/[\w/.-]+\.(?:yaml|json)", text):
        assert (ROOT / ref).is_file(), f"{script.name} refers to missing {ref}"


@pytest.mark.unit
def test_parameters_from_a_config_count_grouped_query_attention(tmp_path):
    """Qwen2.5-Math-7B's config (28 heads, 4 of them for keys and values): 7.615 B, not the 8.23 B that
    full-width k and v projections would give."""
    from llmdistill.plan import params_from_name

    config = {"hidden_size": 3584, "num_hidden_layers": 28, "vocab_size": 152064, "intermediate_size": 18944,
              "num_attention_heads": 28, "num_key_value_heads": 4, "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(config))
    h, kv = 3584, 4 * 128
    assert params_from_name(str(tmp_path)) == 28 * (2 * h * h + 2 * h * kv + 3 * h * 18944) + 2 * 152064 * h
    assert params_from_name(str(tmp_path)) == pytest.approx(7.615e9, rel=1e-3)


@pytest.mark.unit
def test_generate_plan_counts_local_prompts(tmp_path):
    from llmdistill.config.generate import GenerateConfig
    from llmdistill.plan import make_plan

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(f'{{"prompt": "q{i}"}}\n' for i in range(10)))
    model = tmp_path / "m"
    model.mkdir()
    cfg = GenerateConfig(dataset=str(prompts), model=str(model), num_samples=2, max_tokens=100,
                         logprobs_top_k=20, shard="1/2")
    plan = make_plan("generate", cfg)
    assert plan["prompts (this shard)"] == 5
    assert plan["completions"] == 10
    assert plan["generated tokens (upper bound)"] == "1e+03"
    assert plan["GPUs over all N jobs"] == 2


@pytest.mark.unit
def test_build_plan_uses_the_runs_own_vocabulary_and_k(tmp_path):
    """The estimate reads k and the vocabulary from the generation manifest, not Qwen's 151,936 and k = 20."""
    from llmdistill.config.build import BuildConfig
    from llmdistill.formats import GenerationInfo
    from llmdistill.manifest import write_manifest
    from llmdistill.plan import make_plan, topk_bytes_per_token
    from llmdistill.prompts import PromptFormat

    gen = tmp_path / "gen"
    info = GenerationInfo(stage="generate", teacher="t", tokenizer="t", k=8, vocab_size=512, prompt_format=PromptFormat())
    write_manifest(gen, "generate", None, counts={"rows": 3}, generation=info.to_manifest())
    plan = make_plan("build", BuildConfig(input_path=str(gen), student_tokenizer="s", codec_bits=12))
    key = "top-8 bytes per target token (vocab 512, 12 bits)"
    assert plan[key] == round(topk_bytes_per_token(8, 512, 12), 1) < round(topk_bytes_per_token(20, 151_936, 12), 1)
    assert plan["input counts (from its manifest)"] == {"rows": 3}
    unknown = make_plan("build", BuildConfig(input_path=str(tmp_path / "not-yet"), student_tokenizer="s"))
    assert "unknown until" in unknown["top-k bytes per target token"]
