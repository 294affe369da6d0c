"""The filters between a written query and a prompt: form, length, language, duplicates,
contamination and solvability.

Each returns a boolean keep-mask (or the agreed answers), so the stage counts what every rule
removed. Lengths, duplicates and contamination are build's own functions
(:mod:`llmdistill.builder.filters`, :mod:`~llmdistill.builder.dedup`,
:mod:`~llmdistill.builder.decontam`); answers are read by the shared checker
(:mod:`llmdistill.checking`), exactly as build's verifier and eval read them.
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from collections.abc import Sequence

import numpy as np

from llmdistill.builder.decontam import NgramIndex, contaminated
from llmdistill.builder.dedup import duplicates
from llmdistill.builder.filters import length_mask
from llmdistill.checking.checkers import Reference, check
from llmdistill.checking.extract import THINK_TAGS

# first word of a letter's Unicode name -> script (CJK covers Han, kana and Hangul)
SCRIPT_OF_NAME = {"LATIN": "latin", "CYRILLIC": "cyrillic", "GREEK": "greek", "CJK": "cjk", "HIRAGANA": "cjk",
                  "KATAKANA": "cjk", "HANGUL": "cjk", "ARABIC": "arabic"}


def well_formed_query(text: str, finish_reason: str, special_tokens: Sequence[str]) -> bool:
    """A query that ended its turn (not cut at the token limit), is not empty, and holds no special token,
    no think tag (an answer leaked into the question), no broken UTF-8 (U+FFFD) and no control character
    other than newline and tab."""
    if finish_reason == "length" or not text.strip() or "\ufffd" in text:
        return False
    if any(t in text for t in (*special_tokens, *THINK_TAGS)):
        return False
    return not any(unicodedata.category(ch) == "Cc" and ch not in "\n\t" for ch in text)


def script_fraction(text: str, script: str) -> float:
    """The fraction of the letters of ``text`` written in ``script`` (1.0 when it has no letter)."""
    letters = [ch for ch in text if ch.isalpha()]
    if not letters:
        return 1.0
    inside = sum(SCRIPT_OF_NAME.get(unicodedata.name(ch, "?").split(" ")[0]) == script for ch in letters)
    return inside / len(letters)


def language_mask(texts: Sequence[str], script: str, min_fraction: float) -> np.ndarray:
    """True for texts whose letters are at least ``min_fraction`` in ``script`` (``any``: all True)."""
    if script == "any":
        return np.ones(len(texts), dtype=bool)
    return np.asarray([script_fraction(t, script) >= min_fraction for t in texts], dtype=bool)


def query_length_mask(n_tokens: Sequence[int], min_tokens: int) -> np.ndarray:
    """True for queries of at least ``min_tokens`` tokens (the upper bound is the writing's token limit)."""
    return length_mask(np.asarray(n_tokens, dtype=np.int64), min_tokens, None)


def unique_mask(texts: Sequence[str], near: bool, threshold: float, ngram: int, num_perm: int) -> np.ndarray:
    """True for the first of every group of exact (and, with ``near``, near-) duplicate texts."""
    if not texts:
        return np.zeros(0, dtype=bool)
    return ~duplicates(list(texts), near=near, threshold=threshold, ngram=ngram, num_perm=num_perm)


def clean_mask(texts: Sequence[str], index: NgramIndex) -> tuple[np.ndarray, Counter]:
    """True for texts that overlap no benchmark problem; and the hits per benchmark."""
    found, hits = contaminated(list(texts), index)
    return np.asarray([not names for names in found], dtype=bool), hits


def voted_answer(checker: str, answers: Sequence[str], finish_reasons: Sequence[str]) -> tuple[str | None, float]:
    """The most common final answer of one query's answers and its share of all of them.

    An answer cut at the token limit, or one the checker reads nothing from, is a vote for none.
    Ties go to the answer seen first.

    Args:
        checker: the shared checker that reads the final answer (``math``, ``numeric``, ...).
        answers: the teacher's n answers (whole responses, think block included).
        finish_reasons: ``stop`` or ``length`` per answer.

    Returns:
        ``(answer, agreement)``; ``(None, 0.0)`` when no answer could be read.
    """
    votes = [check(checker, text, Reference()).extracted if reason != "length" else None
             for text, reason in zip(answers, finish_reasons, strict=True)]
    counts = Counter(v for v in votes if v is not None)
    if not counts:
        return None, 0.0
    answer, count = counts.most_common(1)[0]
    return answer, count / len(votes)
