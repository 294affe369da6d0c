"""What the teacher reads when it writes a query: a Magpie prefix, a few-shot request or an evolve request.

The rendering is the one prompt formatter's (:class:`llmdistill.prompts.PromptFormat`) plus one
thing it cannot do: stop the chat template at the start of the user turn. That prefix is found by
rendering a conversation whose user message is a sentinel and cutting at the sentinel, so it is
exactly the bytes the template puts before any user message (``<|im_start|>user\\n`` for ChatML),
whatever the template.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from llmdistill.config.base import UserError, jsonl_objects
from llmdistill.prompts import PromptFormat, read_text_or_file

SENTINEL = "\u2063LLMDISTILL-USER-TURN\u2063"  # text no template writes on its own
SEED_FIELDS = ("prompt", "question", "problem")


class SynthesisError(UserError):
    """A synthesis setting or input that cannot be used, with where and how to fix it."""


def user_turn_prefix(tokenizer: Any, system_prompt: str | None = None) -> str:
    """The chat template rendered up to the start of the user message (Magpie's prompt).

    Raises:
        SynthesisError: the tokenizer has no chat template, or it does not place the user message
            verbatim (so no prefix can be cut).
    """
    fmt = PromptFormat(system_prompt=system_prompt)
    fmt.check_tokenizer(tokenizer)
    messages = fmt.messages(SENTINEL)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    if SENTINEL not in text:
        raise SynthesisError(f"the chat template of {getattr(tokenizer, 'name_or_path', '?')} does not write the "
                             "user message verbatim: magpie mode cannot cut it at the user turn; use mode: seeded")
    return text[: text.index(SENTINEL)]


def read_seeds(path: str) -> list[str]:
    """Seed queries of ``seeded`` mode: a .txt (one per line) or a .jsonl with a prompt/question/problem field.

    Raises:
        SynthesisError: a missing file, a line without such a field, or no seeds at all.
    """
    file = Path(path)
    if not file.is_file():
        raise SynthesisError(f"seed_file {path} does not exist")
    if file.suffix != ".jsonl":
        seeds = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        seeds = []
        for number, record in jsonl_objects(file, SynthesisError):
            name = next((f for f in SEED_FIELDS if f in record), None)
            if name is None:
                raise SynthesisError(f"{path} line {number}: needs one of the fields {list(SEED_FIELDS)}")
            seeds.append(str(record[name]).strip())
    if not seeds:
        raise SynthesisError(f"seed_file {path} holds no seed query")
    return seeds


def few_shot_examples(seeds: list[str], k: int, slot: int, seed: int) -> list[str]:
    """The ``k`` seeds shown to query ``slot``: a draw fixed by (seed, slot), so a resumed run asks the same."""
    rng = random.Random(f"synthesize-{seed}-{slot}")
    return rng.sample(seeds, min(k, len(seeds)))


class QueryPrompts:
    """The texts the teacher completes to write, evolve and answer queries.

    Args:
        tokenizer: the teacher tokenizer.
        system_prompt: system message of the writing prompts (text or a file path).
        seeded_template: user turn holding ``{examples}``.
        evolve_template: user turn holding ``{question}``.
        answer_template: user-turn template of the answering prompt (``{prompt}``), or None.
    """

    def __init__(self, tokenizer: Any, system_prompt: str | None, seeded_template: str, evolve_template: str,
                 answer_template: str | None) -> None:
        self.tokenizer = tokenizer
        self.writing = PromptFormat.from_settings(system_prompt, None, True)
        self.answering = PromptFormat.from_settings(None, answer_template, True)
        self.seeded_template = read_text_or_file(seeded_template)
        self.evolve_template = read_text_or_file(evolve_template)

    def magpie(self) -> str:
        return user_turn_prefix(self.tokenizer, self.writing.system_prompt)

    def seeded(self, examples: list[str]) -> str:
        listing = "\n".join(f"{i}. {e}" for i, e in enumerate(examples, start=1))
        return self.writing.render(self.tokenizer, self.seeded_template.replace("{examples}", listing))

    def evolve(self, question: str) -> str:
        return self.writing.render(self.tokenizer, self.evolve_template.replace("{question}", question))

    def answer(self, question: str) -> str:
        return self.answering.render(self.tokenizer, question)

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of rendered texts (the chat template wrote the special tokens)."""
        return self.writing.encode(self.tokenizer, texts)
