"""The online teacher and the intermediate-layer terms of ``llmdistill train``.

With ``teacher_model`` the teacher runs beside the student (:class:`OnlineTeacher`, a frozen
:class:`~llmdistill.teacher.TransformersTeacher`): one forward over the student's packed batch
per micro-batch gives the KD term its top-k (plus the tail bucket, through the same chunked loss
as stored top-k; or the full distribution with ``teacher_top_k: 0``) and, when asked, its hidden
states, attention probabilities and q/k/v projections (:func:`capture_forward`).
:class:`LayerDistiller` turns the two models' captures into the feature and attention terms of
:mod:`llmdistill.layer_losses`, and owns the learned projection of a narrower student's hidden
states (saved apart from the student: the student checkpoint stays a plain HF model).

On GPUs with DeepSpeed ZeRO-3 the trainer partitions the teacher for inference like the student
(TRL's ``prepare_deepspeed``, no optimizer state): each process holds a shard and the weights are
gathered layer by layer during the teacher's forward.

The layer terms hook the mapped blocks of the decoder, ``layers[i]`` (their outputs),
``layers[i].self_attn`` (attention probabilities) and ``layers[i].self_attn.{q,k,v}_proj``: the
layout of Llama, Qwen, Mistral, Gemma and most decoder-only models in transformers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from transformers import TrainerCallback

from llmdistill.config.base import UserError
from llmdistill.distributed import sum_gradients
from llmdistill.layer_losses import (
    attention_kl_loss,
    document_mask,
    hidden_state_loss,
    map_layers,
    relation_kl_loss,
)
from llmdistill.teacher import TransformersTeacher, logit_transform, predicting_hidden, topk_logprobs

# A subdirectory: vLLM and transformers read every top-level *.safetensors as the model's weights
PROJECTOR_DIR = "feature_projector"
PROJECTOR_FILE = f"{PROJECTOR_DIR}/projector.safetensors"
PROJECTOR_MAP_FILE = f"{PROJECTOR_DIR}/layer_map.json"


@dataclass(frozen=True)
class CaptureSpec:
    """What a forward keeps besides the final hidden states: the mapped layers' only."""

    hidden_layers: tuple[int, ...] = ()  # 0 the embeddings, i block i's output (the last block's after the final norm)
    attention_layers: tuple[int, ...] = ()  # 1-based blocks whose attention probabilities are kept (eager attention)
    qkv_layers: tuple[int, ...] = ()  # 1-based blocks whose q/k/v projections are kept


class Captured(NamedTuple):
    """One forward over a packed sequence of L positions.

    Attributes:
        last: (L, H) final hidden states (after the final norm).
        hidden: layer index -> (L, H), indexed as transformers' ``output_hidden_states`` (0 the
            embeddings, S the last block's output after the final norm).
        attentions: block number -> (heads, L, L) attention probabilities.
        qkv: block number -> (q, k, v), each (L, D) as the projections return them.
    """

    last: torch.Tensor
    hidden: dict[int, torch.Tensor]
    attentions: dict[int, torch.Tensor]
    qkv: dict[int, tuple[torch.Tensor, ...]]


def decoder_layers(backbone: nn.Module) -> nn.ModuleList:
    layers = getattr(backbone, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not all(hasattr(b, "self_attn") for b in layers):
        raise UserError(f"the feature and attention terms hook the decoder blocks layers[i] (and their self_attn), "
                        f"which {type(backbone).__name__} does not have: set feature_loss and attention_loss to none")
    return layers


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def capture_forward(backbone: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor,
                    spec: CaptureSpec) -> Captured:
    """Run ``backbone`` (the model without its LM head) on one packed (1, L) sequence, keeping ``spec``.

    Forward hooks on the mapped blocks keep what the terms use and nothing else. (transformers'
    ``output_hidden_states`` and ``output_attentions`` would keep every block's: for a 28-layer
    teacher and an 8k-token micro-batch, ~100 GB of attention probabilities.)
    """
    hidden: dict[int, torch.Tensor] = {}
    attentions: dict[int, torch.Tensor] = {}
    qkv: dict[int, list[Any]] = {}
    handles = []
    layers = decoder_layers(backbone) if spec != CaptureSpec() else nn.ModuleList()

    def keep(store: dict[int, Any], key: int, pick: Any) -> Any:
        def hook(_module, _inputs, output):
            store[key] = pick(output)
        return hook

    for index in spec.hidden_layers:
        if index == 0:  # the embeddings as the first block receives them (some models scale them)
            def embeddings(_module, args, kwargs):
                hidden[0] = args[0] if args else kwargs["hidden_states"]
            handles.append(layers[0].register_forward_pre_hook(embeddings, with_kwargs=True))
        elif index < len(layers):
            handles.append(layers[index - 1].register_forward_hook(keep(hidden, index, _first)))
    for block in spec.attention_layers:
        handles.append(layers[block - 1].self_attn.register_forward_hook(keep(attentions, block, lambda o: o[1])))
    for block in spec.qkv_layers:
        slots = qkv.setdefault(block, [None, None, None])
        for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
            handles.append(getattr(layers[block - 1].self_attn, name).register_forward_hook(
                keep(slots, i, lambda o: o[0])))  # (1, L, D) -> (L, D)
    try:
        out = backbone(input_ids=input_ids, position_ids=position_ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    if len(layers) in spec.hidden_layers:
        hidden[len(layers)] = out.last_hidden_state
    if any(a is None for a in attentions.values()):
        raise UserError(f"attention_loss: attention_kl needs the attention probabilities, which "
                        f"{backbone.config._attn_implementation} attention does not return: set attention: eager")
    return Captured(
        last=out.last_hidden_state[0],
        hidden={index: h[0] for index, h in hidden.items()},
        attentions={block: a[0] for block, a in attentions.items()},
        qkv={block: tuple(slots) for block, slots in qkv.items()},
    )


class OnlineTeacher:
    """The teacher's signal for a training batch, computed now (no gradient).

    Args:
        teacher: the loaded, frozen teacher.
        top_k: entries per target token; 0 for the full distribution.
        chunk_size: target rows per LM-head chunk.

    The top-k is taken among ``teacher.vocab`` ids when set (a student with fewer LM-head rows).
    """

    def __init__(self, teacher: TransformersTeacher, top_k: int, chunk_size: int):
        self.teacher = teacher
        self.top_k = top_k
        self.chunk_size = chunk_size

    @property
    def model(self) -> nn.Module:
        """The HF model (inside its DeepSpeed engine under ZeRO-3: the engine's hooks stay on its modules)."""
        return getattr(self.teacher.model, "module", self.teacher.model)

    @torch.no_grad()
    def signals(self, inputs: dict[str, torch.Tensor], spec: CaptureSpec,
                padded_groups: bool = False) -> tuple[torch.Tensor, torch.Tensor, Captured | None]:
        """(N, k) top-k ids and T=1 log-probs of the batch's target tokens, and the teacher's captures.

        ``padded_groups`` (the trainer's choice for its student, see ``DistillTrainer._documents_as_padded_groups``):
        with nothing to capture, the documents run as right-padded groups and no captures are returned.
        """
        model = self.model
        target_index = inputs["target_index"]
        captured = None
        if padded_groups and spec == CaptureSpec():
            hidden, _ = predicting_hidden(model, inputs, max_tokens=inputs["input_ids"].shape[1])
        else:
            captured = capture_forward(model.base_model, inputs["input_ids"], inputs["position_ids"], spec)
            hidden = captured.last[target_index - 1]
        vocab = self.teacher.vocab
        rows = vocab or int(model.get_output_embeddings().weight.shape[0])
        k = min(self.top_k, rows) if self.top_k else rows
        ids, logprobs, _ = topk_logprobs(hidden, model.get_output_embeddings(), inputs["input_ids"][0, target_index],
                                         k, self.chunk_size, logit_transform(model.config), vocab)
        return ids, logprobs, captured


def _head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def _projection_widths(config: Any) -> tuple[int, int]:
    """(q width, k/v width) of a decoder's attention projections."""
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return config.num_attention_heads * _head_dim(config), kv_heads * _head_dim(config)


class LayerDistiller:
    """The feature and attention terms between mapped layers, and the feature projection.

    Args:
        args: the :class:`~llmdistill.config.train.TrainConfig` (layer map, losses, relation heads).
        student_config: the student's HF config.
        teacher_config: the teacher's HF config.

    Raises:
        UserError: a layer map outside the models, or relation heads that do not divide the widths.
    """

    def __init__(self, args: Any, student_config: Any, teacher_config: Any):
        try:
            self.pairs = map_layers(args.layer_map, student_config.num_hidden_layers,
                                    teacher_config.num_hidden_layers, args.layer_map_k)
        except ValueError as err:
            raise UserError(str(err)) from None
        self.feature, self.attention = args.feature_loss, args.attention_loss
        if self.attention != "none" and any(0 in pair for pair in self.pairs):
            raise UserError(f"layer_map={args.layer_map!r} maps layer 0 (the embeddings), which has no attention: "
                            "start the pairs at block 1")
        self.relation_heads = args.relation_heads or student_config.num_attention_heads
        if self.attention == "relations":
            widths = _projection_widths(student_config) + _projection_widths(teacher_config)
            if any(w % self.relation_heads for w in widths):
                raise UserError(f"relation_heads={self.relation_heads} must divide the q/k/v projection widths "
                                f"{sorted(set(widths))} of the student and the teacher: pick a common divisor")
        hs, ht = student_config.hidden_size, teacher_config.hidden_size
        self.projector: nn.ModuleList | None = None
        if self.feature != "none" and hs != ht:
            self.projector = nn.ModuleList(nn.Linear(hs, ht, bias=False) for _ in self.pairs)

    def spec(self, side: int) -> CaptureSpec:
        """What the student (``side=0``) or the teacher (``side=1``) must keep in its forward."""
        mapped = tuple(sorted({pair[side] for pair in self.pairs}))
        return CaptureSpec(hidden_layers=mapped if self.feature != "none" else (),
                           attention_layers=mapped if self.attention == "attention_kl" else (),
                           qkv_layers=mapped if self.attention == "relations" else ())

    def terms(self, student: Captured, teacher: Captured, target_index: torch.Tensor,
              position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(feature sum, attention sum) over the rows that predict targets, each averaged over the layer pairs."""
        rows = target_index - 1
        zero = torch.zeros((), dtype=torch.float32, device=rows.device)
        feature = attention = zero
        if self.feature != "none":
            parts = []
            for i, (s, t) in enumerate(self.pairs):
                h = student.hidden[s][rows]
                if self.projector is not None:
                    h = self.projector[i](h.to(self.projector[i].weight.dtype))
                parts.append(hidden_state_loss(h, teacher.hidden[t][rows], self.feature))
            feature = torch.stack(parts).mean()
        if self.attention != "none":
            mask = document_mask(position_ids, rows)
            if self.attention == "attention_kl":
                parts = [attention_kl_loss(student.attentions[s][:, rows], teacher.attentions[t][:, rows], mask)
                         for s, t in self.pairs]
            else:
                parts = [relation_kl_loss(student.qkv[s], teacher.qkv[t], rows, mask, self.relation_heads)
                         for s, t in self.pairs]
            attention = torch.stack(parts).mean()
        return feature, attention

    def save(self, directory: str | Path) -> None:
        """The projection (when there is one) into ``directory``: weights and the layer pairs they map."""
        if self.projector is None:
            return
        from safetensors.torch import save_file

        directory = Path(directory)
        (directory / PROJECTOR_DIR).mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.projector.state_dict().items()},
                  str(directory / PROJECTOR_FILE))
        (directory / PROJECTOR_MAP_FILE).write_text(json.dumps({"pairs": self.pairs, "loss": self.feature}) + "\n")

    def load(self, directory: str | Path) -> None:
        """The projection saved by :meth:`save` (a resumed run)."""
        path = Path(directory) / PROJECTOR_FILE
        if self.projector is None:
            return
        if not path.is_file():
            raise UserError(f"{directory} has no {PROJECTOR_FILE}: this checkpoint was not written with the same "
                            "feature_loss and layer_map; resume with the run's own settings")
        from safetensors.torch import load_file

        self.projector.load_state_dict(load_file(str(path)))


class ProjectorGrads(TrainerCallback):
    """The feature projection's gradients, which the Trainer does not see (it averages, clips and
    zeroes the model's only): before each optimizer step averaged over processes under DDP (DDP
    reduces the gradients of the model it wraps, not of the projection beside it) and clipped to
    ``max_grad_norm`` on their own norm; cleared after it."""

    def __init__(self, projector: nn.Module, average: bool):
        self.projector = projector
        self.average = average

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.average:
            sum_gradients(self.projector.parameters(), average=True)
        grads = [p.grad for p in self.projector.parameters() if p.grad is not None]
        if grads and args.max_grad_norm is not None and args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.projector.parameters(), args.max_grad_norm)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.projector.zero_grad(set_to_none=True)
