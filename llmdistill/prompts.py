"""The one prompt formatter: how a prompt becomes the text (and token ids) a model reads.

Every stage that puts a prompt in front of a model calls :class:`PromptFormat`: ``generate``
and ``score`` (the teacher's input), ``build`` (the student's prompt tokens, which must equal
the teacher's), ``eval`` (benchmark prompts) and the tiny world (teacher bootstrap). A format
is resolved once, from inline text or files, and recorded *as text* in the generation
manifest (:func:`llmdistill.formats.read_generation_info`), so a later stage never re-reads a
file and cannot disagree with the teacher on a trailing newline.

A prompt is either text (one user turn) or a list of ``{role, content}`` chat messages. It is
stored in generation shards as given: text as is, messages as JSON (:func:`stored_prompt`,
read back by :func:`prompt_messages`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llmdistill.config.base import UserError

PLACEHOLDER = "{prompt}"
MAX_INLINE_CHARS = 4096  # longer values are always text, never a path


class PromptError(UserError):
    """A prompt or prompt setting that cannot be formatted, with where and how to fix it."""


def read_text_or_file(value: str | None) -> str | None:
    """A prompt setting given inline or as the path of a file holding it.

    The file is read exactly as it is (a trailing newline stays): the teacher saw those bytes.
    """
    if value and len(value) < MAX_INLINE_CHARS:
        path = Path(os.path.expanduser(value))
        if path.is_file():
            return path.read_text(encoding="utf-8")
    return value


def stored_prompt(prompt: str | list[dict[str, Any]]) -> str:
    """A prompt as stored in the ``prompt`` column of generation shards: text as is, messages as JSON."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False)


def prompt_hash(prompt: str | list[dict[str, Any]]) -> str:
    """Stable id of a prompt (text or messages): the first 16 hex digits of the SHA-256 of its JSON."""
    return hashlib.sha256(json.dumps(prompt, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def prompt_messages(stored: str) -> list[dict[str, Any]]:
    """The chat messages of a stored prompt: JSON messages decoded, plain text as one user turn."""
    if stored.startswith("["):
        try:
            messages = json.loads(stored)
        except json.JSONDecodeError:
            messages = None
        if isinstance(messages, list) and messages and all(
                isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            return messages
    return [{"role": "user", "content": stored}]


def prompt_problem(stored: str) -> str:
    """The problem text of a stored prompt (its user turns): what dedup and decontamination compare."""
    return "\n".join(str(m["content"]) for m in prompt_messages(stored) if m.get("role", "user") == "user")


@dataclass(frozen=True)
class PromptFormat:
    """How a prompt is put in front of a model.

    Attributes:
        system_prompt: system message inserted first (unless the prompt has one), or None.
        instruction_template: user-turn template holding ``{prompt}`` (applied to the last
            user turn), or None to use the prompt as is.
        use_chat_template: render with the tokenizer's chat template (generation prompt
            included); False joins the turns with blank lines for a base model.
    """

    system_prompt: str | None = None
    instruction_template: str | None = None
    use_chat_template: bool = True

    def __post_init__(self) -> None:
        if self.instruction_template is not None and PLACEHOLDER not in self.instruction_template:
            raise PromptError(f"instruction_template must contain '{PLACEHOLDER}' where the prompt goes; got "
                              f"{self.instruction_template[:80]!r}")

    @classmethod
    def from_settings(cls, system_prompt: str | None = None, instruction_template: str | None = None,
                      use_chat_template: bool = True) -> PromptFormat:
        """A format from config values, each inline text or a file path (read as is)."""
        return cls(read_text_or_file(system_prompt), read_text_or_file(instruction_template), use_chat_template)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PromptFormat:
        """The inverse of :meth:`to_dict` (what a manifest records)."""
        return cls(data.get("system_prompt"), data.get("instruction_template"), bool(data.get("use_chat_template", True)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def messages(self, prompt: str | list[dict[str, Any]], where: str = "prompt") -> list[dict[str, Any]]:
        """The chat messages of a prompt with the instruction template and system prompt applied.

        Args:
            prompt: text (one user turn) or ``{role, content}`` messages.
            where: the file and row of the prompt, for error messages.

        Raises:
            PromptError: not text or messages, or empty.
        """
        if isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}]
        elif isinstance(prompt, list) and prompt and all(isinstance(m, dict) and "role" in m and "content" in m
                                                         for m in prompt):
            messages = [dict(m) for m in prompt]
        else:
            raise PromptError(f"{where}: the prompt must be text or a list of {{role, content}} messages")
        if not any(str(m["content"]).strip() for m in messages):
            raise PromptError(f"{where}: the prompt is empty; remove the row or fill it in")
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        if self.instruction_template is not None and users:
            last = messages[users[-1]]
            last["content"] = self.instruction_template.replace(PLACEHOLDER, str(last["content"]))
        if self.system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return messages

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Fail when the format needs a chat template the tokenizer does not have."""
        if self.use_chat_template and not getattr(tokenizer, "chat_template", None):
            raise PromptError(f"the tokenizer of {getattr(tokenizer, 'name_or_path', '?')} has no chat template: "
                              "set use_chat_template: false for a base model")

    def render(self, tokenizer: Any, prompt: str | list[dict[str, Any]], where: str = "prompt") -> str:
        """The exact text the model reads; with a chat template it ends with the generation prompt."""
        messages = self.messages(prompt, where)
        if self.use_chat_template:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if len(messages) > 2 or messages[-1]["role"] != "user":
            raise PromptError(f"{where}: multi-turn messages need use_chat_template: true")
        return "\n\n".join(str(m["content"]) for m in messages)

    def encode(self, tokenizer: Any, texts: list[str]) -> list[list[int]]:
        """Token ids of rendered prompts: special tokens come from the chat template, else the tokenizer adds them."""
        if not texts:
            return []
        return tokenizer(texts, add_special_tokens=not self.use_chat_template)["input_ids"]

    def token_ids(self, tokenizer: Any, prompts: list[str | list[dict[str, Any]]]) -> list[list[int]]:
        """:meth:`render` then :meth:`encode` for a list of prompts."""
        return self.encode(tokenizer, [self.render(tokenizer, p) for p in prompts])
