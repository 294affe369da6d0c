"""The tiny world writes its own questions: a question-writing teacher, and a parser that reads questions back.

The shipped teacher learned to answer (loss on the answer only), so it never learned to write a
user turn. :func:`question_writer` fine-tunes a copy of it briefly on whole conversations (the
user question and the answer, loss on both, after the chat template's user-turn header), so that
given only ``<|im_start|>user\\n`` it writes a tiny-world question, and given a question it still
answers. The shipped teacher is not changed; the derived checkpoint is cached under
:func:`~llmdistill.tinyworld.bootstrap.cache_dir` with a key of the teacher, the settings and this
code, and its manifest records the held-out greedy accuracy (which must stay >= 90%) and the share
of sampled questions that are valid.

:func:`parse_question` reads a question back into its operations, difficulty and answer with the
task's own sentence templates: what the data-free experiment measures diversity and answer
accuracy with.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from llmdistill.log import get_logger
from llmdistill.manifest import MANIFEST, write_manifest
from llmdistill.synthesis import prompts as synthesis_prompts
from llmdistill.tinyworld import bootstrap, task
from llmdistill.tinyworld.models import save_model
from llmdistill.tinyworld.recipe import (
    MAX_NEW_TOKENS,
    TeacherTrainSettings,
    _lr_factor,
    _train_loop,
    encode_examples,
    greedy_accuracy,
    heldout_eval_problems,
)

logger = get_logger(__name__)

# A short fine-tune at a third of the teacher's peak rate: the answers stay in the loss, so they are not forgotten.
WRITER_SETTINGS = TeacherTrainSettings(steps=400, batch_size=64, lr=1e-3, warmup_steps=40)
DATA_SEED_OFFSET = 50_000  # the fine-tune's problems are train-split problems the teacher never saw
VALIDITY_SAMPLES = 256


def conversation_examples(tok: PreTrainedTokenizerBase, problems: Sequence[task.Problem]) -> list[tuple[list[int], int]]:
    """(token ids of the whole conversation, length of the user-turn header) per problem.

    The loss covers the question, the end of the user turn, the assistant header and the answer.
    """
    header = tok(synthesis_prompts.user_turn_prefix(tok), add_special_tokens=False)["input_ids"]
    examples = [(ids, len(header)) for ids, _ in encode_examples(tok, problems)]
    for ids, _ in examples[:1]:
        if ids[: len(header)] != header:
            raise RuntimeError("the tiny tokenizer does not tokenize the user-turn header the same inside a "
                               "conversation: magpie prompts would differ from training")
    return examples


def train_question_writer(teacher_dir: Path, seed: int, settings: TeacherTrainSettings) -> tuple[torch.nn.Module,
                                                                                                 PreTrainedTokenizerBase]:
    """Fine-tune the teacher at ``teacher_dir`` on whole conversations of fresh train-split problems."""
    tok = AutoTokenizer.from_pretrained(str(teacher_dir))
    model = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32)
    problems = task.generate_problems(settings.steps * settings.batch_size, seed=DATA_SEED_OFFSET + seed, split="train")
    examples = conversation_examples(tok, problems)
    batches = [examples[i : i + settings.batch_size] for i in range(0, len(examples), settings.batch_size)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, betas=(0.9, 0.95),
                                  weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, settings))
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.num_threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            _train_loop(model, batches, optimizer, scheduler, tok.pad_token_id, settings)
    finally:
        torch.set_num_threads(threads)
    return model.eval(), tok


@torch.no_grad()
def sample_questions(model_dir: str | Path, n: int, seed: int = 0, temperature: float = 1.0) -> list[str]:
    """``n`` questions the checkpoint writes from the bare user-turn header (HF sampling, for the manifest)."""
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    header = tok(synthesis_prompts.user_turn_prefix(tok), add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = model.generate(header.repeat(n, 1), do_sample=True, temperature=temperature, top_p=1.0,
                             max_new_tokens=MAX_NEW_TOKENS, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
    return [t.strip() for t in tok.batch_decode(out[:, header.shape[1] :], skip_special_tokens=True)]


def _writer_key(teacher_dir: Path, seed: int, settings: TeacherTrainSettings) -> str:
    """Hash of what decides the writer's weights: the teacher (its name is its own key), seed, settings, and the
    code of the fine-tune (the training loop is the teacher recipe's, inside the teacher's key)."""
    code = "".join(inspect.getsource(f) for f in (conversation_examples, train_question_writer,
                                                  synthesis_prompts.user_turn_prefix))
    payload = {"teacher": teacher_dir.name, "seed": seed, "settings": dataclasses.asdict(settings),
               "data_seed_offset": DATA_SEED_OFFSET, "code": hashlib.sha256(code.encode()).hexdigest()[:12]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def question_writer(seed: int = 0, settings: TeacherTrainSettings = WRITER_SETTINGS, use_shipped: bool = True) -> Path:
    """The question-writing teacher's checkpoint dir: the shipped one when this code made it (seed 0,
    like the teacher: ``scripts/ship_teacher.py``), else cached, else fine-tuned now from the seed's
    teacher (minutes).

    Its manifest records ``heldout_accuracy`` (greedy, as the teacher's) and ``question_validity``
    (the share of :data:`VALIDITY_SAMPLES` questions sampled at T = 1 that :func:`parse_question` reads).
    """
    teacher_dir = bootstrap.bootstrap_teacher(seed)
    name = f"tiny-question-writer-{_writer_key(teacher_dir, seed, settings)}"
    if use_shipped and (bootstrap.SHIPPED / name / MANIFEST).is_file():
        return bootstrap.SHIPPED / name
    target = bootstrap.cache_dir() / name

    def build(out: Path) -> None:
        started = time.time()
        logger.info("fine-tuning the tiny teacher to write questions (%d steps) into %s", settings.steps, target)
        model, tok = train_question_writer(teacher_dir, seed, settings)
        save_model(model, tok, out)
        train_time = time.time() - started
        accuracy = greedy_accuracy(out, heldout_eval_problems())
        questions = sample_questions(out, VALIDITY_SAMPLES, seed=seed)
        validity = sum(parse_question(q) is not None for q in questions) / len(questions)
        logger.info("question writer: held-out greedy accuracy %.3f, valid questions %.3f", accuracy, validity)
        write_manifest(out, "question-writer", settings, started=started, inputs={"teacher": teacher_dir},
                       counts={"steps": settings.steps, "train_conversations": settings.steps * settings.batch_size},
                       seed=seed, train_wall_time_s=round(train_time, 1), heldout_accuracy=accuracy,
                       question_validity=validity, sample_questions=questions[:8])

    return bootstrap._build_cached(target, build)


# ---------------------------------------------------------------------------------------
# Reading a question back


@dataclass(frozen=True)
class ParsedQuestion:
    """A question read back: its operations (``add``, ``sub``, ``double``, ``triple``, ``halve``) and answer."""

    ops: tuple[str, ...]
    answer: int

    @property
    def difficulty(self) -> int:
        return len(self.ops)


def _pattern(template: str) -> str:
    fields = {"{name}": r"(?P<name>[A-Z][a-z]+)", "{pron}": r"(?:He|She)", "{pron_lower}": r"(?:he|she)",
              "{a}": r"(?P<a>\d+)", "{n}": r"(?P<n>\d+)", "{obj}": r"(?P<obj>[a-z]+)"}
    out = re.escape(template)
    for key, regex in fields.items():
        out = out.replace(re.escape(key), regex)
    return out


def _compile(templates: Sequence[str]) -> list[re.Pattern]:
    return [re.compile(_pattern(t)) for t in templates]


_OPENINGS = _compile(task.OPENINGS)
_QUESTIONS = _compile(task.QUESTIONS)
_OPS = {name: _compile(templates) for name, templates in
        (("add", task.ADD), ("sub", task.SUB), ("double", task.DOUBLE), ("triple", task.TRIPLE), ("halve", task.HALVE))}


def _match(patterns: list[re.Pattern], sentence: str) -> re.Match | None:
    return next((m for p in patterns if (m := p.fullmatch(sentence))), None)


def _apply(op: str, value: int, n: int | None) -> int | None:
    """The value after one operation, or None when the task would never write it."""
    result = {"add": lambda: value + (n or 0), "sub": lambda: value - (n or 0), "double": lambda: 2 * value,
              "triple": lambda: 3 * value, "halve": lambda: value // 2 if value % 2 == 0 else -1}[op]()
    ok = 0 <= result <= task.MAX_VALUE and (n is None or 1 <= n <= task.OPERAND_MAX)
    return result if ok else None


def parse_question(text: str, strict: bool = True) -> ParsedQuestion | None:
    """A tiny-world question's operations and answer, or None when it is not one the task could write
    (unknown sentence, 0 or more than 3 steps, a value out of range; with ``strict``, two names or objects).

    Without ``strict`` a question that mixes up names or objects ("Ben has 5 pens. ... How many stamps
    now?") still reads: its arithmetic is well defined."""
    sentences = re.findall(r"[^.?]+[.?]", text.strip())
    if len(sentences) < 3 or "".join(sentences) .replace(" ", "") != text.strip().replace(" ", ""):
        return None
    sentences = [s.strip() for s in sentences]
    opening = _match(_OPENINGS, sentences[0])
    if opening is None or _match(_QUESTIONS, sentences[-1]) is None or len(sentences) - 2 > max(task.DIFFICULTIES):
        return None
    names, objects, value, ops = {opening["name"]}, {opening["obj"]}, int(opening["a"]), []
    for sentence in sentences[1:-1]:
        found = next(((op, m) for op, patterns in _OPS.items() if (m := _match(patterns, sentence))), None)
        if found is None:
            return None
        op, m = found
        groups = m.groupdict()
        names.update(g for g in [groups.get("name")] if g)
        value = _apply(op, value, int(groups["n"]) if groups.get("n") else None)
        if value is None:
            return None
        ops.append(op)
    last = _match(_QUESTIONS, sentences[-1]).groupdict()
    names.update(g for g in [last.get("name")] if g)
    objects.update(g for g in [last.get("obj")] if g)
    if strict and (len(names) != 1 or len(objects) != 1):
        return None
    return ParsedQuestion(tuple(ops), value)
