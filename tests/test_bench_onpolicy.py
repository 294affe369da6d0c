"""``scripts/bench_onpolicy.py`` compares like with like: TRL's ``DistillationConfig`` carries llmdistill's
on-policy settings, and TRL renders the same prompt tokens. The bench itself is not run here."""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
from pathlib import Path

import pytest

from llmdistill.prompts import PromptFormat
from llmdistill.tinyworld.task import generate_problems, to_records

BENCH = Path(__file__).resolve().parents[1] / "scripts" / "bench_onpolicy.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_onpolicy", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.unit
@pytest.mark.parametrize("use_vllm", [False, True])
def test_trl_config_mirrors_the_llmdistill_settings(bench, tmp_path, use_vllm):
    from trl import DistillationConfig

    cfg = bench.onpolicy_config(tmp_path / "p.jsonl", tmp_path / "student", tmp_path / "teacher", tmp_path / "o")
    trl = bench.trl_config(cfg, tmp_path / "trl", use_vllm=use_vllm)
    # the rollout batch: one completion per prompt, all of them in one optimizer step
    assert cfg.samples_per_prompt == 1 and cfg.sync_every == 1
    assert trl.per_device_train_batch_size * trl.gradient_accumulation_steps == cfg.prompts_per_step
    assert trl.max_completion_length == cfg.max_new_tokens
    # sampling; TRL also divides the loss's logits by its temperature, llmdistill's loss is at T = 1
    assert trl.temperature == cfg.rollout_temperature == 1.0
    assert (trl.top_p, trl.top_k, trl.min_p, trl.repetition_penalty) == (cfg.rollout_top_p, 0, None, 1.0)
    # reverse KL, on the student's own samples only (DistillationTrainer has no lambda: it is always on-policy)
    assert cfg.objective == "reverse_kl" and trl.beta == 1.0
    assert cfg.on_policy_fraction == 1.0 and cfg.offline_data_dir is None
    assert not {"lmbda", "seq_kd"} & {f.name for f in dataclasses.fields(DistillationConfig)}
    # optimisation and precision
    assert (trl.max_steps, trl.learning_rate, trl.warmup_steps, trl.weight_decay, trl.max_grad_norm, trl.seed) == \
        (cfg.max_steps, cfg.learning_rate, cfg.warmup_steps, cfg.weight_decay, cfg.max_grad_norm, cfg.seed)
    assert trl.lr_scheduler_type == "linear"  # llmdistill: linear decay to 0 after warm-up
    assert not trl.bf16 and not trl.fp16 and not trl.gradient_checkpointing
    assert trl.model_init_kwargs["dtype"] == "float32" == cfg.dtype
    assert trl.teacher_model_init_kwargs["dtype"] == cfg.teacher_dtype
    assert trl.use_vllm is use_vllm and trl.vllm_max_model_length == cfg.max_model_len


@pytest.mark.unit
def test_trl_reads_the_prompts_as_the_same_tokens(bench, tiny_tokenizer):
    records = to_records(generate_problems(8, seed=3))
    rows = bench.trl_prompts(records)
    # what DistillationTrainer._tokenize_prompts does with conversational prompts
    trl_ids = tiny_tokenizer.apply_chat_template(conversation=list(rows["prompt"]), add_generation_prompt=True,
                                                 tokenize=True, return_dict=True)["input_ids"]
    assert trl_ids == PromptFormat().token_ids(tiny_tokenizer, [r["prompt"] for r in records])


@pytest.mark.unit
def test_pass_at_1_is_the_mean_over_repeats_with_the_standard_error_of_that_mean(bench, monkeypatch):
    """Each arm's pass@1 is the mean of its repeats, its s.e. the repeats' standard deviation over sqrt(n),
    never below the binomial s.e. of all its answers; each llmdistill arm's difference to TRL adds the
    two in quadrature."""
    scores = {"w": 0.5, "t0": 0.6, "t1": 0.7, "t2": 0.8, "l0": 0.7, "l1": 0.7, "l2": 0.7}
    monkeypatch.setattr(bench, "evaluate", lambda path: scores[path.name])
    monkeypatch.setattr(bench, "BACKENDS", ("vllm",))
    monkeypatch.setattr(bench, "EVAL_PROBLEMS", 100)
    out = bench.accuracy({"warm_start": [Path("w")], "trl": [Path(f"t{i}") for i in range(3)],
                          "llmdistill_vllm": [Path(f"l{i}") for i in range(3)]})
    assert (out["warm_start_pass@1"], out["warm_start_pass@1_se"]) == (0.5, 0.05)  # binomial, 100 answers
    assert out["trl_pass@1"] == 0.7 and out["trl_pass@1_repeats"] == [0.6, 0.7, 0.8]
    assert out["trl_pass@1_se"] == round(0.1 / 3 ** 0.5, 4)  # s.d. 0.1 over 3 repeats
    equal = round((0.7 * 0.3 / 300) ** 0.5, 4)  # three equal repeats: the binomial s.e. of their 300 answers
    assert (out["llmdistill_vllm_pass@1"], out["llmdistill_vllm_pass@1_se"]) == (0.7, equal)
    assert out["llmdistill_vllm_minus_trl_pass@1"] == 0.0
    assert out["llmdistill_vllm_minus_trl_pass@1_se"] == round(((0.1 / 3 ** 0.5) ** 2 + (0.7 * 0.3 / 300)) ** 0.5, 4)


@pytest.mark.unit
def test_speed_ratios_are_of_the_fastest_repeats_and_of_each_repeats_pair(bench, monkeypatch):
    """``speedup_*`` divides TRL's fastest seconds per step by the arm's fastest; ``*_per_repeat`` pairs
    repeat r of TRL with repeat r of the arm. The first step of a repeat is not timed."""
    monkeypatch.setattr(bench, "BACKENDS", ("vllm",))
    monkeypatch.setattr(bench, "STEPS", 2)

    def run(seconds: float) -> dict:
        return {"step_ends": [5.0, 5.0 + seconds, 5.0 + 2 * seconds], "setup_s": 1.0, "load_1min": 0.0,
                "completion_tokens": 64, "phases_s": {"rollout": 0.2}}

    out = bench.speed({"trl": [run(1.2), run(0.8)], "llmdistill_vllm": [run(0.4), run(0.8)]})
    assert out["trl_s_per_step_repeats"] == [1.2, 0.8] and out["llmdistill_vllm_s_per_step"] == 0.4
    assert out["speedup_llmdistill_vllm_over_trl"] == 2.0  # 0.8 / 0.4
    assert out["speedup_llmdistill_vllm_over_trl_per_repeat"] == [3.0, 1.0]
    assert out["llmdistill_vllm_rollout_s_per_step"] == 0.1
    # four steps per rollout: the window holds whole groups, each with its rollout (a 3 s first step),
    # from the end of the first group to the end of the last complete one (the 10th step's group is cut)
    ends = list(itertools.accumulate([3.0, 1, 1, 1] * 2 + [3.0, 1]))
    assert bench.seconds_per_step(ends, group=4) == 6.0 / 4
    assert bench.seconds_per_step(ends) == (ends[-1] - ends[0]) / 9
    with pytest.raises(ValueError, match="set BENCH_ONPOLICY_STEPS >= 8"):
        bench.seconds_per_step(ends[:7], group=4)
