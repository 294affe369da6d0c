"""``llmdistill train``: distil the teacher's top-k into a student on packed, built shards.

One process: ``llmdistill train --config configs/train_tiny_kd.yaml``. Many processes or
machines: ``accelerate launch --config_file configs/accelerate/<ddp_cpu|deepspeed_zero2|...>.yaml
-m llmdistill train --config ...`` (see the comments in those files for multi-node launches).

The run reads top to bottom in :func:`run_train`: built data -> student (+ LoRA / QLoRA) ->
online teacher (with ``teacher_model``) -> trainer -> train -> :func:`save_run` (model, loss curve,
``manifest.json`` written last: a directory with a manifest holds a finished run). The built
data is memory-mapped, never loaded: its Parquet shards are converted once per machine into Arrow
files that every process maps (:func:`load_built`).
Checkpoints and the final model are written whole, and ``resume_from_checkpoint: latest`` resumes
from the newest complete checkpoint at the exact data position: see :mod:`llmdistill.trainer`.
A SIGTERM to any process (Slurm's ``--signal``, a launcher passing it on) ends the run after the
step under way with a checkpoint, all processes at the same step, and exit status 143.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from llmdistill.collate import DistillCollator
from llmdistill.config.base import UserError
from llmdistill.config.train import TrainConfig
from llmdistill.formats import (
    SchemaError,
    built_cache_dir,
    check_built_fits,
    convert_built_to_arrow,
    open_built,
    read_built_metadata,
)
from llmdistill.log import get_logger
from llmdistill.manifest import write_json_atomic, write_manifest
from llmdistill.teacher import check_logit_transform, check_same_vocabulary

logger = get_logger(__name__)


def run_train(config: TrainConfig) -> dict[str, Any]:
    """Train a student on built shards; returns the final training metrics.

    Raises:
        ValueError: KD requested on shards without top-k, or a student tokenizer other than the
            one the shards were built with.
        SchemaError: shards from another schema version.
    """
    from llmdistill.checkpoints import RunClock, StopOnSignal, StopRequest, resolve_resume, stop_message

    started = time.time()
    # the checkpoint to resume from, before anything loads: `latest` -> newest complete one
    resume = resolve_resume(config.resume_from_checkpoint, config.output_dir)
    check_resume_layout(resume, config)
    # Data, student and trainer
    trainer, meta = build_trainer(config)

    # Train; a SIGTERM to any process: all of them save the same checkpoint after the step and exit (one
    # during the last step lets the run finish, and the final save is not cut short by another)
    trainer.add_callback(RunClock.resumed(resume, started))  # with the seconds of the processes before a resume
    with StopRequest(repeat_exits=False) as stop:
        stopper = StopOnSignal(stop, trainer.accelerator)
        trainer.add_callback(stopper)
        result = trainer.train(resume_from_checkpoint=resume)
        if stopper.signum is not None:
            step = trainer.state.global_step
            logger.warning("%s", stop_message(stopper.signum, step, trainer.state.max_steps,
                                              Path(config.output_dir) / f"checkpoint-{step}"))
            raise SystemExit(128 + stopper.signum)

        # Save
        save_run(trainer, config, result, started, meta)
    return result.metrics


def check_resume_layout(checkpoint: str | None, config: TrainConfig) -> None:
    """Refuse to resume with another batch layout than the checkpoint's (:func:`~llmdistill.trainer.batch_layout`).

    transformers would skip ``global_step x gradient_accumulation_steps`` of this run's batches per
    process, which lands elsewhere in the data than where the checkpoint stopped: some rows repeat,
    others are never seen. ``ignore_data_skip: true`` (transformers' own) resumes the weights, optimizer
    and schedule and starts the epoch's data over; it is let through. Checkpoints written before the
    layout was recorded are not checked.

    Raises:
        UserError: the layouts differ and ``ignore_data_skip`` is not set.
    """
    from llmdistill.trainer import LAYOUT_FILE, batch_layout

    path = Path(checkpoint) / LAYOUT_FILE if checkpoint is not None else None
    if path is None or not path.is_file() or config.ignore_data_skip:
        return
    saved, now = json.loads(path.read_text()), batch_layout(config)
    if saved == now:
        return

    def described(layout: dict[str, int]) -> str:
        processes, rows = layout["world_size"], layout["per_device_train_batch_size"]
        return (f"{processes} process{'es' if processes != 1 else ''} x {rows} row{'s' if rows != 1 else ''} x "
                f"{layout['gradient_accumulation_steps']} accumulated")

    raise UserError(f"resume_from_checkpoint: {checkpoint} was trained with {described(saved)}, this run has "
                    f"{described(now)}: resuming would skip to another place in the data than where the checkpoint "
                    "stopped. Resume with the checkpoint's processes, per_device_train_batch_size and "
                    "gradient_accumulation_steps, or set ignore_data_skip: true to keep the weights, optimizer and "
                    "schedule and start this epoch's data over")


def save_run(trainer: Any, config: TrainConfig, result: Any, started: float, meta: dict[str, Any]) -> None:
    """The final student, then (main process) its log, loss curve and ``manifest.json``, written last."""
    from llmdistill.checkpoints import is_disk_full

    replicas = replica_fingerprints(trainer)
    tokens = int(trainer.trained_tokens())  # a collective, like the fingerprints: before the main process's part
    save_student(trainer, config)
    if trainer.accelerator.is_main_process:
        out = Path(config.output_dir)
        history = trainer.state.log_history
        try:
            if trainer.layers is not None:
                trainer.layers.save(out)  # the feature projection, apart from the plain HF student
            write_json_atomic(out / "log_history.json", history)
            plot_loss_curve(history, out / "loss_curve.png")
            inputs = {"data": config.data_dir, "student": config.student_source}
            if config.teacher_model:
                inputs["teacher"] = config.teacher_model
            write_manifest(config.output_dir, "train", config, inputs=inputs, counts=_counts(trainer, result, tokens),
                           started=started, built=meta, replica_fingerprints=replicas,
                           wall_time_total_s=round(trainer.clock.elapsed, 3))
        except OSError as err:
            if not is_disk_full(err, out):
                raise
            raise UserError(f"train: writing log_history.json, loss_curve.png and manifest.json into {out}: no "
                            f"space left on the disk ({shutil.disk_usage(out).free} bytes free); the trained "
                            f"model in {out} is complete, but without manifest.json the run does not count as "
                            "finished: free some space and rerun") from err
    trainer.accelerator.wait_for_everyone()


def build_trainer(config: TrainConfig) -> tuple[Any, dict[str, Any]]:
    """Built data -> student (+ LoRA/QLoRA) -> :class:`~llmdistill.trainer.DistillTrainer`.

    Returns:
        The trainer and the built shards' metadata.
    """
    from transformers import AutoTokenizer

    from llmdistill.trainer import DistillTrainer

    if not config.student_source:
        raise UserError("student_model is empty: set the student checkpoint (a path or hub id), or student_init: "
                        "drop_layers with teacher_model")
    dataset, meta = load_built(config)
    tokenizer = AutoTokenizer.from_pretrained(config.student_source, trust_remote_code=config.trust_remote_code)
    check_compatible(config, meta, tokenizer)
    logger.info("train data: %d packed rows from %s (memory-mapped from %s), kd=%s, k=%s", len(dataset),
                config.data_dir, Path(dataset.cache_files[0]["filename"]).parent, meta["kd"], meta.get("k"))
    model, peft_config = load_student(config)
    teacher, layers = load_online_teacher(config, tokenizer, model)
    # the online teacher replaces stored top-k: the collator does not decode it
    collator = DistillCollator(k=int(meta["k"]), vocab_size=int(meta["vocab_size"]),
                               codec_bits=int(meta.get("codec_bits") or 0),
                               with_topk=bool(meta["kd"]) and teacher is None)
    trainer = DistillTrainer(model=model, args=config, train_dataset=dataset, data_collator=collator,
                             processing_class=tokenizer, peft_config=peft_config,
                             max_length=int(meta["max_length"]), teacher=teacher, layers=layers)
    return trainer, meta


def load_online_teacher(config: TrainConfig, tokenizer: Any, student: Any) -> tuple[Any, Any]:
    """The online teacher and the layer terms, or (None, None) without ``teacher_model``.

    Raises:
        UserError: a student with fewer LM-head rows than its tokenizer's tokens, a teacher or student
            attention kernel that cannot give attention probabilities, or a layer map that does not fit
            the models (the teacher's tokenizer is checked before, by :func:`check_compatible`).
    """
    from llmdistill.online import LayerDistiller, OnlineTeacher
    from llmdistill.teacher import TransformersTeacher

    if not config.teacher_model:
        return None, None
    student_rows = student.get_output_embeddings().weight.shape[0]
    if len(tokenizer) > student_rows:  # before the teacher loads
        raise UserError(f"student {config.student_source} has {student_rows} output rows for a tokenizer of "
                        f"{len(tokenizer)} tokens: resize its embeddings (model.resize_token_embeddings) first")
    loaded = TransformersTeacher(config.teacher_model, config.teacher_dtype, attn_implementation=config.attention)
    if config.attention_loss == "attention_kl":
        for who, model in (("student", student), ("teacher", loaded.model)):
            if model.config._attn_implementation != "eager":
                raise UserError(f"attention_loss=attention_kl: the {who} runs {model.config._attn_implementation} "
                                "attention, which gives no attention probabilities: it needs attn_implementation: "
                                "eager (set attention: eager, and no attn_implementation in model_init_kwargs)")
    layers = None
    if config.feature_loss != "none" or config.attention_loss != "none":
        layers = LayerDistiller(config, student.config, loaded.model.config)
    loaded.grade_for(student)
    return OnlineTeacher(loaded, config.teacher_top_k, config.loss_chunk_size), layers


def load_built(config: TrainConfig) -> tuple[Any, dict[str, Any]]:
    """The built shards as a memory-mapped dataset, converted to Arrow once per machine.

    The main process converts first (:func:`~llmdistill.formats.convert_built_to_arrow`), the
    others wait. Where the other machines do not see its files (``data_cache_dir`` on node-local
    disk), the main process of each machine then converts its own copy; where they do, that second
    pass only finds the files. Every process then maps them (:func:`~llmdistill.formats.open_built`):
    no process holds a table, and a machine's processes share one page-cache copy of the data.

    Raises:
        SchemaError: shards from another schema version, naming the fix.
    """
    if not config.data_dir:
        raise UserError("data_dir is empty: point it at the output of `llmdistill build`")
    cache_dir = built_cache_dir(config.data_dir, config.data_cache_dir or None)
    try:
        read_built_metadata(config.data_dir)  # every process, before any waits: a bad shard stops them all alike
        for local in (False, True):
            with config.main_process_first(local=local, desc="converting the built shards to Arrow"):
                if (config.local_process_index if local else config.process_index) == 0:
                    convert_built_to_arrow(config.data_dir, cache_dir)
        return open_built(config.data_dir, cache_dir)
    except SchemaError as err:
        raise SchemaError(f"cannot train on {config.data_dir}: {err}") from err


def check_compatible(config: TrainConfig, meta: dict[str, Any], tokenizer: Any) -> None:
    """Refuse data the run cannot use: KD without top-k (stored, or from an online teacher), or a student
    tokenizer other than the shards'; and an online teacher of another tokenizer, or with a top-k larger
    than the vocabulary."""
    needs = (f"alpha={config.alpha} (alpha_schedule={config.alpha_schedule}, alpha_start={config.alpha_start}) needs "
             "it; or set teacher_model (an online teacher), or train with alpha: 0 (plain SFT)"
             ) if config.uses_kd and not config.teacher_model else None
    check_built_fits(config.data_dir, meta, tokenizer, config.student_source, needs)
    check_logit_transform(config.student_source, "student_model", config.trust_remote_code)
    if config.teacher_model:
        check_same_vocabulary(config.teacher_model, tokenizer, "teacher_model", config.student_source,
                              config.trust_remote_code)
        check_logit_transform(config.teacher_model, "teacher_model", config.trust_remote_code)
    if config.teacher_model and config.teacher_top_k > len(tokenizer):  # before any model loads
        raise UserError(f"teacher_top_k={config.teacher_top_k} exceeds the vocabulary ({len(tokenizer)} tokens): "
                        "lower it, or set 0 for the full distribution")


def load_student(config: TrainConfig) -> tuple[Any, Any]:
    """The student model and, with ``use_peft``, its LoRA config (QLoRA: 4-bit NF4 base weights).

    ``model_init_kwargs`` go to ``from_pretrained`` (``attention`` and ``trust_remote_code`` fill
    ``attn_implementation`` and ``trust_remote_code`` unless they set them).
    """
    return _student_model(config, four_bit=config.load_in_4bit), config.peft_config()


def _student_model(config: TrainConfig, four_bit: bool) -> Any:
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = dict(config.model_init_kwargs or {})
    kwargs.setdefault("attn_implementation", config.attention)
    kwargs.setdefault("trust_remote_code", config.trust_remote_code)
    if four_bit:
        kwargs["quantization_config"] = _four_bit_config(config)
    model = AutoModelForCausalLM.from_pretrained(config.student_source, **kwargs)
    if config.student_init == "drop_layers":
        drop_layers(model)
    return model


def merged_student(peft_model: Any, config: TrainConfig) -> Any:
    """The trained LoRA adapter merged into the student's base weights: a plain HF model.

    A QLoRA base is held in 4-bit NF4, and merging there would re-quantise each weight with its
    delta, rounding most of a small LoRA update away. So with ``load_in_4bit`` the base is loaded
    again unquantised (as ``from_pretrained`` gives it, ``model_init_kwargs`` applied), the trained
    adapter weights are copied onto it, and the merge happens there.
    """
    if not config.load_in_4bit:
        return peft_model.merge_and_unload()
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    name = peft_model.active_adapter
    fresh = get_peft_model(_student_model(config, four_bit=False), peft_model.peft_config[name])
    state = {key: value.detach().to("cpu") for key, value in get_peft_model_state_dict(peft_model, adapter_name=name).items()}
    set_peft_model_state_dict(fresh, state)
    return fresh.merge_and_unload()


def drop_layers(model: Any) -> Any:
    """DistilBERT's initialisation, in place: keep every other decoder block (0, 2, 4, ...) of ``model``.

    Embeddings, final norm and LM head stay; the config's layer count (and per-layer types) follow.
    A 3-block teacher gives a 2-block student made of its blocks 0 and 2.

    Raises:
        UserError: a model whose decoder blocks are not ``base_model.layers``.
    """
    from torch import nn

    backbone = model.base_model
    layers = getattr(backbone, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UserError(f"student_init=drop_layers: {type(model).__name__} keeps no decoder blocks in "
                        "base_model.layers; initialise the student another way")
    keep = list(range(0, len(layers), 2))
    backbone.layers = nn.ModuleList(layers[i] for i in keep)
    for new_index, block in enumerate(backbone.layers):
        if hasattr(getattr(block, "self_attn", None), "layer_idx"):
            block.self_attn.layer_idx = new_index  # the KV-cache slot of a generating model
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    return model


def _four_bit_config(config: TrainConfig) -> Any:
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as err:
        raise ImportError(
            "load_in_4bit=true (QLoRA) needs bitsandbytes: `pip install bitsandbytes`, or set load_in_4bit: false"
        ) from err
    compute = torch.bfloat16 if config.bf16 else torch.float32
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute,
                              bnb_4bit_use_double_quant=True)


def replica_fingerprints(trainer: Any) -> list[str] | None:
    """Under DDP, a hash of each rank's final weights, gathered on every rank; None otherwise.

    DDP keeps full replicas that must stay bit-identical; a difference means the gradient
    all-reduce was bypassed somewhere. (Sharded setups, ZeRO/FSDP, hold different shards by design.)
    """
    from accelerate.utils import DistributedType

    if trainer.accelerator.distributed_type not in (DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        return None
    digest = hashlib.sha256()
    model = trainer.accelerator.unwrap_model(trainer.model)
    for name, param in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(param.detach().float().cpu().numpy().tobytes())
    gathered: list[Any] = [None] * trainer.accelerator.num_processes
    torch.distributed.all_gather_object(gathered, digest.hexdigest()[:16])
    if len(set(gathered)) > 1:
        logger.error("DDP replicas ended with different weights: %s", gathered)
    return gathered


def save_student(trainer: Any, config: TrainConfig) -> None:
    """Final weights into ``output_dir``: the full model, the LoRA adapter, or the merged model.

    Written whole (:meth:`~llmdistill.trainer.DistillTrainer.save_whole`): staged beside the old
    model, which stays until the new one is complete; a full disk raises a UserError.
    """
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    out = Path(config.output_dir)
    sharded = is_deepspeed_zero3_enabled() or trainer.is_fsdp_enabled
    if config.use_peft and config.save_merged and sharded:
        logger.warning("use_peft + save_merged with sharded weights (ZeRO-3/FSDP): saving the adapter only; "
                       "merge it offline with peft's merge_and_unload")
    if not (config.use_peft and config.save_merged) or sharded:
        trainer.save_model(str(out))  # full model, or the adapter alone (staged, then swapped in whole)
        return
    trainer.accelerator.wait_for_everyone()

    def write_merged(staging: Path) -> None:
        if trainer.accelerator.is_main_process:
            merged = merged_student(trainer.accelerator.unwrap_model(trainer.model), config)
            merged.save_pretrained(str(staging))
            trainer.processing_class.save_pretrained(str(staging))

    trainer.save_whole(write_merged, "train: saving the merged model")
    trainer.accelerator.wait_for_everyone()


def plot_loss_curve(history: list[dict[str, Any]], path: Path) -> None:
    """Total, CE and KD loss against the optimizer step (a PNG, matplotlib's Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("loss", "ce_loss", "kd_loss", "eval_loss"):
        points = [(h["step"], h[key]) for h in history if key in h]
        if points:
            ax.plot(*zip(*points, strict=True), label=key, marker="." if len(points) < 30 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("nats per target token")
    if ax.lines:  # a run too short to log a step has no curve to name
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def _counts(trainer: Any, result: Any, trained_tokens: int) -> dict[str, Any]:
    last = next((h for h in reversed(trainer.state.log_history) if "ce_loss" in h), {})
    return {
        "packed_rows": len(trainer.train_dataset),
        "global_steps": trainer.state.global_step,
        "trained_tokens": trained_tokens,
        "world_size": trainer.accelerator.num_processes,
        "train_loss": result.training_loss,
        "last_logged": json.loads(json.dumps(last, default=float)),
    }
