"""The LoRA settings ``train`` and ``onpolicy`` share: one definition, one LoRA config builder."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmdistill.config.base import ConfigError, check_range

LM_HEADS = ("lm_head", "embed_out")  # the output layer's name in transformers' causal LMs


@dataclass
class LoraSettings:
    """Train a LoRA adapter on the frozen student instead of all its weights (PEFT)."""

    use_peft: bool = field(default=False, metadata={"help": "Train a LoRA adapter instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = lora_alpha / lora_r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: str = field(
        default="all-linear",
        metadata={"help": "Comma-separated module names for LoRA, or 'all-linear' (every linear layer but "
                          "the LM head)."},
    )

    def check_lora(self) -> None:
        check_range("lora_r", self.lora_r, 1, None)
        check_range("lora_alpha", self.lora_alpha, 1, None)
        check_range("lora_dropout", self.lora_dropout, 0.0, 1.0)
        heads = [t.strip() for t in self.lora_target_modules.split(",") if t.strip() in LM_HEADS]
        if self.use_peft and heads:
            raise ConfigError(f"lora_target_modules names the LM head ({heads[0]}): the chunked loss multiplies by "
                              "the head's weight directly, so an adapter there would never train; leave it out "
                              "('all-linear' does)")

    def peft_config(self) -> Any:
        """peft's ``LoraConfig`` for a causal LM (None without ``use_peft``)."""
        if not self.use_peft:
            return None
        from peft import LoraConfig

        targets = self.lora_target_modules
        return LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                          task_type="CAUSAL_LM",
                          target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",")])
