"""How the tiny world's teacher is trained and measured: the recipe the bootstrap cache key hashes.

Everything that decides the teacher's weights lives here (and in the task, tokenizer, model and
prompt-format modules), so the cache key (:func:`llmdistill.tinyworld.bootstrap.code_version`)
changes exactly when the teacher would. Training is a plain PyTorch loop with a fixed number of
steps (never a time budget), seeded, on one thread layout, so the same seed gives the same
weights on the same CPU; a CPU with other vector units rounds differently and gives a teacher of
about the same accuracy, not the same bits.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from llmdistill.checking.checkers import Reference, check
from llmdistill.config.base import check_range
from llmdistill.log import get_logger
from llmdistill.prompts import PromptFormat
from llmdistill.tinyworld.models import make_model
from llmdistill.tinyworld.task import Problem, generate_problems, reference_completion
from llmdistill.tinyworld.tokenizer import build_tokenizer

logger = get_logger(__name__)

EVAL_SEED = 0
EVAL_PROBLEMS = 500
MAX_NEW_TOKENS = 64


@dataclass(frozen=True)
class TeacherTrainSettings:
    """How the teacher is trained. Any change gives a new cache key."""

    steps: int = field(default=1200, metadata={"help": "Optimizer steps (fixed: no time budget)."})
    batch_size: int = field(default=64, metadata={"help": "Sequences per step."})
    lr: float = field(default=3e-3, metadata={"help": "Peak AdamW learning rate."})
    warmup_steps: int = field(default=60, metadata={"help": "Linear warm-up steps, then linear decay to 0."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    grad_clip: float = field(default=1.0, metadata={"help": "Max gradient norm."})
    num_threads: int = field(default=2, metadata={"help": "torch intra-op threads (fixed for reproducibility)."})

    def __post_init__(self) -> None:
        check_range("steps", self.steps, 1)
        check_range("batch_size", self.batch_size, 1)
        check_range("lr", self.lr, 0.0)
        check_range("warmup_steps", self.warmup_steps, 0, self.steps)
        check_range("num_threads", self.num_threads, 1)


PROMPT_FORMAT = PromptFormat()  # the question is the user turn, under the tokenizer's ChatML template


def encode_examples(tok: PreTrainedTokenizerBase, problems: Sequence[Problem]) -> list[tuple[list[int], int]]:
    """(token ids of prompt + reference completion + eos, prompt length) per problem."""
    prompt_ids = PROMPT_FORMAT.token_ids(tok, [p.question for p in problems])
    answer_ids = tok([reference_completion(p) + tok.eos_token for p in problems],
                     add_special_tokens=False)["input_ids"]
    return [(p + a, len(p)) for p, a in zip(prompt_ids, answer_ids, strict=True)]


def _collate(examples: Sequence[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; labels are -100 on the prompt and padding (loss on the answer only)."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, n_prompt) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def _lr_factor(step: int, settings: TeacherTrainSettings) -> float:
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    return max(0.0, (settings.steps - step) / max(1, settings.steps - settings.warmup_steps))


def train_teacher(seed: int, settings: TeacherTrainSettings) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """Train a teacher from random init on fresh train-split problems (one pass, no repeats)."""
    tok = build_tokenizer()
    model = make_model("teacher", tok, seed=seed)
    problems = generate_problems(settings.steps * settings.batch_size, seed=seed, split="train")
    examples = encode_examples(tok, problems)  # problems come in random order: batches are i.i.d.
    batches = [examples[i : i + settings.batch_size] for i in range(0, len(examples), settings.batch_size)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, betas=(0.9, 0.95),
                                  weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, settings))
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.num_threads)
    try:
        _train_loop(model, batches, optimizer, scheduler, tok.pad_token_id, settings)
    finally:
        torch.set_num_threads(threads)
    return model.eval(), tok


def _train_loop(model, batches, optimizer, scheduler, pad_id: int, settings: TeacherTrainSettings) -> None:
    model.train()  # no dropout in these models: the only randomness is init and data order, both seeded
    started = time.time()
    for step, examples in enumerate(batches):
        loss = model(**_collate(examples, pad_id)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == settings.steps - 1:
            logger.info("teacher step %d/%d loss %.4f (%.0f s)", step + 1, settings.steps, loss.item(),
                        time.time() - started)


@torch.no_grad()
def greedy_accuracy(model_dir: str | Path, problems: Sequence[Problem], batch_size: int = 128) -> float:
    """Fraction of problems a checkpoint solves with greedy decoding (HF generate, left padding).

    Args:
        model_dir: a checkpoint directory holding model and tokenizer.
        problems: the problems to solve.
        batch_size: prompts per ``generate`` call.

    Returns:
        Accuracy in [0, 1], judged by the ``numeric`` checker (:func:`llmdistill.checking.checkers.check`),
        as the ``tiny`` benchmark is.
    """
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    correct = 0
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        texts = [PROMPT_FORMAT.render(tok, p.question) for p in chunk]
        enc = tok(texts, add_special_tokens=not PROMPT_FORMAT.use_chat_template, padding=True, return_tensors="pt")
        out = model.generate(**enc, do_sample=False, max_new_tokens=MAX_NEW_TOKENS,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        texts = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        correct += sum(check("numeric", t, Reference(answer=p.answer)).correct for t, p in zip(texts, chunk, strict=True))
    return correct / max(1, len(problems))


def heldout_eval_problems(n: int = EVAL_PROBLEMS) -> list[Problem]:
    """The fixed held-out problems (mixed difficulty) the teacher's accuracy is measured on."""
    return generate_problems(n, seed=EVAL_SEED, split="heldout")
