"""``llmdistill train``: loss wiring against references, refusals, configs, resume, LoRA/QLoRA.

The built shards are made from tiny-world problems and a teacher checkpoint by
:mod:`llmdistill.tinyworld.kd_data`, which runs the build stage itself on them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from conftest import accelerate_launch  # tests/ is on sys.path (pytest's rootdir conftest)
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from llmdistill import losses
from llmdistill.collate import DistillCollator
from llmdistill.compute import checkpoint_compute
from llmdistill.config.base import ConfigError, UserError, load_config, save_config
from llmdistill.config.train import UNSUPPORTED_SFT_FIELDS, TrainConfig
from llmdistill.formats import SchemaError, read_built, write_built_shard
from llmdistill.tinyworld.kd_data import teacher_topk, write_tiny_built
from llmdistill.tinyworld.recipe import encode_examples
from llmdistill.tinyworld.task import generate_problems
from llmdistill.train import build_trainer, load_student, run_train
from llmdistill.trainer import LAYOUT_FILE, DistillTrainer, schedule_value

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built_kd(tmp_path_factory, tiny_tokenizer, tiny_random_teacher_dir):
    """Built shards of 64 problems with the random teacher's top-8."""
    return write_tiny_built(tmp_path_factory.mktemp("built_kd"), tiny_tokenizer, generate_problems(64, seed=0),
                            tiny_random_teacher_dir, k=8, max_length=128)


@pytest.fixture(scope="module")
def built_sft(tmp_path_factory, tiny_tokenizer):
    """The same problems built with ``kd: false`` (no top-k)."""
    return write_tiny_built(tmp_path_factory.mktemp("built_sft"), tiny_tokenizer, generate_problems(64, seed=0),
                            None, max_length=128)


def config(tmp_path, student, data, **overrides) -> TrainConfig:
    values = dict(output_dir=str(tmp_path / "out"), student_model=str(student), data_dir=str(data), alpha=0.5,
                  max_steps=4, per_device_train_batch_size=2, learning_rate=3e-3, logging_steps=1,
                  save_strategy="no", gradient_checkpointing=False, report_to="none", seed=0, disable_tqdm=True)
    values.update(overrides)
    return TrainConfig(**values)


def first_batch(trainer) -> dict[str, torch.Tensor]:
    rows = [trainer.train_dataset[i] for i in range(3)]
    return trainer.data_collator(rows)


def split_documents(batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """One batch per packed document, cut out of a collated batch (no re-encoding)."""
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [batch["input_ids"].shape[1]]
    docs = []
    for s, e in zip(starts[:-1], starts[1:], strict=True):
        keep = (batch["target_index"] >= s) & (batch["target_index"] < e)
        doc = {"input_ids": batch["input_ids"][:, s:e], "position_ids": batch["position_ids"][:, s:e],
               "target_index": batch["target_index"][keep] - s, "num_rows": torch.tensor(1)}
        if "teacher_ids" in batch:
            doc["teacher_ids"], doc["teacher_logprobs"] = batch["teacher_ids"][keep], batch["teacher_logprobs"][keep]
        docs.append(doc)
    return docs


def loss_and_grads(trainer, batch, n_items):
    model = trainer.model
    model.zero_grad()
    loss = trainer.compute_loss(model, batch, num_items_in_batch=torch.tensor(float(n_items)))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ---- pure pieces ----------------------------------------------------------------------------


@pytest.mark.unit
def test_schedules_reach_their_endpoints():
    assert schedule_value("constant", 0.1, 0.7, 0.3) == 0.7
    assert schedule_value("linear_warmup", 0.2, 0.8, 0.0, warmup_ratio=0.5) == pytest.approx(0.2)
    assert schedule_value("linear_warmup", 0.2, 0.8, 0.25, warmup_ratio=0.5) == pytest.approx(0.5)
    assert schedule_value("linear_warmup", 0.2, 0.8, 0.9, warmup_ratio=0.5) == pytest.approx(0.8)
    assert schedule_value("linear", 2.0, 1.0, 0.5) == pytest.approx(1.5)
    assert schedule_value("cosine", 2.0, 1.0, 0.0) == pytest.approx(2.0)
    assert schedule_value("cosine", 2.0, 1.0, 0.5) == pytest.approx(1.5)
    assert schedule_value("cosine", 2.0, 1.0, 1.0) == pytest.approx(1.0)


@pytest.mark.unit
def test_the_dry_run_counts_a_qlora_merge_in_host_ram(tmp_path):
    """QLoRA keeps the base in NF4 on the GPU; save_merged loads it again unquantised on the main process."""
    from llmdistill.plan import GIB, make_plan

    common = dict(output_dir=str(tmp_path), student_model="Qwen/Qwen2.5-Math-7B", data_dir=str(tmp_path), use_peft=True)
    qlora = make_plan("train", TrainConfig(**common, load_in_4bit=True))
    assert qlora["frozen weights (NF4)"].startswith(f"at least {7e9 * 0.5 / GIB:.1f} GiB per GPU")
    assert qlora["merging the adapter at the end (save_merged)"].startswith(
        f"the main process loads the base again unquantised, {7e9 * 2 / GIB:.0f} GiB of host RAM")
    fp32 = make_plan("train", TrainConfig(**common, load_in_4bit=True, model_init_kwargs={"dtype": "float32"}))
    assert f"unquantised, {7e9 * 4 / GIB:.0f} GiB" in fp32["merging the adapter at the end (save_merged)"]
    adapter_only = make_plan("train", TrainConfig(**common, load_in_4bit=True, save_merged=False))
    lora = make_plan("train", TrainConfig(**common))
    assert "merging the adapter at the end (save_merged)" not in adapter_only | lora  # LoRA merges in place
    assert lora["frozen weights (bf16)"] == f"{7e9 * 2 / GIB:.1f} GiB per GPU (not sharded by DDP)"


@pytest.mark.unit
def test_config_checks_ranges_and_combinations(tmp_path):
    with pytest.raises(ConfigError, match="use_peft"):
        TrainConfig(output_dir=str(tmp_path), load_in_4bit=True)
    with pytest.raises(ConfigError, match="divergence"):
        TrainConfig(output_dir=str(tmp_path), divergence="kl")
    with pytest.raises(ConfigError, match="alpha"):
        TrainConfig(output_dir=str(tmp_path), alpha=1.5)
    with pytest.raises(ConfigError, match="padding_free"):
        TrainConfig(output_dir=str(tmp_path), padding_free=True)
    with pytest.raises(ConfigError, match="adaptive_ema_decay=1.0 never moves the average"):
        TrainConfig(output_dir=str(tmp_path), adaptive_ema_decay=1.0)
    assert not TrainConfig(output_dir=str(tmp_path), alpha=0.0).uses_kd
    assert TrainConfig(output_dir=str(tmp_path), alpha=0.0, alpha_schedule="linear_warmup", alpha_start=0.3).uses_kd
    cfg = TrainConfig(output_dir=str(tmp_path))
    assert cfg.dataset_kwargs["skip_prepare_dataset"] and not cfg.remove_unused_columns
    # NaN passes every comparison, inf every lower bound: both are refused by name
    for field, value in (("alpha", float("nan")), ("temperature", float("inf")), ("jsd_beta", float("nan")),
                         ("adaptive_ema_decay", float("nan"))):
        with pytest.raises(ConfigError, match=f"^{field}={value} is not a finite number: set a number$"):
            TrainConfig(output_dir=str(tmp_path), **{field: value})
    with pytest.raises(UserError, match="student_model is empty: set the student checkpoint"):
        build_trainer(TrainConfig(output_dir=str(tmp_path), data_dir=str(tmp_path / "never-read")))


@pytest.mark.unit
def test_collator_flattens_rows_and_decodes_the_targets_topk(built_kd, tiny_tokenizer, tiny_random_teacher_dir):
    table, meta = read_built(built_kd)
    rows = table.slice(0, 2).to_pylist()
    batch = DistillCollator(meta["k"], meta["vocab_size"], meta["codec_bits"], with_topk=True)(rows)
    flat_ids = sum((r["input_ids"] for r in rows), [])
    flat_mask = np.concatenate([r["loss_mask"] for r in rows]).astype(bool)
    assert batch["input_ids"][0].tolist() == flat_ids
    assert batch["target_index"].tolist() == np.flatnonzero(flat_mask).tolist()
    # the first document's targets carry the teacher's top-k for exactly those positions
    teacher = AutoModelForCausalLM.from_pretrained(tiny_random_teacher_dir)
    problems = {p.id: p for p in generate_problems(64, seed=0)}
    doc = encode_examples(tiny_tokenizer, [problems[rows[0]["doc_ids"][0].split("/")[0]]])
    ids, logprobs = teacher_topk(teacher, doc, meta["k"])[0]
    n = len(ids)
    assert torch.equal(batch["teacher_ids"][:n], torch.from_numpy(ids))
    assert torch.allclose(batch["teacher_logprobs"][:n], torch.from_numpy(logprobs), atol=0.01)


@pytest.mark.unit
def test_config_accepts_exactly_the_divergences_of_the_losses_registry(tmp_path):
    from llmdistill.config import train as train_config

    names = set(losses.DIVERGENCES)
    assert set(train_config.DIVERGENCES) == names
    for name in names:
        assert TrainConfig(output_dir=str(tmp_path), divergence=name).divergence == name
    with pytest.raises(ConfigError, match="divergence='kl' is not one of"):
        TrainConfig(output_dir=str(tmp_path), divergence="kl")
    meta = next(f for f in dataclasses.fields(TrainConfig) if f.name == "divergence").metadata
    assert set(meta["choices"]) == names and all(f"{name} (" in meta["help"] for name in names)


# An SFTConfig value other than the default for every field the distillation trainer does not honour.
NON_DEFAULT_SFT_VALUES = {
    "max_length": 2048, "packing": True, "packing_strategy": "wrapped", "eval_packing": True, "padding_free": True,
    "pad_to_multiple_of": 8, "pad_token": "<pad>", "truncation_mode": "keep_end", "dataset_text_field": "content",
    "dataset_num_proc": 4, "shuffle_dataset": True, "eos_token": "<|im_end|>", "chat_template_path": "chat.jinja",
    "completion_only_loss": False, "assistant_only_loss": True, "loss_type": "dft", "label_smoothing_factor": 0.1,
    "use_liger_kernel": True, "liger_kernel_config": {"rms_norm": True}, "router_aux_loss_coef": 0.01,
    "average_tokens_across_devices": False, "enable_jit_checkpoint": True,
}


@pytest.mark.unit
def test_every_unsupported_sft_field_is_tested():
    assert set(NON_DEFAULT_SFT_VALUES) == set(UNSUPPORTED_SFT_FIELDS)


@pytest.mark.unit
@pytest.mark.parametrize("name", sorted(NON_DEFAULT_SFT_VALUES))
def test_unsupported_sft_field_with_a_non_default_value_is_refused(tmp_path, name):
    with pytest.raises(ConfigError, match=rf"^{name}=.* is not supported by llmdistill train: ") as err:
        TrainConfig(output_dir=str(tmp_path), **{name: NON_DEFAULT_SFT_VALUES[name]})
    assert "\n" not in str(err.value)


@pytest.mark.unit
@pytest.mark.filterwarnings("ignore:`loss_type='chunked_nll'` is deprecated:FutureWarning")
def test_unsupported_sft_fields_at_their_defaults_pass(tmp_path):
    from trl import SFTConfig

    defaults = {f.name: f.default for f in dataclasses.fields(SFTConfig) if f.name in UNSUPPORTED_SFT_FIELDS}
    TrainConfig(output_dir=str(tmp_path), **defaults)
    # values that mean the same as the default: the deprecated alias of nll, no padding, no MoE loss,
    # completion-only loss (what the shards' loss_mask does)
    TrainConfig(output_dir=str(tmp_path), loss_type="chunked_nll", pad_to_multiple_of=None, router_aux_loss_coef=0.0,
                completion_only_loss=True, dataset_kwargs='{"skip_prepare_dataset": true}')
    for bad in ({"skip_prepare_dataset": False}, {"num_proc": 4}):
        with pytest.raises(ConfigError, match=r"^dataset_kwargs=.*skip_prepare_dataset: true"):
            TrainConfig(output_dir=str(tmp_path), dataset_kwargs=bad)


@pytest.mark.unit
def test_a_saved_train_config_loads_back(tmp_path):
    """The values SFTConfig's __post_init__ resolves (pad_to_multiple_of, dataset_kwargs ...) load back."""
    import yaml

    cfg = TrainConfig(output_dir=str(tmp_path / "out"), alpha=0.3, divergence="jsd")
    save_config(cfg, tmp_path / "train.yaml")
    # TrainingArguments.to_dict masks every *_token field as "<NAME_TOKEN>": save_config leaves those out
    saved = yaml.safe_load((tmp_path / "train.yaml").read_text())
    assert not [k for k, v in saved.items() if v == f"<{k.upper()}>"]
    again = load_config(TrainConfig, tmp_path / "train.yaml")
    assert (again.alpha, again.divergence, again.dataset_kwargs) == (0.3, "jsd", {"skip_prepare_dataset": True})


@pytest.mark.unit
def test_trust_remote_code_reaches_from_pretrained(tmp_path, monkeypatch):
    import transformers

    seen = {}
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda path, **kwargs: seen.update(kwargs) or "model")
    assert load_student(TrainConfig(output_dir=str(tmp_path), student_model="s", trust_remote_code=True)) == ("model", None)
    assert seen["trust_remote_code"] is True and seen["attn_implementation"] == "sdpa"


# ---- the loss inside the trainer, against references ----------------------------------------


@pytest.mark.unit
def test_packed_batch_loss_equals_sum_of_unpacked_documents(tmp_path, tiny_student_dir, built_kd):
    """The packed forward (one sequence, documents told apart by their position ids) against each
    document run alone. sdpa would split the batch into its documents before the forward (padded
    groups), which makes the two sides one computation: the packed forward is forced here."""
    trainer, _ = build_trainer(config(tmp_path, tiny_student_dir, built_kd, temperature=2.0))
    trainer._padded_groups = False
    trainer.model.eval()
    batch = first_batch(trainer)
    n = batch["target_index"].numel()
    docs = split_documents(batch)
    assert len(docs) > 3

    packed_loss, packed_grads = loss_and_grads(trainer, batch, n)
    doc_losses, doc_grads = zip(*(loss_and_grads(trainer, d, n) for d in docs), strict=True)
    assert packed_loss.item() == pytest.approx(sum(doc_losses).item(), rel=1e-5)
    for name, grad in packed_grads.items():
        assert torch.allclose(grad, sum(g[name] for g in doc_grads), atol=1e-6, rtol=1e-4), name

    # the isolation comes from the per-document position ids: one running sequence leaks context
    leaky = dict(batch, position_ids=torch.arange(batch["input_ids"].shape[1])[None])
    leaky_loss, _ = loss_and_grads(trainer, leaky, n)
    assert abs(leaky_loss.item() - packed_loss.item()) > 1e-3


@pytest.mark.unit
def test_padded_groups_give_the_packed_forwards_loss_and_gradients(tmp_path, tiny_student_dir, built_kd):
    """sdpa runs a batch's documents as right-padded groups; the packed forward (one sequence under a
    block-diagonal mask, as flash_attention_2 and sharded students run) gives the same loss and gradients."""
    trainer, _ = build_trainer(config(tmp_path, tiny_student_dir, built_kd, temperature=2.0,
                                      per_device_train_batch_size=3))
    assert trainer._padded_groups
    trainer.model.eval()
    batch = first_batch(trainer)
    n = batch["target_index"].numel()
    lengths = torch.diff(torch.nonzero(batch["position_ids"][0] == 0).flatten(),
                         append=torch.tensor([batch["input_ids"].shape[1]]))
    assert len(set(lengths.tolist())) > 3  # documents of different lengths: the groups carry padding
    grouped_loss, grouped_grads = loss_and_grads(trainer, batch, n)
    trainer._padded_groups = False
    packed_loss, packed_grads = loss_and_grads(trainer, batch, n)
    assert grouped_loss.item() == pytest.approx(packed_loss.item(), rel=1e-5)
    assert grouped_grads.keys() == packed_grads.keys()
    for name, grad in packed_grads.items():
        assert torch.allclose(grouped_grads[name], grad, atol=1e-6, rtol=1e-4), name


@pytest.mark.unit
def test_packed_forward_is_kept_for_varlen_attention_and_sharded_students(tmp_path, tiny_student_dir, built_kd,
                                                                          monkeypatch):
    trainer, _ = build_trainer(config(tmp_path, tiny_student_dir, built_kd, attention="eager"))
    assert trainer._documents_as_padded_groups()
    monkeypatch.setattr(trainer.model.config, "_attn_implementation", "flash_attention_2")
    assert not trainer._documents_as_padded_groups()
    monkeypatch.setattr(trainer.model.config, "_attn_implementation", "sdpa")
    monkeypatch.setattr(trainer, "is_fsdp_enabled", True)
    assert not trainer._documents_as_padded_groups()
    import transformers.integrations.deepspeed as ds

    monkeypatch.setattr(trainer, "is_fsdp_enabled", False)
    monkeypatch.setattr(trainer, "is_deepspeed_enabled", True)
    monkeypatch.setattr(ds, "is_deepspeed_zero3_enabled", lambda: False)  # ZeRO-1/2: whole weights, groups
    assert trainer._documents_as_padded_groups()
    monkeypatch.setattr(ds, "is_deepspeed_zero3_enabled", lambda: True)
    assert not trainer._documents_as_padded_groups()


@pytest.mark.unit
def test_alpha_zero_is_plain_cross_entropy(tmp_path, tiny_student_dir, built_kd):
    trainer, _ = build_trainer(config(tmp_path, tiny_student_dir, built_kd, alpha=0.0))
    trainer.model.eval()
    batch = first_batch(trainer)
    t = batch["target_index"]
    loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=torch.tensor(float(t.numel())))
    with torch.no_grad():
        logits = trainer.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
    reference = F.cross_entropy(logits[t - 1], batch["input_ids"][0, t])
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)


# ---- refusals -------------------------------------------------------------------------------


@pytest.mark.unit
def test_refuses_kd_on_shards_without_topk(tmp_path, tiny_student_dir, built_sft):
    with pytest.raises(ValueError, match=r"without teacher top-k \(kd: false\).*alpha: 0"):
        run_train(config(tmp_path, tiny_student_dir, built_sft, alpha=0.5))
    with pytest.raises(ValueError, match="kd: false"):
        run_train(config(tmp_path, tiny_student_dir, built_sft, alpha=0.0, alpha_schedule="linear_warmup",
                         alpha_start=0.2))


def _rewrite_meta(src: Path, dst: Path, **changes) -> Path:
    table, meta = read_built(src)
    write_built_shard(table.to_pylist(), dst / "part-00000.parquet", {**meta, **changes})
    return dst


@pytest.mark.unit
def test_refuses_a_student_tokenizer_other_than_the_shards(tmp_path, tiny_student_dir, built_kd):
    data = _rewrite_meta(built_kd, tmp_path / "other", tokenizer_fingerprint="0123456789abcdef")
    with pytest.raises(ValueError, match="fingerprint 0123456789abcdef.*Rebuild the data"):
        run_train(config(tmp_path, tiny_student_dir, data))


@pytest.mark.unit
def test_refuses_shards_of_another_schema_version(tmp_path, tiny_student_dir, built_kd):
    path = next(Path(built_kd).glob("*.parquet"))
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[b"llmdistill"])
    meta["schema_version"] = 99
    (tmp_path / "old").mkdir()
    pq.write_table(table.replace_schema_metadata({b"llmdistill": json.dumps(meta).encode()}),
                   tmp_path / "old" / path.name)
    with pytest.raises(SchemaError, match="schema version 99.*regenerate"):
        run_train(config(tmp_path, tiny_student_dir, tmp_path / "old"))


# ---- accelerate / DeepSpeed / FSDP configs, on paper -----------------------------------------


def _launch_dests() -> set[str]:
    from accelerate.commands.launch import launch_command_parser

    return {action.dest for action in launch_command_parser()._actions}


@pytest.mark.unit
@pytest.mark.parametrize("name", ["ddp_cpu", "deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3_offload", "fsdp"])
def test_accelerate_configs_are_valid(name):
    from accelerate.commands.config.config_args import load_config_from_file

    path = ROOT / "configs" / "accelerate" / f"{name}.yaml"
    cfg = load_config_from_file(str(path))  # rejects unknown top-level keys
    dests = _launch_dests()
    assert all(key in dests for key in cfg.deepspeed_config), cfg.deepspeed_config
    assert all((key if key.startswith("fsdp_") else f"fsdp_{key}") in dests for key in cfg.fsdp_config)
    assert cfg.num_machines == 1 and cfg.machine_rank == 0 and cfg.num_processes >= 2
    text = path.read_text()
    assert "--num_machines" in text and "--machine_rank" in text and "--main_process_ip" in text
    if name.startswith("deepspeed"):
        ds = json.loads((ROOT / cfg.deepspeed_config["deepspeed_config_file"]).read_text())
        assert ds["zero_optimization"]["stage"] == (2 if "zero2" in name else 3)
        offloaded = ds["zero_optimization"].get("offload_optimizer", {}).get("device")
        assert offloaded == ("cpu" if name.endswith("offload") else None)
        for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
            assert ds[key] == "auto", key  # filled from TrainConfig, so the two never disagree
    if name == "fsdp":
        assert cfg.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "Qwen2DecoderLayer"


# ---- real training steps --------------------------------------------------------------------


def logged_steps(out: Path) -> dict[int, dict]:
    """The training log entries of a run by optimizer step."""
    return {h["step"]: h for h in json.loads((out / "log_history.json").read_text()) if "ce_loss" in h}


@pytest.mark.integration
@pytest.mark.parametrize("workers", [0, 1])
def test_resume_continues_at_the_exact_data_position(tmp_path, tiny_student_dir, built_kd, workers):
    """The 3 steps after a resume in the second epoch log the losses of an uninterrupted run, bit for bit.

    33 packed rows, 2 a step: an epoch is 17 steps; the checkpoint at step 18 is one step into the
    second epoch, so the resumed run must skip into a reshuffled epoch (with DataLoader workers too).
    """
    schedules = dict(max_steps=21, save_strategy="steps", save_steps=18, alpha=0.8, alpha_schedule="linear_warmup",
                     alpha_start=0.2, alpha_warmup_ratio=0.5, temperature=1.0, temperature_schedule="cosine",
                     temperature_start=2.0, dataloader_num_workers=workers)
    run_train(config(tmp_path / "a", tiny_student_dir, built_kd, **schedules))
    run_train(config(tmp_path / "b", tiny_student_dir, built_kd, **schedules,
                     resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-18")))

    a, b = logged_steps(tmp_path / "a" / "out"), logged_steps(tmp_path / "b" / "out")
    assert sorted(a) == sorted(b) == list(range(1, 22))
    assert a[18]["epoch"] > 1.0 and len({a[s]["ce_loss"] for s in a}) == 21  # past an epoch; steps differ
    for step in (19, 20, 21):
        for key in ("loss", "grad_norm", "ce_loss", "kd_loss", "alpha", "temperature", "learning_rate",
                    "trained_tokens"):  # the running token count survives the resume too
            assert b[step][key] == a[step][key], (step, key)
    weights = [load_file(tmp_path / run / "out" / "model.safetensors") for run in ("a", "b")]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    # the cost of each step is logged beside its speed
    for entry in a.values():
        assert entry["tokens_per_s"] > 0 and 0 <= entry["data_wait_fraction"] < 1
        assert 0 <= entry["data_wait_s"] < 5 and 0.1 < entry["peak_rss_gib"] < 8
    # logged_at: when the run reached each step, rising, within the stage's wall time
    logged = [a[step]["logged_at"] for step in sorted(a)]
    first = json.loads((tmp_path / "a" / "out" / "manifest.json").read_text())
    assert first["started_at"] < logged[0] and all(x < y for x, y in zip(logged, logged[1:], strict=False))
    assert logged[-1] <= first["started_at"] + first["wall_time_s"]
    manifest = json.loads((tmp_path / "b" / "out" / "manifest.json").read_text())
    assert manifest["stage"] == "train" and manifest["counts"]["global_steps"] == 21
    assert manifest["counts"]["trained_tokens"] == a[21]["trained_tokens"] > a[20]["trained_tokens"] > 0
    assert (tmp_path / "b" / "out" / "loss_curve.png").stat().st_size > 1000
    if workers:
        return
    # logged every 4 steps, the checkpoint at 18 inside a window: its tokens of steps 17-18 are counted in
    # the checkpoint, not in a log, and the run's count and the resumed one's still come out whole
    sparse = {**schedules, "logging_steps": 4}
    run_train(config(tmp_path / "c", tiny_student_dir, built_kd, **sparse))
    run_train(config(tmp_path / "d", tiny_student_dir, built_kd, **sparse,
                     resume_from_checkpoint=str(tmp_path / "c" / "out" / "checkpoint-18")))
    for run in ("c", "d"):
        counted = json.loads((tmp_path / run / "out" / "manifest.json").read_text())["counts"]["trained_tokens"]
        assert counted == a[21]["trained_tokens"], run
    saved = json.loads((tmp_path / "c" / "out" / "checkpoint-18" / "trained_tokens.json").read_text())
    assert saved["trained_tokens"] == a[18]["trained_tokens"]
    # the batch layout is part of the data position: another one is refused before anything loads, unless
    # the run asks transformers not to skip data (ignore_data_skip: the epoch's data starts over)
    layout = json.loads((tmp_path / "a" / "out" / "checkpoint-18" / LAYOUT_FILE).read_text())
    assert layout == {"world_size": 1, "gradient_accumulation_steps": 1, "per_device_train_batch_size": 2}
    other = dict(schedules, resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-18"),
                 per_device_train_batch_size=1, gradient_accumulation_steps=2)
    with pytest.raises(UserError, match=r"checkpoint-18 was trained with 1 process x 2 rows x 1 accumulated, this "
                                        r"run has 1 process x 1 row x 2 accumulated: .*ignore_data_skip: true"):
        run_train(config(tmp_path / "e", tiny_student_dir, built_kd, **other))
    assert not (tmp_path / "e" / "out" / "manifest.json").exists()
    run_train(config(tmp_path / "e", tiny_student_dir, built_kd, **other, ignore_data_skip=True))
    e = logged_steps(tmp_path / "e" / "out")  # the checkpoint's history, then this run's steps
    assert sorted(e) == list(range(1, 22)) and all(e[step] == a[step] for step in range(1, 19))


@pytest.mark.integration
def test_a_sigterm_stops_after_the_step_with_a_checkpoint_that_resumes_exactly(tmp_path, tiny_student_dir, built_kd,
                                                                               monkeypatch, caplog):
    """SIGTERM during step 4 of 8 (checkpoints off): checkpoint-4, no final model or manifest, exit 143; the
    resumed run ends with the weights and step losses of an uninterrupted one, bit for bit."""
    import os
    import signal
    import time

    from transformers import TrainerCallback

    import llmdistill.train as train_module
    from llmdistill.checkpoints import complete_checkpoints

    settings = dict(max_steps=8, alpha=0.8, temperature=2.0)
    run_train(config(tmp_path / "whole", tiny_student_dir, built_kd, **settings))

    class SigtermAt(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 2:  # the first process spends at least a second more than its steps
                time.sleep(1.0)
            if state.global_step == 3:  # the 4th step begins
                os.kill(os.getpid(), signal.SIGTERM)

    real_build = train_module.build_trainer

    def build_with_a_signal(cfg):
        trainer, meta = real_build(cfg)
        trainer.add_callback(SigtermAt())
        return trainer, meta

    monkeypatch.setattr(train_module, "build_trainer", build_with_a_signal)
    out = tmp_path / "cut" / "out"
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped:
        run_train(config(tmp_path / "cut", tiny_student_dir, built_kd, **settings))
    assert stopped.value.code == 128 + signal.SIGTERM
    assert complete_checkpoints(out) == [out / "checkpoint-4"]
    assert not (out / "manifest.json").exists() and not (out / "model.safetensors").exists()
    assert "stopped by SIGTERM after step 4 of 8" in caplog.text and "--resume_from_checkpoint latest" in caplog.text
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is gone with the run

    monkeypatch.setattr(train_module, "build_trainer", real_build)
    run_train(config(tmp_path / "cut", tiny_student_dir, built_kd, **settings, resume_from_checkpoint="latest"))
    whole, resumed = logged_steps(tmp_path / "whole" / "out"), logged_steps(out)
    assert sorted(resumed) == list(range(1, 9))
    assert [resumed[s]["loss"] for s in range(5, 9)] == [whole[s]["loss"] for s in range(5, 9)]
    weights = [load_file(d / "model.safetensors") for d in (tmp_path / "whole" / "out", out)]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    # the run's time counts both processes: the log's elapsed_s goes on from the checkpoint's, the manifest's total
    saved = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["stateful_callbacks"]["RunClock"]
    elapsed = [resumed[s]["elapsed_s"] for s in range(1, 9)]
    assert elapsed == sorted(elapsed) and elapsed[3] < saved["args"]["before"] < elapsed[4]
    manifest = json.loads((out / "manifest.json").read_text())
    assert saved["args"]["before"] > 1 and manifest["wall_time_total_s"] == pytest.approx(
        manifest["wall_time_s"] + saved["args"]["before"], abs=0.5)
    # the checkpoint's training record: its step, the run's clock and token count when it was saved
    record = checkpoint_compute(out / "checkpoint-4")
    assert (record["step"], record["optimizer_steps"], record["wall_s"]) == (4, 4, saved["args"]["before"])
    assert 0 < record["trained_tokens"] < manifest["counts"]["trained_tokens"]
    assert record["trained_tokens"] == resumed[4]["trained_tokens"]
    # the run's record in the checkpoint: the student it started from, as the manifest names it, and the machine
    assert record["started_from"] == manifest["inputs"]["student"] and record["machine"] == manifest["machine"]
    assert record["started_from"]["path"] == str(Path(tiny_student_dir).absolute())


@pytest.mark.integration
def test_lora_saves_a_loadable_adapter_and_a_matching_merged_model(tmp_path, tiny_student_dir, built_kd):
    from peft import PeftModel

    out = tmp_path / "out"
    run_train(config(tmp_path, tiny_student_dir, built_kd, use_peft=True, lora_r=4, save_merged=True,
                     save_strategy="steps", save_steps=4))
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_student_dir),
                                        out / "checkpoint-4").eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_student_dir).eval()
    ids = torch.randint(0, base.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merged_logits, adapter_logits, base_logits = (m(input_ids=ids).logits for m in (merged, adapter, base))
    assert torch.allclose(merged_logits, adapter_logits, atol=1e-5)
    assert (adapter_logits - base_logits).abs().max() > 1e-3  # the adapter learned something


@pytest.mark.integration
def test_qlora_trains_a_4bit_student_on_cpu(tmp_path, tiny_student_dir, built_kd):
    pytest.importorskip("bitsandbytes")
    metrics = run_train(config(tmp_path, tiny_student_dir, built_kd, use_peft=True, load_in_4bit=True, lora_r=4,
                               save_merged=False, max_steps=2))
    assert np.isfinite(metrics["train_loss"])
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert saved["r"] == 4
    adapter = load_file(tmp_path / "out" / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and any(bool(v.abs().max() > 0) for v in lora_b)  # B starts at zero: the 4-bit student trained


@pytest.mark.integration
def test_qlora_merges_its_adapter_into_the_unquantised_base(tmp_path, tiny_student_dir, built_kd):
    """The merged QLoRA student is the original full-precision base plus the adapter's delta, not the NF4 base."""
    pytest.importorskip("bitsandbytes")
    from peft import PeftModel

    out = tmp_path / "out"
    run_train(config(tmp_path, tiny_student_dir, built_kd, use_peft=True, load_in_4bit=True, lora_r=4,
                     save_merged=True, max_steps=2, save_strategy="steps", save_steps=2))
    merged = load_file(out / "model.safetensors")
    expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_student_dir),
                                         out / "checkpoint-2").merge_and_unload().state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_student_dir).state_dict()
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert set(merged) <= set(expected)
    changed = [name for name, weight in merged.items() if not torch.equal(weight, base[name])]
    assert changed and all("proj" in name for name in changed)  # only the adapted projections moved
    for name, weight in merged.items():
        torch.testing.assert_close(weight, expected[name], atol=1e-6, rtol=0)


def _common_run(student, data) -> dict:
    return dict(student_model=str(student), data_dir=str(data), alpha=0.5, max_steps=4,
                per_device_train_batch_size=2, learning_rate=3e-3, logging_steps=1, save_strategy="no",
                gradient_checkpointing=False, report_to="none", seed=0, disable_tqdm=True)


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, tiny_student_dir, built_kd) -> Path:
    """One process accumulating 2 micro-batches of 2 rows per optimizer step."""
    out = tmp_path_factory.mktemp("one_process")
    run_train(TrainConfig(**_common_run(tiny_student_dir, built_kd), output_dir=str(out), gradient_accumulation_steps=2))
    return out


@pytest.fixture(scope="module")
def one_process_packed_run(tmp_path_factory, tiny_student_dir, built_kd) -> Path:
    """:func:`one_process_run` with the packed forward a ZeRO-3 student keeps (the same sums in the same order)."""
    out = tmp_path_factory.mktemp("one_process_packed")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(DistillTrainer, "_documents_as_padded_groups", lambda self: False)
        run_train(TrainConfig(**_common_run(tiny_student_dir, built_kd), output_dir=str(out),
                              gradient_accumulation_steps=2))
    return out


@pytest.mark.integration
@pytest.mark.parametrize("launcher", ["ddp_cpu", "deepspeed_zero3"])
def test_two_processes_end_identical_and_equal_one_process_with_accumulation(tmp_path, tiny_student_dir, built_kd,
                                                                            request, launcher):
    """`accelerate launch` of the real CLI with 2 CPU processes: DDP over gloo, and DeepSpeed ZeRO-3.

    Each rank sees half of the optimizer step's rows; normalising by the global target-token count
    and undoing the gradient averaging over ranks must give the update of one process that
    accumulates the same two micro-batches. The reference runs the forward the launched student
    runs (padded groups under DDP, one packed sequence under ZeRO-3): the two are equal only to
    rounding (see test_padded_groups_give_the_packed_forwards_loss_and_gradients), which 4 AdamW
    steps amplify past this test's 1e-5.
    """
    one_process_run = request.getfixturevalue("one_process_run" if launcher == "ddp_cpu" else "one_process_packed_run")
    import os
    import subprocess

    import yaml

    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(yaml.safe_dump({**_common_run(tiny_student_dir, built_kd), "output_dir": str(tmp_path / "out")}))
    cmd = accelerate_launch("-m", "llmdistill", "train", "--config", str(run_yaml), launcher=launcher)
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["counts"]["world_size"] == 2
    if launcher == "ddp_cpu":  # DDP replicas must hold the same weights on both ranks
        fingerprints = manifest["replica_fingerprints"]
        assert len(fingerprints) == 2 and fingerprints[0] == fingerprints[1]

    two, one = load_file(tmp_path / "out" / "model.safetensors"), load_file(one_process_run / "model.safetensors")
    for name in one:
        assert torch.allclose(two[name], one[name], atol=1e-5), name
    logged = [json.loads((d / "log_history.json").read_text()) for d in (tmp_path / "out", one_process_run)]
    for key in ("loss", "grad_norm", "ce_loss", "kd_loss"):  # grad_norm: the gradient scale, not just its sign
        values = [[h[key] for h in history if "ce_loss" in h] for history in logged]
        assert values[0] == pytest.approx(values[1], rel=1e-4) and len(values[0]) == 4, key


@pytest.mark.integration
def test_a_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path, tiny_student_dir, built_kd):
    """`accelerate launch` with 2 CPU processes, SIGTERM to rank 1 only once training runs: both ranks save
    one checkpoint at the same step and exit; `resume_from_checkpoint: latest` finishes the run."""
    import os
    import re
    import signal
    import subprocess

    import psutil
    import yaml

    from llmdistill.checkpoints import complete_checkpoints

    out = tmp_path / "out"
    run = {**_common_run(tiny_student_dir, built_kd), "output_dir": str(out), "max_steps": 300}
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(yaml.safe_dump(run))

    def launch(path: Path) -> subprocess.Popen:
        cmd = accelerate_launch("-m", "llmdistill", "train", "--config", str(path))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    proc, lines = launch(run_yaml), []
    for line in proc.stdout:  # rank 0 prints each step's log: training is under way
        lines.append(line)
        if "'loss'" in line:
            break
    ranks = {p.environ().get("RANK"): p for p in psutil.Process(proc.pid).children(recursive=True)
             if "llmdistill" in " ".join(p.cmdline())}
    ranks["1"].send_signal(signal.SIGTERM)
    said = "".join(lines) + proc.communicate(timeout=600)[0]
    assert proc.returncode != 0, said[-3000:]
    stops = re.findall(r"stopped by SIGTERM after step (\d+) of 300", said)
    assert len(stops) == 2 and stops[0] == stops[1], said[-3000:]  # each rank says so, at one step
    step = int(stops[0])
    assert complete_checkpoints(out) == [out / f"checkpoint-{step}"] and 1 <= step < 300
    assert not (out / "manifest.json").exists()

    run_yaml.write_text(yaml.safe_dump({**run, "resume_from_checkpoint": "latest"}))
    resumed = launch(run_yaml)
    said = resumed.communicate(timeout=900)[0]
    assert resumed.returncode == 0, said[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["global_steps"] == 300 and manifest["counts"]["world_size"] == 2
    assert len(set(manifest["replica_fingerprints"])) == 1


def _heldout_kl(teacher_dir: Path, student_dir: Path, docs) -> float:
    """Mean full-vocabulary KL(teacher || student) per completion token of the documents."""
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    student = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, prompt_len in docs:
            x = torch.tensor([ids])
            rows = slice(prompt_len - 1, len(ids) - 1)
            t = teacher(input_ids=x).logits[0, rows].log_softmax(-1)
            s = student(input_ids=x).logits[0, rows].log_softmax(-1)
            total += (t.exp() * (t - s)).sum().item()
            count += t.shape[0]
    return total / count


@pytest.mark.integration
def test_kd_student_gets_closer_to_the_teacher_than_sft_student(tmp_path, tiny_tokenizer, tiny_student_dir):
    """Equal data and steps: distilling the teacher's top-k beats training on its text alone."""
    from llmdistill.tinyworld.models import make_model, save_model

    problems = generate_problems(256, seed=1)
    run_args = dict(max_steps=30, per_device_train_batch_size=4, logging_steps=10, lr_scheduler_type="cosine",
                    warmup_steps=5)
    # a teacher: another random init after a short CE run (lr 3e-3) on the reference traces
    sft_data = write_tiny_built(tmp_path / "sft_data", tiny_tokenizer, problems, None)
    teacher_init = save_model(make_model("student", tiny_tokenizer, seed=1), tiny_tokenizer, tmp_path / "t0")
    run_train(config(tmp_path / "teacher", teacher_init, sft_data, alpha=0.0, **run_args))
    teacher = tmp_path / "teacher" / "out"
    kd_data = write_tiny_built(tmp_path / "kd_data", tiny_tokenizer, problems, teacher, k=32)

    run_train(config(tmp_path / "kd", tiny_student_dir, kd_data, alpha=0.9, learning_rate=1e-3, **run_args))
    run_train(config(tmp_path / "sft", tiny_student_dir, kd_data, alpha=0.0, learning_rate=1e-3, **run_args))
    heldout = encode_examples(tiny_tokenizer, generate_problems(48, seed=0, split="heldout"))
    kd_kl = _heldout_kl(teacher, tmp_path / "kd" / "out", heldout)
    sft_kl = _heldout_kl(teacher, tmp_path / "sft" / "out", heldout)
    print(f"held-out KL(teacher || student): kd {kd_kl:.4f}, sft {sft_kl:.4f}")
    assert kd_kl < 0.97 * sft_kl, (kd_kl, sft_kl)
