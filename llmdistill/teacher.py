"""The in-process teacher, shared by ``onpolicy`` (grading the student's samples) and ``train``
(the online teacher): a frozen model in this process, its forward over packed samples, and its
top-k log-probs computed chunk by chunk (never a full ``[tokens x vocab]`` float32 tensor).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from llmdistill.losses import NO_TRANSFORM, LogitTransform

#: Config fields that turn the LM head's output into the logits, with their neutral values.
LOGIT_FIELDS = {"final_logit_softcapping": None, "logits_soft_cap": None, "logits_scaling": 1.0, "logit_scale": 1.0,
                "lm_head_multiplier": 1.0}
#: What each model type does with its field, as its transformers forward does it (each entry is tested
#: against that forward: tests/test_logit_transforms.py). The same field name means different things in different
#: models (Granite divides by ``logits_scaling``, HyperCLOVA X multiplies by it), so a type not listed
#: that sets a field is refused rather than guessed.
LOGIT_TRANSFORMS = {
    **dict.fromkeys(("gemma2", "gemma3_text", "nanochat"), ("final_logit_softcapping", "softcap")),
    "recurrent_gemma": ("logits_soft_cap", "softcap"),
    **dict.fromkeys(("granite", "granitemoe", "granitemoeshared", "minicpm3"), ("logits_scaling", "divide")),
    "hyperclovax": ("logits_scaling", "multiply"),
    **dict.fromkeys(("cohere", "cohere2"), ("logit_scale", "multiply")),
    "falcon_h1": ("lm_head_multiplier", "multiply"),
}


def logit_transform(config: Any, who: str = "the model") -> LogitTransform:
    """What the model with HF ``config`` does to its LM head's output before the softmax.

    The chunked loss, the teachers' top-k and the students' token log-probs compute the head's output
    chunk by chunk and apply this to it, so they see the logits the model samples from.

    Raises:
        UserError: the config sets one of :data:`LOGIT_FIELDS` for a model type not in
            :data:`LOGIT_TRANSFORMS` (or another field than its own).
    """
    from llmdistill.config.base import UserError

    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(config, "model_type", None)
    rule = LOGIT_TRANSFORMS.get(model_type)
    for name, neutral in LOGIT_FIELDS.items():
        value = getattr(config, name, neutral)
        if value is not None and value != neutral and (rule is None or rule[0] != name):
            raise UserError(f"{who}: its config ({model_type}) sets {name}={value}, which transforms the LM head's "
                            "output into the logits in a way llmdistill does not know for this model type; the "
                            f"chunked loss and top-k would read other logits than it samples from (known: "
                            f"{', '.join(sorted(LOGIT_TRANSFORMS))})")
    if rule is None or getattr(config, rule[0], None) in (None, LOGIT_FIELDS[rule[0]]):
        return LogitTransform()
    value = float(getattr(config, rule[0]))
    if rule[1] == "softcap":
        return LogitTransform(softcap=value)
    return LogitTransform(scale=1.0 / value if rule[1] == "divide" else value)


def check_same_vocabulary(path: str, tokenizer: Any, who: str, student: str, trust_remote_code: bool = False) -> None:
    """Refuse a teacher whose tokenizer is not the student's ``tokenizer`` (reads only the tokenizer
    files, before any weights load): token-level distillation compares the two models' probabilities
    of the same token ids, which under another vocabulary name other strings.

    Raises:
        UserError: naming the teacher, the student and the fix.
    """
    from transformers import AutoTokenizer

    from llmdistill.config.base import UserError

    theirs = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if theirs.get_vocab() != tokenizer.get_vocab():
        raise UserError(f"{who} {path}: its tokenizer differs from the student's ({student}); token-level "
                        "distillation needs one vocabulary: pick a teacher of the student's family, or distil from "
                        "its text (generate, build, then train with alpha: 0)")


def check_logit_transform(path: str, who: str, trust_remote_code: bool = False) -> None:
    """:func:`logit_transform` of the checkpoint at ``path``, before any weights load (reads only the config)."""
    from transformers import AutoConfig

    logit_transform(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code), f"{who} {path}")


def on_device(batch: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The batch's tensors on the model's device (a no-op on a CPU host)."""
    device = next(model.parameters()).device
    return {key: value.to(device) for key, value in batch.items()}


def forward_groups(position_ids: torch.Tensor, max_tokens: int) -> list[list[tuple[int, int]]]:
    """The packed samples (their ``(start, end)`` spans) grouped for padded forwards of bounded size.

    Samples are taken longest first; a group holds as many as fit ``count × longest <= max_tokens``
    (a longer sample is a group of its own). Each group runs as one right-padded batch, so attention
    costs each sample's own square, not the square of a packed run, and padding stays small.
    """
    starts = torch.nonzero(position_ids == 0)[:, 0].tolist()
    spans = sorted(zip(starts, [*starts[1:], len(position_ids)], strict=True), key=lambda s: s[0] - s[1])
    groups: list[list[tuple[int, int]]] = []
    for span in spans:
        if groups and (len(groups[-1]) + 1) * (groups[-1][0][1] - groups[-1][0][0]) <= max_tokens:
            groups[-1].append(span)
        else:
            groups.append([span])
    return groups


def hidden_by_group(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                    max_tokens: int = 2048) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Per forward group: the rows of the targets it predicts (indices into ``target_ids``) and the
    final hidden states that predict them (rows, H).

    The packed samples run as right-padded batches of at most ``max_tokens`` positions
    (:func:`forward_groups`). Under a causal mask a real token never sees the padding after it,
    so no attention mask is needed and each position's state equals the packed forward's. Only the
    states that predict a target leave a group: a caller that reduces them at once (a teacher's top-k)
    holds one group's states at a time, never the whole batch's.
    """
    ids = batch["input_ids"][0]
    row_of = torch.full((len(ids),), -1, dtype=torch.long, device=ids.device)  # position -> the target it predicts
    row_of[batch["target_index"] - 1] = torch.arange(len(batch["target_index"]), device=ids.device)
    for group in forward_groups(batch["position_ids"][0], max_tokens):
        lengths = torch.tensor([b - a for a, b in group], device=ids.device)
        padded = ids.new_zeros(len(group), int(lengths[0]))
        for row, (a, b) in enumerate(group):
            padded[row, :b - a] = ids[a:b]
        out = model.base_model(input_ids=padded, use_cache=False).last_hidden_state
        real = torch.arange(padded.shape[1], device=ids.device)[None] < lengths[:, None]
        rows = row_of[torch.cat([torch.arange(a, b, device=ids.device) for a, b in group])]
        predicts = rows >= 0
        yield rows[predicts], out[real][predicts]  # out[real]: the group's samples in order, without padding


def predicting_hidden(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                      max_tokens: int = 2048) -> tuple[torch.Tensor, torch.nn.Module]:
    """The final hidden states that predict each target (N, H), in target order, and the LM head
    (:func:`hidden_by_group`'s groups put together)."""
    groups = list(hidden_by_group(model, batch, max_tokens))
    if not groups:  # no sample
        return batch["input_ids"].new_zeros(0, model.config.hidden_size).float(), model.get_output_embeddings()
    rows, pieces = zip(*groups, strict=True)
    order = torch.empty_like(batch["target_index"])
    order[torch.cat(rows)] = torch.arange(len(order), device=order.device)
    return torch.cat(pieces)[order], model.get_output_embeddings()


@torch.no_grad()
def topk_logprobs(hidden: torch.Tensor, head: torch.nn.Module, target_ids: torch.Tensor, k: int,
                  chunk_size: int, transform: LogitTransform = NO_TRANSFORM, vocab: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k ids and log-probs (N, k) and the targets' own log-probs (N,), chunk by chunk (fp32), of the
    logits ``transform(head(hidden))``.

    ``vocab``: the top-k is taken among ids below it only (a student with fewer LM-head rows than
    the teacher: the teacher's extra rows are padding no token has). The log-probs stay normalised
    over every row, so what those rows hold falls in the loss's tail bucket."""
    ids, lps, own = [], [], []
    for start in range(0, len(hidden), chunk_size):
        logits = transform(head(hidden[start:start + chunk_size]).float())
        logp = torch.log_softmax(logits, dim=-1)
        top = (logp if vocab is None else logp[:, :vocab]).topk(k, dim=-1)
        ids.append(top.indices)
        lps.append(top.values)
        own.append(logp.gather(-1, target_ids[start:start + chunk_size, None])[:, 0])
    return torch.cat(ids), torch.cat(lps), torch.cat(own)


class TransformersTeacher:
    """A frozen teacher in this process (no gradient, eval mode, its own dtype, on ``device``).

    ``onpolicy`` grades a step's samples with :meth:`score` (one prefill per group of packed
    samples); ``train``'s online teacher runs :attr:`model` on the student's packed batch
    (:class:`llmdistill.online.OnlineTeacher`).

    Args:
        path: HF checkpoint of the teacher.
        dtype: ``float32``, ``bfloat16``, ``float16``, or ``auto`` (the checkpoint's own dtype).
        device: where the weights go.
        pack_tokens: positions per forward in :meth:`score`.
        attn_implementation: transformers' attention kernel (``eager`` returns attention probabilities);
            None keeps transformers' default.
    """

    def __init__(self, path: str, dtype: str, device: torch.device | str = "cpu", pack_tokens: int = 2048,
                 attn_implementation: str | None = None):
        from transformers import AutoModelForCausalLM

        self.pack_tokens = pack_tokens
        self.vocab: int | None = None  # a student's LM-head rows when this teacher has more (:meth:`grade_for`)
        kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
        self.model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype if dtype == "auto" else getattr(torch, dtype), **kwargs).to(device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def grade_for(self, student: torch.nn.Module) -> None:
        """Take the top-k among ``student``'s ids when this teacher has more LM-head rows: with one
        tokenizer the extra rows are padding no token has (Qwen2.5 7B and up: 152,064 rows, 0.5B-3B:
        151,936), and ids past the student's rows would index nothing in it."""
        rows = student.get_output_embeddings().weight.shape[0]
        self.vocab = rows if self.model.get_output_embeddings().weight.shape[0] > rows else None

    def score(self, batch: dict[str, torch.Tensor], k: int, chunk_size: int) -> dict[str, torch.Tensor]:
        """The teacher's top-k ids and log-probs (N, k) and its log-prob of each target (N,), for the
        packed samples of ``batch``. Each forward group's hidden states become top-k at once, so
        what is held is one group's states (``pack_tokens`` x H) and 12 bytes x k per target."""
        batch = on_device(batch, self.model)
        targets = batch["target_ids"]
        ids = torch.empty(len(targets), k, dtype=torch.long, device=targets.device)
        lps = torch.empty(len(targets), k, dtype=torch.float32, device=targets.device)
        own = torch.empty(len(targets), dtype=torch.float32, device=targets.device)
        head, transform = self.model.get_output_embeddings(), logit_transform(self.model.config)
        with torch.no_grad():
            for rows, hidden in hidden_by_group(self.model, batch, self.pack_tokens):
                ids[rows], lps[rows], own[rows] = topk_logprobs(hidden, head, targets[rows], k, chunk_size,
                                                                transform, self.vocab)
        return {"teacher_ids": ids, "teacher_logprobs": lps, "teacher_token_logprobs": own}
