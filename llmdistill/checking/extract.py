"""Answer extraction from model responses.

A reasoning model answers ``<think>…</think>`` followed by the final answer. Everything in
the think block is scratch work, so extraction looks only after ``</think>``; a response whose
think block never closes (truncated, or the model rambled) has no answer at all.

``THINK_OPEN``/``THINK_CLOSE`` are the one definition of the think tags; everything else
(build's well-formedness filter, eval's prompt check, the tiny world's tokenizer) imports them.
"""

from __future__ import annotations

import re

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
THINK_TAGS = (THINK_OPEN, THINK_CLOSE)

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_CODE_BLOCK = re.compile(r"```([\w+-]*)[^\n]*\n(.*?)```", re.DOTALL)
_CHOICE_PATTERNS = (
    # the words in any case, the letter upper-case only: "the answer is a bit subtle" commits to nothing
    re.compile(r"(?i:answer\s*(?:is|:)?)\s*[:\s]*\(?\**([A-J])\b\)?"),
    re.compile(r"^\s*\(?([A-J])\)?[.)]?\s*$", re.MULTILINE),
)


def strip_think(text: str, think_in_prompt: bool = False) -> str | None:
    """The part of a response after its think block.

    Args:
        text: the generated response.
        think_in_prompt: the chat template already opened ``<think>`` in the prompt (as the
            R1-distill templates do), so the response starts inside the think block.

    Returns:
        The text after the last ``</think>``; the whole text when the model did not think;
        ``None`` when a think block was opened but never closed (no answer was given).
    """
    if THINK_CLOSE in text:
        return text.rsplit(THINK_CLOSE, 1)[1]
    if think_in_prompt or THINK_OPEN in text:
        return None
    return text


def last_boxed(text: str) -> str | None:
    r"""Content of the last ``\boxed{…}`` (or ``\fbox{…}``), nested braces included.

    Returns:
        The content between the outer braces, stripped; ``None`` when there is no complete box.
    """
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    for start in reversed(starts):
        depth = 1
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i].strip()
    return None


def final_number(text: str) -> str | None:
    """The last number in ``text``, thousands separators removed (``"1,234.5"`` -> ``"1234.5"``)."""
    matches = _NUMBER.findall(text)
    if not matches:
        return None
    return matches[-1].replace(",", "").rstrip(".")


def choice_letter(text: str, letters: str = "ABCD") -> str | None:
    """The multiple-choice letter a response commits to.

    Looks, in order, at the last ``\\boxed{X}``, then "answer is (X)" / "Answer: X", then a line
    holding only a letter. Outside a box the letter must be upper case ("the answer is a bit
    subtle" is no answer). Letters outside ``letters`` are ignored.
    """
    boxed = last_boxed(text)
    if boxed is not None:
        m = re.fullmatch(r"\s*(?:\\text\{)?\(?([A-Za-z])\)?\}?\s*", boxed)
        if m and m.group(1).upper() in letters:
            return m.group(1).upper()
    for pattern in _CHOICE_PATTERNS:
        found = [g for g in pattern.findall(text) if g in letters]
        if found:
            return found[-1]
    return None


def code_block(text: str, language: str = "python") -> str | None:
    """The last fenced code block, preferring blocks tagged with ``language``.

    Returns:
        The block's content without the fences; ``None`` when there is no complete block.
    """
    blocks = _CODE_BLOCK.findall(text)
    if not blocks:
        return None
    tagged = [body for tag, body in blocks if tag.lower() in (language, language[:2])]
    return (tagged or [body for _, body in blocks])[-1]
