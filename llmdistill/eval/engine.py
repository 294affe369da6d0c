"""One vLLM engine per evaluated model: resolve the model (LoRA adapters included), start, release.

A LoRA adapter directory (it holds ``adapter_config.json``) is served on its base model either
by vLLM's LoRA support (``enable_lora`` + a ``LoRARequest`` per generate call) or, with
``lora_mode="merge"``, by merging it into the base with peft in a temporary directory.

vLLM V1 runs the model in an engine-core process; deleting the ``LLM`` object alone does not
always stop it, so :func:`open_engine` shuts the engine core down explicitly when it exits.
"""

from __future__ import annotations

import gc
import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmdistill.config.base import ConfigError, check_model_path
from llmdistill.config.eval import EvalConfig
from llmdistill.log import get_logger
from llmdistill.vllm_runtime import VLLM_LORA_RANKS, set_cpu_kv_cache, set_engine_process, vllm_lora_rank

logger = get_logger(__name__)


@dataclass
class Engine:
    """A started engine, the tokenizer whose chat template builds prompts, and the adapter (if any)."""

    llm: Any
    tokenizer: Any
    lora_request: Any = None


def adapter_base(model: str) -> str | None:
    """The base model of a LoRA adapter directory, or ``None`` when ``model`` is not an adapter."""
    config = Path(model) / "adapter_config.json"
    if not config.is_file():
        return None
    base = json.loads(config.read_text()).get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{config} has no 'base_model_name_or_path': cannot tell which model it adapts; "
                          "add it, or pass the merged model")
    return base


def check_models(models: list[str]) -> None:
    """Fail before any engine starts when a model (or an adapter's base) cannot be found."""
    for i, model in enumerate(models):
        check_model_path(f"models[{i}]", model)
        base = adapter_base(model)
        if base is not None:
            check_model_path(f"the base model of adapter {model}", base)


def _tokenizer_source(model: str, base: str | None) -> str:
    """An adapter dir usually carries the tokenizer it was trained with; else use the base's."""
    if base and not any((Path(model) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return base
    return model


def _merge_adapter(adapter: str, base: str, into: Path) -> None:
    """Merge a LoRA adapter into its base with peft and save the full model to ``into``."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload()
    merged.save_pretrained(str(into))
    AutoTokenizer.from_pretrained(_tokenizer_source(adapter, base)).save_pretrained(str(into))


def _lora_rank(adapter: str) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that fits the adapter's rank."""
    rank = int(json.loads((Path(adapter) / "adapter_config.json").read_text()).get("r", 8))
    if rank > VLLM_LORA_RANKS[-1]:
        raise ValueError(f"{adapter}: LoRA rank {rank} exceeds vLLM's largest ({VLLM_LORA_RANKS[-1]}); "
                         f"use --lora_mode merge")
    return vllm_lora_rank(rank)


def _engine_kwargs(config: EvalConfig) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "dtype": config.dtype,
        "seed": config.seed,
        "enforce_eager": config.enforce_eager,
        "tensor_parallel_size": config.tensor_parallel_size,
        "trust_remote_code": config.trust_remote_code,
        "gpu_memory_utilization": config.gpu_memory_utilization,
    }
    if config.max_model_len:
        kwargs["max_model_len"] = config.max_model_len
    return kwargs


def shutdown(llm: Any) -> None:
    """Stop a vLLM engine's engine-core process (where the weights and KV cache live)."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()


@contextmanager
def open_engine(model: str, config: EvalConfig) -> Iterator[Engine]:
    """Start a vLLM engine for ``model`` (checkpoint, hub id or LoRA adapter dir); stop it on exit."""
    from transformers import AutoTokenizer
    from vllm import LLM

    set_cpu_kv_cache(config.kv_cache_space_gb)
    set_engine_process(config.vllm_multiprocessing)
    base = adapter_base(model)
    tmp_dir, lora_request, kwargs = None, None, _engine_kwargs(config)
    if base and config.lora_mode == "merge":
        tmp_dir = Path(tempfile.mkdtemp(prefix="llmdistill-merged-"))
        logger.info("merging adapter %s into %s", model, base)
        _merge_adapter(model, base, tmp_dir)
        engine_model = str(tmp_dir)
    elif base:
        from vllm.lora.request import LoRARequest

        engine_model = base
        kwargs.update(enable_lora=True, max_loras=1, max_lora_rank=_lora_rank(model))
        lora_request = LoRARequest("adapter", 1, str(Path(model).resolve()))
    else:
        engine_model = model
    tokenizer = AutoTokenizer.from_pretrained(_tokenizer_source(model, base), trust_remote_code=config.trust_remote_code)
    logger.info("starting vLLM for %s%s", model, f" (LoRA on {base})" if base else "")
    # vLLM only detokenizes (prompts arrive as token ids); an adapter shares its base's vocabulary
    llm = LLM(model=engine_model, tokenizer=engine_model, **kwargs)
    engine = Engine(llm=llm, tokenizer=tokenizer, lora_request=lora_request)
    try:
        yield engine
    finally:
        shutdown(llm)
        engine.llm = llm = None
        gc.collect()
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)
